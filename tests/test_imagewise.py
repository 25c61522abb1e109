"""Tests for dff3d.imagewise: per-image losses equal the batched computation, values and
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dff3d import imagewise
from dff3d import rasterizer as R
from tests.test_rasterizer import H, W, random_mesh


def _render_loss(tris):
  """(B,) per-image loss of a rasterized, antialiased colour image against a target."""

  def per_image(sv, colours, target):
    raster = R.rasterize(sv, tris, (H, W))
    rgb = R.interpolate(colours, raster, tris)
    mask = raster.mask[..., None]
    out = R.antialias(jnp.concatenate([rgb * mask + 0.5 * (1 - mask), mask], -1), raster, sv,
                      tris)
    return jnp.sum((out[..., :3] - target) ** 2, (1, 2, 3)) + jnp.sum(out[..., 3], (1, 2))

  return per_image


@pytest.fixture(scope="module")
def scene():
  rng = np.random.default_rng(5)
  sv, tris = random_mesh(rng, batch=3, layers=2, per_kind=(10, 20, 1))
  colours = rng.uniform(size=(3, sv.shape[1], 3)).astype(np.float32)
  target = rng.uniform(size=(3, H, W, 3)).astype(np.float32)
  weights = np.array([0.5, -2.0, 3.0], np.float32)  # distinct cotangents per image
  return sv, tris, colours, target, weights


def test_values_and_gradients_match_the_batched_loss(scene):
  sv, tris, colours, target, weights = scene
  batched = _render_loss(tris)
  one = lambda diff, const: batched(*diff, const)[0]

  def weighted_per_image(sv, colours):
    return jnp.sum(weights * imagewise.per_image_losses(one, (sv, colours), target))

  def weighted_batched(sv, colours):
    return jnp.sum(weights * batched(sv, colours, target))

  values = jax.jit(lambda s, c: imagewise.per_image_losses(one, (s, c), target))(sv, colours)
  np.testing.assert_allclose(values, batched(sv, colours, target), rtol=1e-5)
  got = jax.jit(jax.value_and_grad(weighted_per_image, (0, 1)))(sv, colours)
  want = jax.jit(jax.value_and_grad(weighted_batched, (0, 1)))(sv, colours)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    assert np.abs(np.asarray(w)).max() > 0
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(np.asarray(w)).max())


def test_pytree_arguments_and_a_batch_of_one():
  fn = lambda diff, const: jnp.sum(jnp.sin(diff["a"]) * const[0]) + jnp.sum(diff["b"] ** 2)
  a = jnp.arange(4.0).reshape(1, 4)
  b = jnp.ones((1, 2, 2))
  k = jnp.full((1, 4), 2.0)
  loss, grads = jax.value_and_grad(
      lambda a, b: jnp.sum(3.0 * imagewise.per_image_losses(fn, {"a": a, "b": b}, (k,))),
      (0, 1))(a, b)
  np.testing.assert_allclose(loss, 3.0 * (2.0 * np.sum(np.sin(np.arange(4.0))) + 4.0),
                             rtol=1e-6)
  np.testing.assert_allclose(grads[0], 6.0 * np.cos(np.arange(4.0))[None], rtol=1e-6)
  np.testing.assert_allclose(grads[1], 6.0 * np.ones((1, 2, 2)), rtol=1e-6)


def test_integer_differentiable_argument_is_refused():
  with pytest.raises(TypeError, match="per_image_losses: diff_args must be floating point"):
    imagewise.per_image_losses(lambda d, c: jnp.sum(d), jnp.ones((2, 3), jnp.int32))


def test_differentiating_a_constant_raises_instead_of_a_wrong_gradient():
  a = jnp.ones((2, 3))

  def loss(target):
    return jnp.sum(imagewise.per_image_losses(lambda d, c: jnp.sum(d * c), a, target))

  with pytest.raises(jax.errors.UnexpectedTracerError):
    jax.grad(loss)(jnp.ones((2, 3)))
