r"""Train the DFF network on synthetic pose pairs (and real AFLW pairs) and write its weights.

  python -m experiments.train_dff --workdir=/tmp/dff --steps=3000 --batch_size=8 \
      --image_size=96 --width=8 --output=/tmp/dff/dff.npz

Every step renders `batch_size` fresh pairs of views of random faces (dff3d.synthetic.pose_pairs,
|yaw difference| uniform up to --max_yaw_diff degrees) and takes one Adam step on the dense
correspondence loss (dff3d.dff_training), both in one jitted program.

Real pairs, as the original DFF trained (--real_fraction > 0): round(real_fraction x
batch_size) of the pairs are two different real AFLW crops (training split only: crops whose
aflw_3ddfa.split_of is "validation" are never loaded), drawn per step with a numpy RNG seeded by
--seed; their pixels correspond through the model fitted to each crop (--real_pseudo68, the .npz
of data_prep.aflw_pseudo68 with its "coefficients"), rendered as a synthetic view is
(dff_training.real_views). The crops are decoded once to --image_size in memory (16.7k training
crops at 96 px: about 460 MB; --real_max keeps the first N); --real_pose_balance draws every
|yaw| group equally often. --init starts from a file of the same network, or from one of half
the --width, widened to the same function (models.dff.widen; the shipped width-16 network was
made so from the width-8 one). A ~20-minute fine-tune of the shipped width-16 net on the 2-core
CPU (about 0.8 s per step of 8 pairs when the CPU is not shared, plus 1-3 min to compile; the fit
of all 17,590 crops takes about 2 min):

  python -m data_prep.aflw_pseudo68 --aflw_dir=../shared/data/aflw_3ddfa \
      --output=/tmp/dffreal/AFLW_GT_pseudo68.npz
  python -m experiments.train_dff --workdir=/tmp/dffreal/ft --init=dff3d/assets/dff.npz \
      --steps=1500 --batch_size=8 --image_size=96 --width=16 --learning_rate=1.5e-4 \
      --real_aflw_dir=../shared/data/aflw_3ddfa \
      --real_pseudo68=/tmp/dffreal/AFLW_GT_pseudo68.npz --real_fraction=0.5 \
      --output=/tmp/dffreal/ft/dff.npz
  python -m benchmarks.dff_correspondence --mode=both --weights=/tmp/dffreal/ft/dff.npz \
      --dff_path=/tmp/dffreal/ft/dff.npz --dff_native_size=96

Writes:
  workdir/metrics.jsonl   one JSON line per --log_every steps (step, loss, within_px, lr, ...)
  workdir/dff_step{N}.npz float32 weights every --save_every steps and at the end
  --output                the final weights (float16 unless --output_dtype=float32)
"""

import json
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np

