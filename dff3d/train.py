"""Training of the regressor with the paper's losses (Sec. 3.3, 4.1): state, steps, loop.

No flags here (experiments/train.py holds them). Data parallel with jax.sharding: the batch is
split over all local devices along its first axis, parameters are replicated, and XLA inserts
the gradient all-reduce; one CPU device works unchanged.

Landmarks come as named point sets (dff3d.landmark_sets): every batch row carries its set
index, so iBUG-68 examples (synthetic, 300W-LP, CelebA) and AFLW-21 examples (real AFLW crops)
train in one loop. Per epoch the loop accumulates each point's mean normalised error over the
examples where it is labelled, per set; from `config.land_error_start_epoch` on,
L_land_error weights each set's inner points by the previous epoch's errors (paper: from epoch
6, i.e. index 5 counting from 0).
"""

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import distributed
from dff3d import landmark_sets
from dff3d import losses
from dff3d import metrics
from dff3d import morphable_model as mm
from dff3d import render as render_lib
from dff3d.models import dff as dff_lib
from dff3d.models import light
from dff3d.models import vgg


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One experiment's settings (experiments/configs/*.py return these)."""
  name: str = "paper"
  backbone: str = "vgg16"          # "vgg16" (paper) or "light"
  width: float = 1.0
  fc_width: int = 4096
  pool: str = "mean"               # light backbone: "mean" or "flatten" (models/light.py)
  input_window: tuple = ()         # () or (x0, y0, x1, y1): input black outside (heads.py)
  image_size: int = 224
  batch_size: int = 16
  learning_rate: float = 1e-5
  decayed_learning_rate: float = 1e-6
  decay_epoch: int = 5             # lr drops after this many epochs
  num_epochs: int = 10
  land_error_start_epoch: int = 5  # 0-based: the paper's epoch 6
  weights: losses.LossWeights = losses.LossWeights()
  landmark_loss: str = "l2"        # L_land / L_land_error penalty: "l2" (paper), "l1", "wing"
  use_dff: bool = True
  dff_path: str = ""               # "" -> the shipped dff3d/assets/dff.npz
  flip_prob: float = 0.5
  max_rotation_deg: float = 30.0
  colour_range: tuple = (0.7, 1.3)
  box_scale_jitter: float = 0.0    # not the paper's: re-framed crops (augment.jitter_box)
  box_shift_jitter: float = 0.0
  box_jitter_prob: float = 1.0     # share of examples jittered (augment.AugmentConfig)
  data: str = "synthetic"          # "synthetic", "aflw" (real crops) or TFDS dataset dirs
  synthetic_train: int = 20000
  synthetic_val: int = 256
  synthetic_render_size: int = 0   # 0: image_size * 1.25 (the crop then resamples)
  val_data: str = ""               # TFDS dir for validation ("" -> a held-out part of data)
  aflw_dir: str = "../shared/data/aflw_3ddfa"  # data="aflw": the 3DDFA AFLW layout
  aflw_pseudo68: str = ""          # .npz of data_prep.aflw_pseudo68 (crop boxes, 68 labels)
  aflw_labels: str = "pts21"       # "pts21" (the 21 hand points) or "pseudo68" (fitted 68)
  aflw_max_train: int = 0          # use only the first N training crops (0: all)
  aflw_pose_balance: bool = False  # repeat 30-60 / 60+ degree crops to the 0-30 group's count
  synthetic_mix: int = 0           # data="aflw": add this many synthetic faces to training
  dev_dir: str = ""                # AFLW2000-3D folder validated every epoch ("" -> none)
  log_every_steps: int = 20
  eval_every_steps: int = 500
  checkpoint_every_steps: int = 0  # 0: at epoch ends (and on request) only
  init_params: str = ""            # fine-tune: start from these parameters ("shipped", a .npz
                                   # or a workdir); Adam and error statistics start fresh
  seed: int = 0

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


