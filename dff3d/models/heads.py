"""The regression head shared by every backbone: features -> the flat coefficient vector.

    x = init_bias + output_scale * Dense(h)

`init_bias` (P,) is a fixed constant (not a parameter): the flat vector of
`morphable_model.zero_coefficients(model, 1)`, i.e. the mean face (identity, albedo, expression
0), frontal (rotation 0), at translation (0, 0, -camera.DEFAULT_DISTANCE), lit by
`shading.default_lighting()`. The Dense layer starts with a zero kernel and a zero bias, so an
untrained network predicts exactly that vector for every image (Deep3DFaceRecon zero-initialises
its final layers in the same way). Its first update moves only the head; the backbone receives
gradients from the second step on, once the kernel is nonzero.

`output_scale` (P,) is a fixed per-entry multiplier that balances the fields. Translation is in
model units (ICT: centimetres) around camera.DEFAULT_DISTANCE (~1e2); by default it is scaled
by 10, so one unit of the Dense output moves the head by 10 cm, about two thirds of a face
width, roughly what a unit of Deep3DFaceRecon's raw translation output does there. Rotation
(radians), the ~N(0, 1) identity / albedo modes, the blendshape weights and the SH lighting
(~1) are of order one already and keep scale 1. With Adam, whose steps do not depend on the
gradient's scale, the scale sets how far a field moves per step (10x for translation); the
gradient the backbone receives from a field is multiplied by the same factor.
"""

from typing import Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dff3d import coefficients as coeffs_lib
from dff3d import morphable_model

DEFAULT_FIELD_SCALES = {"identity": 1.0, "albedo": 1.0, "expression": 1.0, "rotation": 1.0,
                        "translation": 10.0, "lighting": 1.0}


def output_scale(sizes: Tuple[int, ...],
                 field_scales: Optional[Mapping[str, float]] = None) -> np.ndarray:
  """(P,) float32 per-entry output scale for a coefficient layout.

  Args:
    sizes: the layout, e.g. `model.sizes` = (Ki, Ka, Ke, 3, 3, 27).
    field_scales: overrides of DEFAULT_FIELD_SCALES by field name (see coefficients.FIELDS);
      a value may be a scalar or a sequence of the field's length (e.g. translation (1, 1, 10)).
  """
  scales = dict(DEFAULT_FIELD_SCALES)
  if field_scales:
    unknown = set(field_scales) - set(coeffs_lib.FIELDS)
    if unknown:
      raise ValueError(f"unknown coefficient fields {sorted(unknown)}; "
                       f"expected some of {coeffs_lib.FIELDS}")
    scales.update(field_scales)
  parts = [np.broadcast_to(np.asarray(scales[name], np.float32), (n,))
           for name, n in zip(coeffs_lib.FIELDS, sizes)]
  return np.concatenate(parts).astype(np.float32)


def initial_bias(model, distance: Optional[float] = None) -> np.ndarray:
  """(P,) float32: the flat `zero_coefficients(model, 1, distance)` vector (see module doc)."""
  return np.asarray(coeffs_lib.concat(morphable_model.zero_coefficients(model, 1, distance))[0],
                    np.float32)


class RegressorHead(nn.Module):
  """features (B, F) -> coefficients (B, P) = init_bias + output_scale * Dense(features).

  Attributes:
    num_outputs: P.
    init_bias: (P,) fixed offset (a tuple of floats keeps the module hashable); None means 0.
    output_scale: (P,) fixed multiplier; None means 1.
    kernel_std: std of the Dense kernel's normal init; 0 (default) gives a zero kernel, so
      the untrained output is exactly init_bias.
  """
  num_outputs: int
  init_bias: Optional[Sequence[float]] = None
  output_scale: Optional[Sequence[float]] = None
  kernel_std: float = 0.0

  @nn.compact
  def __call__(self, features):
    init = (nn.initializers.zeros if self.kernel_std == 0.0
            else nn.initializers.normal(self.kernel_std))
    y = nn.Dense(self.num_outputs, kernel_init=init, bias_init=nn.initializers.zeros,
                 name="dense")(features)
    if self.output_scale is not None:
      y = y * _constant(self.output_scale, self.num_outputs, "output_scale")
    if self.init_bias is not None:
      y = y + _constant(self.init_bias, self.num_outputs, "init_bias")
    return y


def _constant(values, n, what):
  a = jnp.asarray(np.asarray(values, np.float32))
  if a.shape != (n,):
    raise ValueError(f"{what} has shape {a.shape}, the head has {n} outputs")
  return a


def as_tuple(a) -> Tuple[float, ...]:
  """An array-like (P,) -> tuple of Python floats (hashable module attribute)."""
  return tuple(float(v) for v in np.asarray(a, np.float32).reshape(-1))


def count_params(tree) -> int:
  """Total number of scalars in a pytree of arrays (or of ShapeDtypeStructs)."""
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def num_params(module: nn.Module, input_shape: Sequence[int]) -> int:
  """Parameter count of `module` for inputs of `input_shape` (e.g. (1, 224, 224, 3)),
  computed from shapes only (jax.eval_shape), so even full VGG-16 costs no memory."""
  variables = jax.eval_shape(lambda k: module.init(k, jnp.zeros(input_shape, jnp.float32)),
                             jax.random.PRNGKey(0))
  return count_params(variables.get("params", variables))


# ImageNet statistics for inputs in [0, 1] (torchvision's): the backbones start from
# unit-variance inputs, which suits their He initialisation, and ImageNet-pretrained torchvision
# weights could be loaded without changing the preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def window_mask(height: int, width: int, window) -> jnp.ndarray:
  """(H, W) float32: 1 at pixels whose centre lies inside `window` = (x0, y0, x1, y1), given
  as fractions of the image width and height, else 0."""
  x0, y0, x1, y1 = (float(v) for v in window)
  xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  inside_x = (xs >= x0) & (xs <= x1)
  inside_y = (ys >= y0) & (ys <= y1)
  return (inside_y[:, None] & inside_x[None, :]).astype(jnp.float32)


def apply_window(images, window):
  """(B, H, W, 3) images black (0) outside `window` (x0, y0, x1, y1) fractions; unchanged
  when window is None or empty.

  Why: the AFLW crops the shipped regressors train on are cut from 3DDFA's 120 px boxes, and a
  crop framed at the face's landmark box shows those boxes' black padding on its top and sides
  (median 4 % left and right, 10 % on top). A network that always sees the same black window
  reads no framing cue from it, and test crops of full photos look like training crops
  (BUILD_NOTES, "Session 14: the crops' black border").
  """
  if not window:
    return images
  return images * window_mask(images.shape[1], images.shape[2], window)[None, :, :, None]


def check_window(window) -> tuple:
  """`window` as a tuple of 4 floats (or () for none); ValueError unless 0 <= x0 < x1 <= 1 and
  0 <= y0 < y1 <= 1."""
  if not window:
    return ()
  w = tuple(float(v) for v in window)
  if len(w) != 4 or not (0.0 <= w[0] < w[2] <= 1.0 and 0.0 <= w[1] < w[3] <= 1.0):
    raise ValueError(f"input window {window!r} is not x0,y0,x1,y1 with 0 <= x0 < x1 <= 1 and "
                     "0 <= y0 < y1 <= 1")
  return w


def normalize_images(images):
  """(B, H, W, 3) float RGB in [0, 1] -> (images - ImageNet mean) / ImageNet std."""
  mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
  std = jnp.asarray(IMAGENET_STD, images.dtype)
  return (images - mean) / std
