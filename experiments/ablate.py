r"""Loss-term ablation on real faces (the paper's Table-3 question), every row the same budget.

  python -m experiments.ablate --workdir=/tmp/ablation [--rows=land,photo,dff,land_error,pts21]
      [--aflw_max_train=3200 --num_epochs=4]
  # fine-tune rows from one converged regressor instead of from scratch:
  python -m experiments.ablate --workdir=/tmp/ft --init_params=shipped --aflw_max_train=0 \
      --num_epochs=1 --decay_epoch=1 --learning_rate=3e-5 --base_loss_weights=pose=100 \
      --aflw_pose_balance --rows=land,land_seed1,photo,dff,land_error,pts21

Each row trains the `real` config on the same AFLW crops for the same number of steps and
schedule (by default from scratch, lr decay and L_land_error after half the epochs), then
reports its AFLW2000-3D development figures (68 points, box from the ground truth) and the
held-out AFLW 21-point NME. The flags after --aflw_pseudo68 apply to every row alike. Rows
(cumulative, as in the paper):
  land        L_land + L_reg
  land_seed1  the land row with seed + 1 (its difference from land: run-to-run noise)
  photo       + L_photo
  dff         + L_dff
  land_error  + L_land_error (all five terms)
  pts21       L_land + L_reg on the 21 hand points instead of the pseudo-68 labels
A row whose workdir holds a finished run is read, not retrained. Prints a markdown table and
writes <workdir>/ablation.json.
"""

import json
import os

from absl import app, flags

from dff3d import morphable_model as mm
from dff3d import train
from dff3d.data import real
from experiments import configs

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the rows' training workdirs.")
_ROWS = flags.DEFINE_list("rows", ["land", "photo", "dff", "land_error", "pts21"], "Rows.")
_MAX_TRAIN = flags.DEFINE_integer("aflw_max_train", 3200, "AFLW training crops per row.")
_EPOCHS = flags.DEFINE_integer("num_epochs", 4, "Epochs per row.")
_PSEUDO = flags.DEFINE_string("aflw_pseudo68", "", "Pseudo-68 .npz shared by the rows (\"\": "
                              "fitted once into <workdir>/AFLW_GT_pseudo68.npz).")
_INIT = flags.DEFINE_string("init_params", "", "Every row starts from these parameters "
                            "(\"shipped\", a .npz or a workdir); \"\": from scratch.")
_LR = flags.DEFINE_float("learning_rate", None, "Initial learning rate (default: the config's).")
_LR_DECAYED = flags.DEFINE_float("decayed_learning_rate", None, "Learning rate after the decay "
                                 "(default: the config's).")
_DECAY = flags.DEFINE_integer("decay_epoch", None, "Epochs before the decay (default: half).")
_LE_START = flags.DEFINE_integer("land_error_start_epoch", None, "Epoch from which the "
                                 "land_error row uses L_land_error (default: half).")
_BASE_WEIGHTS = flags.DEFINE_list("base_loss_weights", [], "name=value loss weights set in "
                                  "every row before the row's own (e.g. pose=100).")
_BALANCE = flags.DEFINE_bool("aflw_pose_balance", False, "Repeat the 30-60 / 60+ degree crops.")
_SCALE_JITTER = flags.DEFINE_float("box_scale_jitter", 0.0, "Crop box scale jitter.")
_SHIFT_JITTER = flags.DEFINE_float("box_shift_jitter", 0.0, "Crop box shift jitter.")
_JITTER_PROB = flags.DEFINE_float("box_jitter_prob", 1.0, "Share of crops jittered.")

_LAND_ONLY = dict(photo=0.0, dff=0.0, land_error=0.0)
ROWS = {  # each row's loss weights; land_seed1 and pts21 also change the seed / the labels
    "land": _LAND_ONLY,
    "land_seed1": _LAND_ONLY,
    "photo": dict(dff=0.0, land_error=0.0),
    "dff": dict(land_error=0.0),
    "land_error": dict(),
    "pts21": _LAND_ONLY,
}


def row_config(name: str, max_train: int, epochs: int, pseudo68: str, **shared):
  """The TrainConfig of one ablation row.

  `shared` holds TrainConfig fields set in every row (init_params, learning rates, jitter,
  ...), plus optional `decay_epoch` / `land_error_start_epoch` (default: epochs // 2) and
  `base_weights` (name=value items applied before the row's own weights).
  """
  base = configs.get_config("real").replace(aflw_pseudo68=pseudo68)
  base_weights = train.parse_weights(base.weights, shared.pop("base_weights", ()))
  decay = shared.pop("decay_epoch", None)
  land_error_start = shared.pop("land_error_start_epoch", None)
  cfg = base.replace(aflw_max_train=max_train, num_epochs=epochs,
                     decay_epoch=epochs // 2 if decay is None else decay,
                     land_error_start_epoch=(epochs // 2 if land_error_start is None
                                             else land_error_start),
                     checkpoint_every_steps=0, weights=base_weights.replace(**ROWS[name]),
                     **{k: v for k, v in shared.items() if v is not None})
  if name == "land_seed1":
    cfg = cfg.replace(seed=cfg.seed + 1)
  return cfg.replace(aflw_labels="pts21") if name == "pts21" else cfg


def read_row(workdir: str) -> dict:
  """Last dev figures, last validation NME and training time of a finished row."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "dev" in rec:
        out["dev"] = rec["dev"]
      if rec.get("final"):
        out["val_nme_aflw21"] = rec["val_nme"]
        out["steps"] = rec["step"]
  return out


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  pseudo68 = _PSEUDO.value or os.path.join(_WORKDIR.value, "AFLW_GT_pseudo68.npz")
  if not os.path.isfile(pseudo68):
    real.write_pseudo68(configs.get_config("real").aflw_dir, pseudo68)
  shared = dict(init_params=_INIT.value, learning_rate=_LR.value,
                decayed_learning_rate=_LR_DECAYED.value, decay_epoch=_DECAY.value,
                land_error_start_epoch=_LE_START.value, aflw_pose_balance=_BALANCE.value,
                box_scale_jitter=_SCALE_JITTER.value, box_shift_jitter=_SHIFT_JITTER.value,
                box_jitter_prob=_JITTER_PROB.value)
  try:
    for name in _ROWS.value:
      if name not in ROWS:
        raise ValueError(f"--rows: unknown row {name!r} (known: {sorted(ROWS)})")
    cfg = row_config("land", 1, 1, pseudo68, base_weights=_BASE_WEIGHTS.value, **shared)
    if cfg.init_params:
      train.load_init_params(cfg, mm.default_model())
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  results = {}
  for name in _ROWS.value:
    wd = os.path.join(_WORKDIR.value, name)
    done = os.path.isfile(os.path.join(wd, "metrics.jsonl")) and "steps" in read_row(wd)
    if not done:
      cfg = row_config(name, _MAX_TRAIN.value, _EPOCHS.value, pseudo68,
                       base_weights=_BASE_WEIGHTS.value, **shared)
      train.train_and_evaluate(cfg, wd)
    results[name] = read_row(wd)
  pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
  print("| row | steps | dev 0-30 | dev 30-60 | dev 60-90 | dev mean | AFLW-21 val |")
  print("|---|---|---|---|---|---|---|")
  for name, r in results.items():
    d = r["dev"]
    print(f"| {name} | {r['steps']} | {pct(d['nme_0_30'])} | {pct(d['nme_30_60'])} | "
          f"{pct(d['nme_60_90'])} | {pct(d['nme_mean'])} | {pct(r['val_nme_aflw21'])} |")
  with open(os.path.join(_WORKDIR.value, "ablation.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
