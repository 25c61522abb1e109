"""Face detection and 68-point landmarks with dlib (optional), and the iBUG `.pts` format.

Two detectors, both dlib's: the HOG frontal face detector (fast, finds mostly near-frontal
faces) and the CNN (MMOD) face detector `mmod_human_face_detector.dat` (finds faces at any
yaw, about 20x slower on the same image). `detect_boxes` runs either, or "auto" (the
default): HOG, and the CNN on a downscaled copy only where HOG finds nothing (figures in
BOX_CALIBRATION's and CNN_FIRST_SIDE's comments). The landmarks come from dlib's 68-point
shape predictor; the model files are shipped by the `face_recognition_models` package. Both
are optional dependencies:

    pip install 'dff3d[detect]'      # dlib-bin + face-recognition-models

and are imported only when a detector first runs. Licence: dlib's 68-point model was
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


def _model_path(locator: str, what: str) -> str:
  """The path of one of face_recognition_models' files (`locator`: its location function),
  checked to exist; DetectorUnavailableError with the install command otherwise."""
  try:
    import face_recognition_models  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DetectorUnavailableError(
        f"{what} needs the face_recognition_models package, which is not installed: "
        f"{INSTALL_HINT}") from None
  path = getattr(face_recognition_models, locator)()
  if not os.path.isfile(path):
    raise DetectorUnavailableError(f"{path}: {what} model file missing; reinstall "
                                   f"face_recognition_models ({INSTALL_HINT})")
  return path


@functools.lru_cache(maxsize=None)
def _models():
  """(HOG detector, 68-point shape predictor), loaded once per process."""
  path = _model_path("pose_predictor_model_location", "dlib's 68-point landmark predictor")
  return _hog_model(), _import_dlib().shape_predictor(path)


def require_detector(detector: str = "hog") -> None:
  """Loads dlib and the 68-point model now (once per process), and the CNN face detector's
  model too when `detector` (a detect_boxes detector) uses it.

  Raises:
    ValueError: unknown detector.
    DetectorUnavailableError: with the install command, when they are missing.
  """
  _check_detector(detector)
  _models()
  if detector != "hog":
    _cnn_model()


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
  out = np.empty(image.shape, np.uint8)
  rows = max(1, (1 << 20) // max(1, image.shape[1]))  # about 12 MB of float temporaries
  for i in range(0, image.shape[0], rows):
    out[i:i + rows] = np.clip(np.asarray(image[i:i + rows], np.float32) * 255.0 + 0.5, 0, 255)
  return out


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


# ----------------------------------------------------------------------------------------------
# Face boxes: HOG, CNN, or both ("auto")
# ----------------------------------------------------------------------------------------------

DETECTORS = ("auto", "cnn", "hog", "both")

# A detector rectangle -> a crop box framed like data.augment.face_box of the face's 68
# landmarks (scale 1.6, shift_up 0.1): (scale, (x, y) offset), see box_from_rectangle. The two
# detectors frame a face differently, so each has its own constants. Measured per image on the
# detection whose centre lies inside face_box(ground-truth 68 points) and is nearest its
# centre: medians of face_box side / rectangle side (the mean of its width and height) and of
# face_box's centre minus the rectangle's centre, in rectangle sides (x right, y down).
# - "hog": dlib 20.0 HOG at upsample 1 on the 450-px images, AFLW2000-3D sample (12 of 16)
#   + dev (170 of 300): 1.520 (quartiles 1.42-1.63), (0.034, 0.016); x follows the yaw
#   (about -0.22 for yaw < -30 degrees, +0.22 beyond +30). Median IoU of the crop box with
#   face_box(ground truth) 0.75 (benchmarks/detectors.py; its --calibrate gives 1.517,
#   (0.036, 0.016) on 181 images).
# - "cnn": dlib 20.0 CNN at upsample 0 on the 225-px copy (CNN_FIRST_SIDE, detect_boxes'
#   default), the same images: 309 of 316 (dev 293, sample 16): 1.562 (quartiles 1.47-1.66;
#   dev 1.561, sample 1.64), (0.054, 0.059); x follows the yaw less than HOG's (-0.00 for
#   yaw < -30, 0.06 within 30, 0.10 beyond +30). Median crop-box IoU 0.81. The framing is the
#   same on a 300-px copy (1.548, (0.052, 0.045)) but not for faces near the CNN's smallest
#   size (rectangles under about 80 px: 1.42 at 180 px, 1.31 at 150 px on these images).
BOX_CALIBRATION = {
    "hog": (1.520, (0.034, 0.016)),
    "cnn": (1.562, (0.054, 0.059)),
}

# Longer side of the image the detectors see: larger photos are downscaled (antialiased) first,
# so time and memory stay bounded. HOG at upsample 1 finds faces of about 35-40 px and larger
# in that image, 4 % of the photo's longer side at 1024. On a 3600-px photo of 8 x 8 tiled
# AFLW2000-3D faces (rectangles about 190 px; benchmarks/detectors.py --grid=8), HOG found 61,
# 60 and 61 of 64 at max_side 640, 1024 and 1600, in 0.25, 0.5-0.7 and 1.2 s of HOG (plus
# 0.25 s to convert the float image and 0.15 s to downscale it); without downscaling, HOG took
# 9 s on a 2700-px grid (6 x 6) that it searched in 1.9 s at 1024. 1024 keeps HOG under
# about 0.7 s per photo and finds faces of a 12-megapixel photo down to about 150 px.
# CNN_FIRST_SIDE is the first copy the CNN sees (its cost grows with the pixels, single-threaded:
# about 0.17 / 0.25 / 0.41 / 0.75 / 1.9 s at upsample 0 on 150 / 180 / 225 / 300 / 450 px
# here). At upsample 0 it finds faces whose rectangle is about 70 px or more in that copy. On
# AFLW2000-3D (450 px, rectangles 145-340 px) it found the same faces at 225 as at 300 and 450
# (50 / 48 / 47 of 50 per yaw group, 46-47 in 60-90 at 450) and fewer at 180 (50 / 45 / 46)
# and 150 (42 / 24 / 32); the full-resolution CNN at upsample 1 (7 s per image) misses the
# same hard images (black borders, an upside-down face).
DEFAULT_MAX_SIDE = 1024

# Default score thresholds per detector (detect_boxes(min_score=None)). On the 300 dev images
# (HOG at upsample 1, CNN at 225 px) the HOG boxes that frame the annotated face (crop-box IoU
# >= 0.5) scored from -0.49 (median 0.77) and the others from -0.50, with 8 above 0 (among
# them the false positive on the astronaut's suit at 0.12; the ones above 0.3 are background
# faces); the CNN's true boxes scored 0.26 and more, its 5 others 0.12 and 0.93-1.07
# (background faces). HOG's 0.3 drops weak boxes; "auto" then asks the CNN.
MIN_SCORE = {"hog": 0.3, "cnn": 0.0}

# The CNN's copies: first CNN_FIRST_SIDE; where that finds nothing, twice the side, and so on up
# to CNN_MAX_SIDE (and never past the image's own longer side). A face must be about 70 px in
# the copy, so the 225-px copy of a 1920 x 1080 photo finds only faces over ~600 px: on 10 dev
# profiles (|yaw| > 60) pasted at their 450-px size into a 1920 x 1080 noise photo (rectangles
# ~150-340 px) the CNN found 0 at 225 (0.45 s), 0 at 450 (1.6 s) and 6 of 6 at 900 (6 s); at
# 1.8x that size 6 of 6 at 450 (1.4 s). CNN_MAX_SIDE 450 keeps the worst photo (one that holds
# no face) near 2.5 s of detection and finds turned faces down to ~15 % of the photo's longer
# side; detect_boxes(cnn_max_side=900) reaches ~8 % at ~6 s more (figures: BUILD_NOTES).
CNN_FIRST_SIDE = 225
CNN_MAX_SIDE = 450

# Two boxes whose crop boxes (crop_box) overlap at least this much (IoU) are one face.
NMS_IOU = 0.5

# dlib 20's CNN fails (a RuntimeError from its tensor code) on images narrower than 16 px;
# its smallest face is about 70 px, so a smaller image holds nothing it could find.
_CNN_MIN_SIDE = 32


class Box(NamedTuple):
  """One detected face box.

  rect: (4,) float32 (x0, y0, x1, y1), the detector's rectangle (outer corners) in dff3d
    pixels of the image given to detect_boxes (not of its downscaled copy).
  score: the detector's own score: HOG's SVM margin (about -0.5..3.5) or the CNN's confidence
    (about 0..1.3); the two scales are not comparable.
  source: "hog" or "cnn", which detector framed rect (crop_box's calibration depends on it).
  """

  rect: np.ndarray
  score: float
  source: str


def box_from_rectangle(rectangle, scale: float = BOX_CALIBRATION["hog"][0],
                       offset=BOX_CALIBRATION["hog"][1]) -> np.ndarray:
  """A detector's face rectangle -> the square crop box augment.face_box would give.

  Args:
    rectangle: (..., 4) x0, y0, x1, y1 outer corners in photo pixels (Box.rect, Face.bbox).
    scale: box side / rectangle side (the mean of its width and height).
    offset: (2,) box centre minus rectangle centre, in rectangle sides (x right, y down).
      The defaults are HOG's (BOX_CALIBRATION["hog"]).
  Returns:
    (..., 4) float32 x0, y0, x1, y1 of the square box.
  """
  r = np.asarray(rectangle, np.float64)
  side = ((r[..., 2] - r[..., 0]) + (r[..., 3] - r[..., 1])) / 2
  centre = (r[..., :2] + r[..., 2:]) / 2 + np.asarray(offset, np.float64) * side[..., None]
  half = (scale * side / 2)[..., None]
  return np.concatenate([centre - half, centre + half], -1).astype(np.float32)


def rectangle_from_box(box, scale: float = BOX_CALIBRATION["hog"][0],
                       offset=BOX_CALIBRATION["hog"][1]) -> np.ndarray:
  """The inverse of box_from_rectangle: (..., 4) crop box -> the square rectangle that gives it."""
  b = np.asarray(box, np.float64)
  side = ((b[..., 2] - b[..., 0]) + (b[..., 3] - b[..., 1])) / 2 / scale
  centre = (b[..., :2] + b[..., 2:]) / 2 - np.asarray(offset, np.float64) * side[..., None]
  half = (side / 2)[..., None]
  return np.concatenate([centre - half, centre + half], -1).astype(np.float32)


def crop_box(box: Box) -> np.ndarray:
  """(4,) float32 square crop box of a Box, framed like augment.face_box of its face's 68
  landmarks, with the calibration of the detector that found it (BOX_CALIBRATION)."""
  scale, offset = BOX_CALIBRATION[box.source]
  return box_from_rectangle(box.rect, scale, offset)


def box_iou(a, b) -> np.ndarray:
  """Intersection over union of (..., 4) x0, y0, x1, y1 boxes (broadcast): (...) float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = w * h
  area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes, iou: float = NMS_IOU) -> list[Box]:
  """Greedy non-maximum suppression in the given order (first = preferred).

  A box is dropped when its crop box (crop_box, so HOG's and the CNN's differently framed
  rectangles compare alike) overlaps one already kept by IoU >= iou.
  """
  kept, kept_boxes = [], []
  for b in boxes:
    cb = crop_box(b)
    if kept_boxes and np.max(box_iou(np.stack(kept_boxes), cb)) >= iou:
      continue
    kept.append(b)
    kept_boxes.append(cb)
  return kept


