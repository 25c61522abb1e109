import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from dff3d import landmarks as lm
from dff3d import losses


def test_landmark_loss_hand_values():
  pred = jnp.zeros((2, 68, 2))
  target = jnp.zeros((2, 68, 2)).at[:, :, 0].set(2.0)  # every point off by 2 px
  # per image: sum_i w_i (2/4)^2 = 0.25 * (52 + 0.5 * 16) = 15
  np.testing.assert_allclose(losses.landmark_loss(pred, target, image_size=4.0), 15.0)
  w = jnp.zeros((68,)).at[0].set(1.0)
  np.testing.assert_allclose(losses.landmark_loss(pred, target, w, image_size=4.0), 0.25)


def test_landmark_error_loss_uses_inner_points_only():
  pred = jnp.zeros((1, 68, 2))
  target = jnp.ones((1, 68, 2))
  err = jnp.ones((68,))
  got = losses.landmark_error_loss(pred, target, err, image_size=1.0)
  np.testing.assert_allclose(got, 2.0 * len(lm.INNER))


def test_photometric_loss_reference():
  rng = np.random.default_rng(0)
  a, b = rng.uniform(size=(2, 5, 6, 3)), rng.uniform(size=(2, 5, 6, 3))
  m = (rng.uniform(size=(2, 5, 6)) > 0.5).astype(np.float64)
  ref = np.mean([(m[i] * np.linalg.norm(a[i] - b[i], axis=-1)).sum() / m[i].sum()
                 for i in range(2)])
  got = losses.photometric_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                jnp.asarray(m, jnp.float32), eps=0.0)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_dff_and_regularization_reference():
  rng = np.random.default_rng(1)
  d1, d2 = rng.normal(size=(2, 68, 4)), rng.normal(size=(2, 68, 4))
  f = (rng.uniform(size=(2, 68)) > 0.3).astype(np.float64)
  ref = np.mean(np.sum(f * np.sum((d1 - d2) ** 2, -1), -1))
  np.testing.assert_allclose(losses.dff_loss(jnp.asarray(d1), jnp.asarray(d2), jnp.asarray(f)),
                             ref, rtol=1e-5)
  a, b, d = jnp.ones((1, 80)), jnp.ones((1, 80)), jnp.ones((1, 64))
  np.testing.assert_allclose(losses.regularization(a, b, d), 80 * 2e-5 + 80 * 2e-2 + 64 * 4e-4,
                             rtol=1e-6)


def test_visibility_from_normals():
  n = jnp.array([[[0, 0, 1.0], [0, 0, -1.0], [1.0, 0, 0]]])
  p = jnp.array([[[0, 0, -100.0], [0, 0, -100.0], [5.0, 0, -100.0]]])
  np.testing.assert_array_equal(losses.landmark_visibility(n, p), [[1, 0, 0]])


def test_loss_gradients_match_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    pred, target = jnp.asarray(rng.normal(size=(1, 68, 2))), jnp.asarray(rng.normal(size=(1, 68, 2)))
    check_grads(lambda p: losses.landmark_loss(p, target, image_size=3.0), (pred,), 1,
                modes=("rev",))
    img = jnp.asarray(rng.uniform(size=(1, 3, 4, 3)))
    ren = jnp.asarray(rng.uniform(size=(1, 3, 4, 3)))
    m = jnp.asarray(rng.uniform(size=(1, 3, 4)))
    check_grads(lambda r, m: losses.photometric_loss(img, r, m), (ren, m), 1, modes=("rev",))


def _np_penalty(d, kind):
  """float64 NumPy reference of losses.point_penalty."""
  if kind == "l2":
    return d ** 2
  if kind == "l1":
    return d
  w, eps = losses.WING_WIDTH, losses.WING_CURVATURE
  c = w - w * np.log1p(w / eps)
  return np.where(d < w, w * np.log1p(d / eps), d - c)


def test_landmark_loss_kinds_match_a_float64_reference():
  rng = np.random.default_rng(3)
  pred = rng.normal(size=(3, 68, 2)) * 6.0
  target = rng.normal(size=(3, 68, 2)) * 6.0
  weights = rng.uniform(size=(3, 68)) * (rng.uniform(size=(3, 68)) > 0.2)
  dist = np.linalg.norm(pred - target, axis=-1) / 96.0
  assert (dist < losses.WING_WIDTH).any() and (dist > losses.WING_WIDTH).any()  # both branches
  for kind in losses.LANDMARK_LOSSES:
    ref = np.mean(np.sum(weights * _np_penalty(dist, kind), -1))
    got = losses.landmark_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                               jnp.asarray(weights, jnp.float32), 96.0, kind)
    np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=kind)
  # l1 is the NME's quantity: the weighted sum of plain distances.
  np.testing.assert_allclose(
      losses.landmark_loss(jnp.zeros((1, 68, 2)), jnp.full((1, 68, 2), 3.0), jnp.ones(68), 1.0,
                           "l1"), 68 * 3.0 * np.sqrt(2.0), rtol=1e-6)


def test_wing_is_continuous_and_weighs_small_errors_more_than_l2():
  w = losses.WING_WIDTH
  below, above = losses.point_penalty(jnp.float32(w - 1e-6), "wing"), losses.point_penalty(
      jnp.float32(w + 1e-6), "wing")
  np.testing.assert_allclose(below, above, atol=1e-5)
  slope = jax.grad(lambda d: losses.point_penalty(d, "wing"))
  small, large = float(slope(jnp.float32(0.005))), float(slope(jnp.float32(0.3)))
  assert small > 3.0 * large  # l2's slope grows with the error instead
  np.testing.assert_allclose(large, 1.0)


def test_landmark_loss_kinds_gradients_match_finite_differences_and_stay_finite_at_zero():
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    pred = jnp.asarray(rng.normal(size=(1, 68, 2)))
    target = jnp.asarray(rng.normal(size=(1, 68, 2)))
    for kind in ("l1", "wing"):
      check_grads(lambda p: losses.landmark_loss(p, target, image_size=3.0, kind=kind), (pred,),
                  1, modes=("rev",))
      g = jax.grad(lambda p: losses.landmark_loss(p, p * 0 + target, image_size=3.0,
                                                  kind=kind))(target)
      assert np.isfinite(np.asarray(g)).all()


def test_unknown_landmark_loss_is_rejected():
  import pytest
  with pytest.raises(ValueError, match="huber"):
    losses.point_penalty(jnp.zeros(3), "huber")