# ---- state ----------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole).

  step: () int32 global step.  params, opt_state: network and Adam state.
  point_error: (S, 68) previous epoch's mean normalised error of each point of each landmark
    set (L_land_error; 1 before the first epoch and where a point was never labelled).
  error_sum: (S, 68), error_count: (S, 68) accumulators of the current epoch (the count is
    each point's own number of labelled examples).
  """
  step: jnp.ndarray
  params: Any
  opt_state: Any
  point_error: jnp.ndarray
  error_sum: jnp.ndarray
  error_count: jnp.ndarray


def make_network(config: TrainConfig, model: mm.MorphableModel):
  """The Flax regressor of a config."""
  return vgg.make_regressor(model, config.backbone, width=config.width,
                            fc_width=config.fc_width, pool=config.pool,
                            input_window=config.input_window)


@functools.lru_cache(maxsize=16)
def make_optimizer(config: TrainConfig, steps_per_epoch: int):
  """Adam with the paper's step decay (lr, then decayed lr after decay_epoch epochs)."""
  boundary = max(1, config.decay_epoch * steps_per_epoch)
  schedule = optax.piecewise_constant_schedule(
      config.learning_rate, {boundary: config.decayed_learning_rate / config.learning_rate})
  return optax.adam(schedule), schedule


def create_train_state(key, net, tx, image_size: int) -> TrainState:
  """Fresh state: initialised network, Adam state, zero error statistics."""
  params = net.init(key, jnp.zeros((1, image_size, image_size, 3)))["params"]
  shape = (len(landmark_sets.SETS), landmark_sets.MAX_POINTS)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    point_error=jnp.ones(shape), error_sum=jnp.zeros(shape),
                    error_count=jnp.zeros(shape))


def end_epoch(state: TrainState) -> TrainState:
  """Move the epoch's mean error of each point into point_error (points not labelled this
  epoch keep their old value) and reset the accumulators."""
  mean = state.error_sum / jnp.maximum(state.error_count, 1.0)
  return state.replace(point_error=jnp.where(state.error_count > 0, mean, state.point_error),
                       error_sum=jnp.zeros_like(state.error_sum),
                       error_count=jnp.zeros_like(state.error_count))


# ---- loss and steps -------------------------------------------------------------------------
def compute_losses(params, batch, *, net, model, table, config: TrainConfig, point_error,
                   land_error_on, dff_fn: Optional[Callable] = None):
  """All loss terms for a batch.

  Args:
    batch: "image" (B, S, S, 3), "landmarks" (B, 68, 2) crop pixels (padded point sets),
      "landmarks_visible" (B, 68) in {0, 1}, "landmark_set" (B,) int set index; optional
      "rotation" (B, 3, 3) pose labels with "rotation_weight" (B,) (the "pose" term).
    table: landmark_sets.SetTable of `model`.
    point_error: (n_sets, 68); land_error_on: () float in {0, 1} (traced: no recompilation).
    dff_fn: frozen DFF (images -> unit descriptors) or None.
  Returns:
    (total, aux) with aux holding each unweighted term, "loss", "point_error_batch"
    (n_sets, 68) (summed normalised distance of each labelled point) and "point_count"
    (n_sets, 68) (how many examples label it).
  """
  s = config.image_size
  w = config.weights
  images = batch["image"]
  x = net.apply({"params": params}, images)
  c = coeffs_lib.split(x, model.sizes)
  needs_render = w.photo > 0 or (dff_fn is not None)
  if needs_render:
    r = render_lib.render(model, c, (s, s), background=images)
    screen = r.screen_vertices
  else:  # L_land (+ L_land_error, L_reg) only: no rasterisation needed
    _, screen, _ = render_lib.camera_vertices(model, c, (s, s))
  sets = (batch["landmark_set"].astype(jnp.int32) if "landmark_set" in batch
          else jnp.zeros(images.shape[:1], jnp.int32))  # iBUG-68 by default
  pred = landmark_sets.points(screen, table, sets)[..., :2]   # (B, 68, 2)
  target = batch["landmarks"]
  vis = batch["landmarks_visible"] * (table.weights[sets] > 0)
  weights = table.weights[sets] * vis
  err_weights = point_error[sets] * table.inner[sets] * vis
  terms = {
      "land": losses.landmark_loss(pred, target, weights, s, config.landmark_loss),
      "land_error": (losses.landmark_loss(pred, target, err_weights, s, config.landmark_loss)
                     * land_error_on),
      "photo": (losses.photometric_loss(images, r.image, r.skin_mask) if needs_render
                else jnp.zeros(())),
      "reg": losses.weighted_regularization(c, w),
  }
  total = (w.land * terms["land"] + w.land_error * terms["land_error"]
           + w.photo * terms["photo"] + w.reg * terms["reg"])
  if "rotation" in batch:
    terms["pose"] = losses.rotation_loss(camera.rotation_matrix(c.rotation), batch["rotation"],
                                         batch["rotation_weight"])
    total = total + w.pose * terms["pose"]
  if dff_fn is not None:
    lm_ids = model.landmarks
    visible = losses.landmark_visibility(r.normals_cam[:, lm_ids], r.vertices_cam[:, lm_ids])
    d_img = dff_lib.sample_descriptors(jax.lax.stop_gradient(dff_fn(images)), r.landmarks_2d)
    d_ren = dff_lib.sample_descriptors(dff_fn(r.image), r.landmarks_2d)
    terms["dff"] = losses.dff_loss(d_img, d_ren, visible)
    total = total + w.dff * terms["dff"]
  dist = jnp.linalg.norm(pred - target, axis=-1) / s * vis  # (B, 68)
  one_hot = jax.nn.one_hot(sets, len(landmark_sets.SETS), dtype=dist.dtype)  # (B, n_sets)
  aux = dict(terms, loss=total,
             point_error_batch=jnp.einsum("bs,bk->sk", one_hot, dist),
             point_count=jnp.einsum("bs,bk->sk", one_hot, vis))
  return total, aux