def _import_dlib():
  try:
    import dlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DetectorUnavailableError(
        f"face detection needs dlib, which is not installed: {INSTALL_HINT}") from None
  return dlib


@functools.lru_cache(maxsize=None)
def _hog_model():
  """dlib's HOG frontal face detector, built once per process."""
  return _import_dlib().get_frontal_face_detector()


@functools.lru_cache(maxsize=None)
def _cnn_model():
  """dlib's CNN face detector (mmod_human_face_detector.dat), loaded once per process."""
  dlib = _import_dlib()
  path = _model_path("cnn_face_detector_model_location",
                     "the CNN face detector (mmod_human_face_detector.dat)")
  return dlib.cnn_face_detection_model_v1(path)


def _check_detector(detector: str) -> None:
  if detector not in DETECTORS:
    raise ValueError(f"detector must be one of {', '.join(DETECTORS)}; got {detector!r}")


def _downscaled(img: np.ndarray, max_side: int):
  """(copy whose longer side is <= max_side, (sx, sy) copy -> original pixel scale).

  The copy covers the same extent as the image (PIL's resize maps outer edges onto outer
  edges), so a point at x in the copy's pixels is at x * sx in the original's.
  """
  h, w = img.shape[:2]
  if max(h, w) <= max_side:
    return img, (1.0, 1.0)
  f = max_side / max(h, w)
  w2, h2 = max(1, int(round(w * f))), max(1, int(round(h * f)))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = np.asarray(Image.fromarray(img).resize((w2, h2), Image.BILINEAR))  # antialiased
  return np.ascontiguousarray(small), (w / w2, h / h2)


