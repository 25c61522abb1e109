"""The regressor's parameter vector: named fields and split / concat to the flat vector.

Layout (paper Sec. 3.1, the order of Deng et al. 2019): identity, albedo, expression,
rotation (3 angles, radians, see camera.py), translation (3, model units, camera space),
lighting (27 = 3 colour channels x 9 SH coefficients, see shading.py). With BFM sizes
(80, 80, 64) the vector has 257 entries; otherwise the sizes follow the morphable model.
"""

from typing import Tuple

import flax
import jax.numpy as jnp

FIELDS = ("identity", "albedo", "expression", "rotation", "translation", "lighting")


@flax.struct.dataclass
class Coefficients:
  """Per-face parameters, each with a leading batch dimension B.

  identity: (B, Ki), ~N(0, 1) per mode.  albedo: (B, Ka), ~N(0, 1).  expression: (B, Ke).
  rotation: (B, 3) (pitch, yaw, roll) radians.  translation: (B, 3) model units.
  lighting: (B, 27) SH coefficients, channel-major (r0..r8, g0..g8, b0..b8).
  """
  identity: jnp.ndarray
  albedo: jnp.ndarray
  expression: jnp.ndarray
  rotation: jnp.ndarray
  translation: jnp.ndarray
  lighting: jnp.ndarray


def layout(num_identity: int, num_albedo: int, num_expression: int) -> Tuple[int, ...]:
  """Field sizes in FIELDS order, e.g. (80, 80, 64, 3, 3, 27) for BFM (sum 257)."""
  return (num_identity, num_albedo, num_expression, 3, 3, 27)


def size(sizes: Tuple[int, ...]) -> int:
  """Length P of the flat vector for a layout."""
  return int(sum(sizes))


def split(x: jnp.ndarray, sizes: Tuple[int, ...]) -> Coefficients:
  """Flat (..., P) vector -> Coefficients with fields (..., size_i)."""
  if x.shape[-1] != size(sizes):
    raise ValueError(f"coefficient vector has {x.shape[-1]} entries, layout {sizes} needs "
                     f"{size(sizes)}")
  out, start = {}, 0
  for name, n in zip(FIELDS, sizes):
    out[name] = x[..., start:start + n]
    start += n
  return Coefficients(**out)


def concat(c: Coefficients) -> jnp.ndarray:
  """Coefficients -> flat (..., P) vector (inverse of split)."""
  return jnp.concatenate([getattr(c, name) for name in FIELDS], axis=-1)
