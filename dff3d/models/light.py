"""A light regressor backbone for CPU training and inference: ResNet-18 with GroupNorm.

Why ResNet-18 (He et al. 2016) rather than MobileNetV2: on XLA:CPU dense 3x3 convolutions run
on well-tuned kernels while depthwise convolutions (feature_group_count = C) are far slower per
FLOP (measured 0.6 against 68 GFLOP/s, BUILD_NOTES, Networks), so MobileNetV2's FLOP saving
mostly disappears there; ResNet-18 has 18 weight layers (plus 3 projection shortcuts) against
MobileNetV2's 53, which keeps compile time down too; and its residual connections train from
scratch without the care a plain 13-conv VGG needs.

Why GroupNorm instead of BatchNorm: the network stays a pure function of `params` (no
batch_stats collection, no train / eval switch, no cross-device statistics), which keeps the
train state and the per-image fitting loop simple; GroupNorm (Wu & He 2018) is independent of
the batch size, so batches of 1-8 on a CPU behave like large ones. The last GroupNorm of every
residual block starts with scale 0 (Goyal et al. 2017), so each block starts as the identity.

Layout (channels times `width`, rounded to a multiple of 8, at least 8):
  conv 7x7/2 64, GN, ReLU, max-pool 3x3/2 |
  stage 1: 2 basic blocks 64 | stage 2: 2 blocks 128, first stride 2 |
  stage 3: 2 blocks 256, stride 2 | stage 4: 2 blocks 512, stride 2 |
  pool | head (heads.RegressorHead)
Pool: "mean" (global average pool, the default: any H, W) or "flatten" (the final
ceil(H/32) x ceil(W/32) grid flattened, so the head sees where each feature is; the input size
is then fixed by the parameters). `expand_head` turns a "mean" network's parameters into the
"flatten" network that computes the same function, so a trained network can be widened in
place and fine-tuned (BUILD_NOTES, "Spatial head").
Input: (B, H, W, 3) float32 RGB in [0, 1] (ImageNet-normalised inside); the output stride is 32.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dff3d.models import heads

RESNET18_STAGES = ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2))  # (channels, blocks, stride)
STEM_CHANNELS = 64
POOLS = ("mean", "flatten")


def grid_size(image_size: int) -> int:
  """Side of the final feature grid for a square input of image_size px (SAME padding)."""
  side = image_size
  for stride in (2, 2) + tuple(s for _, _, s in RESNET18_STAGES):  # stem, max-pool, stages
    side = -(-side // stride)
  return side


def expand_head(params, image_size: int):
  """A "mean"-pool network's params -> the "flatten" network's with the same function.

  The head kernel (C, P) becomes (G * G * C, P): the mean over the G x G grid is the flat
  (G, G, C) features times the kernel tiled G * G times and divided by G * G. Other params
  are returned unchanged (the same arrays).
  """
  cells = grid_size(image_size) ** 2
  kernel = params["head"]["dense"]["kernel"]
  head = dict(params["head"])
  head["dense"] = dict(head["dense"], kernel=jnp.tile(kernel, (cells, 1)) / cells)
  return dict(params, head=head)


def duplicate_index(channels: int) -> np.ndarray:
  """(2 C,) source channel of each channel of a network twice as wide, C -> 2 C.

  Every group of the wide layer's GroupNorm holds one source group's channels (twice, or
  once in each of two groups), so its mean and variance are the source group's: the layout
  is each source group's channels, then the same channels again.
  """
  groups = num_groups(channels)
  if num_groups(2 * channels) not in (groups, 2 * groups):
    raise ValueError(f"{channels} channels in {groups} groups: GroupNorm at twice the width "
                     f"has {num_groups(2 * channels)} groups, which copies cannot match")
  size = channels // groups
  j = np.arange(2 * channels)
  return (j // (2 * size)) * size + j % size


def doubles(width: float) -> bool:
  """True when every layer of the width-2w network has exactly twice the width-w channels
  (what `widen` needs; rounding to multiples of 8 breaks it for some widths)."""
  counts = (STEM_CHANNELS,) + tuple(c for c, _, _ in RESNET18_STAGES)
  return all(scaled(c, 2 * width) == 2 * scaled(c, width) for c in counts)


# Relative noise on the kernels of a widened network (widen, models.dff.widen), so the channel
# copies can part; on run 7's file 1 % moves the outputs by 0.006 on average (BUILD_NOTES,
# "Session 15").
WIDEN_NOISE = 0.02


def widen(params, key=None, noise: float = 0.0):
  """A light network's params -> those of the network of twice its width, same function.

  Net2WiderNet (Chen et al. 2016) for this layout: every channel is duplicated
  (`duplicate_index`), every kernel reading duplicated channels is halved over the copies,
  GroupNorm scales and biases are copied. Copies would get the same gradients for ever, so
  `noise` > 0 adds N(0, (noise * std of the kernel)^2) to every conv kernel (needs `key`)
  to let them part; the function then changes by about that fraction.

  Args:
    params: a ResNet18Regressor's params at width w (either pool: a flatten head is
      widened cell by cell).
    key: PRNG key, used when noise > 0.
  Returns:
    the params of the same network at width 2 w (same names, float32 arrays).
  """
  channels = params["stage4_block2"]["conv2"]["kernel"].shape[-1]

  def one(path, x):
    conv = path[0] != "head" and path[-1] == "kernel"         # (kh, kw, Ci, Co)
    if path == ("head", "dense", "kernel"):                   # (cells * C, P)
      cells = x.shape[0] // channels
      x = x.reshape(cells, channels, -1)[:, duplicate_index(channels)] / 2.0
      return x.reshape(cells * 2 * channels, -1), False
    if conv:
      if path[0] != "stem":                                  # the stem reads RGB
        x = x[:, :, duplicate_index(x.shape[2])] / 2.0
      return x[..., duplicate_index(x.shape[3])], True
    if path[0] != "head":                                    # GroupNorm scale / bias (C,)
      return x[duplicate_index(x.shape[0])], False
    return x, False

  return widen_params(params, one, key, noise)


def widen_params(params, one, key=None, noise: float = 0.0):
  """Apply `one(path, x) -> (wide x, is_kernel)` to every parameter (float32 numpy) of a
  pytree; kernels get N(0, (noise * std)^2) noise (a key per name, so the draw does not
  depend on dict order). The Net2WiderNet loop of `widen` and `models.dff.widen`."""
  if noise and key is None:
    raise ValueError("widen: noise > 0 needs a key")
  flat = traverse_util.flatten_dict(params)
  keys = iter(jax.random.split(key, len(flat)) if noise else [None] * len(flat))
  out = {}
  for path in sorted(flat):
    x, kernel = one(path, np.asarray(flat[path], np.float32))
    k = next(keys)
    if noise and kernel:
      x = x + noise * x.std() * np.asarray(jax.random.normal(k, x.shape))
    out[path] = jnp.asarray(x)
  return traverse_util.unflatten_dict(out)


def scaled(channels: int, width: float, divisor: int = 8) -> int:
  """Channel count times width, rounded to a multiple of `divisor`, at least `divisor`."""
  return max(divisor, int(round(channels * width / divisor)) * divisor)


def num_groups(channels: int, max_groups: int = 32) -> int:
  """Largest group count <= max_groups that divides `channels` with >= 2 channels a group."""
  for g in range(min(max_groups, channels // 2), 0, -1):
    if channels % g == 0:
      return g
  return 1


def group_norm(channels, name, zero_scale=False, dtype=jnp.float32):
  return nn.GroupNorm(num_groups=num_groups(channels), dtype=dtype, name=name,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones)


class BasicBlock(nn.Module):
  """conv3x3(stride) GN ReLU conv3x3 GN (+ projected shortcut) ReLU."""
  channels: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.he_normal()
    conv = lambda c, k, s, name: nn.Conv(c, (k, k), strides=(s, s), padding="SAME",
                                         use_bias=False, kernel_init=init, dtype=self.dtype,
                                         name=name)
    y = conv(self.channels, 3, self.stride, "conv1")(x)
    y = nn.relu(group_norm(self.channels, "norm1", dtype=self.dtype)(y))
    y = conv(self.channels, 3, 1, "conv2")(y)
    y = group_norm(self.channels, "norm2", zero_scale=True, dtype=self.dtype)(y)
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = conv(self.channels, 1, self.stride, "shortcut")(x)
      x = group_norm(self.channels, "shortcut_norm", dtype=self.dtype)(x)
    return nn.relu(x + y)


class ResNet18Regressor(nn.Module):
  """ResNet-18 + GroupNorm: images (B, H, W, 3) in [0, 1] -> (B, num_outputs).

  Attributes:
    num_outputs: P.
    width: channel multiplier (1.0: 64-512 channels, 11.3 M params with P = 246).
    init_bias, output_scale: (P,) head constants (see heads.py).
    dtype: compute dtype of the backbone; params and the head stay float32.
    pool: "mean" or "flatten" (module docstring).
    input_window: optional (x0, y0, x1, y1) fractions: the input is black outside it
      (heads.apply_window); no parameters depend on it.
  Parameter names: stem, stem_norm, stage{1..4}_block{1,2}/..., head/dense.
  """
  num_outputs: int
  width: float = 1.0
  init_bias: Optional[Sequence[float]] = None
  output_scale: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  pool: str = "mean"
  input_window: Optional[Sequence[float]] = None

  @nn.compact
  def __call__(self, images):
    if self.pool not in POOLS:
      raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOLS}")
    x = heads.apply_window(images.astype(jnp.float32), self.input_window)
    x = heads.normalize_images(x).astype(self.dtype)
    c = scaled(STEM_CHANNELS, self.width)
    x = nn.Conv(c, (7, 7), strides=(2, 2), padding="SAME", use_bias=False,
                kernel_init=nn.initializers.he_normal(), dtype=self.dtype, name="stem")(x)
    x = nn.relu(group_norm(c, "stem_norm", dtype=self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for s, (channels, blocks, stride) in enumerate(RESNET18_STAGES, start=1):
      for b in range(blocks):
        x = BasicBlock(scaled(channels, self.width), stride if b == 0 else 1, self.dtype,
                       name=f"stage{s}_block{b + 1}")(x)
    x = x.astype(jnp.float32)
    x = jnp.mean(x, axis=(1, 2)) if self.pool == "mean" else x.reshape(x.shape[0], -1)
    return heads.RegressorHead(self.num_outputs, self.init_bias, self.output_scale,
                               name="head")(x)
