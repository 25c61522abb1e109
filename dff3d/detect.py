"""Face detection and 68-point landmarks with dlib (optional), and the iBUG `.pts` format.

The detector is dlib's HOG frontal face detector; the landmarks come from dlib's 68-point shape
predictor shipped by the `face_recognition_models` package. Both are optional dependencies:

    pip install 'dff3d[detect]'      # dlib-bin + face-recognition-models

and are imported only when `detect_faces` first runs. Licence: dlib's 68-point model was
trained on the iBUG 300-W data set, whose licence excludes commercial use; landmarks it
produces inherit that restriction (see BUILD_NOTES.md, "Datasets and input pipeline").

Coordinates follow dff3d's convention (camera.py): x right, y down, pixel (row i, column j)
covers [j, j+1) x [i, i+1) and has its centre at (j + 0.5, i + 0.5).
- dlib rectangles hold inclusive pixel indices (left, top, right, bottom), so the box in dff3d
  pixels is (left, top, right + 1, bottom + 1).
- dlib landmark parts are integer pixel indices (the pixel that holds the point), so the point
  in dff3d pixels is (x + 0.5, y + 0.5).
- iBUG 300-W `.pts` files use the Matlab convention: the top-left pixel's centre is (1, 1). So
  dff3d = pts - 0.5 (read_pts) and pts = dff3d + 0.5 (write_pts).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np

INSTALL_HINT = "pip install 'dff3d[detect]'"


class DetectorUnavailableError(ImportError):
  """dlib or face_recognition_models is missing; the message says how to install them."""


class PtsFileError(ValueError):
  """A `.pts` file is missing or malformed; the message names the file."""


class Face(NamedTuple):
  """One detected face.

  bbox: (4,) float32 (x0, y0, x1, y1), the box's outer corners in dff3d pixels.
  landmarks: (68, 2) float32 iBUG 68-point landmarks in dff3d pixels.
  """

  bbox: np.ndarray
  landmarks: np.ndarray


@functools.lru_cache(maxsize=None)
def _models():
  """(detector, shape_predictor), loaded once per process."""
  try:
    import dlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DetectorUnavailableError(
        f"face detection needs dlib, which is not installed: {INSTALL_HINT}") from None
  try:
    import face_recognition_models  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DetectorUnavailableError(
        "face detection needs the face_recognition_models package (dlib's 68-point model), "
        f"which is not installed: {INSTALL_HINT}") from None
  path = face_recognition_models.pose_predictor_model_location()
  if not os.path.isfile(path):
    raise DetectorUnavailableError(f"{path}: dlib 68-point model file missing; reinstall "
                                   f"face_recognition_models ({INSTALL_HINT})")
  return dlib.get_frontal_face_detector(), dlib.shape_predictor(path)


def require_detector() -> None:
  """Loads dlib and the 68-point model now (once per process).

  Raises:
    DetectorUnavailableError: with the install command, when they are missing.
  """
  _models()


def detector_available() -> bool:
  """True when dlib and the 68-point model can be loaded."""
  try:
    _models()
  except DetectorUnavailableError:
    return False
  return True


def _to_uint8(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"detect_faces expects an (H, W, 3) image, got shape {image.shape}")
  if image.dtype == np.uint8:
    return np.ascontiguousarray(image)
  return np.ascontiguousarray(
      np.clip(np.asarray(image, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8))


def detect_faces(image, upsample: int = 1, min_score: float = 0.0) -> list[Face]:
  """Detects faces and their 68 landmarks.

  Args:
    image: (H, W, 3) float RGB in [0, 1] (uint8 is accepted as is).
    upsample: how many times dlib doubles the image before detecting; the HOG detector finds
      faces of about 80 px and larger at 0, about 40 px at 1. Higher is slower (x4 per step).
    min_score: detections with a dlib score at or below this are dropped (dlib's own
      threshold is 0; at upsample >= 1 it returns occasional low-score false positives).

  Returns:
    list of Face(bbox (4,) float32 x0, y0, x1, y1; landmarks (68, 2) float32), in dff3d
    pixels (pixel centres at integer + 0.5), best detection score first. Empty if none.

  Raises:
    DetectorUnavailableError: dlib / face_recognition_models not installed.
  """
  detector, predictor = _models()
  img = _to_uint8(image)
  rects, scores, _ = detector.run(img, int(upsample), 0.0)
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  faces = []
  for k in order:
    if scores[k] <= min_score:
      continue
    r = rects[k]
    shape = predictor(img, r)
    pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)],
                   np.float32) + 0.5
    bbox = np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float32)
    faces.append(Face(bbox=bbox, landmarks=pts))
  return faces


def read_pts(path) -> np.ndarray:
  """Reads an iBUG / 300-W `.pts` file.

  Format: `version: 1`, `n_points: N`, `{`, N lines `x y`, `}` (extra header lines and blank
  lines are tolerated). Coordinates in the file are 1-based (Matlab: the top-left pixel's
  centre is (1, 1)); they are returned in dff3d pixels, i.e. minus 0.5.

  Returns:
    (N, 2) float32.

  Raises:
    PtsFileError: missing file or malformed content; the message names the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise PtsFileError(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      lines = [ln.strip() for ln in f]
  except (OSError, UnicodeDecodeError) as e:
    raise PtsFileError(f"{path}: cannot read .pts file ({type(e).__name__})") from None
  n_points = None
  start = None
  for i, line in enumerate(lines):
    if line.lower().startswith("n_points"):
      try:
        n_points = int(line.split(":", 1)[1])
      except (IndexError, ValueError):
        raise PtsFileError(f"{path}: bad n_points line {line!r}") from None
    elif line == "{":
      start = i + 1
      break
  if n_points is None or start is None:
    raise PtsFileError(f"{path}: not a .pts file (expected 'n_points: N' and '{{')")
  try:
    end = lines.index("}", start)
  except ValueError:
    raise PtsFileError(f"{path}: missing closing '}}'") from None
  rows = [ln for ln in lines[start:end] if ln]
  if len(rows) != n_points:
    raise PtsFileError(f"{path}: n_points is {n_points} but {len(rows)} point lines follow")
  try:
    pts = np.array([[float(v) for v in ln.split()] for ln in rows], np.float64)
  except ValueError:
    raise PtsFileError(f"{path}: non-numeric point line") from None
  if pts.ndim != 2 or pts.shape[1] != 2:
    raise PtsFileError(f"{path}: each point line must hold exactly 'x y'")
  if not np.all(np.isfinite(pts)):
    raise PtsFileError(f"{path}: non-finite coordinates")
  return (pts - 0.5).astype(np.float32)


def write_pts(path, points) -> None:
  """Writes (N, 2) points in dff3d pixels as an iBUG `.pts` file (1-based: plus 0.5)."""
  pts = np.asarray(points, np.float64)
  if pts.ndim != 2 or pts.shape[1] != 2:
    raise ValueError(f"write_pts expects (N, 2) points, got shape {pts.shape}")
  lines = ["version: 1", f"n_points: {len(pts)}", "{"]
  lines += [f"{x + 0.5:.3f} {y + 0.5:.3f}" for x, y in pts]
  lines.append("}")
  with open(os.fspath(path), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
