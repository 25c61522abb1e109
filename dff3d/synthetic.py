"""Synthetic faces: random identity, expression, pose, lighting, albedo and background,
rendered with the rasterizer, with landmarks and dense correspondence as ground truth.

Everything is a pure function of a PRNG key, so examples are deterministic per seed:
`generate(seed, index, size)` is the single-example numpy view (used by the TFDS builder),
`sample_batch(key, model, batch, size)` the jit-friendly batched one (used for training).

Per example:
  image (S, S, 3) float32 in [0, 1]; landmarks (68, 2) pixels; landmarks_visible (68,) bool
  (facing the camera and not occluded); coefficients (P,) the flat vector (dff3d.coefficients);
  triangle_id (S, S) int32 (-1 background); vertex_id (S, S) int32, the visible triangle's
  vertex with the largest barycentric (-1 background); barycentric (S, S, 3) float32;
  mean_face_position (S, S, 3) float32, the pixel's surface point on the model's mean face
  (model units; the dense correspondence shared by every render of any face); mask (S, S) bool.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import losses
from dff3d import morphable_model as mm
from dff3d import rasterizer
from dff3d import render as render_lib
from dff3d import shading


@flax.struct.dataclass
class SamplerConfig:
  """Ranges of the random faces (angles in degrees, hashable: static under jit)."""
  max_yaw: float = flax.struct.field(pytree_node=False, default=90.0)
  max_pitch: float = flax.struct.field(pytree_node=False, default=20.0)
  max_roll: float = flax.struct.field(pytree_node=False, default=20.0)
  distance_range: tuple = flax.struct.field(pytree_node=False, default=(0.9, 1.15))
  max_shift: float = flax.struct.field(pytree_node=False, default=1.5)  # model units
  albedo_scale: float = flax.struct.field(pytree_node=False, default=0.8)
  expression_power: float = flax.struct.field(pytree_node=False, default=3.0)
  light_jitter: float = flax.struct.field(pytree_node=False, default=0.15)


def sample_coefficients(key, model: mm.MorphableModel, batch: int,
                        config: SamplerConfig = SamplerConfig()):
  """Random Coefficients (batch B).

  identity ~ N(0, 1); albedo ~ N(0, albedo_scale^2); expression: blendshape weights U(0,1)^p
  (mostly small, a few strong) or N(0, 1) for PCA expressions; yaw / pitch / roll uniform in
  +-max degrees; distance DEFAULT_DISTANCE x U(distance_range) and an x/y shift; lighting the
  default light times U(0.6, 1.3) x a U(0.9, 1.1) tint per channel, plus N(0, light_jitter^2) on bands 1-2.
  """
  ks = jax.random.split(key, 8)
  ki, ka, ke = model.sizes[:3]
  if len(model.expression_names):
    expr = jax.random.uniform(ks[2], (batch, ke)) ** config.expression_power
  else:
    expr = jax.random.normal(ks[2], (batch, ke))
  lim = jnp.deg2rad(jnp.array([config.max_pitch, config.max_yaw, config.max_roll]))
  rot = jax.random.uniform(ks[3], (batch, 3), minval=-1.0, maxval=1.0) * lim
  lo, hi = config.distance_range
  dist = camera.DEFAULT_DISTANCE * jax.random.uniform(ks[4], (batch,), minval=lo, maxval=hi)
  shift = jax.random.uniform(ks[5], (batch, 2), minval=-1.0, maxval=1.0) * config.max_shift
  trans = jnp.concatenate([shift, -dist[:, None]], -1)
  base = shading.default_lighting().reshape(3, 9)
  k6a, k6b = jax.random.split(ks[6])
  gain = (jax.random.uniform(k6a, (batch, 1, 1), minval=0.6, maxval=1.3)
          * jax.random.uniform(k6b, (batch, 3, 1), minval=0.9, maxval=1.1))
  jitter = jax.random.normal(ks[7], (batch, 1, 9)) * config.light_jitter  # white light
  jitter = jitter.at[..., 0].set(0.0)
  light = (base[None] * gain + jitter * gain).reshape(batch, 27)
  return coeffs_lib.Coefficients(
      identity=jax.random.normal(ks[0], (batch, ki)),
      albedo=jax.random.normal(ks[1], (batch, ka)) * config.albedo_scale,
      expression=expr, rotation=rot, translation=trans, lighting=light)


def random_background(key, batch: int, size: int):
  """Textured backgrounds: (B, S, S, 3) in [0, 1].

  A sum of colour noise at 4 octaves (4, 8, 16 and 32 cells across, bilinearly upsampled, with
  random amplitudes) plus a random oriented stripe pattern, around a random base colour: no flat
  colours, no faces.
  """
  ks = jax.random.split(key, 8)
  base = jax.random.uniform(ks[0], (batch, 1, 1, 3), minval=0.1, maxval=0.9)
  img = jnp.broadcast_to(base, (batch, size, size, 3))
  for o, cells in enumerate((4, 8, 16, 32)):
    amp = jax.random.uniform(ks[1 + o], (batch, 1, 1, 1), maxval=0.25)
    noise = jax.random.normal(jax.random.fold_in(ks[5], o), (batch, cells, cells, 3))
    img = img + amp * jax.image.resize(noise, (batch, size, size, 3), "linear")
  ang = jax.random.uniform(ks[6], (batch, 1, 1), maxval=math.pi)
  freq = jax.random.uniform(ks[7], (batch, 1, 1), minval=2.0, maxval=12.0) * 2 * math.pi / size
  yy, xx = jnp.meshgrid(jnp.arange(size) + 0.5, jnp.arange(size) + 0.5, indexing="ij")
  stripes = jnp.sin(freq * (jnp.cos(ang) * xx + jnp.sin(ang) * yy))
  img = img + 0.1 * stripes[..., None]
  return jnp.clip(img, 0.0, 1.0)


def landmark_visibility(model: mm.MorphableModel, r: render_lib.Rendering, tolerance=0.02):
  """(B, 68) bool: landmark vertex faces the camera and is the visible surface at its pixel
  (its depth within `tolerance` x depth of the z-buffer there)."""
  lm_ids = model.landmarks
  facing = losses.landmark_visibility(r.normals_cam[:, lm_ids], r.vertices_cam[:, lm_ids]) > 0
  scr = r.screen_vertices[:, lm_ids]
  h, w = r.raster.depth.shape[1:]
  col = jnp.clip(jnp.floor(scr[..., 0]).astype(jnp.int32), 0, w - 1)
  row = jnp.clip(jnp.floor(scr[..., 1]).astype(jnp.int32), 0, h - 1)
  inside = (scr[..., 0] >= 0) & (scr[..., 0] < w) & (scr[..., 1] >= 0) & (scr[..., 1] < h)
  zbuf = jax.vmap(lambda d, i, j: d[i, j])(r.raster.depth, row, col)
  unoccluded = zbuf >= scr[..., 2] * (1.0 - tolerance)
  return facing & inside & unoccluded


def render_examples(model: mm.MorphableModel, c: coeffs_lib.Coefficients, background, size: int):
  """Render Coefficients over backgrounds into the example dict (batched, see module doc)."""
  r = render_lib.render(model, c, (size, size), background=background)
  ids = r.raster.triangle_id
  covered = ids >= 0
  corner = jnp.argmax(r.raster.barycentrics, -1)
  tri_vertices = model.triangles[jnp.maximum(ids, 0)]  # (B, S, S, 3)
  vid = jnp.take_along_axis(tri_vertices, corner[..., None], -1)[..., 0]
  mean_pos = rasterizer.interpolate(model.mean_shape, r.raster, model.triangles)
  return {
      "image": jnp.clip(r.image, 0.0, 1.0),
      "landmarks": r.landmarks_2d,
      "landmarks_visible": landmark_visibility(model, r),
      "coefficients": coeffs_lib.concat(c),
      "triangle_id": ids,
      "vertex_id": jnp.where(covered, vid, -1),
      "barycentric": r.raster.barycentrics,
      "mean_face_position": mean_pos,
      "mask": covered,
  }


@functools.partial(jax.jit, static_argnames=("batch", "size", "config"))
def sample_batch(key, model: mm.MorphableModel, batch: int, size: int,
                 config: SamplerConfig = SamplerConfig()):
  """A batch of random synthetic examples: dict of (B, ...) arrays (see module doc)."""
  k1, k2 = jax.random.split(key)
  c = sample_coefficients(k1, model, batch, config)
  return render_examples(model, c, random_background(k2, batch, size), size)


def example_key(seed: int, index: int):
  """The PRNG key of example `index` of the dataset with `seed` (deterministic)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), index)


