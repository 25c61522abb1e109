r"""Loss-term ablation on real faces (the paper's Table-3 question), every row the same budget.

  python -m experiments.ablate --workdir=/tmp/ablation [--rows=land,photo,dff,land_error,pts21]
      [--aflw_max_train=3200 --num_epochs=4]

Each row trains the `real` config from scratch on the same AFLW crops for the same number of
steps and schedule (lr decay and L_land_error after half the epochs), then reports its
AFLW2000-3D development figures (68 points, box from the ground truth) and the held-out AFLW
21-point NME. Rows (cumulative, as in the paper):
  land        L_land + L_reg
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

from dff3d import train
from dff3d.data import real
from experiments import configs

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the rows' training workdirs.")
_ROWS = flags.DEFINE_list("rows", ["land", "photo", "dff", "land_error", "pts21"], "Rows.")
_MAX_TRAIN = flags.DEFINE_integer("aflw_max_train", 3200, "AFLW training crops per row.")
_EPOCHS = flags.DEFINE_integer("num_epochs", 4, "Epochs per row.")
_PSEUDO = flags.DEFINE_string("aflw_pseudo68", "", "Pseudo-68 .npz shared by the rows (\"\": "
                              "fitted once into <workdir>/AFLW_GT_pseudo68.npz).")

ROWS = {
    "land": dict(photo=0.0, dff=0.0, land_error=0.0),
    "photo": dict(dff=0.0, land_error=0.0),
    "dff": dict(land_error=0.0),
    "land_error": dict(),
    "pts21": dict(photo=0.0, dff=0.0, land_error=0.0),
}


def row_config(name: str, max_train: int, epochs: int, pseudo68: str):
  """The TrainConfig of one ablation row."""
  base = configs.get_config("real").replace(aflw_pseudo68=pseudo68)
  cfg = base.replace(aflw_max_train=max_train, num_epochs=epochs, decay_epoch=epochs // 2,
                     land_error_start_epoch=epochs // 2, checkpoint_every_steps=0,
                     weights=base.weights.replace(**ROWS[name]))
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
  results = {}
  for name in _ROWS.value:
    if name not in ROWS:
      raise app.UsageError(f"--rows: unknown row {name!r} (known: {sorted(ROWS)})")
    wd = os.path.join(_WORKDIR.value, name)
    done = os.path.isfile(os.path.join(wd, "metrics.jsonl")) and "steps" in read_row(wd)
    if not done:
      train.train_and_evaluate(row_config(name, _MAX_TRAIN.value, _EPOCHS.value, pseudo68), wd)
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
