r"""Pseudo-68 labels for the AFLW crops: fit the model to each crop's visible 21 points.

  python -m data_prep.aflw_pseudo68 --aflw_dir=../shared/data/aflw_3ddfa \
      --output=/tmp/aflw/AFLW_GT_pseudo68.npz

AFLW2000-3D's own 68-point ground truth was made this way (a 3DMM fitted to AFLW's 21 points,
then its 68 landmark vertices projected). The landmark-only fit (dff3d.data.real.fit_pseudo68:
dff3d.fitting.fit_landmarks with the AFLW-21 set of dff3d.landmark_sets, whose ear lobes and
nose sides are calibrated on hand clicks, fixed contour, real.PSEUDO68_FIT_WEIGHTS priors) runs
batched on the gathered landmark rows only: 17,590 crops in 50-115 s on the 2-core CPU. Training
with TrainConfig(data="aflw", aflw_labels="pseudo68", aflw_pseudo68="") writes this file into
its workdir on first use. Output (.npz, the format that
data_prep/aflw_3ddfa_builder.py and dff3d.data.real read):
  names        (N,) str   file names, the order of AFLW_GT_crop.list
  landmarks_68 (N, 68, 2) float32 crop pixels (dff3d convention) of the fitted face's 68 points
               (fixed vertices, as AFLW2000-3D's pt3d_68; far-side points are projected too)
  fit_error    (N,) float32 mean distance of the visible 21 points to the fit, as a fraction of
               the crop side
  visible_21   (N,) int32 count of visible points the fit used
  coefficients (N, P) float32 the fitted coefficients (dff3d.coefficients layout of the default
               model): the DFF's real training pairs re-render each crop's face from them
"""

import time

from absl import app, flags
import numpy as np

from dff3d.data import real

_DIR = flags.DEFINE_string("aflw_dir", "../shared/data/aflw_3ddfa", "3DDFA AFLW layout folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the .npz.")
_CHUNK = flags.DEFINE_integer("chunk", 512, "Crops per compiled fit.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Fit only the first N crops (0: all).")


def main(argv):
  del argv
  if not _OUTPUT.value:
    raise app.UsageError("--output is required")
  t = time.time()
  err = real.write_pseudo68(_DIR.value, _OUTPUT.value, _CHUNK.value, _LIMIT.value)
  print(f"{len(err)} crops fitted in {time.time() - t:.1f} s; fit error median "
        f"{100 * np.median(err):.2f}% / 90th pct {100 * np.percentile(err, 90):.2f}% of the "
        f"crop side -> {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
