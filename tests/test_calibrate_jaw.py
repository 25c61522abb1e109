"""data_prep.calibrate_jaw: the jaw vertices that reproduce 3D labels and the AFLW-21 vertices
that reproduce hand clicks are found again; the pseudo-68 construction on the sample images."""

import jax.numpy as jnp
import numpy as np
import pytest

from data_prep import calibrate_jaw, convert_ict
from dff3d import camera
from dff3d import landmark_sets
from dff3d import metrics
from dff3d import morphable_model as mm
from dff3d.data import real
from tests.conftest import AFLW_SAMPLE_DIR, require

# ICT-FaceKit's own jaw vertices (the source archive's landmarks_68[:17]), 1.4-2.6 cm further
# forward than JAW_VERTICES.
ICT_SOURCE_JAW = (1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924,
                  2608, 3272, 4088, 3443)


def _labels(model, jaw, yaws):
  """pt3d_68-like labels (B, 68, 3) of random faces whose jaw points are `jaw` vertices: an
  orthographic view, x right and y down in pixels, z = s Z (so (x, -y, z) is a similarity of
  the posed face)."""
  rng = np.random.default_rng(0)
  ids = np.asarray(model.landmarks).copy()
  ids[:17] = jaw
  out = []
  for yaw in yaws:
    ident = jnp.asarray(rng.normal(size=(1, model.sizes[0])) * 0.5, jnp.float32)
    v = np.asarray(mm.shape(model, ident, jnp.zeros((1, model.sizes[2]))))[0]
    r = np.asarray(camera.rotation_matrix(jnp.asarray([0.1, np.deg2rad(yaw), -0.05])))
    cam = v[ids] @ r.T
    s = 12.0
    out.append(np.stack([225 + s * cam[:, 0], 225 - s * cam[:, 1], s * cam[:, 2]], 1))
  return np.stack(out)


@pytest.mark.parametrize("current_jaw", [convert_ict.JAW_VERTICES, ICT_SOURCE_JAW])
def test_calibration_finds_the_labels_jaw_vertices(current_jaw):
  model = mm.default_model()
  ids = np.asarray(model.landmarks).copy()
  ids[:17] = current_jaw
  model = model.replace(landmarks=jnp.asarray(ids, model.landmarks.dtype))
  truth = np.asarray(convert_ict.JAW_VERTICES)
  gt = _labels(model, truth, [-60.0, -35.0, -10.0, 5.0, 30.0, 65.0])
  cal = calibrate_jaw.calibrate(model, gt[..., :2], gt)
  mean = np.asarray(model.mean_shape)
  moved = np.linalg.norm(mean[cal.vertices] - mean[truth], axis=-1)
  assert np.median(cal.align_rms) < 0.3  # the inner points align (model units: cm)
  assert moved.max() < 0.35 and cal.rms.mean() < 0.5
  mirror = calibrate_jaw.mirror_map(mean)
  np.testing.assert_array_equal(mirror[cal.vertices], cal.vertices[::-1])
  if current_jaw == ICT_SOURCE_JAW:
    assert cal.rms_before.mean() > 1.5  # the forward jaw is far from these labels


def test_aflw21_calibration_finds_the_clicked_vertices():
  """Hand clicks projected from known vertices (the geometric rules' ear lobes and nose sides,
  not the calibrated pairs the embedded model uses now) are found again, and the current
  pairs score worse."""
  model = mm.default_model()
  moved = model.replace(mean_shape=model.mean_shape + jnp.array([0.0, 1e-3, 0.0]))
  rule, _ = landmark_sets.AFLW21.vertices(moved)
  rows = [12, 16, 13, 15]
  truth = rule[rows, 0]
  calibrated = landmark_sets.CALIBRATED_AFLW21[landmark_sets.mesh_key(model)]
  assert all(calibrated[k] != t for k, t in zip(rows, truth))
  rng = np.random.default_rng(1)
  pt3d, hand = [], []
  for yaw in [-60.0, -35.0, -10.0, 5.0, 30.0, 65.0]:
    ident = jnp.asarray(rng.normal(size=(1, model.sizes[0])) * 0.5, jnp.float32)
    v = np.asarray(mm.shape(model, ident, jnp.zeros((1, model.sizes[2]))))[0]
    r = np.asarray(camera.rotation_matrix(jnp.asarray([0.1, np.deg2rad(yaw), -0.05])))
    cam = v @ r.T
    to_px = lambda c: np.stack([225 + 12.0 * c[:, 0], 225 - 12.0 * c[:, 1], 12.0 * c[:, 2]], 1)
    pt3d.append(to_px(cam[np.asarray(model.landmarks)]))
    h = np.zeros((21, 2))
    h[rows] = to_px(cam[truth])[:, :2]
    hand.append(h)
  visible = np.zeros((6, 21), bool)
  visible[:, rows] = True
  visible[0, 16] = False  # a hidden lobe is simply left out
  pt2d = np.stack(pt3d)[..., :2]
  ears, noses = calibrate_jaw.calibrate_aflw21(model, pt2d, np.stack(hand), visible)
  mean = np.asarray(model.mean_shape)
  mirror = calibrate_jaw.mirror_map(mean)
  for cal, want, count in [(ears, truth[:2], 11), (noses, truth[2:], 12)]:
    assert cal.count == count
    assert np.linalg.norm(mean[cal.vertices] - mean[want], axis=-1).max() < 0.6
    np.testing.assert_array_equal(mirror[cal.vertices], cal.vertices[::-1])
  # the fit to inner points does not pin each face's ears: ~5 % of the box remains at the truth
  assert ears.rms < 0.07 and ears.rms_before > 1.8 * ears.rms
  assert noses.rms < 0.03 and noses.rms_before > noses.rms
  with pytest.raises(ValueError, match="points 12 and 16: no visible hand click"):
    calibrate_jaw.calibrate_aflw21(model, pt2d, np.stack(hand), np.zeros((6, 21), bool))


def test_pseudo68_of_the_sample_hand_clicks_matches_their_ground_truth():
  """The pseudo-68 construction (fit to AFLW's 21 hand clicks) on the 16 sample images, against
  their 68-point ground truth: 3.45 % NME with the calibrated ear lobes and nose sides and the
  pseudo-68 priors; the rules' vertices at the per-image fit's priors gave 4.87 %."""
  pt3d, pt2d, visible = calibrate_jaw.load_hand_points(require(AFLW_SAMPLE_DIR))
  affines = calibrate_jaw.crop_affines(pt3d[..., :2])
  crop = lambda pts: calibrate_jaw.crop_points(affines, pts)
  p68, _ = real.fit_pseudo68(mm.default_model(), crop(pt2d), visible, calibrate_jaw.CROP)
  nme = metrics.nme_2d(p68, crop(pt3d[..., :2]))
  assert len(nme) == 16 and np.mean(nme) < 0.037
