"""data_prep.calibrate_jaw: the jaw vertices that reproduce 3D labels are found again."""

import jax.numpy as jnp
import numpy as np
import pytest

from data_prep import calibrate_jaw, convert_ict
from dff3d import camera
from dff3d import morphable_model as mm

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