@functools.partial(jax.jit, static_argnames=("net", "tx", "config", "dff_fn"),
                   donate_argnums=(0,))
def train_step(state: TrainState, batch, land_error_on, model, table, *, net, tx, config,
               dff_fn):
  """One Adam step (jitted; the arrays of `model` and the landmark-set `table` are arguments,
  the rest static); returns (state, metrics of scalars)."""
  grad_fn = jax.value_and_grad(compute_losses, has_aux=True)
  (_, aux), grads = grad_fn(state.params, batch, net=net, model=model, table=table,
                            config=config, point_error=state.point_error,
                            land_error_on=land_error_on, dff_fn=dff_fn)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  count = aux.pop("point_count")
  err = aux.pop("point_error_batch")
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                      error_sum=state.error_sum + err, error_count=state.error_count + count)
  return new, aux


def predict(params, images, *, net, model):
  """Coefficients (B, ...) for crops (B, S, S, 3)."""
  return coeffs_lib.split(net.apply({"params": params}, images), model.sizes)


def predict_landmarks(params, images, *, net, model, image_size, table=None, sets=None):
  """Crop-pixel landmarks of the regressed faces: (B, 68, 2) iBUG-68 points, or with a
  landmark-set `table` and per-image `sets` (B,) each image's set (padded to 68)."""
  c = predict(params, images, net=net, model=model)
  cam, screen, _ = render_lib.camera_vertices(model, c, (image_size, image_size))
  if table is None:
    return mm.landmark_points(model, screen)[..., :2]
  return landmark_sets.points(screen, table, sets)[..., :2]


@functools.partial(jax.jit, static_argnames=("net", "image_size"))
def _predict_landmarks_jit(params, images, sets, model, table, *, net, image_size):
  return predict_landmarks(params, images, net=net, model=model, image_size=image_size,
                           table=table, sets=sets)


# ---- data ---------------------------------------------------------------------------------
def synthetic_pool(num: int, size: int, seed: int, chunk: int = 32):
  """In-memory synthetic examples (image uint8, landmarks, visibility) for training/eval:
  list of dicts, generated in chunks with dff3d.synthetic.sample_batch (deterministic)."""
  from dff3d import synthetic
  model = mm.default_model()
  out = []
  for start in range(0, num, chunk):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), start // chunk)
    b = synthetic.sample_batch(key, model, chunk, size)
    img = np.asarray(jnp.round(b["image"] * 255.0)).astype(np.uint8)
    pts, vis = np.asarray(b["landmarks"]), np.asarray(b["landmarks_visible"])
    rot = np.asarray(camera.rotation_matrix(
        coeffs_lib.split(b["coefficients"], model.sizes).rotation), np.float32)
    for i in range(min(chunk, num - start)):
      out.append({"image": img[i], "landmarks": pts[i], "landmarks_visible": vis[i],
                  "rotation": rot[i]})
  return out


class _Subset:
  """Rows `indices` of a random-access source."""

  def __init__(self, source, indices):
    self._source, self._idx = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self._idx)

  def __getitem__(self, i):
    return self._source[int(self._idx[int(i)])]


