"""Deep face feature (DFF) network, its frozen loader, and bilinear descriptor sampling.

DFFNet is a U-Net-like encoder-decoder (the paper, Sec. 3.2, after Jiang et al. 2017): an
image (B, H, W, 3) in [0, 1] -> a descriptor map (B, H, W, D), D = 32 by default, every pixel's
descriptor L2-normalised. Layout with `levels` L and base channels `width` (channels at level l:
min(width * 2**l, max_width)):

  encoder, l = 0..L-1: [conv3x3, GN, ReLU] x 2 -> skip_l, max-pool 2x2
  bottleneck (level L): [conv3x3, GN, ReLU] x 2
  decoder, l = L-1..0: up-conv 2x2 stride 2 (transposed conv), concat skip_l,
                       [conv3x3, GN, ReLU] x 2 (no ReLU after the very last GN)
  conv1x1 -> D, L2 normalise per pixel

The last decoder block omits its final ReLU: with ReLU features a pixel whose channels are all
negative would get an exactly zero descriptor (common in narrow untrained networks), which
cannot be normalised; the GN output feeding the 1x1 projection is almost surely nonzero.

H and W must be divisible by 2**L (224 = 14 * 16 works with L = 4). GroupNorm (not BatchNorm)
keeps the network a pure function of its params; `norm=False` gives plain ('SAME'-padded)
U-Net blocks. Inputs are ImageNet-normalised inside (heads.normalize_images).

The network is pretrained (experiments/train_dff.py) and frozen while the regressor trains:
`load_frozen_dff(path)` returns `dff(images) -> descriptors` with the weights closed over and
passed through jax.lax.stop_gradient, so no gradient can reach them, while gradients still flow
to the input image (L_dff differentiates through DFF(rendered image)).

File format (`save_dff_params` / `load_dff`): an .npz whose keys are the '/'-joined paths of the
params pytree (e.g. 'enc0/conv0/kernel'), stored as float16 by default and cast to float32 on
load, plus '__config__', a JSON string of the DFFNet attributes (width, levels, descriptor_dim,
max_width, norm), so loading needs only the path.
"""

import os
from typing import Optional, Any, Callable, Mapping, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dff3d.models import heads
from dff3d.models import light
from dff3d.models import param_files
from dff3d.models.light import num_groups

CONFIG_KEY = "__config__"
CONFIG_FIELDS = ("width", "levels", "descriptor_dim", "max_width", "norm")


class DFFFileError(ValueError):
  """A DFF parameter file is missing or malformed; the message names the file."""


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(|x|, eps) along `axis`; a zero vector maps to zero with finite gradients."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class _ConvBlock(nn.Module):
  channels: int
  norm: bool = True
  last_relu: bool = True

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=not self.norm,
                  kernel_init=nn.initializers.he_normal(), name=f"conv{i}")(x)
      if self.norm:
        x = nn.GroupNorm(num_groups=num_groups(self.channels), name=f"norm{i}")(x)
      if i == 0 or self.last_relu:
        x = nn.relu(x)
    return x


