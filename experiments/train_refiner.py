r"""Train the landmark refiner (dff3d.refine) on real AFLW crops and write it.

  python -m data_prep.aflw_pseudo68 --aflw_dir=../shared/data/aflw_3ddfa \
      --output=/tmp/refine/AFLW_GT_pseudo68.npz
  python -m experiments.train_refiner --aflw_dir=../shared/data/aflw_3ddfa \
      --pseudo68=/tmp/refine/AFLW_GT_pseudo68.npz --workdir=/tmp/refine \
      --dev_dir=../shared/data/aflw2000_3d_dev --output=dff3d/assets/refiner.npz

Stage 1 (once, cached in workdir/stage1.npz): every AFLW crop of the training and the
validation split, framed as the `real` config frames it (the box of its pseudo-68 points,
train.eval_pipeline at the regressor's crop size), goes through --regressor (flip-averaged,
as the job runs it); its 68 projected points are the refiner's input and the crop's pseudo-68
points its target. Training: random mirror image (points mirrored and re-ordered), colour
scale U(0.8, 1.2) per channel, the input points jittered (refine.perturb_points: the
regressor is closer to its own training crops' labels than to unseen faces'), NME loss, AdamW
with warm-up and cosine decay. After each epoch: the NME of the validation split's points
against its pseudo-68 labels, before and after refinement, and with --dev_dir the AFLW2000-3D
figures (ground-truth box, faces cropped upright as `experiments.evaluate --upright` crops
them), into workdir/metrics.jsonl. An Orbax checkpoint per epoch: a stopped run started again
with the same flags resumes after its last finished epoch.
"""

import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from dff3d import fitting, io, metrics, orientation, reconstruction, refine, train
from dff3d import morphable_model as mm
from dff3d.data import real
from dff3d.datasets import aflw2000_3d, aflw_3ddfa

_AFLW = flags.DEFINE_string("aflw_dir", "../shared/data/aflw_3ddfa", "3DDFA AFLW folder.")
_P68 = flags.DEFINE_string("pseudo68", None, ".npz of data_prep.aflw_pseudo68 (targets).")
_REGRESSOR = flags.DEFINE_string("regressor", "shipped", "Stage-1 regressor "
                                 "(train.load_regressor), flip-averaged.")
_WORKDIR = flags.DEFINE_string("workdir", None, "stage1.npz, checkpoints, metrics.jsonl.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz (float16).")
_DEV = flags.DEFINE_string("dev_dir", "", "Optional AFLW2000-3D folder for dev figures.")
_EPOCHS = flags.DEFINE_integer("epochs", 6, "Epochs over the training crops.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Crops per step.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Peak AdamW rate (warm-up, cosine decay).")
_WD = flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and the draws.")
_J_SCALE = flags.DEFINE_float("jitter_scale", 0.04, "Input points: similarity scale std.")
_J_SHIFT = flags.DEFINE_float("jitter_shift", 0.03, "Shift std, of the box size.")
_J_ROT = flags.DEFINE_float("jitter_rotation", 4.0, "Rotation std, degrees.")
_J_POINT = flags.DEFINE_float("jitter_point", 0.015, "Per-point std, of the box size.")
_STEPS_PER_EPOCH = flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0: one pass "
                                        "over the training crops).")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 0.0, "Stop after the epoch that passes this "
                                  "(0: no limit); the run resumes from its checkpoint.")


def regressed_points(regressor, model, crops, batch_size: int = 32) -> np.ndarray:
  """(N, 68, 2) crop pixels of the regressed faces' landmarks for crops (N, S, S, 3) in
  [0, 1] (the fixed-contour points the job reports)."""
  s = regressor.image_size
  problem = fitting.landmark_problem(model, False)
  fn = jax.jit(lambda x: fitting.screen_landmarks(problem, regressor(x), s, False)[..., :2])
  out = []
  for start in range(0, len(crops), batch_size):
    chunk = crops[start:start + batch_size]
    pad = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
    out.append(np.asarray(fn(jnp.asarray(pad, jnp.float32) / 255.0))[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, 68, 2), np.float32)


