r"""Train the quarter-turn classifier (dff3d.orientation) on real AFLW crops and write it.

  python -m data_prep.aflw_pseudo68 --aflw_dir=../shared/data/aflw_3ddfa \
      --output=/tmp/orient/AFLW_GT_pseudo68.npz
  python -m experiments.train_orientation --aflw_dir=../shared/data/aflw_3ddfa \
      --pseudo68=/tmp/orient/AFLW_GT_pseudo68.npz --workdir=/tmp/orient \
      --output=dff3d/assets/orientation.npz   # fine-tunes the shipped regressor's backbone

Each example is a training-split AFLW crop (validation-split crops are never loaded for
training) framed as orientation.classifier_affine frames a face, around its pseudo-68
points moved by a box jitter (scale U(1 - a, 1 + a), shift U(-b, b) of the side: a
detector's box or a first pass's landmarks are not the truth), the photo rotated so that the
face's own turn becomes k * 90 degrees plus a uniform +-tilt; the label is k. The face's own
turn is where the pseudo-68 fit (its "coefficients") points the head's up axis in the image
(face_rolls; 0.9 % of AFLW's faces are turned by more than 45 degrees): labelling crops by
the applied turn alone, as the first tries did, taught the classifier that sideways faces are
upright, and the fit's roll angle is no measure of it for profiles (BUILD_NOTES, "Session
18"). Crops the fit did not cover are left out. Pixels outside the 120 px crop (3DDFA's box,
black in the files) are filled with a random colour and noise, so that where the padding lies
(which turns with the face) is no cue. Also a random mirror image and colour scale. The
network starts from --init_regressor's backbone (orientation.from_regressor; default the
shipped regressor: it already reads faces) with a new head. Adam with cosine decay, softmax
cross-entropy. Validation: every validation-split crop at each k with a fixed tilt draw;
accuracy overall and at |tilt| <= 30 degrees.

Writes workdir/metrics.jsonl (step, loss, accuracy; val_accuracy, val_accuracy_tilt30) and
--output (float16).
"""

import json
import os
import queue
import threading
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from dff3d import orientation
from dff3d.data import augment
from dff3d.datasets import aflw_3ddfa

_AFLW = flags.DEFINE_string("aflw_dir", None, "3DDFA AFLW folder (AFLW_GT_crop, lists).")
_P68 = flags.DEFINE_string("pseudo68", None, ".npz of data_prep.aflw_pseudo68 (face boxes).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for metrics.jsonl.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz (float16).")
_STEPS = flags.DEFINE_integer("steps", 2500, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Crops per step.")
_LR = flags.DEFINE_float("learning_rate", 3e-4, "Peak Adam learning rate (cosine decay).")
_TILT = flags.DEFINE_float("tilt", 40.0, "Uniform tilt about each quarter turn, degrees.")
_SCALE_JITTER = flags.DEFINE_float("scale_jitter", 0.15, "Box scale jitter a.")
_SHIFT_JITTER = flags.DEFINE_float("shift_jitter", 0.12, "Box shift jitter b (of the side).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters and the draws.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 1000, "Validation every N steps.")
_INIT = flags.DEFINE_string("init_regressor", "shipped", "Regressor (train.read_params) whose "
                            "backbone starts the classifier; empty: from scratch.")
_MAX = flags.DEFINE_integer("max_crops", 0, "Use the first N crops of each split (0: all).")


def face_rolls(pseudo68_path, names) -> np.ndarray:
  """(N,) float64 in-plane turn in degrees (counter-clockwise on screen) of each crop's face:
  the angle of the head's up axis (model +y) as the pseudo-68 fit projects it, from the
  image's up direction; NaN where the file has no fit. (Not the fit's roll angle: in
  R = Rz(roll) Ry(yaw) Rx(pitch) a profile's pitch also turns it in the image.)"""
  from dff3d.data import real
  rot = real.pose_labels(pseudo68_path, names)
  up = rot[:, :, 1]  # R @ (0, 1, 0): camera x right, y up
  return np.degrees(np.arctan2(-up[:, 0], up[:, 1])).astype(np.float64)


def load_split(listing, p68, rolls, split: str, max_crops: int):
  """(images uint8 (n, S, S, 3), points (n, 68, 2), rolls (n,) degrees) of one split's
  crops with a known roll."""
  rows = aflw_3ddfa.split_indices(listing, split)
  rows = rows[np.isfinite(rolls[rows])]
  if max_crops:
    rows = rows[:max_crops]
  images = np.stack([np.asarray(Image.open(listing.image_paths[k]).convert("RGB"))
                     for k in rows])
  return images, p68[rows].astype(np.float64), rolls[rows]


def fill_outside(crop, affine, source_shape, rng: np.random.Generator):
  """The crop with every pixel that came from outside the source (black in a warp) set to a
  random colour plus noise."""
  size = crop.shape[0]
  inv = augment.inverse_affine(affine)
  g = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5), -1)
  src = g @ inv[:, :2].T + inv[:, 2]
  h, w = source_shape[:2]
  outside = (src[..., 0] < 0) | (src[..., 0] > w) | (src[..., 1] < 0) | (src[..., 1] > h)
  if not outside.any():
    return crop
  fill = rng.uniform(0, 1, 3) + rng.normal(0, rng.uniform(0, 0.15), (size, size, 3))
  return np.where(outside[..., None], np.clip(fill, 0, 1), crop).astype(np.float32)


