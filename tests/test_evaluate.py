"""experiments.evaluate on generated AFLW2000-3D-layout files (synthetic faces)."""

import numpy as np
import pytest
import scipy.io

import jax.numpy as jnp

from dff3d import coefficients as coeffs_lib
from dff3d import fitting, io, synthetic
from dff3d import reconstruct as reconstruction
from dff3d import render as render_lib
from dff3d import morphable_model as mm
from experiments import evaluate

CONFIG = fitting.FitConfig(image_size=64, pose_steps=20, shape_steps=40, photo_steps=0)


@pytest.fixture(scope="module")
def aflw_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("aflw")
  sizes = mm.default_model().sizes
  for i in range(3):
    ex = synthetic.generate(seed=11, index=i, size=96)
    io.write_image(d / f"image{i:05d}.jpg", ex["image"])
    yaw = float(ex["coefficients"][sum(sizes[:3]) + 1])
    # the true mesh in the photo's pixels, as dense ground truth (x, y, z towards the camera)
    c = coeffs_lib.split(jnp.asarray(ex["coefficients"])[None], sizes)
    _, screen, _ = render_lib.camera_vertices(mm.default_model(), c, (96, 96))
    dense = reconstruction.landmarks_to_photo(np.asarray(screen[0]), np.eye(2, 3), 96)
    dense[:, :2] -= 0.5
    pts = ex["landmarks"] - 0.5  # AFLW2000-3D: 0-based pixel centres
    (d / "dense").mkdir(exist_ok=True)
    np.save(d / "dense" / f"image{i:05d}.npy", dense)
    lm_ids = np.asarray(mm.default_model().landmarks)
    pt3d = np.concatenate([pts, dense[lm_ids, 2:]], 1).T
    scipy.io.savemat(d / f"image{i:05d}.mat", {
        "pt3d_68": pt3d, "Pose_Para": np.array([[0.0, yaw, 0.0, 0, 0, 0, 1.0]]),
        "pt2d": np.zeros((2, 21)), "roi": np.array([[0, 0, 96, 96]])})
  return d


def test_evaluate_reports_the_papers_figures(aflw_dir):
  res = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                          batch_size=4, landmarks="ground_truth",
                          dense_gt=str(aflw_dir / "dense"))
  assert 0 <= res["nme_3d_dense"] < 0.1 and 0 <= res["nme_3d"] < 0.1
  for key in ("nme_0_30", "nme_30_60", "nme_60_90", "nme_mean", "nme_balanced_mean", "nme_3d",
              "num_images", "failures"):
    assert key in res
  assert res["num_images"] == 3 and res["failures"] == 0
  # fitted to the very landmarks it is scored on: small error
  assert max(res["per_image_nme"]) < 0.08
  groups = [res[k] for k in ("nme_0_30", "nme_30_60", "nme_60_90")]
  finite = [g for g in groups if np.isfinite(g)]
  assert res["nme_mean"] == pytest.approx(np.mean(finite))
  text = evaluate.table(res)
  assert "0-30" in text and "paper" in text


def test_broken_image_is_a_failure_not_a_crash(aflw_dir, tmp_path):
  import shutil
  for f in aflw_dir.iterdir():
    if f.is_file():
      shutil.copy(f, tmp_path / f.name)
  (tmp_path / "image00001.jpg").write_bytes(b"broken")
  res = evaluate.evaluate("aflw2000_3d", str(tmp_path), mm.default_model(), CONFIG,
                          batch_size=4, landmarks="ground_truth")
  assert res["num_images"] == 2 and res["failures"] == 1
  assert "image00001.jpg" in res["failed_images"][0]


def test_lfpa_needs_vertex_ids(tmp_path):
  with pytest.raises(ValueError, match="lfpa_vertices"):
    evaluate.evaluate("aflw_lfpa", str(tmp_path), mm.default_model(), CONFIG, 4)
