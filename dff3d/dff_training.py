"""Training the DFF network on view pairs with known (or fitted) dense correspondence.

Two renders of the same face (dff3d.synthetic.pose_pairs) share, at every face pixel, the
surface point on the model's mean face (`mean_face_position`, model units: cm for ICT). For a
pixel of view A its partner in view B is the B face pixel whose mean-face position is nearest;
the pair counts only when that distance is below `match_threshold` (the point is visible in
both views, not hidden or outside B).

Loss (`correspondence_loss`): a dense InfoNCE, per anchor pixel a soft-target cross-entropy over
*every* pixel of the other image (face and background):

    logits_kj = <d_A(p_k), d_B(q_j)> / temperature            j over all H*W pixels of B
    target_kj ~ mask_B(q_j) * exp(-|X_A(p_k) - X_B(q_j)|^2 / (2 sigma^2))
                on the 5 x 5 pixels q_j around the partner, 0 elsewhere
    L = mean over valid anchors k of  -sum_j target_kj log softmax_j(logits_kj)

X the mean-face position. The soft target spreads the positive over the matched pixel's
surface neighbourhood (sigma about one pixel's footprint), so adjacent pixels, which show almost
the same surface point, are not pushed apart as hard negatives; pixels beyond a few sigma, other
face points and all background pixels are negatives. It is applied in both directions (A->B and
B->A). The softmax runs over the whole other image, the same search the benchmark
(benchmarks/dff_correspondence.py) and a nearest-descriptor match perform.

Real pairs (`real_views`, `mixed_pairs`): two different real crops, each with the model fitted
to it (dff3d.data.real.fit_pseudo68), rendered like a synthetic view; their pixels correspond
through the fitted mean-face positions: a dense pseudo-correspondence across identities (the
original DFF's training data). A batch may mix synthetic pose pairs and real pairs.

Everything here is a pure function of arrays; `train_step` / `mixed_train_step` are jitted
with a static `LossConfig`. Pixel indices are flat (row * W + col); pixel (row i, column j) has
its centre at (j + 0.5, i + 0.5) (dff3d's convention).
"""

import functools
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from dff3d import coefficients as coeffs_lib
from dff3d import morphable_model as mm
from dff3d import synthetic
from dff3d.models import dff as dff_lib


@flax.struct.dataclass
class LossConfig:
  """Hyper-parameters of the correspondence loss (all static: hashable under jit).

  num_anchors: K anchor pixels sampled per image and direction (uniform over the face mask).
  temperature: InfoNCE temperature on cosine similarities.
  match_threshold: largest mean-face distance (model units, cm) of a valid correspondence;
    about one pixel footprint at the training size (0.27 cm per pixel at 96 px, 0.23 at 112).
  target_sigma: width (cm) of the soft positive target around the matched surface point.
  symmetric: also A <- B.
  colour_jitter: images x U(1 - j, 1 + j) per RGB channel (the paper's augmentation range 0.3).
  noise_std: additive Gaussian pixel noise.
  radius_px: pixel radius of the `within_px` training metric.
  target_radius_px: the soft target lives on the (2r+1)^2 pixels around the partner pixel.
  match_stride: coarse-to-fine matching stride (match_points; 1 = exact brute force).
  """
  num_anchors: int = flax.struct.field(pytree_node=False, default=128)
  temperature: float = flax.struct.field(pytree_node=False, default=0.07)
  match_threshold: float = flax.struct.field(pytree_node=False, default=0.3)
  target_sigma: float = flax.struct.field(pytree_node=False, default=0.25)
  symmetric: bool = flax.struct.field(pytree_node=False, default=True)
  colour_jitter: float = flax.struct.field(pytree_node=False, default=0.3)
  noise_std: float = flax.struct.field(pytree_node=False, default=0.02)
  radius_px: float = flax.struct.field(pytree_node=False, default=3.0)
  target_radius_px: int = flax.struct.field(pytree_node=False, default=2)
  match_stride: int = flax.struct.field(pytree_node=False, default=2)


# ---- correspondence -----------------------------------------------------------------------

def pixel_centres(height: int, width: int):
  """(H * W, 2) float32 (x, y) centres of the flat pixel indices (row * W + col)."""
  rows, cols = jnp.divmod(jnp.arange(height * width), width)
  return jnp.stack([cols + 0.5, rows + 0.5], -1).astype(jnp.float32)