def _rect_array(r, scale) -> np.ndarray:
  """dlib rectangle (inclusive pixel indices) -> outer corners, scaled to the original."""
  sx, sy = scale
  return np.array([r.left() * sx, r.top() * sy, (r.right() + 1) * sx, (r.bottom() + 1) * sy],
                  np.float32)


def _hog_boxes(img, upsample, min_score, max_side) -> list[Box]:
  small, scale = _downscaled(img, max_side)
  rects, scores, _ = _hog_model().run(small, int(upsample), float(min(min_score, 0.0)))
  boxes = [Box(_rect_array(r, scale), float(s), "hog") for r, s in zip(rects, scores)
           if s > min_score]
  return sorted(boxes, key=lambda b: -b.score)


def _cnn_boxes(img, upsample, min_score, max_side) -> list[Box]:
  small, scale = _downscaled(img, max_side)
  if min(small.shape[:2]) * 2**int(upsample) < _CNN_MIN_SIDE:
    _cnn_model()  # still fail clearly when the model is missing
    return []
  dets = _cnn_model()(small, int(upsample))
  boxes = [Box(_rect_array(d.rect, scale), float(d.confidence), "cnn") for d in dets
           if d.confidence > min_score]
  return sorted(boxes, key=lambda b: -b.score)


def _cnn_escalating(img, upsample, min_score, first_side, max_side) -> list[Box]:
  """_cnn_boxes on a copy of longer side first_side, then twice that where it finds nothing,
  up to max_side and the image's own longer side (the first copy at least is always tried)."""
  side, longest = int(first_side), max(img.shape[:2])
  while True:
    boxes = _cnn_boxes(img, upsample, min_score, min(side, max_side))
    if boxes or side >= max_side or side >= longest:
      return boxes
    side *= 2