def hold_out(source, fraction: float = 0.02, minimum: int = 16):
  """(train, validation) parts of one source: every round(1 / fraction)-th example is held
  out (at least `minimum`), so validation never sees a training example."""
  n = len(source)
  stride = max(2, min(int(round(1.0 / fraction)), n // max(minimum, 1)))
  held = np.arange(0, n, stride)
  return _Subset(source, np.setdiff1d(np.arange(n), held)), _Subset(source, held)


def make_sources(config: TrainConfig):
  """(train source, validation source) for config.data.

  "synthetic": in-memory pools; "aflw": the real AFLW crops of config.aflw_dir (validation: its
  held-out split, 21 hand points), plus config.synthetic_mix synthetic faces; otherwise TFDS
  dirs, validated on config.val_data's "test" split or, without one, on a held-out part of the
  first dataset's "train" split (never on examples that are trained on)."""
  from dff3d.data import sources
  if config.data == "synthetic":
    size = config.synthetic_render_size or int(round(config.image_size * 1.25))
    train = synthetic_pool(config.synthetic_train, size, config.seed)
    val = synthetic_pool(config.synthetic_val, size, config.seed + 1_000_003)
    return train, val
  if config.data == "aflw":
    from dff3d.data import real
    train, val = real.aflw_sources(config.aflw_dir, config.aflw_pseudo68, config.aflw_labels,
                                   config.aflw_max_train, config.aflw_pose_balance,
                                   with_pose=config.weights.pose > 0)
    if config.synthetic_mix:
      size = config.synthetic_render_size or int(round(config.image_size * 1.25))
      train = sources.ConcatSource(train, synthetic_pool(config.synthetic_mix, size,
                                                         config.seed))
    return train, val
  dirs = config.data.split(",")
  if config.val_data:
    train = sources.ConcatSource(*[sources.open_tfds(d, "train") for d in dirs])
    return train, sources.open_tfds(config.val_data, "test")
  first, val = hold_out(sources.open_tfds(dirs[0], "train"))
  return sources.ConcatSource(first, *[sources.open_tfds(d, "train") for d in dirs[1:]]), val


def make_pipelines(config: TrainConfig, train_source, val_source, shard_index: int = 0,
                   shard_count: int = 1):
  """(training pipeline: this process's rows of each global batch, validation pipeline:
  every example, on every process)."""
  from dff3d.data import augment, pipeline
  aug = augment.AugmentConfig(flip_prob=config.flip_prob,
                              max_rotation_deg=config.max_rotation_deg,
                              colour_range=tuple(config.colour_range),
                              box_scale_jitter=config.box_scale_jitter,
                              box_shift_jitter=config.box_shift_jitter,
                              box_jitter_prob=config.box_jitter_prob)
  train = pipeline.InputPipeline(train_source, pipeline.PipelineConfig(
      batch_size=config.batch_size, image_size=config.image_size, augment=aug,
      seed=config.seed, num_threads=2, prefetch=4 * config.batch_size,
      shard_index=shard_index, shard_count=shard_count))
  val = eval_pipeline(config, val_source)
  return train, val


def eval_pipeline(config: TrainConfig, source):
  """Evaluation pipeline (no augmentation, source order, yaw passed through when present)."""
  from dff3d.data import pipeline
  extra = ("yaw_deg",) if len(source) and "yaw_deg" in source[0] else ()
  return pipeline.InputPipeline(source, pipeline.eval_config(
      config.batch_size, image_size=config.image_size, num_threads=2, extra_keys=extra))


# ---- evaluation -----------------------------------------------------------------------------
def predictions(predict_fn, val_pipeline):
  """Predicted and labelled points over a pipeline's epoch (padding rows dropped).

  predict_fn: (images (B, S, S, 3), sets (B,)) -> (B, 68, 2). Returns a dict of numpy arrays:
  "pred", "landmarks" (n, 68, 2), "visible" (n, 68) bool, "landmark_set" (n,), "yaw_deg"
  (n,) (NaN when the examples have none)."""
  out = {k: [] for k in ("pred", "landmarks", "visible", "landmark_set", "yaw_deg")}
  for batch in val_pipeline.epoch(0):
    keep = batch["index"] >= 0
    pred = np.asarray(predict_fn(jnp.asarray(batch["image"], jnp.float32),
                                 jnp.asarray(batch["landmark_set"], jnp.int32)))
    out["pred"].append(pred[keep])
    out["landmarks"].append(batch["landmarks"][keep])
    out["visible"].append(batch["landmarks_visible"][keep] > 0)
    out["landmark_set"].append(batch["landmark_set"][keep])
    yaw = batch.get("yaw_deg", np.full(len(keep), np.nan))
    out["yaw_deg"].append(np.asarray(yaw, np.float64).reshape(-1)[keep])
  return {k: np.concatenate(v) for k, v in out.items()}


def nme_of(pred) -> np.ndarray:
  """(n,) NME per example: over the visible points of its set, normalised by sqrt(w h) of
  their box (for all-visible 68-point examples this is the AFLW2000-3D metric)."""
  return metrics.nme_visible(pred["pred"], pred["landmarks"], pred["visible"])


def evaluate_nme(predict_fn, val_pipeline) -> float:
  """Mean NME over a pipeline's epoch (the paper's bbox-normalised metric over each
  example's labelled points)."""
  return float(np.nanmean(nme_of(predictions(predict_fn, val_pipeline))))


def evaluate_dev(predict_fn, dev_pipeline) -> dict:
  """AFLW2000-3D figures in the Table-1 layout: "nme_0_30", "nme_30_60", "nme_60_90",
  "nme_mean" (mean of the group means), "nme_all" (mean over images)."""
  pred = predictions(predict_fn, dev_pipeline)
  nme = nme_of(pred)
  out = {k: v for k, v in metrics.grouped_nme(nme, pred["yaw_deg"]).items()
         if k.startswith("nme")}
  out["nme_all"] = float(np.mean(nme))
  return {k: (float(v) if v is not None and np.isfinite(v) else None) for k, v in out.items()}


# ---- checkpoints ----------------------------------------------------------------------------
def checkpoint_manager(workdir: str, max_to_keep: int = 3):
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save_checkpoint(mngr, state: TrainState, epoch: int, batch_in_epoch: int):
  """Saves `state` under its step; a step that is already saved (an epoch end that is also a
  checkpoint_every_steps step, the last step, a stop right after resuming) is left as it is,
  since it holds the same state. With several processes every one calls it (Orbax writes
  each replicated array once)."""
  step = int(state.step)
  if step in mngr.all_steps():
    return
  if jax.process_count() == 1:
    state = jax.device_get(state)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({"epoch": epoch, "batch_in_epoch": batch_in_epoch})), force=True)
  mngr.wait_until_finished()


