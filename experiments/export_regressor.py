r"""Export a trained regressor's parameters to one .npz (the format of the shipped weights).

  python -m experiments.export_regressor --checkpoint=WORKDIR \
      --output=dff3d/assets/regressor.npz [--dtype=float16] [--input_window=x0,y0,x1,y1]

Only the network parameters and the config travel (no Adam state); train.load_regressor
reads the file (train.load_regressor() with no argument reads dff3d/assets/regressor.npz).
--checkpoint may also be a regressor .npz or "shipped" (re-export, e.g. with another
--input_window: the window the network's input is blacked out beyond, TrainConfig.input_window;
'' for none).
"""

import os
import sys

from absl import app, flags
import numpy as np

from dff3d import morphable_model as mm
from dff3d import train
from dff3d.models import heads

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir.")
_OUTPUT = flags.DEFINE_string("output", None, "The .npz to write.")
_DTYPE = flags.DEFINE_enum("dtype", "float16", ["float16", "float32"], "Stored precision.")
_WINDOW = flags.DEFINE_list("input_window", None, "Replace the config's input window: "
                            "x0,y0,x1,y1 fractions of the crop ('' for none).")


def main(argv):
  del argv
  if not _CHECKPOINT.value or not _OUTPUT.value:
    raise app.UsageError("--checkpoint and --output are required")
  try:
    params, config = train.read_params(_CHECKPOINT.value, mm.default_model())
    if _WINDOW.value is not None:
      config = config.replace(input_window=heads.check_window(
          [float(v) for v in _WINDOW.value if v.strip()]))
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  train.save_params_npz(_OUTPUT.value, params, config, np.dtype(_DTYPE.value))
  print(f"{_OUTPUT.value}: {os.path.getsize(_OUTPUT.value) / 1e6:.2f} MB ({_DTYPE.value})")


if __name__ == "__main__":
  app.run(main)