class DFFNet(nn.Module):
  """U-Net: images (B, H, W, 3) in [0, 1] -> unit descriptors (B, H, W, descriptor_dim).

  Attributes:
    descriptor_dim: D (32 in the paper).
    width: channels at full resolution (level 0).
    levels: number of 2x down-samplings; H and W must be divisible by 2**levels.
    max_width: cap on the channels of the deeper levels.
    norm: GroupNorm after every 3x3 conv.
  Parameter names: enc{l}, bottleneck, up{l}, dec{l}, out.
  """
  descriptor_dim: int = 32
  width: int = 32
  levels: int = 4
  max_width: int = 512
  norm: bool = True

  def channels(self, level: int) -> int:
    return min(self.width * 2 ** level, self.max_width)

  def config(self) -> dict:
    """The attributes that rebuild this network (stored in the .npz)."""
    return {k: getattr(self, k) for k in CONFIG_FIELDS}

  @nn.compact
  def __call__(self, images):
    f = 2 ** self.levels
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"DFFNet with {self.levels} levels needs H and W divisible by {f}, "
                       f"got {images.shape[1:3]}")
    x = heads.normalize_images(images.astype(jnp.float32))
    skips = []
    for l in range(self.levels):
      x = _ConvBlock(self.channels(l), self.norm, name=f"enc{l}")(x)
      skips.append(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = _ConvBlock(self.channels(self.levels), self.norm, name="bottleneck")(x)
    for l in reversed(range(self.levels)):
      x = nn.ConvTranspose(self.channels(l), (2, 2), strides=(2, 2),
                           kernel_init=nn.initializers.he_normal(), name=f"up{l}")(x)
      x = jnp.concatenate([x, skips[l]], axis=-1)
      x = _ConvBlock(self.channels(l), self.norm, last_relu=l > 0, name=f"dec{l}")(x)
    x = nn.Conv(self.descriptor_dim, (1, 1), name="out")(x)
    return l2_normalize(x)


def widen(params, net: DFFNet, key=None, noise: float = 0.0) -> Tuple[DFFNet, dict]:
  """A DFFNet's params -> (the net of twice its width, its params), the same function.

  Net2WiderNet as `light.widen`: every channel is duplicated in the layout of
  `light.duplicate_index` (so each GroupNorm group keeps its statistics), kernels reading
  duplicated channels are halved over the copies (the decoder's first conv reads
  concat(up-conv, skip), both duplicated), GroupNorm and bias vectors are copied; the RGB input
  and the descriptor output keep their channels. `noise` > 0 (with `key`) perturbs every kernel
  by that fraction of its std so the copies can part when trained.

  Args:
    params: `net`'s params. net: a DFFNet whose every level doubles exactly (not capped by
      max_width at twice the width).
  Returns:
    (DFFNet(width=2 * net.width, ...), params of the same names, float32).
  """
  wide = net.clone(width=2 * net.width)
  if any(wide.channels(l) != 2 * net.channels(l) for l in range(net.levels + 1)):
    raise ValueError(f"widen: max_width {net.max_width} caps the width-{wide.width} network, "
                     "so its channels do not double")
  dup = light.duplicate_index

  def one(path, x):
    block, leaf = path[0], path[-1]
    if x.ndim == 1:                                  # GroupNorm scale / bias, conv biases
      return (x if block == "out" else x[dup(x.shape[0])]), False
    ci = x.shape[2]
    if block == "enc0" and path[1] == "conv0":       # reads RGB
      x_in = x
    elif block.startswith("dec") and path[1] == "conv0":  # reads concat(up, skip)
      half = ci // 2
      x_in = x[:, :, np.concatenate([dup(half), half + dup(half)])] / 2.0
    else:
      x_in = x[:, :, dup(ci)] / 2.0
    return (x_in if block == "out" else x_in[..., dup(x.shape[3])]), leaf == "kernel"

  return wide, light.widen_params(params, one, key, noise)


def load_dff_as(path, net: DFFNet, key) -> Tuple[dict, bool]:
  """(params for `net`, widened?) from the DFF file `path`: a file of the same network as it
  is; one of half its width through `widen` (kernels perturbed by light.WIDEN_NOISE drawn with
  `key`). Any other network raises DFFFileError naming the file."""
  file_net, params = load_dff(path)
  if file_net.config() == net.config():
    return params, False
  if file_net.clone(width=2 * file_net.width).config() == net.config():
    return widen(params, file_net, key, light.WIDEN_NOISE)[1], True
  raise DFFFileError(f"{os.fspath(path)}: network {file_net.config()} is neither "
                     f"{net.config()} nor half its width")


# ---- parameter files ----------------------------------------------------------------------

def _as_config(net_or_config: Union[DFFNet, Mapping[str, Any]]) -> dict:
  if isinstance(net_or_config, DFFNet):
    return net_or_config.config()
  config = dict(net_or_config)
  unknown = set(config) - set(CONFIG_FIELDS)
  if unknown:
    raise ValueError(f"unknown DFFNet config keys {sorted(unknown)}; expected {CONFIG_FIELDS}")
  return config


def save_dff_params(path, params, config: Union[DFFNet, Mapping[str, Any]],
                    dtype=np.float16) -> None:
  """Write DFF params and the network config to one .npz (see module docstring).

  Args:
    path: output file (numpy appends '.npz' when missing).
    params: the 'params' pytree of DFFNet (a {'params': ...} variables dict is accepted too).
    config: the DFFNet (or a dict of its CONFIG_FIELDS) the params belong to.
    dtype: storage dtype of the arrays (float16 halves the file; loads cast up to float32).
  """
  param_files.write(path, params, CONFIG_KEY, _as_config(config), dtype)


def load_dff(path) -> Tuple[DFFNet, dict]:
  """(DFFNet, params as float32 arrays) from a file written by save_dff_params.

  Raises DFFFileError naming the file when it is missing, unreadable, has no config, or its
  arrays do not match the network its config describes.
  """
  arrays, config = param_files.read(path, CONFIG_KEY, DFFFileError, "DFF parameter")
  try:
    net = DFFNet(**_as_config(config))
  except (ValueError, TypeError) as e:
    raise DFFFileError(f"{os.fspath(path)}: bad '{CONFIG_KEY}' entry: {e}") from None
  size = 2 ** net.levels
  init = lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
  params = param_files.unflatten_checked(path, arrays, init, DFFFileError,
                                         f"config {net.config()}")
  return net, params


# The shipped network (dff3d/assets/dff.npz) was trained on 96 px synthetic crops; applied to
# 224 px crops directly only 4% of pixels match within 3 px, through a 96 px resize 34%
# (BUILD_NOTES, "DFF network"). Pass it as load_frozen_dff's native_size.
SHIPPED_NATIVE_SIZE = 96


def load_frozen_dff(path, native_size: Optional[int] = None) -> Callable[[jnp.ndarray],
                                                                          jnp.ndarray]:
  """A frozen DFF: `dff(images (B, H, W, 3) in [0, 1]) -> descriptors (B, H, W, D)`.

  With `native_size`, images of another size are resized (bilinear, antialiased) to
  native_size x native_size, described there, and the descriptor map is resized back to
  (H, W) and renormalised: descriptors stay aligned with the input's pixels.

  The weights are closed over and pass through jax.lax.stop_gradient, so they are constants to
  every transformation: nothing can train them, while gradients w.r.t. `images` flow as usual.
  The function is not jitted (jit it, or the loss that calls it, at the boundary); under jit
  the weights become constants of the compiled program (see frozen_apply for the alternative).
  Its attributes `module` (the DFFNet) and `config` describe the network.
  """
  net, params = load_dff(path)

  def dff(images):
    """images (B, H, W, 3) float32 in [0, 1] -> unit descriptors (B, H, W, D)."""
    b, h, w, _ = images.shape
    if native_size is None or (h, w) == (native_size, native_size):
      return net.apply({"params": jax.lax.stop_gradient(params)}, images)
    small = jax.image.resize(images, (b, native_size, native_size, 3), "linear", antialias=True)
    desc = net.apply({"params": jax.lax.stop_gradient(params)}, small)
    desc = jax.image.resize(desc, (b, h, w, desc.shape[-1]), "linear")
    return l2_normalize(desc)

  dff.module = net
  dff.config = net.config()
  return dff


def frozen_apply(net: DFFNet, params, images):
  """`net` applied with `params` behind jax.lax.stop_gradient: the explicit-argument form of
  load_frozen_dff. Under jit, load_frozen_dff's closed-over weights are embedded in every
  compiled program as constants (31 MB at the default width); passing `params` as an argument
  of the jitted step (from load_dff) avoids that, with the same gradients (none to params)."""
  return net.apply({"params": jax.lax.stop_gradient(params)}, images)


# ---- sampling -----------------------------------------------------------------------------

def sample_descriptors(desc, points):
  """Bilinear samples of a descriptor map at pixel coordinates.

  Args:
    desc: (B, H, W, D) descriptor (or any feature) map.
    points: (B, K, 2) (x, y) pixel coordinates, x right, y down, pixel (i, j)'s centre at
      (j + 0.5, i + 0.5); points beyond the outermost pixel centres clamp to the border.
  Returns:
    (B, K, D): at a pixel centre exactly that pixel's value; differentiable w.r.t. `desc` (and
    w.r.t. `points` inside the image). Samples of a unit map are not renormalised.
  """
  b, h, w, d = desc.shape
  u = jnp.clip(points[..., 0] - 0.5, 0.0, w - 1.0)
  v = jnp.clip(points[..., 1] - 0.5, 0.0, h - 1.0)
  u0 = jnp.floor(u)
  v0 = jnp.floor(v)
  wu = (u - u0)[..., None]
  wv = (v - v0)[..., None]
  x0 = u0.astype(jnp.int32)
  y0 = v0.astype(jnp.int32)
  x1 = jnp.minimum(x0 + 1, w - 1)
  y1 = jnp.minimum(y0 + 1, h - 1)
  flat = desc.reshape(b, h * w, d)
  at = lambda y, x: jnp.take_along_axis(flat, (y * w + x)[..., None], axis=1)
  top = at(y0, x0) * (1.0 - wu) + at(y0, x1) * wu
  bottom = at(y1, x0) * (1.0 - wu) + at(y1, x1) * wu
  return top * (1.0 - wv) + bottom * wv