def restore_checkpoint(mngr, abstract_state: TrainState):
  """(state, epoch, batch_in_epoch) from the latest checkpoint, or None."""
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  meta = restored.meta
  return restored.state, int(meta["epoch"]), int(meta["batch_in_epoch"])


SHIPPED_REGRESSOR = os.path.join(mm.ASSET_DIR, "regressor.npz")


def save_params_npz(path: str, params, config: TrainConfig, dtype=np.float16):
  """Writes network parameters (flattened pytree paths -> arrays in `dtype`) and the config
  JSON to one .npz (the shipped-weights format)."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
  arrays = {f"params/{k}": np.asarray(v).astype(dtype) for k, v in flat.items()}
  np.savez(path, config_json=np.asarray(config_to_json(config)), **arrays)


def load_params_npz(path: str):
  """(params pytree float32, TrainConfig) from save_params_npz's file."""
  try:
    with np.load(path, allow_pickle=False) as z:
      config = config_from_json(str(z["config_json"]))
      flat = {k[len("params/"):]: jnp.asarray(z[k], jnp.float32)
              for k in z.files if k.startswith("params/")}
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path}: not a dff3d regressor file ({str(e).splitlines()[0]})") from None
  return flax.traverse_util.unflatten_dict(flat, sep="/"), config


def workdir_params(checkpoint: str, model: mm.MorphableModel):
  """(params, config) of the latest checkpoint of a training workdir: restores only the
  parameters (the Adam state and error statistics are not read)."""
  workdir = checkpoint.rstrip("/")
  if os.path.basename(workdir) == "checkpoints":
    workdir = os.path.dirname(workdir)
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: no config.json (expected a training workdir)")
  with open(cfg_path) as f:
    config = config_from_json(f.read())
  net = make_network(config, model)
  mngr = checkpoint_manager(workdir)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint found")
  abstract = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros(
      (1, config.image_size, config.image_size, 3)))["params"])
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      {"params": abstract}, restore_args=jax.tree_util.tree_map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), {"params": abstract}),
      partial_restore=True)))  # as NumPy: loads on any device count (multi-host runs too)
  return restored.state["params"], config


def read_params(checkpoint: str, model: mm.MorphableModel):
  """(params, TrainConfig) of "shipped" (dff3d/assets/regressor.npz), a .npz written by
  save_params_npz, or a training workdir (or its checkpoints folder)."""
  if checkpoint == "shipped":
    checkpoint = SHIPPED_REGRESSOR
    if not os.path.isfile(checkpoint):
      raise FileNotFoundError(f"{checkpoint}: the shipped regressor is missing from the "
                              "installation")
  if checkpoint.endswith(".npz"):
    return load_params_npz(checkpoint)
  return workdir_params(checkpoint, model)


