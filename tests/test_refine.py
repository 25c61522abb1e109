"""dff3d.refine (the landmark refiner), fitting.fit_anchored and experiments.train_refiner."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dff3d import fitting, io, metrics, refine, synthetic, train
from dff3d import coefficients as coeffs_lib
from dff3d import landmarks as lm
from dff3d import morphable_model as mm

from tests.conftest import SHARED_DATA, require

SAMPLE_DIR = SHARED_DATA / "aflw2000_3d_sample"


def _bilinear_reference(image, x, y):
  """float64 NumPy bilinear sample at continuous crop coordinates (dff3d convention: pixel i
  covers [i, i + 1)), edge pixels repeated outside."""
  h, w = image.shape[:2]
  u, v = x - 0.5, y - 0.5
  x0 = int(np.clip(np.floor(u), 0, w - 2))
  y0 = int(np.clip(np.floor(v), 0, h - 2))
  fx, fy = np.clip(u - x0, 0, 1), np.clip(v - y0, 0, 1)
  im = image.astype(np.float64)
  return ((im[y0, x0] * (1 - fx) + im[y0, x0 + 1] * fx) * (1 - fy)
          + (im[y0 + 1, x0] * (1 - fx) + im[y0 + 1, x0 + 1] * fx) * fy)


def test_patches_match_a_float64_bilinear_reference():
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(20, 24, 3)).astype(np.float32)
  points = np.array([[5.3, 7.9], [12.0, 10.5], [0.2, 19.7], [23.9, 0.1]], np.float32)
  got = np.asarray(refine.patches(jnp.asarray(image), jnp.asarray(points), 5, 1.5))
  assert got.shape == (4, 5, 5, 3)
  for k, (px, py) in enumerate(points):
    for i in range(5):
      for j in range(5):
        x, y = px + (j - 2) * 1.5, py + (i - 2) * 1.5
        np.testing.assert_allclose(got[k, i, j], _bilinear_reference(image, x, y), atol=1e-5)


def test_patch_at_a_pixel_centre_is_the_pixels():
  image = np.arange(10 * 10 * 3, dtype=np.float32).reshape(10, 10, 3)
  got = np.asarray(refine.patches(jnp.asarray(image), jnp.array([[4.5, 6.5]]), 3, 1.0))[0]
  np.testing.assert_allclose(got, image[5:8, 3:6], atol=1e-4)


def _net_and_params(seed=0):
  net = refine.make_network(refine.DEFAULTS)
  params = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 96, 96, 3)),
                    jnp.zeros((1, 68, 2)))["params"]
  return net, params


def _face_points(n=2, seed=0):
  """Plausible 68-point sets in a 96 px crop (the mean face, shifted)."""
  model = mm.default_model()
  c = mm.zero_coefficients(model, n)
  problem = fitting.landmark_problem(model, False)
  pts = np.asarray(fitting.predicted_landmarks(problem, c, 96, False))
  return pts + np.random.default_rng(seed).normal(0, 2, (n, 1, 2)).astype(np.float32)


def test_untrained_refiner_returns_its_input():
  net, params = _net_and_params()
  pts = jnp.asarray(_face_points())
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 96, 96, 3))
  np.testing.assert_allclose(np.asarray(net.apply({"params": params}, x, pts)), pts, atol=1e-5)


def test_mirror_points_flips_x_and_swaps_sides():
  pts = _face_points(1)[0]
  m = np.asarray(refine.mirror_points(jnp.asarray(pts), 96.0))
  perm = np.asarray(lm.FLIP_PERMUTATION)
  np.testing.assert_allclose(m[:, 0], 96.0 - pts[perm, 0])
  np.testing.assert_allclose(m[:, 1], pts[perm, 1])
  np.testing.assert_allclose(np.asarray(refine.mirror_points(jnp.asarray(m), 96.0)), pts,
                             atol=1e-5)
  # the mirrored face's left eye corner (36) is the original's right one (45), mirrored
  np.testing.assert_allclose(m[36, 0], 96.0 - pts[45, 0])


def test_perturb_points_draws_the_stated_jitter():
  pts = jnp.asarray(np.repeat(_face_points(1), 4000, 0))
  size = float(refine.box_size(pts[:1])[0])
  same = refine.perturb_points(jax.random.PRNGKey(0), pts, 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_allclose(np.asarray(same), np.asarray(pts), atol=1e-4)
  shifted = np.asarray(refine.perturb_points(jax.random.PRNGKey(0), pts, 0.0, 0.03, 0.0, 0.0))
  move = (shifted - np.asarray(pts)).mean(1)  # a pure shift moves every point alike
  assert np.std(shifted - np.asarray(pts) - move[:, None]) < 1e-3
  assert np.std(move) / size == pytest.approx(0.03, rel=0.05)
  zoomed = np.asarray(refine.perturb_points(jax.random.PRNGKey(1), pts, 0.04, 0.0, 0.0, 0.0))
  ratio = np.asarray(refine.box_size(jnp.asarray(zoomed))) / size
  assert np.std(ratio) == pytest.approx(0.04, rel=0.08)


def test_nme_loss_is_the_benchmark_metric():
  rng = np.random.default_rng(2)
  target = _face_points(3)
  pred = target + rng.normal(0, 1.5, target.shape).astype(np.float32)
  assert float(refine.nme_loss(jnp.asarray(pred), jnp.asarray(target))) == pytest.approx(
      float(np.mean(metrics.nme_2d(pred, target))), rel=1e-5)


def test_file_round_trip_and_one_line_errors(tmp_path):
  _, params = _net_and_params(3)
  path = tmp_path / "refiner.npz"
  refine.save_refiner(path, params)
  net, loaded, config = refine.load_refiner_params(path)
  assert config["image_size"] == 96
  leaves = zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded))
  for a, b in leaves:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3, rtol=2e-3)
  fn = refine.load_refiner(path, flip_average=False)
  assert fn.image_size == 96
  with pytest.raises(refine.RefinerFileError, match="missing.npz: landmark refiner file not"):
    refine.load_refiner(tmp_path / "missing.npz")
  bad = dict(refine.DEFAULTS, hidden=[256, 128])
  refine.save_refiner(tmp_path / "other.npz", params, bad)
  with pytest.raises(refine.RefinerFileError, match="other.npz: .*shape"):
    refine.load_refiner(tmp_path / "other.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(refine.RefinerFileError, match="junk.npz: not a readable"):
    refine.load_refiner(tmp_path / "junk.npz")


def test_flip_averaged_refiner_is_mirror_consistent(tmp_path):
  """With flip averaging, refining the mirror image gives the mirrored answer."""
  _, params = _net_and_params(4)
  # give the zero-initialised last layer weights, so the refiner moves points
  params = jax.tree_util.tree_map(lambda a: a, params)
  last = max(k for k in params if k.startswith("Dense_"))
  params[last]["kernel"] = 0.01 * jax.random.normal(jax.random.PRNGKey(5),
                                                    params[last]["kernel"].shape)
  refine.save_refiner(tmp_path / "r.npz", params)
  fn = refine.load_refiner(tmp_path / "r.npz", flip_average=True)
  x = jax.random.uniform(jax.random.PRNGKey(6), (1, 96, 96, 3))
  pts = jnp.asarray(_face_points(1))
  out = np.asarray(fn(x, pts))
  assert np.abs(out - np.asarray(pts)).max() > 0.05  # it does move them
  mirrored = np.asarray(fn(x[:, :, ::-1], refine.mirror_points(pts, 96.0)))
  np.testing.assert_allclose(np.asarray(refine.mirror_points(jnp.asarray(mirrored), 96.0)),
                             out, atol=2e-3)


def _sample_faces(n=2):
  model = mm.default_model()
  vec = np.stack([synthetic.generate(seed=5, index=i, size=96)["coefficients"]
                  for i in range(n)])
  return model, coeffs_lib.split(jnp.asarray(vec), model.sizes)


def test_fit_anchored_keeps_a_face_on_its_own_points():
  model, c = _sample_faces()
  problem = fitting.landmark_problem(model, False)
  pts = fitting.predicted_landmarks(problem, c, 96, False)
  c2 = fitting.fit_anchored(model, c, pts, 96)
  np.testing.assert_allclose(np.asarray(fitting.predicted_landmarks(problem, c2, 96, False)),
                             np.asarray(pts), atol=0.05)


def test_fit_anchored_moves_the_face_to_new_points_and_the_anchor_holds_it():
  model, c = _sample_faces()
  problem = fitting.landmark_problem(model, False)
  pts = np.asarray(fitting.predicted_landmarks(problem, c, 96, False))
  rng = np.random.default_rng(7)
  # a face-like change: the mouth opens and the whole face moves 1.5 px right
  target = pts.copy()
  target[:, 48:] += np.array([0.0, 1.0], np.float32) * np.where(
      np.arange(48, 68) >= 57, 1.0, 0.0)[None, :, None]
  target[..., 0] += 1.5
  target += rng.normal(0, 0.05, target.shape).astype(np.float32)
  before = np.abs(pts - target).mean()
  moved = fitting.fit_anchored(model, c, target, 96)
  after = np.abs(np.asarray(fitting.predicted_landmarks(problem, moved, 96, False))
                 - target).mean()
  assert after < 0.35 * before
  held = fitting.fit_anchored(model, c, target, 96, anchor=1e3)
  held_pts = np.asarray(fitting.predicted_landmarks(problem, held, 96, False))
  # (Adam's last steps still jitter by about its rate: a tenth of a pixel here)
  assert np.abs(held_pts - pts).mean() < 0.1 * np.abs(target - pts).mean()
  # albedo and lighting are not touched
  np.testing.assert_array_equal(np.asarray(moved.albedo), np.asarray(c.albedo))
  np.testing.assert_array_equal(np.asarray(moved.lighting), np.asarray(c.lighting))


def test_fit_anchored_gradient_matches_finite_differences():
  """The objective fit_anchored descends: its gradient against central differences (float64
  NumPy evaluation of the same objective through the model's points)."""
  model, c = _sample_faces(1)
  problem = fitting.landmark_problem(model, False)
  target = np.asarray(fitting.predicted_landmarks(problem, c, 96, False)) + 0.7

  def objective(t):
    moved = c.replace(translation=t)
    pred = fitting.predicted_landmarks(problem, moved, 96, False)
    land = jnp.sum(jnp.square((pred - target) / 96.0))
    return land + 1e-3 * jnp.sum(jnp.square((t - c.translation) / fitting.FIELD_SCALES[
        "translation"]))

  t0 = c.translation + jnp.array([[0.3, -0.2, 0.5]])
  g = np.asarray(jax.grad(objective)(t0))[0]
  eps = 1e-2
  for axis in range(3):
    d = np.zeros((1, 3), np.float32)
    d[0, axis] = eps
    fd = (float(objective(t0 + d)) - float(objective(t0 - d))) / (2 * eps)
    assert g[axis] == pytest.approx(fd, rel=2e-2, abs=1e-7)


def test_refine_faces_with_an_untrained_refiner_keeps_the_faces(tmp_path):
  _, params = _net_and_params()
  refine.save_refiner(tmp_path / "r.npz", params)
  fn = refine.load_refiner(tmp_path / "r.npz")
  model, c = _sample_faces()
  crops = jax.random.uniform(jax.random.PRNGKey(0), (2, 96, 96, 3))
  out = refine.refine_faces(model, fn, crops, c)
  problem = fitting.landmark_problem(model, False)
  np.testing.assert_allclose(np.asarray(fitting.predicted_landmarks(problem, out, 96, False)),
                             np.asarray(fitting.predicted_landmarks(problem, c, 96, False)),
                             atol=0.05)
  with pytest.raises(ValueError, match="refiner reads 96 px crops, these are 64 px"):
    refine.refine_faces(model, fn, crops[:, :64, :64], c)


def test_shipped_refiner_loads():
  fn = refine.load_refiner()
  assert fn.image_size == train.load_regressor().image_size


def test_shipped_refiner_improves_the_regressor_on_the_sample_photos():
  """The 16 AFLW2000-3D sample photos (neither dev nor test), ground-truth box, upright:
  refined landmarks closer to the ground truth than the regressor's, on average."""
  require(SAMPLE_DIR)
  from dff3d import reconstruction
  from dff3d.datasets import aflw2000_3d
  model = mm.default_model()
  regressor = train.load_regressor("shipped", model, flip_average=True)
  pairs = aflw2000_3d.list_aflw2000_3d(SAMPLE_DIR).pairs
  faces = [(io.read_image(p), aflw2000_3d.ground_truth(m)["gt_2d"]) for p, m in pairs]
  config = fitting.FitConfig(image_size=regressor.image_size, photo_steps=0, contour="fixed")
  gt = np.stack([pts for _, pts in faces])
  nme = {}
  for name, refiner in (("regressor", None), ("refined", refine.load_refiner())):
    out = reconstruction.reconstruct_faces(model, faces, config, 16, regressor,
                                           refiner=refiner)
    nme[name] = float(np.mean(metrics.nme_2d(np.stack([f.landmarks_2d for f in out]), gt)))
  assert nme["refined"] < nme["regressor"] - 0.001, nme


# ---- the launcher on a generated AFLW layout ------------------------------------------------

def test_train_refiner_runs_resumes_and_writes_a_loadable_file(tmp_path):
  # In a subprocess: the launcher defines absl flags (--batch_size, ...) that other launchers
  # imported by the test session define too.
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  from tests.test_aflw_3ddfa import _write_layout, _write_pseudo68
  aflw = tmp_path / "aflw"
  names, _, _, _ = _write_layout(aflw)
  _write_pseudo68(aflw, names)
  work, out = tmp_path / "work", tmp_path / "refiner.npz"
  command = [sys.executable, "-m", "experiments.train_refiner", f"--aflw_dir={aflw}",
             f"--pseudo68={aflw / 'AFLW_GT_pseudo68.npz'}", f"--workdir={work}",
             f"--output={out}", "--batch_size=2", "--steps_per_epoch=2"]

  def run(epochs):
    done = subprocess.run(command + [f"--epochs={epochs}"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout

  run(1)
  assert (work / "stage1.npz").is_file() and out.is_file()
  with np.load(work / "stage1.npz") as z:
    assert z["train_pred"].shape == (4, 68, 2) and z["val_label"].shape == (2, 68, 2)
    assert z["train_image"].dtype == np.uint8 and z["train_image"].shape[1:] == (96, 96, 3)
  assert "resumed after epoch 1" in run(2)
  records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2]
  assert all(np.isfinite(r["val_nme"]) and np.isfinite(r["loss"]) for r in records)
  assert refine.load_refiner(out).image_size == 96


def test_reconstructor_refines_only_the_shipped_regressor_by_default(tmp_path):
  from dff3d import reconstructor
  shipped = reconstructor.Reconstructor(turned_photos=False, orientation=None)
  assert shipped.refiner is not None and shipped.refiner.image_size == 96
  assert reconstructor.Reconstructor(orientation=None, refiner=None).refiner is None

  class Other:  # another regressor: its errors are not the ones the refiner learned
    image_size = 64

    def __call__(self, crops):
      raise AssertionError("not called")

  assert reconstructor.Reconstructor(regressor=Other(), orientation=None).refiner is None
  with pytest.raises(ValueError, match="refiner reads 96 px crops, the regressor 64 px"):
    reconstructor.Reconstructor(regressor=Other(), orientation=None, refiner="shipped")


def test_evaluate_refiner_needs_a_checkpoint(tmp_path):
  from experiments import evaluate
  with pytest.raises(ValueError, match="--refiner needs --checkpoint"):
    evaluate.evaluate("aflw2000_3d", str(tmp_path), mm.default_model(), fitting.FitConfig(), 4,
                      refiner="shipped")
