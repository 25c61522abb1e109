"""experiments.evaluate on generated AFLW2000-3D-layout files (synthetic faces)."""

import numpy as np
import pytest
import scipy.io

import jax
import jax.numpy as jnp

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import fitting, io, synthetic
from dff3d.data import augment
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
    # the true mesh in the photo's pixels, as dense ground truth: x, y projected, z the
    # weak-perspective depth in pixels towards the camera, (mean depth - depth) f / mean depth
    # (built here in NumPy, not with reconstruct.landmarks_to_photo that evaluate uses)
    c = coeffs_lib.split(jnp.asarray(ex["coefficients"])[None], sizes)
    cam, screen, _ = render_lib.camera_vertices(mm.default_model(), c, (96, 96))
    depth = -np.asarray(cam[0, :, 2], np.float64)
    z = (depth.mean() - depth) * camera.default_focal(96) / depth.mean()
    dense = np.concatenate([np.asarray(screen[0, :, :2], np.float64) - 0.5, z[:, None]], 1)
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


# ---- with a checkpoint: a stub regressor stands in for train.load_regressor ------------------

STUB_SIZE = 48  # the regressor's own crop side, unlike CONFIG.image_size (64)


class StubRegressor:
  """crops (B, S, S, 3) -> the same Coefficients (synthetic face 0's) for every crop; records
  the crops it is called with."""

  def __init__(self, image_size):
    self.image_size = image_size
    self.vector = jnp.asarray(synthetic.generate(seed=11, index=0, size=96)["coefficients"])
    self.calls = []

  def __call__(self, images):
    self.calls.append(np.asarray(images))
    batch = jnp.broadcast_to(self.vector, (images.shape[0],) + self.vector.shape)
    return coeffs_lib.split(batch, mm.default_model().sizes)


@pytest.fixture
def stub(monkeypatch):
  from dff3d import train
  regressor = StubRegressor(STUB_SIZE)
  regressor.checkpoints = []
  regressor.flip_averages = []

  def load_regressor(checkpoint, model, flip_average=False):
    regressor.checkpoints.append(checkpoint)
    regressor.flip_averages.append(flip_average)
    return regressor

  monkeypatch.setattr(train, "load_regressor", load_regressor)
  return regressor


def _copy(src, dst):
  import shutil
  for f in src.iterdir():
    if f.is_file():
      shutil.copy(f, dst / f.name)
  return dst


def _gt_points(aflw_dir, i):
  """(68, 2) ground truth of generated image i in dff3d pixels, from its .mat."""
  return scipy.io.loadmat(aflw_dir / f"image{i:05d}.mat")["pt3d_68"][:2].T + 0.5


def test_checkpoint_crops_at_the_regressors_size(aflw_dir, stub):
  res = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                          batch_size=4, checkpoint="shipped")
  assert stub.checkpoints == ["shipped"]  # passed through as is
  assert [c.shape for c in stub.calls] == [(4, STUB_SIZE, STUB_SIZE, 3)]
  image = io.read_image(aflw_dir / "image00002.jpg")
  expected = augment.crop_to_landmarks(image, _gt_points(aflw_dir, 2), STUB_SIZE)[0]
  np.testing.assert_allclose(stub.calls[0][2], expected, atol=1e-5)
  assert res["num_images"] == 3 and res["failures"] == 0
  assert res["face_box"] == "ground_truth" and res["faces_not_found"] == 0
  assert "0 faces not found" in evaluate.summary(res)
  assert stub.flip_averages == [False] and res["flip_average"] is False
  res = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                          batch_size=4, checkpoint="shipped", flip_average=True)
  assert stub.flip_averages == [False, True] and res["flip_average"] is True
  assert "flip-averaged" in evaluate.summary(res)


@pytest.mark.parametrize("broken", ["not_a_mat", "bad_pt3d_68"])
def test_irregular_mat_loads_and_a_broken_one_is_a_failure(aflw_dir, tmp_path, stub, capsys,
                                                           broken):
  d = _copy(aflw_dir, tmp_path)
  mat = {k: v for k, v in scipy.io.loadmat(d / "image00001.mat").items() if k[0] != "_"}
  mat["pt2d"] = np.ones((2, 23))  # as the real image01198.mat
  scipy.io.savemat(d / "image00001.mat", mat)
  if broken == "not_a_mat":
    (d / "image00002.mat").write_bytes(b"broken")
  else:
    mat["pt3d_68"] = np.zeros((3, 67))
    scipy.io.savemat(d / "image00002.mat", mat)
  res = evaluate.evaluate("aflw2000_3d", str(d), mm.default_model(), CONFIG, batch_size=4,
                          checkpoint="ckpt")
  assert res["num_images"] == 2 and res["failures"] == 1 and len(res["per_image_nme"]) == 2
  (line,) = res["failed_images"]
  assert "image00002" in line and "\n" not in line
  assert f"failed: {line}" in capsys.readouterr().err