def load_regressor(checkpoint: str = "shipped", model: Optional[mm.MorphableModel] = None,
                   flip_average: bool = False):
  """A jitted function crops (B, S, S, 3) -> Coefficients, with `.image_size` S,
  `.config` and `.flip_average`.

  checkpoint: "shipped" (default: dff3d/assets/regressor.npz, trained on real AFLW photos), a
  .npz written by save_params_npz, or a training workdir (or its checkpoints folder), whose
  config.json names the network; only the parameters are restored.
  flip_average: also regress each crop's left-right mirror image and average the two
  estimates in coefficient space (symmetry.flip_average; twice the network's cost).
  """
  model = model if model is not None else mm.default_model()
  params, config = read_params(checkpoint, model)
  net = make_network(config, model)
  if flip_average:
    from dff3d import symmetry
    maps = symmetry.mirror_maps(model)

    def run(images):
      both = predict(params, jnp.concatenate([images, images[:, :, ::-1]]), net=net, model=model)
      n = images.shape[0]
      half = lambda lo, hi: jax.tree_util.tree_map(lambda a: a[lo:hi], both)
      return symmetry.flip_average(half(0, n), half(n, 2 * n), maps)
  else:
    run = lambda images: predict(params, images, net=net, model=model)
  fn = jax.jit(run)
  fn.image_size = config.image_size
  fn.config = config
  fn.flip_average = flip_average
  return fn


def load_init_params(config: TrainConfig, model: mm.MorphableModel):
  """The float32 parameters of config.init_params, checked to be this config's network
  (backbone, width, head, crop size); ValueError / FileNotFoundError naming the source.
  A "mean"-pool source for a "flatten" config is expanded to the same function
  (light.expand_head); a light source of half this config's width is widened to about the
  same function (light.widen, kernels perturbed by light.WIDEN_NOISE so the copies can part)."""
  params, source = read_params(config.init_params, model)
  expand = source.pool == "mean" and config.pool == "flatten"
  wider = (config.backbone == "light" and config.width == 2 * source.width
           and light.doubles(source.width))
  # A mean-pool light network's parameters fit any crop size; vgg16's fc6 and a flatten
  # head's kernel are sized by it.
  sized = config.backbone == "vgg16" or source.pool == "flatten"
  if ((source.backbone, source.fc_width) != (config.backbone, config.fc_width)
      or (source.width != config.width and not wider)
      or (sized and source.image_size != config.image_size)
      or (source.pool != config.pool and not expand)):
    pool = lambda c: f" ({c.pool} pool)" if source.pool != config.pool else ""
    raise ValueError(
        f"{config.init_params}: a {source.backbone} x{source.width} network at "
        f"{source.image_size} px{pool(source)}, not this config's {config.backbone} "
        f"x{config.width} at {config.image_size} px{pool(config)}")
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  if wider:
    params = light.widen(params, jax.random.PRNGKey(config.seed), light.WIDEN_NOISE)
  return light.expand_head(params, config.image_size) if expand else params


def init_from(state: TrainState, config: TrainConfig, model: mm.MorphableModel,
              tx) -> TrainState:
  """A fresh state whose parameters are those of config.init_params (fine-tuning); Adam and
  the error statistics start anew."""
  params = load_init_params(config, model)
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), tree)
  if shapes(params) != shapes(state.params):
    raise ValueError(f"{config.init_params}: parameter shapes differ from this config's "
                     "network (another morphable model?)")
  return state.replace(params=params, opt_state=tx.init(params))


def parse_weights(weights: losses.LossWeights, items) -> losses.LossWeights:
  """`weights` with "name=value" items replaced (e.g. ["photo=0", "dff=0.1"]); ValueError
  naming the item for an unknown name or a value that is not a number."""
  fields = set(weights.__dataclass_fields__)
  new = {}
  for item in items:
    name, _, value = item.partition("=")
    try:
      if name not in fields:
        raise ValueError
      new[name] = float(value)
    except ValueError:
      raise ValueError(f"{item!r} is not name=value with a number and a name in "
                       f"{sorted(fields)}") from None
  return weights.replace(**new)


def config_to_json(config: TrainConfig) -> str:
  d = dataclasses.asdict(config)
  d["weights"] = {f.name: getattr(config.weights, f.name)
                  for f in dataclasses.fields(config.weights)}
  return json.dumps(d, indent=2)


def config_from_json(text: str) -> TrainConfig:
  d = json.loads(text)
  d["weights"] = losses.LossWeights(**d["weights"])
  d["colour_range"] = tuple(d["colour_range"])
  d["input_window"] = tuple(d.get("input_window", ()))
  return TrainConfig(**d)


