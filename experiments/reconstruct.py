r"""Reconstruct 3D faces from photos: the main job.

  python -m experiments.reconstruct --input=PATH --output_dir=DIR [--checkpoint=CKPT]

PATH is an image file, a folder, a glob, or `skimage:astronaut` (scikit-image's public-domain
portrait, for the README's demo). Landmarks come from `<stem>.pts` next to an image (iBUG /
300-W format) when present, else from the dlib detector (`pip install 'dff3d[detect]'`).
Faces are fitted with the paper's losses (dff3d.fitting), or predicted by a trained regressor
when --checkpoint is given (then refined by --refine_steps photometric steps).

For each image `<stem>` the job writes DIR/<stem>.json:
  {"image": path, "faces": [{"bbox": [x0, y0, x1, y1], "landmarks_2d": [[x, y] x 68],
   "landmarks_3d": [[x, y, z] x 68], "pose_deg": {"yaw", "pitch", "roll"},
   "mesh": "<stem>_<k>.obj", "overlay": "<stem>_<k>.png", "coefficients": "<stem>_<k>.npz"}]}
2D coordinates are original-image pixels with dff3d's convention (pixel centres at integer +
0.5; subtract 0.5 for the 0-based-centre convention of AFLW2000-3D / OpenCV). z of
landmarks_3d is in the same pixel units, larger towards the camera, 0 at the mean landmark
depth. Meshes are in model space (centimetres for ICT, +y up, +z towards the viewer) with
shaded vertex colours. Unreadable images and images without a face are reported on one line
each and in DIR/failures.json; the run goes on.
"""

import os

from absl import app, flags

from dff3d import fitting
from dff3d import morphable_model as mm
from experiments.reconstruction_job import list_inputs, run

_INPUT = flags.DEFINE_string("input", None, "Image file, folder, glob or skimage:astronaut.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "out", "Output folder.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Regressor: a training workdir, a .npz of "
                                   "experiments.export_regressor, or 'shipped' (optional).")
_SIZE = flags.DEFINE_integer("image_size", 224, "Crop side for fitting, pixels.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Faces fitted together (one compilation).")
_PHOTO_STEPS = flags.DEFINE_integer("photo_steps", 40, "Photometric refinement steps.")
_CONTOUR = flags.DEFINE_enum("contour", "silhouette", ["silhouette", "fixed"],
                             "Jaw landmarks: slide along the outline (detector landmarks) or "
                             "fixed vertices (landmarks that are projected 3D points).")
_UPSAMPLE = flags.DEFINE_integer("detector_upsample", 1, "dlib upsampling for small faces.")
_MIN_SCORE = flags.DEFINE_float("min_score", 0.3, "Drop detections with a lower dlib score.")
_USE_DFF = flags.DEFINE_bool("use_dff", False, "Add the DFF loss (shipped network) to the "
                             "photometric stage; slower (see BUILD_NOTES).")


def main(argv):
  del argv
  if not _INPUT.value:
    raise app.UsageError("--input is required (image, folder, glob or skimage:astronaut)")
  inputs = list_inputs(_INPUT.value)
  if not inputs:
    raise app.UsageError(f"{_INPUT.value}: no image files found")
  config = fitting.FitConfig(image_size=_SIZE.value, photo_steps=_PHOTO_STEPS.value,
                             contour=_CONTOUR.value)
  dff_fn = None
  if _USE_DFF.value:
    from dff3d.models import dff
    dff_fn = dff.load_frozen_dff(os.path.join(mm.ASSET_DIR, "dff.npz"), dff.SHIPPED_NATIVE_SIZE)
  images, failures = run(inputs, _OUTPUT_DIR.value, mm.default_model(), config, _BATCH.value,
                         _CHECKPOINT.value, _UPSAMPLE.value, _MIN_SCORE.value, dff_fn)
  faces = sum(len(v[2]) for v in images.values())
  print(f"{faces} face(s) from {len(images)} image(s) written to {_OUTPUT_DIR.value}; "
        f"{len(failures)} failure(s)")


if __name__ == "__main__":
  app.run(main)
