r"""Reconstruct 3D faces from photos: the main job (flags only; the logic is dff3d.job and
dff3d.reconstructor).

  python -m experiments.reconstruct --input=PATH --output_dir=DIR [--recursive]
      [--outputs=json,mesh,overlay,coefficients,depth,texture] [--detector=auto|cnn|hog]
      [--landmarks=regressor|dlib] [--refine_steps=N] [--overwrite]
      [--shard_index=i --num_shards=n]

PATH is an image file, a folder, a glob, or `skimage:astronaut` (scikit-image's public-domain
portrait, for the README's demo). Faces are found by dlib's detectors (`pip install
'dff3d[detect]'`; --detector=auto runs the CNN detector where HOG finds nothing) and
reconstructed by the shipped regressor (--checkpoint for another), twice: pass 2 re-crops at
pass 1's landmarks. --landmarks=dlib fits the model to dlib's 68 landmarks instead. A
`<stem>.pts` file (iBUG / 300-W format) beside an image wins over detection: the model is
fitted to its points.

Outputs mirror the input folder: DIR/<relative path without extension>.json, written last:
  {"image": path, "outputs": [kinds], "faces": [{"bbox": [x0, y0, x1, y1], "score", "source",
   "landmarks_2d": [[x, y] x 68], "landmarks_3d": [[x, y, z] x 68],
   "pose_deg": {"yaw", "pitch", "roll"}, "mesh": "<stem>_<k>.obj",
   "overlay": "<stem>_<k>.jpg" (for a JPEG photo; .png otherwise),
   "coefficients": "<stem>_<k>.npz", "depth": {"file", "scale", "offset", ...},
   "textured_mesh": "<stem>_<k>_textured.obj"}]}
2D coordinates are photo pixels with dff3d's convention (pixel centres at integer + 0.5;
subtract 0.5 for the 0-based-centre convention of AFLW2000-3D / OpenCV); landmarks_2d are the
points the reconstruction matched. z of landmarks_3d is in the same pixel units, larger
towards the camera, 0 at the mean landmark depth. Meshes are in model space (centimetres for
ICT, +y up, +z towards the viewer) with vertex colours shaded as rendered. Every failure (read,
detect, reconstruct, write) is one line on the console and in DIR/failures.json; the run goes
on. A rerun skips the images whose outputs are complete (--overwrite redoes them).
"""

import os

from absl import app, flags

from dff3d import fitting
from dff3d import job
from dff3d import morphable_model as mm
from dff3d import outputs
from dff3d import reconstructor as reconstructor_lib