from dff3d import dff_training
from dff3d import morphable_model as mm
from dff3d.data import real
from dff3d.models import dff as dff_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for metrics.jsonl and checkpoints.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "View pairs per step (2x images).")
_SIZE = flags.DEFINE_integer("image_size", 96, "Training crop side (divisible by 2**levels).")
_WIDTH = flags.DEFINE_integer("width", 8, "DFFNet channels at full resolution (shipped: 16).")
_LEVELS = flags.DEFINE_integer("levels", 4, "DFFNet down-samplings.")
_DIM = flags.DEFINE_integer("descriptor_dim", 32, "Descriptor dimension.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "Peak Adam learning rate (cosine decay).")
_SEED = flags.DEFINE_integer("seed", 0, "Training seed (the benchmark uses other seeds).")
_OUTPUT = flags.DEFINE_string("output", None, "Final weights (.npz); default workdir/dff.npz.")
_OUTPUT_DTYPE = flags.DEFINE_enum("output_dtype", "float16", ["float16", "float32"],
                                  "Storage dtype of --output.")
_MAX_YAW_DIFF = flags.DEFINE_float("max_yaw_diff", 60.0, "Largest |yaw difference|, degrees.")
_ANCHORS = flags.DEFINE_integer("num_anchors", 128, "Anchor pixels per image and direction.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.07, "InfoNCE temperature.")
_SIGMA = flags.DEFINE_float("target_sigma", 0.25, "Soft positive width, model units (cm).")
_THRESHOLD = flags.DEFINE_float("match_threshold", 0.3, "Valid match distance, cm.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 25, "Steps per metrics line.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 500, "Steps per float32 checkpoint.")
_INIT = flags.DEFINE_string("init", None, "Start from these weights (a .npz of the same net, "
                            "or of half its --width: widened, dff.widen).")
_REAL_DIR = flags.DEFINE_string("real_aflw_dir", None, "3DDFA AFLW folder of the real crops.")
_REAL_P68 = flags.DEFINE_string("real_pseudo68", None,
                                "Pseudo-68 .npz with fitted coefficients of those crops.")
_REAL_FRACTION = flags.DEFINE_float("real_fraction", 0.0,
                                    "Share of each batch's pairs that are real cross-crop pairs "
                                    "(rounded; 0: synthetic only).")
_REAL_POSE_BALANCE = flags.DEFINE_bool(
    "real_pose_balance", False,
    "Draw each real crop with real.pose_balanced_weights (every |yaw| group 0-30 / 30-60 / 60+ "
    "equally often) instead of uniformly: AFLW is ~60 % below 30 degrees.")
_REAL_MAX = flags.DEFINE_integer("real_max", 0, "Use the first N training crops (0: all).")
_REAL_MAX_FIT_ERROR = flags.DEFINE_float("real_max_fit_error", 0.03,
                                         "Drop crops whose 21-point fit error (fraction of the "
                                         "crop side) is larger (0: keep all).")


class Progress:
  """One console line: step / total, loss, rate and ETA (carriage-return updates)."""

  def __init__(self, total):
    self.total, self.start = total, time.time()

  def update(self, step, first_step, text):
    el = time.time() - self.start
    done = step - first_step
    eta = f"{el / done * (self.total - step) / 60:.1f} min" if done else "?"
    sys.stderr.write(f"\r[{step}/{self.total}] {text} {el / 60:.1f} min elapsed, ETA {eta}   ")
    sys.stderr.flush()


def real_pairs_per_step() -> int:
  """Real pairs per batch from --real_fraction; checks the real-data flags."""
  if not 0.0 <= _REAL_FRACTION.value <= 1.0:
    raise app.UsageError(f"--real_fraction {_REAL_FRACTION.value} is not in [0, 1]")
  n_real = int(round(_REAL_FRACTION.value * _BATCH.value))
  if n_real and not (_REAL_DIR.value and _REAL_P68.value):
    raise app.UsageError("--real_fraction > 0 needs --real_aflw_dir and --real_pseudo68")
  return n_real


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  f = 2 ** _LEVELS.value
  if _SIZE.value % f:
    raise app.UsageError(f"--image_size {_SIZE.value} is not divisible by 2**levels = {f}")
  n_real = real_pairs_per_step()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, "dff.npz")
  net = dff_lib.DFFNet(descriptor_dim=_DIM.value, width=_WIDTH.value, levels=_LEVELS.value)
  config = dff_training.LossConfig(num_anchors=_ANCHORS.value, temperature=_TEMPERATURE.value,
                                   target_sigma=_SIGMA.value,
                                   match_threshold=_THRESHOLD.value)
  model = mm.default_model()
  state = dff_training.create_train_state(
      jax.random.key(_SEED.value, impl="unsafe_rbg"), net, _LR.value, _STEPS.value, _SIZE.value)
  if _INIT.value:
    try:
      params, widened = dff_lib.load_dff_as(_INIT.value, net, jax.random.PRNGKey(_SEED.value))
    except dff_lib.DFFFileError as e:
      raise app.UsageError(f"--init: {e}") from None
    if widened:
      print(f"--init {_INIT.value}: widened to width {net.width}", flush=True)
    state = state.replace(params=params)
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(state.params))
  print(f"DFFNet {net.config()}: {n_params} params; {_STEPS.value} steps of {_BATCH.value} "
        f"pairs at {_SIZE.value} px; loss {config}", flush=True)
  crops = None
  if n_real:
    t = time.time()
    crops = real.load_real_crops(_REAL_DIR.value, _REAL_P68.value, _SIZE.value, _REAL_MAX.value,
                                 _REAL_MAX_FIT_ERROR.value, model)
    print(f"{len(crops.names)} real training crops at {_SIZE.value} px "
          f"({crops.images.nbytes / 1e6:.0f} MB) loaded in {time.time() - t:.1f} s; "
          f"{n_real} of {_BATCH.value} pairs a step are real", flush=True)
  pair_rng = np.random.default_rng(_SEED.value)
  data_key = jax.random.fold_in(jax.random.PRNGKey(_SEED.value), 1)
  metrics_path = os.path.join(_WORKDIR.value, "metrics.jsonl")
  progress, first = Progress(_STEPS.value), 0
  acc, t_log = [], time.time()
  t0 = time.time()
  with open(metrics_path, "a") as log:
    for step in range(1, _STEPS.value + 1):
      real_a, real_b = (real.real_pair_batch(pair_rng, crops, n_real, _REAL_POSE_BALANCE.value)
                        if n_real else (None, None))
      state, m = dff_training.mixed_train_step(
          state, jax.random.fold_in(data_key, step), model, _BATCH.value, _SIZE.value,
          _MAX_YAW_DIFF.value, config, real_a=real_a, real_b=real_b)
      acc.append(m)
      if step == 1:
        jax.block_until_ready(m)
        print(f"\nfirst step (compile + run) {time.time() - t0:.1f} s", flush=True)
        progress = Progress(_STEPS.value)
        first = 1
      if step % _LOG_EVERY.value == 0 or step == _STEPS.value:
        mean = {k: float(np.mean([float(a[k]) for a in acc])) for k in acc[0]}
        now = time.time()
        rec = {"step": step, **{k: round(v, 5) for k, v in mean.items()},
               "sec_per_step": round((now - t_log) / len(acc), 3),
               "elapsed_s": round(now - t0, 1)}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        acc, t_log = [], now
        progress.update(step, first, f"loss {mean['loss']:.3f} within3px {mean['within_px']:.3f}")
      if step % _SAVE_EVERY.value == 0 or step == _STEPS.value:
        dff_lib.save_dff_params(os.path.join(_WORKDIR.value, f"dff_step{step}.npz"),
                                state.params, net, dtype=np.float32)
  dtype = np.float16 if _OUTPUT_DTYPE.value == "float16" else np.float32
  out_dir = os.path.dirname(os.path.abspath(output))
  os.makedirs(out_dir, exist_ok=True)
  dff_lib.save_dff_params(output, state.params, net, dtype=dtype)
  size = os.path.getsize(output if output.endswith(".npz") else output + ".npz")
  print(f"\ntrained {_STEPS.value} steps in {(time.time() - t0) / 60:.1f} min; wrote {output} "
        f"({size / 1e6:.2f} MB, {_OUTPUT_DTYPE.value})", flush=True)


if __name__ == "__main__":
  app.run(main)
