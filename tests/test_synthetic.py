import jax
import numpy as np
import pytest

from dff3d import morphable_model as mm
from dff3d import synthetic

SIZE = 64


@pytest.fixture(scope="module")
def examples():
  return [synthetic.generate(seed=7, index=i, size=SIZE) for i in range(3)]


def test_deterministic_per_seed_and_index(examples):
  again = synthetic.generate(seed=7, index=1, size=SIZE)
  for k, v in examples[1].items():
    np.testing.assert_array_equal(v, again[k], err_msg=k)
  other = synthetic.generate(seed=8, index=1, size=SIZE)
  assert not np.array_equal(other["image"], again["image"])


def test_shapes_and_ranges(examples):
  ex = examples[0]
  p = sum(mm.default_model().sizes)
  assert ex["image"].shape == (SIZE, SIZE, 3) and ex["image"].dtype == np.float32
  assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
  assert ex["landmarks"].shape == (68, 2) and ex["landmarks_visible"].shape == (68,)
  assert ex["coefficients"].shape == (p,)
  assert ex["vertex_id"].shape == (SIZE, SIZE) and ex["mask"].dtype == bool
  np.testing.assert_array_equal(ex["vertex_id"] >= 0, ex["mask"])
  np.testing.assert_allclose(ex["barycentric"][ex["mask"]].sum(-1), 1.0, atol=1e-5)


def test_visible_landmarks_land_on_the_rendered_face(examples):
  for ex in examples:
    vis = ex["landmarks_visible"]
    assert vis.sum() >= 20  # at most 90 degrees of yaw keeps a good part visible
    pts = ex["landmarks"][vis]
    col, row = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
    assert ((col >= 0) & (col < SIZE) & (row >= 0) & (row < SIZE)).all()
    assert ex["mask"][row, col].mean() > 0.95


def test_dense_correspondence_is_the_mean_face_point(examples):
  model = mm.default_model()
  ex = examples[0]
  m = ex["mask"]
  tri = np.asarray(model.triangles)[ex["triangle_id"][m]]
  mean = np.asarray(model.mean_shape)[tri]  # (M, 3 corners, 3)
  expect = np.einsum("mk,mkc->mc", ex["barycentric"][m], mean)
  np.testing.assert_allclose(ex["mean_face_position"][m], expect, atol=1e-3)
  # the background is not flat: textures, not a constant colour
  assert ex["image"][~m].std() > 0.03


def test_pose_pairs_share_the_face_and_limit_yaw_difference():
  model = mm.default_model()
  a, b = synthetic.pose_pairs(jax.random.PRNGKey(0), model, 4, SIZE, max_yaw_diff=30.0)
  sizes = model.sizes
  ca, cb = np.asarray(a["coefficients"]), np.asarray(b["coefficients"])
  shared = sum(sizes[:3])
  np.testing.assert_array_equal(ca[:, :shared], cb[:, :shared])
  yaw_a, yaw_b = ca[:, shared + 1], cb[:, shared + 1]
  assert (np.abs(np.rad2deg(yaw_a - yaw_b)) <= 30.0 + 1e-3).all()