def draw_example(image, points, roll, k: int, rng: np.random.Generator, tilt: float,
                 scale_jitter: float, shift_jitter: float, augment_colour: bool = True):
  """(S, S, 3) float32 crop of a face (its own roll `roll` degrees) turned so that its roll
  is k quarter turns plus a tilt."""
  pts = np.asarray(points, np.float64)
  centre = orientation.points_centre(pts)
  side = float(np.ptp(pts, 0).max())
  s = rng.uniform(1 - scale_jitter, 1 + scale_jitter)
  shift = rng.uniform(-shift_jitter, shift_jitter, 2) * side
  pts = centre + (pts - centre) * s + shift
  if rng.uniform() < 0.5:  # mirror: the turn's label is the same for the mirror image
    image = image[:, ::-1]
    pts = np.stack([image.shape[1] - pts[:, 0], pts[:, 1]], -1)
    roll = -roll
  angle = 90.0 * k + rng.uniform(-tilt, tilt) - roll
  a = orientation.classifier_affine(pts, angle)
  size = orientation.INPUT_SIZE
  crop = fill_outside(augment.warp_affine(image, a, size, size), a, image.shape, rng)
  if augment_colour:
    crop = augment.scale_colours(crop, rng.uniform(0.7, 1.3, 3))
  return crop


def make_batch(images, points, rolls, rng, n, tilt, scale_jitter, shift_jitter):
  idx = rng.integers(0, len(images), n)
  ks = rng.integers(0, orientation.NUM_TURNS, n)
  x = np.stack([draw_example(images[i], points[i], rolls[i], k, rng, tilt, scale_jitter,
                             shift_jitter) for i, k in zip(idx, ks)])
  return x, ks


def validation_set(images, points, rolls, tilt, seed=12345):
  """Every crop at each k, a fixed tilt draw, the outside filled as in training;
  (x (4n, S, S, 3), k (4n,), |tilt| (4n,))."""
  rng = np.random.default_rng(seed)
  xs, ks, tilts = [], [], []
  for i in range(len(images)):
    for k in range(orientation.NUM_TURNS):
      t = rng.uniform(-tilt, tilt)
      pts = np.asarray(points[i], np.float64)
      a = orientation.classifier_affine(pts, 90.0 * k + t - rolls[i])
      xs.append(fill_outside(augment.warp_affine(images[i], a, orientation.INPUT_SIZE,
                                                 orientation.INPUT_SIZE), a, images[i].shape,
                             rng))
      ks.append(k)
      tilts.append(abs(t))
  return np.stack(xs), np.array(ks), np.array(tilts)