def test_detector_face_box_two_passes_and_faces_not_found(aflw_dir, stub, monkeypatch):
  from dff3d import detect
  gt = _gt_points(aflw_dir, 0)
  near = np.concatenate([gt.min(0) + 3, gt.max(0) - 3]).astype(np.float32)
  decoy = np.array([0, 0, 12, 12], np.float32)
  face = lambda box: detect.Box(rect=box, score=1.0, source="hog")
  answers = iter([[face(decoy), face(near)], [], [face(near + 2)]])  # images 0, 1, 2
  monkeypatch.setattr(detect, "detect_boxes", lambda image, detector="auto": next(answers))
  res = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                          batch_size=4, checkpoint="ckpt", face_box="detector")
  assert res["face_box"] == "detector" and res["faces_not_found"] == 1
  assert res["num_images"] == 2 and res["failures"] == 1
  assert res["failed_images"] == [f"{aflw_dir / 'image00001.jpg'}: no face detected"]
  assert "1 faces not found" in evaluate.summary(res)
  first, second = stub.calls  # two passes, one batch each
  s = STUB_SIZE
  image = io.read_image(aflw_dir / "image00000.jpg")
  a1 = augment.crop_affine(detect.box_from_rectangle(near), s)
  np.testing.assert_allclose(first[0], augment.warp_affine(image, a1, s, s), atol=1e-5)
  # pass 2 crops at face_box of pass 1's landmarks, mapped from the crop to the photo
  c = coeffs_lib.split(stub.vector[None], mm.default_model().sizes)
  _, screen, _ = render_lib.camera_vertices(mm.default_model(), c, (s, s))
  in_crop = np.asarray(screen[0])[np.asarray(mm.default_model().landmarks), :2]
  scale, shift = a1[0, 0], a1[:, 2]  # crop_affine is a zoom and a shift
  in_photo = (in_crop - shift) / scale
  np.testing.assert_allclose(second[0], augment.crop_to_landmarks(image, in_photo, s)[0],
                             atol=1e-3)


def test_ground_truth_box_second_pass_recrops_at_the_first_passs_landmarks(aflw_dir, stub):
  res = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                          batch_size=4, checkpoint="ckpt", passes=2)
  assert res["passes"] == 2 and res["num_images"] == 3 and "2 passes" in evaluate.summary(res)
  first, second = stub.calls
  s = STUB_SIZE
  image = io.read_image(aflw_dir / "image00002.jpg")
  crop, _, a1 = augment.crop_to_landmarks(image, _gt_points(aflw_dir, 2), s)
  np.testing.assert_allclose(first[2], crop, atol=1e-5)  # pass 1: the one-pass crop
  c = coeffs_lib.split(stub.vector[None], mm.default_model().sizes)
  _, screen, _ = render_lib.camera_vertices(mm.default_model(), c, (s, s))
  in_crop = np.asarray(screen[0])[np.asarray(mm.default_model().landmarks), :2]
  in_photo = (in_crop - a1[:, 2]) / a1[0, 0]
  np.testing.assert_allclose(second[2], augment.crop_to_landmarks(image, in_photo, s)[0],
                             atol=1e-3)
  one = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                          batch_size=4, checkpoint="ckpt")
  assert one["passes"] == 1 and one["per_image_nme"] != res["per_image_nme"]
  with pytest.raises(ValueError, match="--passes=2"):
    evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG, 4, passes=2)


def test_detector_face_box_needs_a_checkpoint(aflw_dir):
  with pytest.raises(ValueError, match="needs --checkpoint"):
    evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG, 4,
                      face_box="detector")


def test_json_safe_replaces_non_finite_floats(tmp_path):
  out = evaluate.json_safe({"a": float("nan"), "b": [1.0, np.float32("inf"), 2], "c": None,
                            "d": {"e": np.float64(3.5)}})
  assert out == {"a": None, "b": [1.0, None, 2], "c": None, "d": {"e": 3.5}}
  io.write_json(tmp_path / "r.json", out)  # strict JSON now