def generate(seed: int, index: int, size: int, model: mm.MorphableModel = None,
             config: SamplerConfig = SamplerConfig()):
  """One example as a dict of numpy arrays; the same (seed, index, size) gives the same
  example on every call and machine with the same JAX version."""
  model = mm.default_model() if model is None else model
  batch = sample_batch(example_key(seed, index), model, 1, size, config)
  return {k: np.asarray(v[0]) for k, v in batch.items()}


def pose_pairs(key, model: mm.MorphableModel, batch: int, size: int, max_yaw_diff: float,
               config: SamplerConfig = SamplerConfig()):
  """Two renders of each of B random faces in different poses, lighting and backgrounds.

  The second view's yaw differs from the first by at most max_yaw_diff degrees (both within
  +-config.max_yaw); pitch, roll, distance, lighting and background are re-drawn.
  Returns (view_a, view_b): example dicts as render_examples.
  """
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  a = sample_coefficients(k1, model, batch, config)
  b = sample_coefficients(k2, model, batch, config)
  dyaw = jnp.deg2rad(jax.random.uniform(k3, (batch,), minval=-1.0, maxval=1.0) * max_yaw_diff)
  lim = jnp.deg2rad(config.max_yaw)
  yaw_b = jnp.clip(a.rotation[:, 1] + dyaw, -lim, lim)
  b = b.replace(identity=a.identity, albedo=a.albedo, expression=a.expression,
                rotation=b.rotation.at[:, 1].set(yaw_b))
  view_a = render_examples(model, a, random_background(k4, batch, size), size)
  view_b = render_examples(model, b, random_background(k5, batch, size), size)
  return view_a, view_b
