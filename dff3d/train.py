"""Training of the regressor with the paper's losses (Sec. 3.3, 4.1): state, steps, loop.

No flags here (experiments/train.py holds them). Data parallel with jax.sharding: the batch is
split over all local devices along its first axis, parameters are replicated, and XLA inserts
the gradient all-reduce; one CPU device works unchanged.

Per epoch the loop accumulates each landmark's mean normalised error; from
`config.land_error_start_epoch` on, L_land_error weights the inner points by the previous
epoch's errors (paper: from epoch 6, i.e. index 5 counting from 0).
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

from dff3d import coefficients as coeffs_lib
from dff3d import landmarks as lm
from dff3d import losses
from dff3d import metrics
from dff3d import morphable_model as mm
from dff3d import render as render_lib
from dff3d.models import dff as dff_lib
from dff3d.models import vgg


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One experiment's settings (experiments/configs/*.py return these)."""
  name: str = "paper"
  backbone: str = "vgg16"          # "vgg16" (paper) or "light"
  width: float = 1.0
  fc_width: int = 4096
  image_size: int = 224
  batch_size: int = 16
  learning_rate: float = 1e-5
  decayed_learning_rate: float = 1e-6
  decay_epoch: int = 5             # lr drops after this many epochs
  num_epochs: int = 10
  land_error_start_epoch: int = 5  # 0-based: the paper's epoch 6
  weights: losses.LossWeights = losses.LossWeights()
  use_dff: bool = True
  dff_path: str = ""               # "" -> the shipped dff3d/assets/dff.npz
  flip_prob: float = 0.5
  max_rotation_deg: float = 30.0
  colour_range: tuple = (0.7, 1.3)
  data: str = "synthetic"          # "synthetic" or comma-separated TFDS dataset dirs
  synthetic_train: int = 20000
  synthetic_val: int = 256
  synthetic_render_size: int = 0   # 0: image_size * 1.25 (the crop then resamples)
  val_data: str = ""               # TFDS dir for validation ("" -> synthetic held-out set)
  log_every_steps: int = 20
  eval_every_steps: int = 500
  checkpoint_every_steps: int = 0  # 0: at epoch ends (and on request) only
  seed: int = 0

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


# ---- state ----------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree (checkpointed whole).

  step: () int32 global step.  params, opt_state: network and Adam state.
  point_error: (68,) previous epoch's mean normalised error per landmark (L_land_error).
  error_sum: (68,), error_count: () accumulators of the current epoch.
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
                            fc_width=config.fc_width)


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
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    point_error=jnp.ones((68,)), error_sum=jnp.zeros((68,)),
                    error_count=jnp.zeros(()))


def end_epoch(state: TrainState) -> TrainState:
  """Move the epoch's mean per-landmark error into point_error and reset the accumulators."""
  mean = state.error_sum / jnp.maximum(state.error_count, 1.0)
  return state.replace(point_error=jnp.where(state.error_count > 0, mean, state.point_error),
                       error_sum=jnp.zeros_like(state.error_sum),
                       error_count=jnp.zeros_like(state.error_count))


# ---- loss and steps -------------------------------------------------------------------------
def compute_losses(params, batch, *, net, model, config: TrainConfig, point_error,
                   land_error_on, dff_fn: Optional[Callable] = None):
  """All loss terms for a batch.

  Args:
    batch: "image" (B, S, S, 3), "landmarks" (B, 68, 2) crop pixels, "landmarks_visible"
      (B, 68) in {0, 1}.
    point_error: (68,); land_error_on: () float in {0, 1} (traced: no recompilation).
    dff_fn: frozen DFF (images -> unit descriptors) or None.
  Returns:
    (total, aux) with aux holding each unweighted term, "loss" and "point_error_batch" (68,)
    (the batch's mean normalised distance per landmark, visible points only) and
    "point_count" (68,).
  """
  s = config.image_size
  w = config.weights
  images = batch["image"]
  x = net.apply({"params": params}, images)
  c = coeffs_lib.split(x, model.sizes)
  r = render_lib.render(model, c, (s, s), background=images)
  vis = batch["landmarks_visible"]
  weights = jnp.asarray(lm.landmark_weights())[None] * vis
  terms = {
      "land": losses.landmark_loss(r.landmarks_2d, batch["landmarks"], weights, s),
      "land_error": losses.landmark_error_loss(r.landmarks_2d, batch["landmarks"] * 1.0,
                                               point_error, s) * land_error_on,
      "photo": losses.photometric_loss(images, r.image, r.skin_mask),
      "reg": losses.weighted_regularization(c, w),
  }
  total = (w.land * terms["land"] + w.land_error * terms["land_error"]
           + w.photo * terms["photo"] + w.reg * terms["reg"])
  if dff_fn is not None:
    lm_ids = model.landmarks
    visible = losses.landmark_visibility(r.normals_cam[:, lm_ids], r.vertices_cam[:, lm_ids])
    d_img = dff_lib.sample_descriptors(jax.lax.stop_gradient(dff_fn(images)), r.landmarks_2d)
    d_ren = dff_lib.sample_descriptors(dff_fn(r.image), r.landmarks_2d)
    terms["dff"] = losses.dff_loss(d_img, d_ren, visible)
    total = total + w.dff * terms["dff"]
  dist = jnp.linalg.norm(r.landmarks_2d - batch["landmarks"], axis=-1) / s  # (B, 68)
  aux = dict(terms, loss=total,
             point_error_batch=jnp.sum(dist * vis, 0),
             point_count=jnp.sum(vis, 0))
  return total, aux