def test_checkpoint_paths_load_a_real_regressor(aflw_dir, tmp_path):
  # No stub: an untrained tiny regressor written as the shipped-weights .npz and as a training
  # workdir (config.json + Orbax checkpoint); evaluate --checkpoint=<either> and the
  # Reconstructor that experiments.reconstruct --checkpoint builds use its parameters.
  import os
  from dff3d import reconstructor, train
  from experiments import configs
  model = mm.default_model()
  cfg = configs.get_config("cpu").replace(image_size=STUB_SIZE, width=0.125, use_dff=False)
  net = train.make_network(cfg, model)
  tx, _ = train.make_optimizer(cfg, 10)
  state = train.create_train_state(jax.random.PRNGKey(4), net, tx, STUB_SIZE)
  # move the head off the mean face so that predictions depend on the image
  state = state.replace(params=jax.tree_util.tree_map(
      lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(5), p.shape), state.params))
  npz = str(tmp_path / "r.npz")
  train.save_params_npz(npz, state.params, cfg, dtype=np.float32)
  workdir = tmp_path / "work"
  os.makedirs(workdir)
  (workdir / "config.json").write_text(train.config_to_json(cfg))
  train.save_checkpoint(train.checkpoint_manager(str(workdir)), state, 1, 0)
  by_npz = evaluate.evaluate("aflw2000_3d", str(aflw_dir), model, CONFIG, batch_size=4,
                             checkpoint=npz)
  by_dir = evaluate.evaluate("aflw2000_3d", str(aflw_dir), model, CONFIG, batch_size=4,
                             checkpoint=str(workdir))
  assert by_npz["num_images"] == 3 and by_npz["failures"] == 0
  np.testing.assert_allclose(by_npz["per_image_nme"], by_dir["per_image_nme"], atol=1e-6)
  # the crops' predictions are the parameters' own
  image = io.read_image(aflw_dir / "image00001.jpg")
  crop = augment.crop_to_landmarks(image, _gt_points(aflw_dir, 1), STUB_SIZE)[0]
  want = train.predict(state.params, jnp.asarray(crop[None]), net=net, model=model)
  rec = reconstructor.Reconstructor(regressor=npz, flip_average=False)
  got = rec.regressor(jnp.asarray(crop[None]))
  assert reconstructor.Reconstructor(regressor=npz).regressor.flip_average  # the job's default
  np.testing.assert_allclose(got.rotation, want.rotation, atol=1e-4)
  np.testing.assert_allclose(got.identity, want.identity, atol=1e-4)
  assert np.abs(np.asarray(want.rotation)).max() > 1e-3  # not the frontal mean face


def test_turned_photos_and_upright_crops(aflw_dir, stub, monkeypatch):
  """--turn_photos turns each photo and its ground truth; --upright crops each face where it
  stands upright (here a stub classifier that reads every face as turned by 180 degrees), so
  the regressor sees the crops of the photos as they were and the figures are the same."""
  from dff3d import orientation
  monkeypatch.setattr(orientation, "load_orientation",
                      lambda path=None: (lambda crops: np.eye(4)[np.full(len(crops), 2)]))
  base = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                           batch_size=4, checkpoint="shipped")
  upright_crops = stub.calls[-1]
  turned = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                             batch_size=4, checkpoint="shipped", turn_deg=180)
  assert turned["turn_deg"] == 180 and turned["quarter_turns"] == [3, 0, 0, 0]
  assert np.abs(stub.calls[-1][:3] - upright_crops[:3]).max() > 0.3  # upside-down crops
  read = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                           batch_size=4, checkpoint="shipped", turn_deg=180, upright=True)
  assert read["quarter_turns"] == [0, 0, 3, 0] and read["upright"] is True
  assert "upright (3 faces read as turned)" in evaluate.summary(read)
  np.testing.assert_allclose(stub.calls[-1][:3], upright_crops[:3], atol=1e-5)
  np.testing.assert_allclose(read["per_image_nme"], base["per_image_nme"], atol=1e-5)
  assert read["nme_3d"] == pytest.approx(base["nme_3d"], abs=1e-5)
  with pytest.raises(ValueError, match="turn_deg"):
    evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                      batch_size=4, checkpoint="shipped", turn_deg=45)


def test_upright_detector_path_searches_turned_photos(aflw_dir, stub, monkeypatch):
  """--upright with the detector's box: a photo where the detector finds nothing is searched
  turned (detect.detect_turned) and the face found there is regressed from its crop box, in
  photo pixels; without --upright it is a face not found."""
  from dff3d import detect
  from dff3d import orientation
  monkeypatch.setattr(orientation, "load_orientation",
                      lambda path=None: (lambda crops: np.eye(4)[np.zeros(len(crops), int)]))
  monkeypatch.setattr(detect, "detect_boxes", lambda image, detector="auto": [])
  gt = _gt_points(aflw_dir, 0)
  box = np.concatenate([gt.min(0) - 8, gt.max(0) + 8]).astype(np.float32)
  box[3] = box[1] + (box[2] - box[0])  # a square crop box
  found = detect.TurnedBox(detect.Box(box, 1.0, "hog"), 1, np.zeros((4, 4, 3)), box, box)
  asked = []
  monkeypatch.setattr(detect, "detect_turned",
                      lambda image, detector="auto": asked.append(detector) or [found])
  res = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                          batch_size=4, checkpoint="ckpt", face_box="detector", upright=True)
  assert res["faces_not_found"] == 0 and res["num_images"] == 3 and asked == ["auto"] * 3
  s = STUB_SIZE
  image = io.read_image(aflw_dir / "image00000.jpg")
  np.testing.assert_allclose(stub.calls[0][0], augment.warp_affine(
      image, augment.crop_affine(box, s), s, s), atol=1e-5)
  res = evaluate.evaluate("aflw2000_3d", str(aflw_dir), mm.default_model(), CONFIG,
                          batch_size=4, checkpoint="ckpt", face_box="detector")
  assert res["faces_not_found"] == 3 and len(asked) == 3