def detect_boxes(image, detector: str = "auto", upsample=None, min_score=None,
                 max_side: int = DEFAULT_MAX_SIDE, cnn_max_side: int = CNN_MAX_SIDE,
                 nms_iou: float = NMS_IOU, cnn_first_side: int = CNN_FIRST_SIDE) -> list[Box]:
  """Face boxes of every face found in an image.

  Args:
    image: (H, W, 3) float RGB in [0, 1] (uint8 is accepted as is).
    detector: "hog": dlib's HOG detector (fast; mostly near-frontal faces, |yaw| < ~45);
      "cnn": dlib's CNN detector on downscaled copies (cnn_first_side; any yaw, slower);
      "auto": HOG, and where it finds nothing the CNN as "cnn" (the cost of HOG on the
      images HOG handles, the CNN's coverage on the others; a non-frontal face next to a face
      that HOG finds is missed); "both": HOG and the CNN always, merged (the slowest; finds
      every face either finds).
    upsample: how many times dlib doubles the detection image first: each step halves the
      smallest face found (HOG: about 80 px at 0, 40 px at 1, in the detection image) and
      costs x4. None: HOG at 0, and at 1 only when that finds no face (a face under ~80 px
      beside a larger one is then missed: pass 1 for group photos); the CNN at 0.
    min_score: boxes with a detector score at or below this are dropped (the CNN returns
      nothing below 0). None: MIN_SCORE's per-detector thresholds (HOG 0.3, CNN 0).
    max_side: the image is first downscaled (antialiased) so that its longer side is at most
      this: bounds time and memory on large photos; faces smaller than about
      80 / 2**upsample * (longer side / max_side) px are then lost to HOG.
    cnn_first_side, cnn_max_side: the CNN runs on a copy of longer side cnn_first_side and,
      where that finds nothing, on copies twice as large in turn, up to min(max_side,
      cnn_max_side) (or the image's own size). At upsample 0 it finds faces whose rectangle
      is at least about 70 px in its copy: 30 % of the longer side at 225, 15 % at 450, 8 %
      at 900; the cost of a copy grows with its square (0.45 / 1.6 / 6 s here).
    nms_iou: boxes whose crop boxes overlap by at least this IoU are merged (nms).
  Returns:
    list of Box(rect (4,) float32 x0, y0, x1, y1 outer corners in dff3d pixels of `image`,
    score, source), best first: by score within a detector; with "both", the CNN's boxes
    (better framed, see BOX_CALIBRATION) before HOG's that no CNN box overlaps. Empty if none.
  Raises:
    ValueError: unknown detector, or not an (H, W, 3) image.
    DetectorUnavailableError: dlib / face_recognition_models not installed.
  """
  _check_detector(detector)
  hog_min = MIN_SCORE["hog"] if min_score is None else float(min_score)
  cnn_min = MIN_SCORE["cnn"] if min_score is None else float(min_score)
  img = _to_uint8(image)
  cnn_up = 0 if upsample is None else int(upsample)
  cnn_side = min(int(max_side), int(cnn_max_side))
  cnn = lambda: _cnn_escalating(img, cnn_up, cnn_min, int(cnn_first_side), cnn_side)
  if detector == "cnn":
    return nms(cnn(), nms_iou)
  if upsample is None:  # coarse first (a quarter of the pixels); finer only if it finds none
    hog = _hog_boxes(img, 0, hog_min, max_side) or _hog_boxes(img, 1, hog_min, max_side)
  else:
    hog = _hog_boxes(img, int(upsample), hog_min, max_side)
  if detector == "hog" or (detector == "auto" and hog):
    return nms(hog, nms_iou)
  return nms(cnn() + hog, nms_iou)