def sample_mask_pixels(key, mask, k: int):
  """K distinct flat pixel indices per image, uniform over the mask (Gumbel top-k).

  Args: mask (B, H, W) bool. Returns (indices (B, K) int32, valid (B, K) bool); `valid` is False
  for the indices drawn outside the mask when it holds fewer than K pixels.
  """
  b = mask.shape[0]
  flat = mask.reshape(b, -1)
  g = jax.random.gumbel(key, flat.shape)
  _, idx = jax.lax.top_k(jnp.where(flat, g, -jnp.inf), k)
  return idx.astype(jnp.int32), jnp.take_along_axis(flat, idx, 1)


def squared_distances(x, y):
  """(B, K, M) squared Euclidean distances between x (B, K, C) and y (B, M, C), >= 0."""
  d2 = (jnp.sum(x * x, -1)[..., :, None] + jnp.sum(y * y, -1)[..., None, :]
        - 2.0 * jnp.einsum("bkc,bmc->bkm", x, y))
  return jnp.maximum(d2, 0.0)


def _window(index, height: int, width: int, radius: int):
  """Flat indices of the (2r+1)^2 pixels around flat `index` (...,) -> ((..., W2), inside)."""
  rows, cols = jnp.divmod(index, width)
  d = jnp.arange(-radius, radius + 1)
  dy, dx = [a.reshape(-1) for a in jnp.meshgrid(d, d, indexing="ij")]
  r, c = rows[..., None] + dy, cols[..., None] + dx
  inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
  return jnp.clip(r, 0, height - 1) * width + jnp.clip(c, 0, width - 1), inside


def match_points(points, position_b, mask_b, stride: int = 1):
  """Nearest B face pixel in mean-face space.

  Args:
    points: (B, K, 3) mean-face positions (e.g. of sampled A pixels).
    position_b: (B, H, W, 3) view B's `mean_face_position`; mask_b: (B, H, W) bool.
    stride: 1: exact argmin over all masked B pixels. s > 1: argmin over the masked pixels of
      every s-th row and column (s^2 times cheaper), then the exact nearest masked pixel in the
      (2s + 3)^2 window around that coarse winner (exact unless the surface folds back within
      a few pixels; used by the training loss).
  Returns:
    (index (B, K) int32 flat B pixel, distance (B, K) model units; +inf if B has no face).
  """
  b, h, w, _ = position_b.shape
  coarse_pos = position_b[:, ::stride, ::stride]
  hc, wc = coarse_pos.shape[1:3]
  d2 = squared_distances(points, coarse_pos.reshape(b, -1, 3))
  d2 = jnp.where(mask_b[:, ::stride, ::stride].reshape(b, 1, -1), d2, jnp.inf)
  idx = jnp.argmin(d2, -1).astype(jnp.int32)
  if stride == 1:
    dist = jnp.sqrt(jnp.take_along_axis(d2, idx[..., None], -1)[..., 0])
    return idx, dist
  rows, cols = jnp.divmod(idx, wc)
  win, inside = _window(rows * stride * w + cols * stride, h, w, stride + 1)  # (B, K, W2)
  pos_w = jnp.take_along_axis(position_b.reshape(b, -1, 3), win.reshape(b, -1, 1), 1)
  mask_w = jnp.take_along_axis(mask_b.reshape(b, -1), win.reshape(b, -1), 1).reshape(win.shape)
  d2w = jnp.sum((pos_w.reshape(*win.shape, 3) - points[:, :, None]) ** 2, -1)
  d2w = jnp.where(inside & mask_w, d2w, jnp.inf)
  best = jnp.argmin(d2w, -1)
  idx = jnp.take_along_axis(win, best[..., None], -1)[..., 0].astype(jnp.int32)
  dist = jnp.sqrt(jnp.take_along_axis(d2w, best[..., None], -1)[..., 0])
  return idx, dist


