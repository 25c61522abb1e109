"""The main job end to end on generated photos with .pts landmarks, plus bad inputs."""

import json

import numpy as np
import pytest
import trimesh

from dff3d import detect, fitting, io, metrics, synthetic
from experiments import reconstruction_job as reconstruct

CONFIG = fitting.FitConfig(image_size=64, pose_steps=20, shape_steps=40, photo_steps=3,
                           photo_size=0)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("photos")
  for i in range(2):
    ex = synthetic.generate(seed=3, index=i, size=96)
    io.write_image(d / f"face{i}.png", ex["image"])
    detect.write_pts(d / f"face{i}.pts", ex["landmarks"])
  (d / "broken.jpg").write_bytes(b"not a jpeg")
  io.write_image(d / "grey.png", np.full((40, 50, 3), 0.5, np.float32))  # no face, no .pts
  return d


def test_job_writes_results_and_reports_failures(photo_dir, tmp_path):
  inputs = reconstruct.list_inputs(str(photo_dir))
  assert [p.split("/")[-1] for p in inputs] == ["broken.jpg", "face0.png", "face1.png",
                                                  "grey.png"]
  out = tmp_path / "out"
  records, failures = reconstruct.run(inputs, str(out), reconstruct.mm.default_model(), CONFIG,
                                      batch_size=2)
  # one line per bad file, the good ones are all written
  failed = {f["image"].split("/")[-1]: f["error"] for f in failures}
  assert set(failed) == {"broken.jpg", "grey.png"}
  assert "broken.jpg: cannot read image" in failed["broken.jpg"]
  assert "\n" not in failed["grey.png"]
  assert json.loads((out / "failures.json").read_text()) == failures
  for i in range(2):
    rec = json.loads((out / f"face{i}.json").read_text())
    face = rec["faces"][0]
    assert set(face) == {"bbox", "landmarks_2d", "landmarks_3d", "pose_deg", "mesh", "overlay",
                         "coefficients"}
    assert np.asarray(face["landmarks_2d"]).shape == (68, 2)
    assert np.asarray(face["landmarks_3d"]).shape == (68, 3)
    assert set(face["pose_deg"]) == {"yaw", "pitch", "roll"}
    mesh = trimesh.load(out / face["mesh"], process=False)
    # trimesh splits vertices along UV seams: the triangles are the model's
    assert len(mesh.faces) == 18460 and len(mesh.vertices) >= 9409
    assert io.read_image(out / face["overlay"]).shape == (96, 96, 3)
    coeffs = np.load(out / face["coefficients"])
    assert coeffs["vector"].shape == (sum(reconstruct.mm.default_model().sizes),)
    # the fit follows the given landmarks (short CPU-test schedule: a loose bound)
    gt = detect.read_pts(photo_dir / f"face{i}.pts")
    nme = metrics.nme_2d(np.asarray(face["landmarks_2d"])[None], gt[None])[0]
    assert nme < 0.08


def test_landmarks_to_photo_inverts_the_crop():
  from dff3d import reconstruct as rec
  from dff3d.data import augment
  affine = augment.crop_affine([10, 20, 110, 120], 50)
  pts = np.stack([np.linspace(0, 50, 68), np.linspace(5, 45, 68), np.full(68, 100.0)], -1)
  out = rec.landmarks_to_photo(pts, affine, 50)
  np.testing.assert_allclose(out[:, 0], 10 + pts[:, 0] * 2, atol=1e-3)
  np.testing.assert_allclose(out[:, 1], 20 + pts[:, 1] * 2, atol=1e-3)
  np.testing.assert_allclose(out[:, 2], 0.0, atol=1e-4)