@functools.lru_cache(maxsize=4)
def _frozen_dff(path):
  """One frozen DFF function per file, so jitted steps that close over it are reused; the
  shipped network runs at its native 96 px (dff_lib.SHIPPED_NATIVE_SIZE)."""
  shipped = os.path.abspath(path) == os.path.abspath(os.path.join(mm.ASSET_DIR, "dff.npz"))
  return dff_lib.load_frozen_dff(path, dff_lib.SHIPPED_NATIVE_SIZE if shipped else None)


# ---- the loop -------------------------------------------------------------------------------
class _StopRequest:
  """SIGINT / SIGTERM set a flag: the loop checkpoints and returns (checkpoint on request)."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    return self

  def _handle(self, *_):
    self.requested = True

  def __exit__(self, *_):
    for s, h in self._old.items():
      signal.signal(s, h)


def _log(path, record):
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _workdir_pseudo68(config: TrainConfig, workdir: str, verbose: bool) -> str:
  """The workdir's pseudo-68 labels of config.aflw_dir, fitted and written on first use."""
  path = os.path.join(workdir, "AFLW_GT_pseudo68.npz")
  if not os.path.isfile(path):
    from dff3d.data import real
    t = time.time()
    err = real.write_pseudo68(config.aflw_dir, path)
    if verbose:
      print(f"pseudo-68 labels: {len(err)} AFLW crops fitted in {time.time() - t:.0f} s "
            f"(median fit error {100 * np.median(err):.2f}% of the crop) -> {path}")
  return path


def host_batch(batch) -> dict:
  """The training step's inputs of one pipeline batch as NumPy: image (B, S, S, 3),
  landmarks (B, 68, 2), landmarks_visible (B, 68), rotation (B, 3, 3) and rotation_weight
  (B,) (when the batch has them) float32; landmark_set (B,) int32."""
  keys = ("image", "landmarks", "landmarks_visible", "rotation", "rotation_weight")
  out = {k: np.asarray(batch[k], np.float32) for k in keys if k in batch}
  out["landmark_set"] = np.asarray(batch["landmark_set"], np.int32)
  return out


