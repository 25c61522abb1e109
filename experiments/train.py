r"""Train the regressor.

  python -m experiments.train --config=cpu --workdir=/tmp/dff3d_cpu [--max_steps=N]

Resumes from the workdir's latest checkpoint. Writes workdir/metrics.jsonl and Orbax
checkpoints (each epoch, every --checkpoint_every_steps, at the end, and on Ctrl-C / SIGTERM).
"""

from absl import app, flags, logging

from dff3d import train
from experiments import configs

_CONFIG = flags.DEFINE_string("config", "cpu", "Config name in experiments/configs (paper, cpu).")
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
_DFF = flags.DEFINE_bool("use_dff", None, "Override: use the DFF loss.")
_EVAL = flags.DEFINE_integer("eval_every_steps", None, "Override: evaluation interval.")
_CKPT = flags.DEFINE_integer("checkpoint_every_steps", None, "Override: checkpoint interval.")
_SEED = flags.DEFINE_integer("seed", None, "Override: seed.")


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)  # keep the console to the progress lines
  config = configs.get_config(_CONFIG.value)
  overrides = {"batch_size": _BATCH.value, "learning_rate": _LR.value,
               "num_epochs": _EPOCHS.value, "image_size": _SIZE.value, "data": _DATA.value,
               "val_data": _VAL.value, "synthetic_train": _NTRAIN.value, "use_dff": _DFF.value,
               "eval_every_steps": _EVAL.value, "checkpoint_every_steps": _CKPT.value,
               "seed": _SEED.value}
  config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
  train.train_and_evaluate(config, _WORKDIR.value, max_steps=_MAX_STEPS.value,
                           max_seconds=None if _MAX_MINUTES.value is None
                           else 60.0 * _MAX_MINUTES.value)


if __name__ == "__main__":
  app.run(main)