TURNS = (1, 3, 2)  # quarter turns tried: a person lying on either side first, then upside down


class TurnedBox(NamedTuple):
  """A face found in a turned copy of a photo, in the photo's own pixels.

  box: the Box as found, in the turned copy's pixels (for landmarks_in_box(turned, box)).
  turn: the copy is the photo turned by `turn` quarter turns counter-clockwise.
  turned: the copy (H', W', 3), as detect_boxes saw it.
  rect: (4,) float32 the box's rectangle in photo pixels (its bounds, turned back).
  crop_box: (4,) float32 crop_box(box) in photo pixels (turned back: still a square).
  """
  box: Box
  turn: int
  turned: np.ndarray
  rect: np.ndarray
  crop_box: np.ndarray


def detect_turned(image, detector: str = "auto", **options) -> list[TurnedBox]:
  """Faces of the first turned copy of an image (90, 270, then 180 degrees counter-clockwise,
  TURNS) in which detect_boxes finds any: for photos where it finds none as they are (dlib's
  detectors find mostly upright faces). detector "auto" becomes "hog" here: in the copy that
  matters the face stands upright, where HOG finds it at a tenth of auto's cost on a photo
  without a face (0.15 against 1.2-1.8 s at 600 px). options: detect_boxes's others.
  Returns [] when no copy has a face."""
  from dff3d.data import augment  # pylint: disable=g-import-not-at-top
  if detector == "auto":
    detector = "hog"
  for turn in TURNS:
    turned = np.ascontiguousarray(np.rot90(image, turn))
    boxes = detect_boxes(turned, detector, **options)
    if boxes:
      back = lambda r: augment.turn_points(np.reshape(r, (2, 2)), turned.shape, -turn)
      bounds = lambda c: np.concatenate([c.min(0), c.max(0)]).astype(np.float32)
      return [TurnedBox(b, turn, turned, bounds(back(b.rect)), bounds(back(crop_box(b))))
              for b in boxes]
  return []


def landmarks_in_box(image, box) -> np.ndarray:
  """dlib's 68 landmarks of the face in a box.

  Args:
    image: (H, W, 3) float RGB in [0, 1] (uint8 is accepted as is).
    box: a Box (a CNN box is first reframed as the HOG rectangle with the same crop box:
      the shape predictor was trained on HOG's framing), or a (4,) HOG-framed rectangle
      x0, y0, x1, y1 in dff3d pixels (Face.bbox, a HOG Box.rect).
  Returns:
    (68, 2) float32 iBUG 68-point landmarks in dff3d pixels. dlib's model was trained on
    300-W (|yaw| up to about 45 degrees): on profiles the points are rough.
  Raises:
    DetectorUnavailableError: dlib / face_recognition_models not installed.
  """
  if isinstance(box, Box):
    rect = box.rect if box.source == "hog" else rectangle_from_box(crop_box(box))
  else:
    rect = np.asarray(box, np.float64)
  dlib = _import_dlib()
  _, predictor = _models()
  img = _to_uint8(image)
  x0, y0, x1, y1 = (int(round(float(v))) for v in rect)
  shape = predictor(img, dlib.rectangle(x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)))
  return np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)],
                  np.float32) + 0.5


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