_INPUT = flags.DEFINE_string("input", None, "Image file, folder, glob or skimage:astronaut.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "out", "Output folder.")
_RECURSIVE = flags.DEFINE_bool("recursive", False, "Walk sub-folders (and ** in globs).")
_OUTPUTS = flags.DEFINE_list("outputs", list(outputs.DEFAULT_KINDS),
                             f"Output kinds, from {list(outputs.KINDS)}.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Redo images whose outputs are complete.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "shipped", "Regressor: 'shipped', a training "
                                  "workdir, or a .npz of experiments.export_regressor.")
_LANDMARKS = flags.DEFINE_enum("landmarks", "regressor", list(reconstructor_lib.LANDMARK_MODES),
                               "regressor: the network predicts each face; dlib: fit the model "
                               "to dlib's 68 landmarks.")
_DETECTOR = flags.DEFINE_enum("detector", "auto", ["auto", "cnn", "hog", "both"],
                              "Face detector: auto (CNN where HOG finds nothing), cnn, hog "
                              "(fast, near-frontal faces only), or both (group photos with "
                              "faces at several poses).")
_REFINE = flags.DEFINE_integer("refine_steps", 0, "Photometric refinement steps after the "
                               "regressor (0: regression only; see BUILD_NOTES).")
_FLIP = flags.DEFINE_bool("flip_average", True, "Regressor path: also regress each face's "
                          "mirror image and average the two estimates (twice the network).")
_UPRIGHT = flags.DEFINE_bool("upright", True, "Faces at any in-plane turn: where dlib finds "
                             "none, look in the photo turned by 90, 270, 180 degrees; read each "
                             "face's quarter turn (dff3d.orientation) and regress it upright.")
_REFINE_LANDMARKS = flags.DEFINE_bool("refine_landmarks", True, "Regressor path, shipped "
                                      "regressor: move each face to the shipped landmark "
                                      "refiner's 68 points (dff3d.refine), a second, local "
                                      "look at the crop.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Crop side of the fit to landmarks.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Faces per compiled batch.")
_PHOTO_STEPS = flags.DEFINE_integer("photo_steps", 40, "Photometric steps of the fit to "
                                    "landmarks (.pts or --landmarks=dlib).")
_CONTOUR = flags.DEFINE_enum("contour", "silhouette", ["silhouette", "fixed"],
                             "Jaw landmarks of the fit: slide along the outline (annotated or "
                             "detected landmarks) or fixed vertices (projected 3D points).")
_UPSAMPLE = flags.DEFINE_integer("detector_upsample", None, "dlib upsampling for small faces "
                                  "(default: 1 for HOG, 0 for the CNN).")
_MIN_SCORE = flags.DEFINE_float("min_score", None, "Drop detections at or below this score "
                                "(default: HOG 0.3, CNN 0; see detect.MIN_SCORE).")
_CNN_MAX_SIDE = flags.DEFINE_integer("cnn_max_side", None, "Largest copy (longer side, px) the "
                                     "CNN detector escalates to where smaller ones find no "
                                     "face (default detect.CNN_MAX_SIDE, 450: turned faces "
                                     "down to ~15 % of the photo; 900: ~8 %, ~6 s more).")
_USE_DFF = flags.DEFINE_bool("use_dff", False, "Add the DFF loss (shipped network) to the "
                             "photometric stages; slower (see BUILD_NOTES).")
_TEXTURE_SIZE = flags.DEFINE_integer("texture_size", 512, "Side of the UV texture (texture).")
_CHUNK = flags.DEFINE_integer("chunk_images", 16, "Images read and reconstructed together.")
_SHARD = flags.DEFINE_integer("shard_index", 0, "This copy's shard (0-based).")
_SHARDS = flags.DEFINE_integer("num_shards", 1, "Copies sharing the input (a job array).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
  del argv
  if not _INPUT.value:
    raise app.UsageError("--input is required (image, folder, glob or skimage:astronaut)")
  try:
    kinds = outputs.parse_kinds(_OUTPUTS.value)
    inputs, listing = job.list_inputs(_INPUT.value, _RECURSIVE.value)
    inputs = job.shard(inputs, _SHARD.value, _SHARDS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if not inputs and not listing:
    raise app.UsageError(f"{_INPUT.value}: no image files found")
  dff_fn = None
  if _USE_DFF.value:
    from dff3d.models import dff
    dff_fn = dff.load_frozen_dff(os.path.join(mm.ASSET_DIR, "dff.npz"), dff.SHIPPED_NATIVE_SIZE)
  regressor = _CHECKPOINT.value if _LANDMARKS.value == "regressor" else None
  rec = reconstructor_lib.Reconstructor(
      regressor=regressor, landmarks=_LANDMARKS.value, detector=_DETECTOR.value,
      refine_steps=_REFINE.value, batch_size=_BATCH.value, min_score=_MIN_SCORE.value,
      upsample=_UPSAMPLE.value, cnn_max_side=_CNN_MAX_SIDE.value, dff_fn=dff_fn,
      flip_average=_FLIP.value, orientation="shipped" if _UPRIGHT.value else None,
      turned_photos=_UPRIGHT.value, refiner="auto" if _REFINE_LANDMARKS.value else None,
      fit_config=fitting.FitConfig(image_size=_SIZE.value, photo_steps=_PHOTO_STEPS.value,
                                   contour=_CONTOUR.value))
  config = job.JobConfig(output_dir=_OUTPUT_DIR.value, kinds=kinds, overwrite=_OVERWRITE.value,
                         texture_size=_TEXTURE_SIZE.value, chunk_images=_CHUNK.value,
                         shard_index=_SHARD.value, num_shards=_SHARDS.value,
                         progress=_PROGRESS.value)
  summary = job.run(inputs, rec, config, listing)
  print(f"{summary.faces} face(s) from {summary.images} image(s) written to "
        f"{_OUTPUT_DIR.value}; {summary.skipped} complete image(s) skipped; "
        f"{len(summary.failures)} failure(s) (see {config.failures_file})")


if __name__ == "__main__":
  app.run(main)
