r"""Per-image fitting on the AFLW2000-3D sample: NME and seconds per face, as JSON lines.

  python -m benchmarks.fit [--data_dir=../shared/data/aflw2000_3d_sample]

The ground-truth 68 landmarks (pt3d_68 x, y) are written as iBUG .pts files next to copies of
the images and the reconstruction job's code path fits them (contour 'fixed': AFLW2000-3D's
landmarks are projected 3D points). Prints one line per setting with "nme_mean" (68-point,
bbox-normalised, mean of the |yaw| group means), "nme_all" (plain mean), "seconds_per_face"
(median of --repeats runs after compilation), "compile_s", "faces", "photo_steps",
"photo_size" (side of the photometric stage's images), "image_size", "device".
"""

import json
import os
import shutil
import tempfile
import time

from absl import app, flags
import jax
import numpy as np

from dff3d import detect, fitting, io, metrics
from dff3d import morphable_model as mm
from dff3d import reconstruction
from dff3d.datasets import aflw2000_3d

_DATA = flags.DEFINE_string("data_dir", os.path.join(os.path.dirname(__file__), "..", "..",
                                                     "shared", "data", "aflw2000_3d_sample"),
                            "AFLW2000-3D folder (imageNNNNN.jpg + .mat).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs after the compiling one.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Crop side.")


def main(_):
  pairs = aflw2000_3d.list_aflw2000_3d(_DATA.value).pairs
  work = tempfile.mkdtemp()
  faces, gts, yaws = [], [], []
  for img, mat in pairs:  # the .pts route of the job: images + iBUG .pts files
    lab = aflw2000_3d.load_aflw2000_3d_mat(mat)
    stem = os.path.splitext(os.path.basename(img))[0]
    shutil.copy(img, os.path.join(work, stem + ".jpg"))
    detect.write_pts(os.path.join(work, stem + ".pts"), lab["landmarks_3d"][:, :2] + 0.5)
    pts = detect.read_pts(os.path.join(work, stem + ".pts"))
    faces.append((io.read_image(os.path.join(work, stem + ".jpg")), pts))
    gts.append(pts)
    yaws.append(lab["yaw_deg"])
  gts, yaws = np.stack(gts), np.asarray(yaws)
  model = mm.default_model()
  for photo_steps, photo_size in ((0, 0), (40, 224), (40, 112)):
    config = fitting.FitConfig(image_size=_SIZE.value, contour="fixed", photo_steps=photo_steps,
                               photo_size=photo_size)
    t = time.perf_counter()
    out = reconstruction.reconstruct_faces(model, faces, config, batch_size=len(faces))
    first = time.perf_counter() - t
    times = []
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      out = reconstruction.reconstruct_faces(model, faces, config, batch_size=len(faces))
      times.append(time.perf_counter() - t)
    pred = np.stack([f.landmarks_2d for f in out])
    nme = metrics.nme_2d(pred, gts)
    per_face = float(np.median(times)) / len(faces)
    print(json.dumps({
        "faces": len(faces), "image_size": _SIZE.value, "photo_steps": photo_steps,
        "photo_size": photo_size or _SIZE.value,
        "nme_mean": round(float(metrics.grouped_nme(nme, yaws)["nme_mean"]), 5),
        "nme_all": round(float(nme.mean()), 5),
        "seconds_per_face": round(per_face, 4),
        "compile_s": round(first - per_face * len(faces), 2),
        "device": jax.devices()[0].device_kind}), flush=True)
  shutil.rmtree(work)


if __name__ == "__main__":
  app.run(main)