def main(argv):
  del argv
  for flag in (_AFLW, _P68, _WORKDIR, _OUTPUT):
    if not flag.value:
      raise app.UsageError(f"--{flag.name} is required")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  try:
    listing = aflw_3ddfa.load_aflw_3ddfa(_AFLW.value)
    p68 = aflw_3ddfa.load_pseudo68(_P68.value, listing.names)[0]
  except (aflw_3ddfa.DatasetFormatError, aflw_3ddfa.DatasetNotFoundError) as e:
    raise app.UsageError(str(e).splitlines()[0]) from None
  t0 = time.time()
  rolls = face_rolls(_P68.value, listing.names)
  train_x, train_p, train_r = load_split(listing, p68, rolls, "train", _MAX.value)
  val_x, val_p, val_r = load_split(listing, p68, rolls, "validation", _MAX.value)
  vx, vk, vt = validation_set(val_x, val_p, val_r, _TILT.value)
  print(f"{len(train_x)} training crops, {len(val_x)} validation crops "
        f"({time.time() - t0:.0f} s)", flush=True)

  net = orientation.make_network()
  params = net.init(jax.random.PRNGKey(_SEED.value),
                    jnp.zeros((1, orientation.INPUT_SIZE, orientation.INPUT_SIZE, 3)))["params"]
  if _INIT.value:
    from dff3d import morphable_model as mm
    from dff3d import train
    try:
      reg_params, _ = train.read_params(_INIT.value, mm.default_model())
      params = orientation.from_regressor(params, reg_params)
    except (FileNotFoundError, ValueError) as e:
      raise app.UsageError(f"--init_regressor: {str(e).splitlines()[0]}") from None
  schedule = optax.cosine_decay_schedule(_LR.value, _STEPS.value)
  tx = optax.adam(schedule)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, k):
    def loss_fn(p):
      logits = net.apply({"params": p}, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, k).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == k)
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, acc

  predict = jax.jit(lambda p, x: jnp.argmax(net.apply({"params": p}, x), -1))

  def evaluate(p):
    pred = np.concatenate([np.asarray(predict(p, jnp.asarray(vx[i:i + 128])))
                           for i in range(0, len(vx), 128)])
    ok = pred == vk
    return float(ok.mean()), float(ok[vt <= 30].mean())

  rng = np.random.default_rng(_SEED.value)
  batches = queue.Queue(maxsize=4)

  def produce():  # one thread draws batches while the step runs (same draws as inline)
    for _ in range(_STEPS.value):
      batches.put(make_batch(train_x, train_p, train_r, rng, _BATCH.value, _TILT.value,
                             _SCALE_JITTER.value, _SHIFT_JITTER.value))

  threading.Thread(target=produce, daemon=True).start()
  metrics = open(os.path.join(_WORKDIR.value, "metrics.jsonl"), "a")
  t0 = time.time()
  for i in range(1, _STEPS.value + 1):
    x, k = batches.get()
    params, opt, loss, acc = step(params, opt, jnp.asarray(x), jnp.asarray(k))
    rec = None
    if i % 100 == 0:
      rec = {"step": i, "loss": float(loss), "accuracy": float(acc),
             "minutes": (time.time() - t0) / 60}
    if i % _EVAL_EVERY.value == 0 or i == _STEPS.value:
      rec = rec or {"step": i, "loss": float(loss), "accuracy": float(acc)}
      rec["val_accuracy"], rec["val_accuracy_tilt30"] = evaluate(params)
    if rec:
      metrics.write(json.dumps(rec) + "\n")
      metrics.flush()
      print(json.dumps(rec), flush=True)
  orientation.save_orientation(_OUTPUT.value, params)
  print(f"wrote {_OUTPUT.value} ({(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
  app.run(main)
