"""Per-image losses over a batch, differentiated one image at a time.

A loss over rendered images (photometric, silhouette) is a sum of per-image terms. Written
on batch-sized arrays, its forward and backward passes stream every per-pixel plane of all B
images through memory several times: at 224 px one float plane is 0.2 MB per image, which
fits a CPU core's L2 cache, but 3.2 MB at batch 16, which does not, and the batched pipeline
then runs at memory speed (1.3-1.4x the per-image time of batch 1 on a 2-core EPYC; see
BUILD_NOTES.md, "Rasterizer"). `per_image_losses` runs the whole per-image computation,
forward and backward together, image by image in a `lax.map`, so that each image's planes
stay in cache from rasterization to the loss and its gradient.

The per-image function is written with the library's batched API on a batch of one, so the
same code serves both forms.
"""

import jax
import jax.numpy as jnp


def _leading_one(tree):
  return jax.tree_util.tree_map(lambda x: x[None], tree)


def per_image_losses(fn, diff_args, const_args=()):
  """(B,) losses `fn(diff_b, const_b)` of every image b, with reverse-mode gradients that are
  computed image by image together with the values.

  Args:
    fn: `fn(diff, const) -> ()` scalar loss of one image. `diff` and `const` have the
      structure of `diff_args` and `const_args` with a leading batch dimension of 1, so `fn`
      can call the library's batched functions (`rasterizer.rasterize`, `render.render`, ...)
      unchanged. Arrays `fn` closes over are constants: differentiating the result with
      respect to one of them raises JAX's `UnexpectedTracerError` instead of returning a wrong
      gradient.
    diff_args: pytree of floating-point arrays with leading batch B (vertices, colours,
      coefficients): the inputs gradients flow to.
    const_args: pytree of arrays with leading batch B that are not differentiated (target
      images, masks, integer data). Differentiating with respect to them raises the same error.
  Returns:
    (B,) float per-image losses. Under `jax.grad` (reverse mode) the forward pass computes
    each image's value and gradient in one step of a `lax.map` and the backward pass scales the
    stored per-image gradients (the size of `diff_args`) by the incoming cotangents.
    Forward mode (`jax.jvp`) is not supported (it is a `custom_vjp`). Without differentiation
    only the values are computed.
  Raises:
    TypeError: when a leaf of `diff_args` is not floating point.
  """
  for leaf in jax.tree_util.tree_leaves(diff_args):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(f"per_image_losses: diff_args must be floating point, got "
                      f"{jnp.result_type(leaf)}; pass integer data in const_args")

  def one(diff, const):
    return fn(_leading_one(diff), _leading_one(const))

  @jax.custom_vjp
  def losses(diff):
    return jax.lax.map(lambda dc: one(*dc), (diff, const_args))

  def losses_fwd(diff):
    return jax.lax.map(lambda dc: jax.value_and_grad(one)(*dc), (diff, const_args))

  def losses_bwd(grads, g):
    scale = lambda x: x * g.reshape(g.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
    return (jax.tree_util.tree_map(scale, grads),)

  losses.defvjp(losses_fwd, losses_bwd)
  return losses(diff_args)