def train_and_evaluate(config: TrainConfig, workdir: str, max_steps: Optional[int] = None,
                       sources_override=None, verbose: bool = True,
                       max_seconds: Optional[float] = None):
  """Train (resuming from workdir's latest checkpoint) and evaluate; returns the final state.

  max_seconds bounds the training time (data preparation not counted); the run checkpoints
  and stops when it is spent. Writes workdir/config.json, workdir/metrics.jsonl (one object
  per logged step: step, epoch, loss, each term, lr, images_per_s; evaluation adds val_nme,
  the NME over the labelled points of the validation examples; at every epoch end and at the
  end, with config.dev_dir, "dev" holds the AFLW2000-3D figures of evaluate_dev) and Orbax
  checkpoints at every epoch end, every checkpoint_every_steps, at the end, and on SIGINT /
  SIGTERM.
  """
  primary = distributed.is_primary()
  verbose = verbose and primary
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_to_json(config))
  if config.data == "aflw" and config.aflw_labels == "pseudo68" and not config.aflw_pseudo68:
    if primary:
      _workdir_pseudo68(config, workdir, verbose)
    distributed.barrier("pseudo68")
    config = config.replace(aflw_pseudo68=os.path.join(workdir, "AFLW_GT_pseudo68.npz"))
  model = mm.default_model()
  train_src, val_src = sources_override or make_sources(config)
  train_pipe, val_pipe = make_pipelines(config, train_src, val_src, jax.process_index(),
                                        jax.process_count())
  dev_pipe = None
  if config.dev_dir:
    from dff3d.data import real
    dev_src = real.Aflw2000Source(config.dev_dir)
    for line in dev_src.failures:
      print(f"dev: skipped {line}")
    dev_pipe = eval_pipeline(config, dev_src)
  table = landmark_sets.set_table(model)
  steps_per_epoch = len(train_pipe)
  total_steps = steps_per_epoch * config.num_epochs
  if max_steps is not None:
    total_steps = min(total_steps, max_steps)
  net = make_network(config, model)
  tx, schedule = make_optimizer(config, steps_per_epoch)
  dff_fn = None
  if config.use_dff and config.weights.dff > 0:
    path = config.dff_path or os.path.join(mm.ASSET_DIR, "dff.npz")
    dff_fn = _frozen_dff(path)

  devices = jax.devices()  # every process's devices: one global mesh
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if config.batch_size % len(devices):
    raise ValueError(f"batch_size {config.batch_size} must divide over {len(devices)} devices")

  state = create_train_state(jax.random.PRNGKey(config.seed), net, tx, config.image_size)
  mngr = checkpoint_manager(workdir)
  epoch, skip = 0, 0
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(lambda: state))
  restored = restore_checkpoint(mngr, abstract)
  if restored is not None:
    state, epoch, skip = restored
    if verbose:
      print(f"resumed from step {int(state.step)} (epoch {epoch}, batch {skip})")
  elif config.init_params:
    state = init_from(state, config, model, tx)
    if verbose:
      print(f"parameters from {config.init_params}")
  state = jax.device_put(state, replicated)

  step_fn = functools.partial(train_step, model=model, table=table, net=net, tx=tx,
                              config=config, dff_fn=dff_fn)
  pred_fn = functools.partial(_predict_landmarks_jit, model=model, table=table, net=net,
                              image_size=config.image_size)
  predictor = lambda: (lambda im, sets: pred_fn(state.params, im, sets))

  def log(record):
    if primary:
      _log(metrics_path, record)

  def dev_record(epoch_now):
    if dev_pipe is None:
      return
    rec = {"step": int(state.step), "epoch": epoch_now, "dev": evaluate_dev(predictor(), dev_pipe)}
    log(rec)
    if verbose:
      d = rec["dev"]
      pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
      print(f"dev (AFLW2000-3D, {len(dev_pipe.source)} images) NME % 0-30 {pct(d['nme_0_30'])} "
            f"30-60 {pct(d['nme_30_60'])} 60-90 {pct(d['nme_60_90'])} mean "
            f"{pct(d['nme_mean'])}", flush=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  step = start_step = int(state.step)
  t0 = last_t = time.time()
  last_step = step
  if step == 0 and config.eval_every_steps:  # the untrained network's figure, for the curve
    log({"step": 0, "epoch": 0, "val_nme": evaluate_nme(predictor(), val_pipe)})
  with _StopRequest() as stop:
    while step < total_steps and not stop.requested:
      on = jnp.float32(epoch >= config.land_error_start_epoch)
      done_in_epoch, finished = skip, True
      for batch in train_pipe.epoch(epoch, start_batch=skip):
        out_of_time = max_seconds is not None and time.time() - t0 > max_seconds
        if step >= total_steps or distributed.any_process(stop.requested or out_of_time,
                                                          after=state):
          finished = False
          break
        batch = distributed.global_batch(host_batch(batch), data_sharding)
        state, aux = step_fn(state, batch, on)
        step += 1
        done_in_epoch += 1
        if step % config.log_every_steps == 0 or step == total_steps:
          now = time.time()
          rec = dict(step=step, epoch=epoch, lr=float(schedule(step)),
                     images_per_s=(step - last_step) * config.batch_size / max(now - last_t, 1e-9),
                     **{k: float(v) for k, v in jax.device_get(aux).items()})
          last_t, last_step = now, step
          if config.eval_every_steps and step % config.eval_every_steps == 0:
            rec["val_nme"] = evaluate_nme(predictor(), val_pipe)
          log(rec)
          if verbose:
            eta = (total_steps - step) * (now - t0) / max(step - start_step, 1)
            extra = f" val_nme {rec['val_nme'] * 100:.2f}%" if "val_nme" in rec else ""
            print(f"step {step}/{total_steps} epoch {epoch} loss {rec['loss']:.4f} "
                  f"land {rec['land']:.5f} photo {rec['photo']:.4f}{extra} "
                  f"{rec['images_per_s']:.1f} img/s ETA {eta / 60:.1f} min", flush=True)
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          save_checkpoint(mngr, state, epoch, done_in_epoch)
      if finished:
        state = end_epoch(state)
        epoch, skip = epoch + 1, 0
        save_checkpoint(mngr, state, epoch, 0)
        if epoch < config.num_epochs:
          log({"step": step, "epoch": epoch, "val_nme": evaluate_nme(predictor(), val_pipe)})
          dev_record(epoch)
      else:  # max_steps, max_seconds or a stop request: checkpoint where we are
        save_checkpoint(mngr, state, epoch, done_in_epoch)
        break
    if max_seconds is not None and time.time() - t0 > max_seconds and verbose:
      print(f"stopped after {max_seconds / 60:.1f} min (max_seconds)")
  final = {"step": step, "epoch": epoch, "final": True,
           "val_nme": evaluate_nme(predictor(), val_pipe)}
  log(final)
  dev_record(epoch)
  if verbose:
    print(f"done: step {step}, val_nme {final['val_nme']*100:.2f}% "
          f"({(time.time() - t0) / 60:.1f} min)")
  return state