@functools.partial(jax.jit, static_argnames=("net", "tx", "config", "dff_fn"),
                   donate_argnums=(0,))
def train_step(state: TrainState, batch, land_error_on, model, *, net, tx, config, dff_fn):
  """One Adam step (jitted; the arrays of `model` are arguments, the rest static); returns
  (state, metrics of scalars)."""
  grad_fn = jax.value_and_grad(compute_losses, has_aux=True)
  (_, aux), grads = grad_fn(state.params, batch, net=net, model=model, config=config,
                            point_error=state.point_error, land_error_on=land_error_on,
                            dff_fn=dff_fn)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  count = jnp.maximum(aux.pop("point_count"), 0.0)
  err = aux.pop("point_error_batch")
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                      error_sum=state.error_sum + err,
                      error_count=state.error_count + jnp.mean(count))
  return new, aux


def predict(params, images, *, net, model):
  """Coefficients (B, ...) for crops (B, S, S, 3)."""
  return coeffs_lib.split(net.apply({"params": params}, images), model.sizes)


def predict_landmarks(params, images, *, net, model, image_size):
  """(B, 68, 2) crop-pixel landmarks of the regressed faces."""
  c = predict(params, images, net=net, model=model)
  cam, screen, _ = render_lib.camera_vertices(model, c, (image_size, image_size))
  return mm.landmark_points(model, screen)[..., :2]


@functools.partial(jax.jit, static_argnames=("net", "image_size"))
def _predict_landmarks_jit(params, images, model, *, net, image_size):
  return predict_landmarks(params, images, net=net, model=model, image_size=image_size)


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
    for i in range(min(chunk, num - start)):
      out.append({"image": img[i], "landmarks": pts[i], "landmarks_visible": vis[i]})
  return out


def make_sources(config: TrainConfig):
  """(train source, validation source) for config.data."""
  from dff3d.data import sources
  if config.data == "synthetic":
    size = config.synthetic_render_size or int(round(config.image_size * 1.25))
    train = synthetic_pool(config.synthetic_train, size, config.seed)
    val = synthetic_pool(config.synthetic_val, size, config.seed + 1_000_003)
    return train, val
  train = sources.ConcatSource(*[sources.open_tfds(d, "train") for d in config.data.split(",")])
  val_dir = config.val_data or config.data.split(",")[0]
  return train, sources.open_tfds(val_dir, "test" if config.val_data else "train")


def make_pipelines(config: TrainConfig, train_source, val_source):
  from dff3d.data import augment, pipeline
  aug = augment.AugmentConfig(flip_prob=config.flip_prob,
                              max_rotation_deg=config.max_rotation_deg,
                              colour_range=tuple(config.colour_range))
  train = pipeline.InputPipeline(train_source, pipeline.PipelineConfig(
      batch_size=config.batch_size, image_size=config.image_size, augment=aug,
      seed=config.seed, num_threads=2, prefetch=4 * config.batch_size))
  val = pipeline.InputPipeline(val_source, pipeline.eval_config(
      config.batch_size, image_size=config.image_size, num_threads=2))
  return train, val


# ---- evaluation -----------------------------------------------------------------------------
def evaluate_nme(predict_fn, val_pipeline) -> float:
  """Mean 68-point NME (x, y, bbox-normalised: the paper's metric) over a pipeline's epoch."""
  nmes = []
  for batch in val_pipeline.epoch(0):
    pred = np.asarray(predict_fn(jnp.asarray(batch["image"], jnp.float32)))
    keep = batch["index"] >= 0
    nmes.append(metrics.nme_2d(pred[keep], batch["landmarks"][keep]))
  return float(np.mean(np.concatenate(nmes)))


# ---- checkpoints ----------------------------------------------------------------------------
def checkpoint_manager(workdir: str, max_to_keep: int = 3):
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save_checkpoint(mngr, state: TrainState, epoch: int, batch_in_epoch: int):
  step = int(state.step)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(jax.device_get(state)),
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