def match_pixels(index_a, view_a, view_b, match_threshold: float, stride: int = 1):
  """Partners in B of A's flat pixels `index_a` (B, K).

  Returns (index_b (B, K) int32, valid (B, K) bool: A pixel on the face and its nearest B face
  point closer than match_threshold, i.e. visible in both views).
  """
  b = index_a.shape[0]
  pos_a = jnp.take_along_axis(view_a["mean_face_position"].reshape(b, -1, 3),
                              index_a[..., None], 1)
  on_face = jnp.take_along_axis(view_a["mask"].reshape(b, -1), index_a, 1)
  idx, dist = match_points(pos_a, view_b["mean_face_position"], view_b["mask"], stride)
  return idx, on_face & (dist < match_threshold)


def _gather(desc, index):
  """desc (B, H, W, D), index (B, K) flat -> (B, K, D)."""
  b, h, w, d = desc.shape
  return jnp.take_along_axis(desc.reshape(b, h * w, d), index[..., None], 1)


# ---- loss ---------------------------------------------------------------------------------

def _one_way(key, desc_a, desc_b, view_a, view_b, config: LossConfig):
  """Soft-target InfoNCE from anchors in A to all pixels of B: (loss_sum, count, hits).

  The soft target is non-zero only on the (2 * target_radius_px + 1)^2 window of B pixels
  around the matched pixel, so the cross-entropy is logsumexp(all logits) - <target, window
  logits>: one (B, K, H*W) logit matrix and no dense target matrix.
  """
  b, h, w, _ = desc_b.shape
  idx_a, in_mask = sample_mask_pixels(key, view_a["mask"], config.num_anchors)
  pos_a = jnp.take_along_axis(view_a["mean_face_position"].reshape(b, -1, 3),
                              idx_a[..., None], 1)
  idx_b, dist = match_points(pos_a, view_b["mean_face_position"], view_b["mask"],
                             config.match_stride)
  valid = in_mask & (dist < config.match_threshold)
  # soft target on the window around the partner, by mean-face distance to the anchor's point
  win, inside = _window(idx_b, h, w, config.target_radius_px)  # (B, K, W2)
  flat_pos_b = view_b["mean_face_position"].reshape(b, -1, 3)
  pos_w = jnp.take_along_axis(flat_pos_b, win.reshape(b, -1, 1), 1).reshape(*win.shape, 3)
  mask_w = jnp.take_along_axis(view_b["mask"].reshape(b, -1), win.reshape(b, -1), 1)
  d2 = jnp.sum((pos_w - pos_a[:, :, None]) ** 2, -1)
  weight = jnp.where(inside & mask_w.reshape(win.shape),
                     jnp.exp(-0.5 * d2 / config.target_sigma ** 2), 0.0)
  target = jax.lax.stop_gradient(weight / jnp.maximum(jnp.sum(weight, -1, keepdims=True), 1e-12))
  anchors = _gather(desc_a, idx_a)  # (B, K, D)
  flat_b = desc_b.reshape(b, h * w, -1)
  logits = jnp.einsum("bkd,bmd->bkm", anchors, flat_b) / config.temperature
  desc_w = jnp.take_along_axis(flat_b, win.reshape(b, -1, 1), 1).reshape(*win.shape, -1)
  logits_w = jnp.einsum("bkd,bkwd->bkw", anchors, desc_w) / config.temperature
  ce = jax.nn.logsumexp(logits, -1) - jnp.sum(target * logits_w, -1)
  # metric: the most similar B pixel within radius_px of the true partner
  xy = pixel_centres(h, w)
  best = jnp.argmax(jax.lax.stop_gradient(logits), -1)
  err = jnp.linalg.norm(xy[best] - xy[idx_b], axis=-1)
  hits = jnp.sum(valid & (err <= config.radius_px))
  return jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid), hits


def correspondence_loss(key, desc_a, desc_b, view_a, view_b, config: LossConfig = LossConfig()):
  """Dense soft-target InfoNCE between two views (see module docstring).

  Args:
    key: PRNG key for the anchor sampling.
    desc_a, desc_b: (B, H, W, D) unit descriptors of views A and B.
    view_a, view_b: dicts with "mean_face_position" (B, H, W, 3) and "mask" (B, H, W) bool
      (synthetic.pose_pairs' examples).
  Returns:
    (loss scalar, metrics dict: loss, valid_anchors (mean per image and direction), within_px
    (fraction of valid anchors whose most similar pixel of the other image, searched over the
    whole image, lies within radius_px of the true partner)).
  """
  ka, kb = jax.random.split(key)
  loss, count, hits = _one_way(ka, desc_a, desc_b, view_a, view_b, config)
  directions = 1
  if config.symmetric:
    l2, c2, h2 = _one_way(kb, desc_b, desc_a, view_b, view_a, config)
    loss, count, hits, directions = loss + l2, count + c2, hits + h2, 2
  n = jnp.maximum(count, 1)
  loss = loss / n
  metrics = {"loss": loss, "within_px": hits / n,
             "valid_anchors": count / (directions * desc_a.shape[0])}
  return loss, metrics