def aflw_split(source, size: int) -> dict:
  """{"image" (N, S, S, 3) uint8, "label" (N, 68, 2)} of a source through eval_pipeline."""
  cfg = train.TrainConfig(name="real", image_size=size, batch_size=32)
  images, labels = [], []
  for batch in train.eval_pipeline(cfg, source).epoch(0):
    keep = batch["index"] >= 0
    images.append(np.round(np.asarray(batch["image"])[keep] * 255.0).astype(np.uint8))
    labels.append(np.asarray(batch["landmarks"], np.float32)[keep])
  return {"image": np.concatenate(images), "label": np.concatenate(labels)}


def stage1(workdir, aflw_dir, pseudo68, regressor, model) -> dict:
  """The cached stage-1 arrays (train_/val_ image, label, pred); computed on first use."""
  path = os.path.join(workdir, "stage1.npz")
  if os.path.isfile(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  t = time.time()
  listing = aflw_3ddfa.load_aflw_3ddfa(aflw_dir)
  p68 = aflw_3ddfa.load_pseudo68(pseudo68, listing.names)[0]
  train_src, val_src = (real.AflwSource(listing, aflw_3ddfa.split_indices(listing, split), p68,
                                        "pseudo68") for split in ("train", "validation"))
  out = {}
  for name, src in (("train", train_src), ("val", val_src)):
    split = aflw_split(src, regressor.image_size)
    out.update({f"{name}_image": split["image"], f"{name}_label": split["label"],
                f"{name}_pred": regressed_points(regressor, model, split["image"])})
  np.savez(path + ".tmp.npz", **out)
  os.replace(path + ".tmp.npz", path)
  print(f"stage 1: {len(out['train_pred'])} + {len(out['val_pred'])} crops in "
        f"{time.time() - t:.0f} s", flush=True)
  return out


def dev_set(dev_dir, regressor, model) -> dict:
  """AFLW2000-3D crops at the regressor's size, framed by the ground-truth box and turned
  upright as experiments.evaluate --upright does: image uint8, pred, gt (N, 68, 2), yaw."""
  items = []
  for image_path, mat_path in aflw2000_3d.list_aflw2000_3d(dev_dir).pairs:
    try:
      items.append((image_path, aflw2000_3d.ground_truth(mat_path)))
    except aflw2000_3d.DatasetFormatError as e:
      print(f"skipped: {e}")
  faces = [(io.read_image(path), lab["gt_2d"]) for path, lab in items]
  turns = orientation.quarter_turns(orientation.load_orientation(), faces)
  crops = reconstruction.upright_crops(faces, regressor.image_size, turns)
  images = np.round(np.stack([c[0] for c in crops]) * 255.0).astype(np.uint8)
  return {"image": images, "pred": regressed_points(regressor, model, images),
          "gt": np.stack([c[1][:, :2] for c in crops]).astype(np.float32),
          "yaw": np.array([lab["yaw_deg"] for _, lab in items], np.float64)}


def refined_points(apply, params, images, points, batch_size: int = 50) -> np.ndarray:
  """apply(params, crops float [0, 1], points) over images (N, S, S, 3) uint8 in batches."""
  out = []
  for start in range(0, len(images), batch_size):
    x = jnp.asarray(images[start:start + batch_size], jnp.float32) / 255.0
    out.append(np.asarray(apply(params, x, jnp.asarray(points[start:start + batch_size]))))
  return np.concatenate(out)


def make_step(net, tx, size: int, jitter: dict):
  """The jitted training step (params, opt_state, crops uint8, points, targets, key) ->
  (params, opt_state, loss)."""

  @jax.jit
  def step(params, opt_state, crops, points, target, key):
    k_flip, k_jitter, k_colour = jax.random.split(key, 3)
    x = crops.astype(jnp.float32) / 255.0
    flip = jax.random.bernoulli(k_flip, 0.5, (x.shape[0],))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    pick = lambda p: jnp.where(flip[:, None, None], refine.mirror_points(p, size), p)
    points, target = pick(points), pick(target)
    gain = jax.random.uniform(k_colour, (x.shape[0], 1, 1, 3), minval=0.8, maxval=1.2)
    x = jnp.clip(x * gain, 0.0, 1.0)
    points = refine.perturb_points(k_jitter, points, **jitter)

    def loss_fn(p):
      return refine.nme_loss(net.apply({"params": p}, x, points), target)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def main(argv):
  del argv
  for name, flag in (("--pseudo68", _P68), ("--workdir", _WORKDIR), ("--output", _OUTPUT)):
    if not flag.value:
      raise app.UsageError(f"{name} is required")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  model = mm.default_model()
  regressor = train.load_regressor(_REGRESSOR.value, model, flip_average=True)
  size = regressor.image_size
  data = stage1(_WORKDIR.value, _AFLW.value, _P68.value, regressor, model)
  dev = dev_set(_DEV.value, regressor, model) if _DEV.value else None

  config = dict(refine.DEFAULTS, image_size=size)
  net = refine.make_network(config)
  params = net.init(jax.random.PRNGKey(_SEED.value), jnp.zeros((1, size, size, 3)),
                    jnp.zeros((1, 68, 2)))["params"]
  n = len(data["train_image"])
  per_epoch = _STEPS_PER_EPOCH.value or n // _BATCH.value
  total = _EPOCHS.value * per_epoch
  schedule = optax.warmup_cosine_decay_schedule(0.0, _LR.value, min(200, total // 10), total)
  tx = optax.adamw(schedule, weight_decay=_WD.value)
  opt_state = tx.init(params)
  jitter = {"scale": _J_SCALE.value, "shift": _J_SHIFT.value,
            "rotation_deg": _J_ROT.value, "per_point": _J_POINT.value}
  step = make_step(net, tx, size, jitter)
  apply = jax.jit(lambda p, x, q: net.apply({"params": p}, x, q))

  mngr = train.checkpoint_manager(_WORKDIR.value, max_to_keep=2)
  start_epoch = 0
  if mngr.latest_step() is not None:
    start_epoch = int(mngr.latest_step())
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      {"params": params, "opt_state": opt_state})
    restored = mngr.restore(start_epoch, args=ocp.args.StandardRestore(abstract))
    params, opt_state = restored["params"], restored["opt_state"]
    print(f"resumed after epoch {start_epoch}", flush=True)

  log_path = os.path.join(_WORKDIR.value, "metrics.jsonl")
  t0 = time.time()
  for epoch in range(start_epoch, _EPOCHS.value):
    order = np.random.default_rng((_SEED.value, epoch)).permutation(n)
    losses = []
    for i in range(per_epoch):
      rows = np.sort(np.take(order, np.arange(i * _BATCH.value, (i + 1) * _BATCH.value),
                             mode="wrap"))
      key = jax.random.fold_in(jax.random.PRNGKey(_SEED.value), epoch * per_epoch + i)
      params, opt_state, loss = step(params, opt_state, jnp.asarray(data["train_image"][rows]),
                                     jnp.asarray(data["train_pred"][rows]),
                                     jnp.asarray(data["train_label"][rows]), key)
      losses.append(float(loss))
    record = {"epoch": epoch + 1, "loss": float(np.mean(losses[-per_epoch // 2:])),
              "minutes": (time.time() - t0) / 60.0}
    val = refined_points(apply, params, data["val_image"], data["val_pred"])
    record["val_nme_stage1"] = float(np.mean(metrics.nme_2d(data["val_pred"], data["val_label"])))
    record["val_nme"] = float(np.mean(metrics.nme_2d(val, data["val_label"])))
    if dev is not None:
      for name, pts in (("dev_stage1", dev["pred"]),
                        ("dev", refined_points(apply, params, dev["image"], dev["pred"]))):
        g = metrics.grouped_nme(metrics.nme_2d(pts, dev["gt"]), dev["yaw"])
        record.update({f"{name}_{k}": float(v) for k, v in g.items() if k.startswith("nme")})
    print(json.dumps(record), flush=True)
    with open(log_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    mngr.save(epoch + 1, args=ocp.args.StandardSave(
        jax.device_get({"params": params, "opt_state": opt_state})), force=True)
    mngr.wait_until_finished()
    if _MAX_MINUTES.value and (time.time() - t0) / 60.0 > _MAX_MINUTES.value:
      print(f"stopped after epoch {epoch + 1} (--max_minutes); run again to resume")
      return
  refine.save_refiner(_OUTPUT.value, params, config)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