def load_regressor(checkpoint: str, model: mm.MorphableModel):
  """A function crops (B, S, S, 3) -> Coefficients from a training workdir (or its
  checkpoints folder); the config is read from the workdir's config.json."""
  workdir = checkpoint.rstrip("/")
  if os.path.basename(workdir) == "checkpoints":
    workdir = os.path.dirname(workdir)
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path}: no config.json (expected a training workdir)")
  config = config_from_json(open(cfg_path).read())
  net = make_network(config, model)
  tx, _ = make_optimizer(config, 1)
  abstract = jax.eval_shape(lambda: create_train_state(jax.random.PRNGKey(0), net, tx,
                                                       config.image_size))
  restored = restore_checkpoint(checkpoint_manager(workdir), abstract)
  if restored is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint found")
  params = restored[0].params
  fn = jax.jit(lambda images: predict(params, images, net=net, model=model))
  fn.image_size = config.image_size
  return fn


def config_to_json(config: TrainConfig) -> str:
  d = dataclasses.asdict(config)
  d["weights"] = {f.name: getattr(config.weights, f.name)
                  for f in dataclasses.fields(config.weights)}
  return json.dumps(d, indent=2)


def config_from_json(text: str) -> TrainConfig:
  d = json.loads(text)
  d["weights"] = losses.LossWeights(**d["weights"])
  d["colour_range"] = tuple(d["colour_range"])
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


def train_and_evaluate(config: TrainConfig, workdir: str, max_steps: Optional[int] = None,
                       sources_override=None, verbose: bool = True,
                       max_seconds: Optional[float] = None):
  """Train (resuming from workdir's latest checkpoint) and evaluate; returns the final state.

  max_seconds bounds the training time (data preparation not counted); the run checkpoints
  and stops when it is spent. Writes workdir/config.json, workdir/metrics.jsonl (one object per logged step: step, epoch,
  loss, each term, lr, images_per_s; evaluation adds val_nme) and Orbax checkpoints at every
  epoch end, every checkpoint_every_steps, at the end, and on SIGINT / SIGTERM.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_to_json(config))
  model = mm.default_model()
  train_src, val_src = sources_override or make_sources(config)
  train_pipe, val_pipe = make_pipelines(config, train_src, val_src)
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

  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if config.batch_size % len(devices):
    raise ValueError(f"batch_size {config.batch_size} must divide over {len(devices)} devices")

  state = create_train_state(jax.random.PRNGKey(config.seed), net, tx, config.image_size)
  mngr = checkpoint_manager(workdir)
  epoch, skip = 0, 0
  restored = restore_checkpoint(mngr, jax.eval_shape(lambda: state))
  if restored is not None:
    state, epoch, skip = restored
    if verbose:
      print(f"resumed from step {int(state.step)} (epoch {epoch}, batch {skip})")
  state = jax.device_put(state, replicated)

  step_fn = functools.partial(train_step, model=model, net=net, tx=tx, config=config,
                              dff_fn=dff_fn)
  pred_fn = functools.partial(_predict_landmarks_jit, model=model, net=net,
                              image_size=config.image_size)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  step = start_step = int(state.step)
  t0 = last_t = time.time()
  last_step = step
  if step == 0 and config.eval_every_steps:  # the untrained network's figure, for the curve
    _log(metrics_path, {"step": 0, "epoch": 0,
                        "val_nme": evaluate_nme(lambda im: pred_fn(state.params, im), val_pipe)})
  with _StopRequest() as stop:
    while step < total_steps and not stop.requested:
      on = jnp.float32(epoch >= config.land_error_start_epoch)
      done_in_epoch, finished = skip, True
      for batch in train_pipe.epoch(epoch, start_batch=skip):
        out_of_time = max_seconds is not None and time.time() - t0 > max_seconds
        if step >= total_steps or stop.requested or out_of_time:
          finished = False
          break
        batch = {k: jax.device_put(np.asarray(batch[k], np.float32), data_sharding)
                 for k in ("image", "landmarks", "landmarks_visible")}
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
            rec["val_nme"] = evaluate_nme(lambda im: pred_fn(state.params, im), val_pipe)
          _log(metrics_path, rec)
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
      else:  # max_steps, max_seconds or a stop request: checkpoint where we are
        save_checkpoint(mngr, state, epoch, done_in_epoch)
        break
    if max_seconds is not None and time.time() - t0 > max_seconds and verbose:
      print(f"stopped after {max_seconds / 60:.1f} min (max_seconds)")
  final = {"step": step, "epoch": epoch, "final": True,
           "val_nme": evaluate_nme(lambda im: pred_fn(state.params, im), val_pipe)}
  _log(metrics_path, final)
  if verbose:
    print(f"done: step {step}, val_nme {final['val_nme']*100:.2f}% "
          f"({(time.time() - t0) / 60:.1f} min)")
  return state
