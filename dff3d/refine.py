"""Second look: a local-patch refiner of the regressor's 68 landmarks (stage 2).

The regressor reads a whole 96 px crop through a global average pool and answers with
coefficients, whose 68 projected points carry its own per-image error (BUILD_NOTES, "Session
17": the error is the network's, not its labels'). The refiner looks again, locally: it
samples a small patch of the crop around each of the regressor's points, describes every
patch with one small shared CNN, and reads all 68 descriptions together with the points'
normalised shape to move each point:

    refine = refine_lib.load_refiner()              # the shipped refiner
    points = refine(crops, points)                   # (B, S, S, 3) in [0, 1], (B, 68, 2)

It works in the regressor's crop (crop pixels, dff3d's convention: pixel i covers [i, i+1)),
so everything downstream (the way back to the photo through the crop's affine) is unchanged.
`fit_to_points` then moves the regressed face to the refined points (pose, identity and
expression, pulled towards the regressor's own coefficients), so the mesh, the 3D landmarks
and the 2D landmarks stay one face.

Training (experiments/train_refiner.py): AFLW training crops, the shipped regressor's
flip-averaged points as the input (jittered by a small random similarity and per-point noise,
so the refiner sees errors like the regressor's on unseen faces), the pseudo-68 labels as the
target, mirror and colour augmentation. Data, command and figures: BUILD_NOTES ("Session 19").
"""

import os
from typing import Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dff3d import coefficients as coeffs_lib
from dff3d import fitting
from dff3d import landmarks as lm
from dff3d import morphable_model as mm
from dff3d.models import param_files

SHIPPED_REFINER = os.path.join(mm.ASSET_DIR, "refiner.npz")
CONFIG_KEY = "refiner_config_json"
# fitting.fit_anchored's settings after refinement, chosen on AFLW validation crops
# (BUILD_NOTES, "Session 19").
REFIT_STEPS = 60
REFIT_ANCHOR = 1e-4
REFIT_LEARNING_RATE = 0.03
DEFAULTS = {"image_size": 96, "patch": 16, "spacing": 1.0, "channels": [16, 32, 32, 64],
            "strides": [1, 2, 1, 2], "hidden": [1024, 512], "num_points": 68}


class RefinerFileError(ValueError):
  """A refiner file that is missing, unreadable or does not match its network."""


def box_size(points) -> jnp.ndarray:
  """(B,) sqrt(w h) of the points' bounding box (the NME normaliser) for points (B, K, 2)."""
  return jnp.sqrt(jnp.prod(points.max(-2) - points.min(-2), -1))


def patches(image, points, patch: int, spacing: float) -> jnp.ndarray:
  """Bilinear patches around points: image (S, S, C), points (K, 2) crop pixels ->
  (K, patch, patch, C), sample (i, j) at point + ((j, i) - (patch - 1) / 2) * spacing.
  Samples outside the image take the nearest edge pixel."""
  g = (jnp.arange(patch) - (patch - 1) / 2) * spacing
  gx, gy = jnp.meshgrid(g, g)
  # pixel i's centre is at i + 0.5
  x = points[:, None, None, 0] + gx - 0.5
  y = points[:, None, None, 1] + gy - 0.5
  h, w = image.shape[:2]
  x0 = jnp.clip(jnp.floor(x), 0, w - 2)
  y0 = jnp.clip(jnp.floor(y), 0, h - 2)
  fx = jnp.clip(x - x0, 0, 1)[..., None]
  fy = jnp.clip(y - y0, 0, 1)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  at = lambda yy, xx: image[yy, xx]
  top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
  bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
  return top * (1 - fy) + bottom * fy


class PatchRefiner(nn.Module):
  """(images (B, S, S, 3) in [0, 1], points (B, K, 2) crop pixels) -> refined (B, K, 2).

  Each point's patch goes through one shared CNN (3x3 convs, GroupNorm, ReLU, mean pool);
  the K descriptions and the points' shape (centred, divided by their box size) feed an MLP
  whose output, times a tenth of the box size, moves each point. The last layer starts at
  zero: an untrained refiner returns its input."""
  patch: int = 16
  spacing: float = 1.0
  channels: Sequence[int] = (16, 32, 32, 64)
  strides: Sequence[int] = (1, 2, 1, 2)
  hidden: Sequence[int] = (1024, 512)

  @nn.compact
  def __call__(self, images, points):
    b, k = points.shape[:2]
    centre = points.mean(1, keepdims=True)
    scale = box_size(points)[:, None, None] + 1e-3
    x = jax.vmap(lambda im, p: patches(im, p, self.patch, self.spacing))(images, points)
    h = x.reshape((b * k,) + x.shape[2:]) - 0.5
    for ch, stride in zip(self.channels, self.strides):
      h = nn.relu(nn.GroupNorm(num_groups=8)(nn.Conv(ch, (3, 3), strides=stride)(h)))
    h = h.mean((1, 2)).reshape(b, k * self.channels[-1])
    shape = ((points - centre) / scale).reshape(b, k * 2)
    z = jnp.concatenate([h, shape * 10.0], -1)
    for width in self.hidden:
      z = nn.relu(nn.Dense(width)(z))
    move = nn.Dense(k * 2, kernel_init=nn.initializers.zeros)(z).reshape(b, k, 2)
    return points + move * scale * 0.1


