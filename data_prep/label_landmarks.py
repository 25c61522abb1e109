r"""Adds 68 weak landmarks (dlib) to a folder of face images that have none, e.g. CelebA.

  python -m data_prep.label_landmarks --images=/data/celeba/img_align_celeba

writes, by default into the images folder's parent (the CelebA root the builder reads):
  landmarks_68.txt           "<file> x0 y0 ... x67 y67" per labelled image (dff3d pixels)
  landmarks_68_failures.txt  "<file> <reason>" per image it could not label
The run is resumable: images already in either file are skipped. Nothing is labelled
silently: images with no face found are reported (printed and written to the failures file)
and left out; with several faces the one with the best detection score is used and counted.

Needs the detect extra (pip install 'dff3d[detect]'). Licence: dlib's 68-point model was
trained on iBUG 300-W, whose licence excludes commercial use; so are labels made with it.
"""

from absl import app, flags

from data_prep.labelling import label_folder
from dff3d import detect

_IMAGES = flags.DEFINE_string("images", None, "Folder of images to label (not recursive).")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where landmarks_68.txt and the failures file go (default: the images "
    "folder's parent, the CelebA root).")
_UPSAMPLE = flags.DEFINE_integer(
    "upsample", 1, "dlib upsampling steps (1 finds faces down to about 40 px).")
_MIN_SCORE = flags.DEFINE_float("min_score", 0.0, "Drop detections scoring at or below this.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Label at most this many new images (0: all).")


def main(argv):
  del argv
  if not _IMAGES.value:
    raise app.UsageError("--images is required")
  try:
    label_folder(_IMAGES.value, _OUTPUT_DIR.value, _UPSAMPLE.value, _MIN_SCORE.value,
                 _LIMIT.value)
  except (FileNotFoundError, detect.DetectorUnavailableError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
