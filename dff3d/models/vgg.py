"""The paper's regressor: VGG-16 (Simonyan & Zisserman 2015, configuration D) -> coefficients.

Layers (paper Sec. 3.2), with channel widths multiplied by `width`:
  conv1_1 64, conv1_2 64, pool | conv2_1 128, conv2_2 128, pool |
  conv3_1..3 256, pool | conv4_1..3 512, pool | conv5_1..3 512, pool |
  fc6 fc_width, fc7 fc_width | head P
Every conv is 3x3, stride 1, 'SAME', followed by ReLU; every pool is 2x2 max, stride 2, so the
pools follow conv 2, 4, 7, 10 and 13; fc6 and fc7 are followed by ReLU. The head is the shared
`heads.RegressorHead` (the mean face at init; per-field output scale).

Input: (B, H, W, 3) float32 RGB in [0, 1], normalised inside with the ImageNet mean and std
(heads.normalize_images). H and W are free (224 in the paper; 64-112 for CPU work); the
flattened fc6 input is (H // 32) * (W // 32) * 512 * width, so a 224 crop gives 7 x 7 as in the
paper, 112 gives 3 x 3. No dropout (the paper does not mention it), no normalisation layers:
the network is a plain function of its params. Convolutions and fc layers use He-normal init.

`make_regressor(model, backbone=...)` builds this or the light backbone (light.py) with the head
configured for a morphable model.
"""

from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from dff3d import coefficients as coeffs_lib
from dff3d.models import heads
from dff3d.models import light

# Output channels of the 13 conv layers, grouped by the pools that close each stage.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
BACKBONES = ("vgg16", "light")


def scaled(channels: int, width: float) -> int:
  """Channel count times the width multiplier, rounded, at least 1."""
  return max(1, int(round(channels * width)))


def conv_widths(width: float = 1.0) -> Tuple[Tuple[int, ...], ...]:
  """VGG16_STAGES with the width multiplier applied."""
  return tuple(tuple(scaled(c, width) for c in stage) for stage in VGG16_STAGES)


class VGG16Regressor(nn.Module):
  """VGG-16: images (B, H, W, 3) in [0, 1] -> (B, num_outputs) coefficient vectors.

  Attributes:
    num_outputs: P (257 for BFM sizes; `coefficients.size(model.sizes)` in general).
    width: channel multiplier for the 13 convs (1.0 is the paper's network).
    fc_width: units of fc6 and fc7 (4096 in the paper).
    init_bias, output_scale: (P,) constants of the head (see heads.py); None means 0 / 1.
    dtype: compute dtype of the backbone (e.g. jnp.bfloat16 on a GPU); params and the head stay
      float32.
  Parameter names: conv1_1 .. conv5_3, fc6, fc7, head/dense.
  """
  num_outputs: int
  width: float = 1.0
  fc_width: int = 4096
  init_bias: Optional[Sequence[float]] = None
  output_scale: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  input_window: Optional[Sequence[float]] = None  # heads.apply_window

  @nn.compact
  def __call__(self, images):
    x = heads.apply_window(images.astype(jnp.float32), self.input_window)
    x = heads.normalize_images(x).astype(self.dtype)
    init = nn.initializers.he_normal()
    for s, stage in enumerate(conv_widths(self.width), start=1):
      for i, c in enumerate(stage, start=1):
        x = nn.Conv(c, (3, 3), padding="SAME", kernel_init=init, dtype=self.dtype,
                    name=f"conv{s}_{i}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    for name in ("fc6", "fc7"):
      x = nn.relu(nn.Dense(self.fc_width, kernel_init=init, dtype=self.dtype, name=name)(x))
    return heads.RegressorHead(self.num_outputs, self.init_bias, self.output_scale,
                               name="head")(x.astype(jnp.float32))


def make_regressor(model, backbone: str = "vgg16", width: float = 1.0, fc_width: int = 4096,
                   field_scales: Optional[Mapping[str, Any]] = None,
                   distance: Optional[float] = None, pool: str = "mean",
                   input_window=(), **kwargs) -> nn.Module:
  """A regressor module whose untrained output is `zero_coefficients(model, 1, distance)`.

  Args:
    model: a MorphableModel (only its sizes and the default pose / lighting are used).
    backbone: "vgg16" (the paper's) or "light" (light.ResNet18Regressor, for CPU work).
    width: channel multiplier of the backbone.
    fc_width: fc6 / fc7 units (vgg16 only).
    field_scales: per-field output scale overrides (heads.DEFAULT_FIELD_SCALES).
    distance: camera distance of the initial pose (default camera.DEFAULT_DISTANCE).
    pool: "mean" or "flatten" (light only; vgg16 always flattens its 7 x 7 grid into fc6).
    input_window: () / None, or (x0, y0, x1, y1) fractions outside which the input is black
      (heads.apply_window).
    **kwargs: further module attributes (e.g. dtype).
  Returns:
    A Flax module: apply({'params': p}, images (B, H, W, 3) in [0, 1]) -> (B, P).
  """
  sizes = model.sizes
  common = dict(num_outputs=coeffs_lib.size(sizes),
                init_bias=heads.as_tuple(heads.initial_bias(model, distance)),
                output_scale=heads.as_tuple(heads.output_scale(sizes, field_scales)),
                input_window=heads.check_window(input_window) or None)
  if backbone == "vgg16":
    if pool != "mean":
      raise ValueError(f"pool {pool!r}: the vgg16 backbone has no pool option")
    return VGG16Regressor(width=width, fc_width=fc_width, **common, **kwargs)
  if backbone == "light":
    return light.ResNet18Regressor(width=width, pool=pool, **common, **kwargs)
  raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")


num_params = heads.num_params