def perturb_points(key, points, scale: float = 0.04, shift: float = 0.03,
                   rotation_deg: float = 4.0, per_point: float = 0.015) -> jnp.ndarray:
  """Training jitter of points (B, K, 2): a random similarity about their centre (scale
  N(1, scale), rotation N(0, rotation_deg) degrees, shift N(0, shift) of the box size per
  axis), then independent N(0, per_point) of the box size on every point."""
  b = points.shape[0]
  k_scale, k_rot, k_shift, k_point = jax.random.split(key, 4)
  size = box_size(points)[:, None, None]
  centre = points.mean(1, keepdims=True)
  zoom = 1.0 + scale * jax.random.normal(k_scale, (b, 1, 1))
  a = jnp.deg2rad(rotation_deg) * jax.random.normal(k_rot, (b,))
  rot = jnp.stack([jnp.stack([jnp.cos(a), -jnp.sin(a)], -1),
                   jnp.stack([jnp.sin(a), jnp.cos(a)], -1)], -2)
  moved = jnp.einsum("bij,bkj->bki", rot, points - centre) * zoom + centre
  moved = moved + shift * size * jax.random.normal(k_shift, (b, 1, 2))
  return moved + per_point * size * jax.random.normal(k_point, points.shape)


def nme_loss(pred, target) -> jnp.ndarray:
  """Mean over the batch of each example's mean point distance over its target's box size
  (the AFLW2000-3D NME): pred, target (B, K, 2) -> scalar."""
  dist = jnp.linalg.norm(pred - target, axis=-1).mean(-1)
  return jnp.mean(dist / box_size(target))


def make_network(config: dict) -> PatchRefiner:
  return PatchRefiner(patch=int(config["patch"]), spacing=float(config["spacing"]),
                      channels=tuple(config["channels"]), strides=tuple(config["strides"]),
                      hidden=tuple(config["hidden"]))


def mirror_points(points, width: float) -> jnp.ndarray:
  """iBUG-68 points (..., 68, 2) of the left-right mirror image of a crop `width` wide."""
  perm = np.asarray(lm.FLIP_PERMUTATION)
  p = points[..., perm, :]
  return jnp.stack([width - p[..., 0], p[..., 1]], -1)


def save_refiner(path, params, config: dict = None, dtype=np.float16) -> None:
  """Write the refiner's params and config (DEFAULTS when None) to one .npz
  (models.param_files' layout)."""
  param_files.write(path, params, CONFIG_KEY, dict(config or DEFAULTS), dtype)


def load_refiner_params(path) -> Tuple[PatchRefiner, dict, dict]:
  """(network, params float32, config) of a file written by save_refiner; RefinerFileError
  (one line naming the file) when it is missing, unreadable or does not match."""
  arrays, config = param_files.read(path, CONFIG_KEY, RefinerFileError, "landmark refiner")
  missing = sorted(set(DEFAULTS) - set(config))
  if missing:
    raise RefinerFileError(f"{os.fspath(path)}: config lacks {missing}")
  net = make_network(config)
  s, k = int(config["image_size"]), int(config["num_points"])
  init = lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)),
                          jnp.zeros((1, k, 2)))["params"]
  return net, param_files.unflatten_checked(path, arrays, init, RefinerFileError,
                                            "this refiner config"), config


def load_refiner(path=None, flip_average: bool = True) -> Callable:
  """A jitted `refine(crops (B, S, S, 3) in [0, 1], points (B, 68, 2)) -> (B, 68, 2)` with
  `.image_size` S (the crop side it was trained at); path None: the shipped
  dff3d/assets/refiner.npz. flip_average: also refine the mirror image (mirrored crop,
  mirrored points) and average the two answers (twice the cost)."""
  net, params, config = load_refiner_params(SHIPPED_REFINER if path is None else path)
  s = int(config["image_size"])
  one = lambda x, p: net.apply({"params": params}, x, p)

  def run(crops, points):
    out = one(crops, points)
    if flip_average:
      out = 0.5 * (out + mirror_points(one(crops[:, :, ::-1], mirror_points(points, s)), s))
    return out

  fn = jax.jit(run)
  fn.image_size = s
  return fn


def refine_faces(model: mm.MorphableModel, refine: Callable, crops, c: coeffs_lib.Coefficients,
                 steps: int = REFIT_STEPS, anchor: float = REFIT_ANCHOR,
                 learning_rate: float = REFIT_LEARNING_RATE,
                 problem: Optional[fitting.LandmarkProblem] = None) -> coeffs_lib.Coefficients:
  """Regressed faces c (B, ...) of crops (B, S, S, 3) in [0, 1] moved to the refiner's points:
  their 68 fixed-contour points are refined (refine: load_refiner's function, S its
  image_size) and fitting.fit_anchored moves each face to them, near where it was.
  problem: the model's iBUG-68 fitting.landmark_problem, when the caller has one (a batch
  loop builds it once, not per batch)."""
  s = crops.shape[1]
  if getattr(refine, "image_size", s) != s:
    raise ValueError(f"the refiner reads {refine.image_size} px crops, these are {s} px")
  problem = fitting.landmark_problem(model, False) if problem is None else problem
  points = fitting.predicted_landmarks(problem, c, s, False)
  return fitting.fit_anchored(model, c, refine(crops, points), s, steps, anchor, learning_rate,
                              problem)