def augment_images(key, images, config: LossConfig):
  """Per-image, per-channel gain x U(1 - j, 1 + j) and Gaussian noise, clipped to [0, 1]."""
  k1, k2 = jax.random.split(key)
  b = images.shape[0]
  gain = jax.random.uniform(k1, (b, 1, 1, 3), minval=1.0 - config.colour_jitter,
                            maxval=1.0 + config.colour_jitter)
  noise = config.noise_std * jax.random.normal(k2, images.shape)
  return jnp.clip(images * gain + noise, 0.0, 1.0)


# ---- training -----------------------------------------------------------------------------

def create_train_state(key, net: dff_lib.DFFNet, learning_rate: float, steps: int,
                       image_size: int, warmup_steps: Optional[int] = None):
  """TrainState (a pytree: step, params, Adam state) with warm-up + cosine decay to 1 %.

  `key` may be any PRNG key; an 'unsafe_rbg' key initialises much faster on XLA:CPU.
  """
  warmup = min(200, max(1, steps // 20)) if warmup_steps is None else warmup_steps
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup, max(steps, warmup + 1), end_value=learning_rate * 0.01)
  params = jax.jit(net.init)(key, jnp.zeros((1, image_size, image_size, 3)))["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  return train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)


def _train_step(state, view_a, view_b, key, config: LossConfig):
  k_aug, k_loss = jax.random.split(key)
  b = view_a["image"].shape[0]
  images = augment_images(k_aug, jnp.concatenate([view_a["image"], view_b["image"]]), config)

  def loss_fn(params):
    desc = state.apply_fn({"params": params}, images)
    return correspondence_loss(k_loss, desc[:b], desc[b:], view_a, view_b, config)

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.apply_gradients(grads=grads), metrics


train_step = jax.jit(_train_step, static_argnames=("config",), donate_argnums=(0,))
train_step.__doc__ = """One Adam step on a batch of view pairs.

Args: state (TrainState), view_a / view_b (pose_pairs dicts with image (B, S, S, 3),
mean_face_position, mask), key, config (static LossConfig).
Returns (new state, metrics dict of scalars: loss, within_px, valid_anchors, grad_norm).
The input state is donated."""


# ---- real pairs ---------------------------------------------------------------------------

VIEW_KEYS = ("image", "mean_face_position", "mask", "vertex_id")


def real_views(model: mm.MorphableModel, images, coefficients):
  """Views of real crops through the morphable model fitted to each (pseudo-correspondence).

  The fitted face is rasterised exactly as synthetic.render_examples renders a synthetic one
  (that very function; its unused shading is dead code under jit), so every pixel it covers
  gets its fitted surface point on the model's mean face: two different crops' pixels
  correspond where their mean-face positions meet, as two renders of one synthetic face do.

  Args:
    model: the morphable model the coefficients were fitted with.
    images: (B, S, S, 3) uint8, or float32 in [0, 1]: the real crops.
    coefficients: (B, P) float32 flat fitted vectors (dff3d.coefficients, model.sizes; e.g.
      aflw_3ddfa.load_pseudo68_coefficients). The default camera scales with the crop, so a
      fit at one crop size renders the same face at any S.
  Returns:
    dict: image (B, S, S, 3) float32 in [0, 1], mean_face_position (B, S, S, 3) model units
    (0 off the face), mask (B, S, S) bool (the fitted face's pixels), vertex_id (B, S, S)
    int32 (-1 off the face).
  """
  size = images.shape[1]
  ex = synthetic.render_examples(model, coeffs_lib.split(coefficients, model.sizes), None, size)
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  return {"image": images, **{k: ex[k] for k in VIEW_KEYS[1:]}}


def mixed_pairs(key, model: mm.MorphableModel, batch: int, size: int, max_yaw_diff: float,
                sampler: synthetic.SamplerConfig = synthetic.SamplerConfig(),
                real_a=None, real_b=None):
  """B view pairs: B - R synthetic pose pairs, then R real cross-crop pairs.

  Args:
    key: PRNG key of the synthetic pairs; batch B, size S, max_yaw_diff, sampler: as
      synthetic.pose_pairs.
    real_a, real_b: None (all B synthetic: exactly synthetic.pose_pairs) or dicts of R <= B
      crops each, "image" (R, S, S, 3) uint8 / float32 and "coefficients" (R, P): pair r is
      (real_a[r], real_b[r]), two different crops (different people).
  Returns:
    (view_a, view_b): dicts of (B, ...) arrays, VIEW_KEYS (all pose_pairs keys when R = 0).
  """
  if real_a is None:
    return synthetic.pose_pairs(key, model, batch, size, max_yaw_diff, sampler)
  ra = real_views(model, real_a["image"], real_a["coefficients"])
  rb = real_views(model, real_b["image"], real_b["coefficients"])
  n_real = ra["image"].shape[0]
  if n_real > batch or ra["image"].shape[1] != size:
    raise ValueError(f"{n_real} real pairs of {ra['image'].shape[1]} px for a batch of {batch} "
                     f"at {size} px")
  if n_real == batch:
    return ra, rb
  sa, sb = synthetic.pose_pairs(key, model, batch - n_real, size, max_yaw_diff, sampler)
  cat = lambda s, r: {k: jnp.concatenate([s[k], r[k]]) for k in VIEW_KEYS}
  return cat(sa, ra), cat(sb, rb)


@functools.partial(jax.jit, static_argnames=("batch", "size", "max_yaw_diff", "config",
                                             "sampler"), donate_argnums=(0,))
def mixed_train_step(state, key, model: mm.MorphableModel, batch: int, size: int,
                     max_yaw_diff: float, config: LossConfig = LossConfig(),
                     sampler: synthetic.SamplerConfig = synthetic.SamplerConfig(),
                     real_a=None, real_b=None):
  """Build B pairs with mixed_pairs (R real ones from real_a / real_b, the rest fresh
  synthetic pose pairs) and take one train_step on them, in one compiled program.
  Returns (new state, metrics). The input state is donated."""
  k_data, k_step = jax.random.split(key)
  view_a, view_b = mixed_pairs(k_data, model, batch, size, max_yaw_diff, sampler, real_a, real_b)
  return _train_step(state, view_a, view_b, k_step, config)


def synthetic_train_step(state, key, model: mm.MorphableModel, batch: int, size: int,
                         max_yaw_diff: float, config: LossConfig = LossConfig(),
                         sampler: synthetic.SamplerConfig = synthetic.SamplerConfig()):
  """Generate B fresh pose pairs (|yaw difference| uniform up to max_yaw_diff degrees) and take
  one train_step on them, in one compiled program (mixed_train_step without real pairs).
  Returns (new state, metrics). The input state is donated."""
  return mixed_train_step(state, key, model, batch, size, max_yaw_diff, config, sampler)


# ---- evaluation helpers (used by the benchmark and the tests) ------------------------------

def nearest_pixels(queries, desc_b, mask_b=None, chunk: int = 512):
  """For each query descriptor the flat index of the L2-nearest pixel of a descriptor map.

  Args:
    queries: (K, D); desc_b: (H, W, D) (unit descriptors: L2-nearest = most cosine-similar;
      also works for raw features such as RGB); mask_b: optional (H, W) bool restricting the
      search to those pixels (None: the whole image).
    chunk: queries per block (bounds memory at chunk x H*W).
  Returns:
    (K,) int32 flat indices into B.
  """
  h, w, d = desc_b.shape
  flat = desc_b.reshape(h * w, d)
  sq = jnp.sum(flat * flat, -1)
  if mask_b is not None:
    sq = jnp.where(mask_b.reshape(-1), sq, jnp.inf)
  k = queries.shape[0]
  pad = (-k) % chunk
  q = jnp.pad(queries, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  best = jax.lax.map(lambda qc: jnp.argmin(sq[None] - 2.0 * qc @ flat.T, -1), q)
  return best.reshape(-1)[:k].astype(jnp.int32)
