r"""Train the regressor.

  python -m experiments.train --config=cpu --workdir=/tmp/dff3d_cpu [--max_steps=N]

Resumes from the workdir's latest checkpoint. Writes workdir/metrics.jsonl and Orbax
checkpoints (each epoch, every --checkpoint_every_steps, at the end, and on Ctrl-C / SIGTERM).
--init_params=shipped (or a .npz / workdir) fine-tunes from those parameters in a new workdir.

Several processes (hosts) train as one (dff3d.distributed): start the same command in every
process with --coordinator_address=HOST0:PORT --num_processes=N --process_id=i (on TPU pods
and under SLURM / MPI the flags can be left out); --batch_size is the global batch.
"""

from absl import app, flags, logging

from dff3d import distributed
from dff3d import losses
from dff3d import morphable_model as mm
from dff3d import train
from dff3d.models import dff as dff_lib
from dff3d.models import heads
from dff3d.models import light
from experiments import configs

_CONFIG = flags.DEFINE_string("config", "cpu", "Config name in experiments/configs (paper, cpu, real).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics).")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps in total.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", None, "Stop (and checkpoint) after this many "
                                  "minutes of training in this run.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Override: batch size.")
_LR = flags.DEFINE_float("learning_rate", None, "Override: initial learning rate.")
_EPOCHS = flags.DEFINE_integer("num_epochs", None, "Override: epochs.")
_SIZE = flags.DEFINE_integer("image_size", None, "Override: crop size.")
_DATA = flags.DEFINE_string("data", None, "Override: 'synthetic' or TFDS dataset dirs (comma).")
_VAL = flags.DEFINE_string("val_data", None, "Override: TFDS dataset dir for validation.")
_NTRAIN = flags.DEFINE_integer("synthetic_train", None, "Override: synthetic training examples.")
_NVAL = flags.DEFINE_integer("synthetic_val", None, "Override: synthetic validation examples.")
_DFF = flags.DEFINE_bool("use_dff", None, "Override: use the DFF loss.")
_DFF_PATH = flags.DEFINE_string("dff_path", None, "Override: the frozen DFF's .npz for L_dff "
                                "(default: the shipped dff3d/assets/dff.npz).")
_EVAL = flags.DEFINE_integer("eval_every_steps", None, "Override: evaluation interval.")
_CKPT = flags.DEFINE_integer("checkpoint_every_steps", None, "Override: checkpoint interval.")
_SEED = flags.DEFINE_integer("seed", None, "Override: seed.")
_LOG_EVERY = flags.DEFINE_integer("log_every_steps", None, "Override: logging interval.")
_PSEUDO = flags.DEFINE_string("aflw_pseudo68", None, "Override: pseudo-68 .npz of the AFLW crops.")
_LABELS = flags.DEFINE_enum("aflw_labels", None, ["pts21", "pseudo68"], "Override: AFLW labels.")
_AFLW_DIR = flags.DEFINE_string("aflw_dir", None, "Override: 3DDFA AFLW folder.")
_MAX_TRAIN = flags.DEFINE_integer("aflw_max_train", None, "Override: AFLW training crops used.")
_BALANCE = flags.DEFINE_bool("aflw_pose_balance", None, "Override: repeat the AFLW training "
                             "crops of 30-60 and 60+ degrees of yaw to the 0-30 group's count.")
_MIX = flags.DEFINE_integer("synthetic_mix", None, "Override: synthetic faces added to AFLW.")
_DEV = flags.DEFINE_string("dev_dir", None, "Override: AFLW2000-3D folder validated per epoch.")
_DECAY = flags.DEFINE_integer("decay_epoch", None, "Override: epochs before the lr decay.")
_LE_START = flags.DEFINE_integer("land_error_start_epoch", None,
                                 "Override: first epoch (0-based) with L_land_error.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process training: "
                                   "host:port of process 0 (with --num_processes, "
                                   "--process_id); SLURM, MPI and TPU pods are detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0 logs).")
_LR_DECAYED = flags.DEFINE_float("decayed_learning_rate", None,
                                  "Override: learning rate after the decay.")
_INIT = flags.DEFINE_string("init_params", None, "Fine-tune: start from these parameters "
                            "('shipped', a regressor .npz or a training workdir).")
_SCALE_JITTER = flags.DEFINE_float("box_scale_jitter", None, "Override: crop box scaled by "
                                    "U(1 - a, 1 + a) (not the paper's; augment.jitter_box).")
_SHIFT_JITTER = flags.DEFINE_float("box_shift_jitter", None, "Override: crop box centre moved "
                                    "by U(-b, b) of its sides (not the paper's).")
_JITTER_PROB = flags.DEFINE_float("box_jitter_prob", None, "Override: share of examples "
                                   "whose crop box is jittered (1: all).")
_POOL = flags.DEFINE_enum("pool", None, list(light.POOLS), "Override: the light backbone's "
                          "pool; 'flatten' from a 'mean' --init_params keeps its function.")
_WIDTH = flags.DEFINE_float("width", None, "Override: the light backbone's channel multiplier; "
                            "twice an --init_params network's width widens it (light.widen).")
_LAND_LOSS = flags.DEFINE_enum("landmark_loss", None, list(losses.LANDMARK_LOSSES),
                               "Override: L_land's penalty of each point's distance: l2 "
                               "(paper, squared), l1 (the distance, as NME) or wing.")
_WINDOW = flags.DEFINE_list("input_window", None, "Override: x0,y0,x1,y1 fractions of the crop "
                            "outside which the network's input is black ('' for none).")
_WEIGHTS = flags.DEFINE_list("loss_weights", None, "Override loss weights, e.g. photo=0,dff=0.")


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)  # keep the console to the progress lines
  try:  # before anything touches devices
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  config = configs.get_config(_CONFIG.value)
  overrides = {"batch_size": _BATCH.value, "learning_rate": _LR.value,
               "num_epochs": _EPOCHS.value, "image_size": _SIZE.value, "data": _DATA.value,
               "val_data": _VAL.value, "synthetic_train": _NTRAIN.value,
               "synthetic_val": _NVAL.value, "use_dff": _DFF.value, "dff_path": _DFF_PATH.value,
               "eval_every_steps": _EVAL.value, "checkpoint_every_steps": _CKPT.value,
               "seed": _SEED.value, "aflw_pseudo68": _PSEUDO.value, "aflw_labels": _LABELS.value,
               "aflw_dir": _AFLW_DIR.value, "aflw_max_train": _MAX_TRAIN.value,
               "aflw_pose_balance": _BALANCE.value,
               "synthetic_mix": _MIX.value, "dev_dir": _DEV.value, "decay_epoch": _DECAY.value,
               "land_error_start_epoch": _LE_START.value, "log_every_steps": _LOG_EVERY.value,
               "decayed_learning_rate": _LR_DECAYED.value, "init_params": _INIT.value,
               "box_scale_jitter": _SCALE_JITTER.value, "box_shift_jitter": _SHIFT_JITTER.value,
               "box_jitter_prob": _JITTER_PROB.value, "pool": _POOL.value,
               "landmark_loss": _LAND_LOSS.value, "width": _WIDTH.value}
  config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
  if _WINDOW.value is not None:
    try:
      config = config.replace(input_window=heads.check_window(
          [float(v) for v in _WINDOW.value if v.strip()]))
    except ValueError as e:
      raise app.UsageError(f"--input_window: {e}") from None
  if not 0.0 <= config.box_jitter_prob <= 1.0:
    raise app.UsageError(f"--box_jitter_prob: {config.box_jitter_prob} is not in [0, 1]")
  if _WEIGHTS.value:
    try:
      config = config.replace(weights=train.parse_weights(config.weights, _WEIGHTS.value))
    except ValueError as e:
      raise app.UsageError(f"--loss_weights: {e}") from None
  if config.dff_path:
    try:
      dff_lib.load_dff(config.dff_path)
    except dff_lib.DFFFileError as e:
      raise app.UsageError(f"--dff_path: {e}") from None
  if config.init_params:
    try:
      train.load_init_params(config, mm.default_model())
    except (ValueError, FileNotFoundError) as e:
      raise app.UsageError(f"--init_params: {e}") from None
  train.train_and_evaluate(config, _WORKDIR.value, max_steps=_MAX_STEPS.value,
                           max_seconds=None if _MAX_MINUTES.value is None
                           else 60.0 * _MAX_MINUTES.value)


if __name__ == "__main__":
  app.run(main)
