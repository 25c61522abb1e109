"""The reconstruction pipeline as one object: find faces, crop, regress, re-crop, refine.

    import dff3d
    faces = dff3d.reconstruct(image)          # (H, W, 3) float in [0, 1], uint8, or a path
    r = dff3d.Reconstructor(refine_steps=0)   # holds the model, the regressor, compiled fns
    faces = r(image)

Default path (landmarks="regressor"): face rectangles from dlib (detect.detect_boxes, CNN and
HOG), each turned into the crop box the regressor was trained on (detect.crop_box), the
shipped regressor run twice (reconstruction.regress_from_boxes: pass 2 re-crops at pass 1's
landmarks), then `refine_steps` photometric steps. landmarks="dlib" instead fits the model to
dlib's 68 landmarks in each rectangle (dff3d.fitting, contour sliding along the outline).
Given landmarks (e.g. a `.pts` sidecar) are always fitted, never regressed.

Every face comes back as a Face in photo pixels (dff3d convention: pixel centres at integer +
0.5); see Face for the fields. Array code only: files are dff3d.job's business.
"""

from __future__ import annotations

import functools
import warnings
from typing import List, NamedTuple, Optional, Sequence

import numpy as np

from dff3d import coefficients as coeffs_lib
from dff3d import fitting
from dff3d import io
from dff3d import morphable_model as mm
from dff3d import reconstruction
from dff3d.data import augment

LANDMARK_MODES = ("regressor", "dlib")


class Located(NamedTuple):
  """Where one face is before reconstruction.

  rect: (4,) float32 x0, y0, x1, y1 photo pixels (a detector's rectangle, or the bounds of
    given landmarks).
  score: the detector's confidence (1.0 for given landmarks).
  source: "hog", "cnn" (detectors), "landmarks" (given points).
  landmarks: optional (68, 2) float32 photo pixels to fit to; None means regress from rect.
  quarter_turns: None (read by the orientation classifier, if any), or k when the face was
    found in the photo turned by -k * 90 degrees without a classifier to read it (it is taken
    to stand turned by k in the photo).
  crop_box: optional (4,) float32 square crop box in photo pixels (a face found in a turned
    copy: detect.crop_box's framing in that copy); None: detect.crop_box(rect, source).
  """
  rect: np.ndarray
  score: float
  source: str
  landmarks: Optional[np.ndarray] = None
  quarter_turns: Optional[int] = None
  crop_box: Optional[np.ndarray] = None


class Face(NamedTuple):
  """One reconstructed face, in the photo's pixels.

  rect, score, source: as Located (where the face was found).
  landmarks_2d: (68, 2) the iBUG-68 points the reconstruction matched (jaw points slid along
    the outline when it was fitted to landmarks), photo pixels.
  landmarks_3d: (68, 3) photo x, y and z in the same pixel units, larger towards the camera,
    0 at the landmarks' mean depth.
  rotation: (3,) pitch, yaw, roll radians (camera.rotation_matrix) of the head in the photo's
    frame; pose_deg: the same in degrees as {"yaw", "pitch", "roll"}.
  coefficients: Coefficients without batch dimension, in the crop's frame (crop_affine; the
    crop of a face found on its side or upside down is turned to stand it upright).
  vertices: (N, 3) the mesh in model space; photo_vertices: (N, 3) in photo pixels and z.
  reference_depth: the crop camera's depth at which z is 0 (texture.depth_map needs it).
  crop_affine: (2, 3) photo -> crop pixels; crop_size: S; rendering (S, S, 3) / mask (S, S):
    the geometry shaded in grey in the crop, and its skin-area coverage (for overlays).
  """
  rect: np.ndarray
  score: float
  source: str
  landmarks_2d: np.ndarray
  landmarks_3d: np.ndarray
  rotation: np.ndarray
  coefficients: coeffs_lib.Coefficients
  vertices: np.ndarray
  photo_vertices: np.ndarray
  reference_depth: float
  crop_affine: np.ndarray
  crop_size: int
  rendering: np.ndarray
  mask: np.ndarray

  @property
  def pose_deg(self):
    pitch, yaw, roll = np.rad2deg(np.asarray(self.rotation, np.float64)).tolist()
    return {"yaw": yaw, "pitch": pitch, "roll": roll}

  @property
  def finite(self) -> bool:
    """False when the reconstruction diverged (a NaN or infinity anywhere that is written)."""
    parts = [self.landmarks_3d, self.photo_vertices, self.vertices, self.rotation]
    parts += [np.asarray(getattr(self.coefficients, f)) for f in coeffs_lib.FIELDS]
    return all(np.all(np.isfinite(p)) for p in parts)


class ReconstructionError(ValueError):
  """A face could not be reconstructed (e.g. the fit diverged); the message says which."""


def as_image(image) -> np.ndarray:
  """(H, W, 3) float32 in [0, 1] from a path, a uint8 / float array, or greyscale (H, W)."""
  if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
    return io.read_image(image)
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, -1)
  if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 1:
    raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
  arr = arr[..., :3]
  if arr.dtype == np.uint8:
    return arr.astype(np.float32) / 255.0
  if arr.dtype == np.uint16:
    return arr.astype(np.float32) / 65535.0
  if arr.dtype == np.float32 and arr.min() >= 0.0 and arr.max() <= 1.0:
    return arr  # already converted (the job's images, __call__ -> locate): no copy
  return np.clip(np.asarray(arr, np.float32), 0.0, 1.0)


class Reconstructor:
  """Holds the model, the regressor and the detector settings; call it on images.

  Args:
    model: MorphableModel (default: the embedded ICT model).
    regressor: "shipped", a checkpoint path (train.load_regressor), a callable crops ->
      Coefficients with `.image_size`, or None (only landmarks="dlib" or given landmarks).
    landmarks: "regressor" (default) or "dlib": fit to dlib's 68 points in each rectangle.
    detector: "auto" (CNN where HOG misses), "cnn" or "hog" (detect.detect_boxes).
    refine_steps: photometric refinement steps after the regressor (0: regression only).
    fit_config: FitConfig of the per-image fit to landmarks (dlib's or given); its contour
      defaults to "silhouette" (landmarks annotated on the visible outline).
    batch_size: faces per compiled batch (the last one is padded).
    min_score, upsample, max_side, cnn_max_side: detector settings (detect.detect_boxes;
      None: its defaults).
    dff_fn: optional frozen DFF for the photometric stages (models.dff.load_frozen_dff).
    flip_average: with a regressor given by name or path, also regress each crop's mirror
      image and average the two estimates (symmetry.flip_average; default on: dev NME 5.35 ->
      5.13 % for twice the network's few ms per face, BUILD_NOTES "Session 14").
    orientation: the regressor path's quarter-turn classifier (dff3d.orientation): "shipped"
      (default), a file written by orientation.save_orientation, a callable crops ->
      probabilities, or None (every face read as upright, within the regressor's +-30
      degrees). Faces on their side or upside down are then cropped upright; Face.rotation
      stays the head's pose in the photo.
    turned_photos: where the detector finds no face in a photo, look again in the photo
      turned by 90, 270 and 180 degrees (in that order, stopping at the first that finds
      one): dlib's detectors find mostly upright faces. With detector "auto" the turned copies
      go to the HOG detector alone (about 0.15 s each on a 600 px photo), so a photo without a
      face costs up to three HOG detections more.
    refiner: the regressor path's landmark refiner (dff3d.refine): "auto" (default: the
      shipped refiner with the shipped regressor, none with another one, whose errors it was
      not trained on), "shipped", a file written by refine.save_refiner, a callable (crops,
      points) -> points with `.image_size`, or None. Each regressed face moves to the
      refiner's 68 points (refine.refine_faces), so mesh and landmarks stay one face.
  """

  def __init__(self, model: Optional[mm.MorphableModel] = None, regressor="shipped",
               landmarks: str = "regressor", detector: str = "auto", refine_steps: int = 0,
               fit_config: Optional[fitting.FitConfig] = None, batch_size: int = 8,
               min_score: Optional[float] = None, upsample: Optional[int] = None,
               max_side: Optional[int] = None, cnn_max_side: Optional[int] = None,
               dff_fn=None, flip_average: bool = True, orientation="shipped",
               turned_photos: bool = True, refiner="auto"):
    if landmarks not in LANDMARK_MODES:
      raise ValueError(f"landmarks must be one of {LANDMARK_MODES}, got {landmarks!r}")
    self.model = model if model is not None else mm.default_model()
    regressor_name = regressor if isinstance(regressor, str) else None
    if isinstance(regressor, str):
      from dff3d import train  # the network side only when a regressor is used
      regressor = train.load_regressor(regressor, self.model, flip_average=flip_average)
    if regressor is None and landmarks == "regressor":
      raise ValueError("landmarks='regressor' needs a regressor (e.g. 'shipped')")
    self.regressor = regressor
    if isinstance(orientation, str) and regressor is None:
      orientation = None  # only the regressor path reads turns (a fit takes any pose)
    if isinstance(orientation, str):
      from dff3d import orientation as orientation_lib  # pylint: disable=g-import-not-at-top
      orientation = orientation_lib.load_orientation(
          None if orientation == "shipped" else orientation)
    self.orientation = orientation
    self.refiner = _load_refiner(refiner, regressor, regressor_name)
    self.turned_photos = bool(turned_photos)
    self.landmarks = landmarks
    self.detector = detector
    self.refine_steps = int(refine_steps)
    self.fit_config = fit_config or fitting.FitConfig(contour="silhouette")
    self.batch_size = int(batch_size)
    self.detect_options = {"detector": detector, "min_score": min_score, "upsample": upsample}
    from dff3d import detect  # pylint: disable=g-import-not-at-top
    if detector not in detect.DETECTORS:
      raise ValueError(f"detector must be one of {detect.DETECTORS}, got {detector!r}")
    for name, value in (("max_side", max_side), ("cnn_max_side", cnn_max_side)):
      if value is not None:
        self.detect_options[name] = int(value)
    self.dff_fn = dff_fn

  @property
  def regress_config(self) -> fitting.FitConfig:
    """FitConfig of the regressor path: its crop size; refinement towards pass 1's landmarks,
    which are projected fixed vertices (contour 'fixed')."""
    return self.fit_config.replace(image_size=self.regressor.image_size,
                                   photo_steps=self.refine_steps, contour="fixed")

  def locate(self, image, landmarks: Optional[Sequence[np.ndarray]] = None) -> List[Located]:
    """Faces of one image: the given landmark sets ((68, 2) each), else the detector's.

    With landmarks="dlib", each detected rectangle also gets dlib's 68 points.
    """
    image = as_image(image)
    if landmarks is not None:
      out = []
      for pts in landmarks:
        pts = np.asarray(pts, np.float32)
        if pts.shape != (68, 2) or not np.all(np.isfinite(pts)):
          raise ValueError(f"given landmarks must be finite (68, 2), got shape {pts.shape}")
        out.append(Located(np.concatenate([pts.min(0), pts.max(0)]), 1.0, "landmarks", pts))
      return out
    from dff3d import detect  # optional dependency (dlib)
    boxes = detect.detect_boxes(image, **self.detect_options)
    if boxes or not self.turned_photos:
      if self.landmarks == "dlib":
        return [Located(b.rect, b.score, b.source, detect.landmarks_in_box(image, b))
                for b in boxes]
      return [Located(b.rect, b.score, b.source) for b in boxes]
    found = detect.detect_turned(image, **self.detect_options)
    return [self._turned_back(t) for t in found]

  def _turned_back(self, found) -> Located:
    """A detect.TurnedBox as a Located of the photo (dlib's landmarks, in landmarks="dlib"
    mode, found in the turned copy and turned back)."""
    from dff3d import detect
    landmarks = None
    if self.landmarks == "dlib":
      pts = detect.landmarks_in_box(found.turned, found.box)
      landmarks = augment.turn_points(pts, found.turned.shape, -found.turn).astype(np.float32)
    # dlib's CNN also finds faces on their side, so a face found in a turned copy need not
    # stand upright there: the classifier reads its turn when there is one
    turns = None if self.orientation is not None else (-found.turn) % 4
    return Located(found.rect, found.box.score, found.box.source, landmarks,
                   quarter_turns=turns, crop_box=found.crop_box)

  def reconstruct_located(self, faces) -> List[Face]:
    """Reconstruct (image (H, W, 3) float32, Located) pairs, batched across images.

    Returns:
      Face per input pair, in order; a Face may not be `.finite` (the caller decides).
    """
    from dff3d import detect
    out: List[Optional[Face]] = [None] * len(faces)
    fit_idx = [i for i, (_, loc) in enumerate(faces) if loc.landmarks is not None]
    box_idx = [i for i, (_, loc) in enumerate(faces) if loc.landmarks is None]
    if fit_idx:
      res = reconstruction.reconstruct_faces(
          self.model, [(faces[i][0], faces[i][1].landmarks) for i in fit_idx], self.fit_config,
          self.batch_size, dff_fn=self.dff_fn)
      for i, r in zip(fit_idx, res):
        out[i] = _face(faces[i][1], r, self.fit_config.image_size)
    if box_idx:
      if self.regressor is None:
        raise ValueError("faces without landmarks need a regressor")
      config = self.regress_config
      locs = [faces[i][1] for i in box_idx]
      pairs = [(faces[i][0], detect.crop_box(loc) if loc.crop_box is None else loc.crop_box)
               for i, loc in zip(box_idx, locs)]
      res = reconstruction.regress_from_boxes(self.model, pairs, config, self.regressor,
                                              self.batch_size, dff_fn=self.dff_fn,
                                              orientation=self.orientation,
                                              quarter_turns=[loc.quarter_turns for loc in locs],
                                              refiner=self.refiner)
      for i, r in zip(box_idx, res):
        out[i] = _face(faces[i][1], r, config.image_size)
    return out

  def __call__(self, image, landmarks: Optional[Sequence[np.ndarray]] = None) -> List[Face]:
    """All faces of one image (best detection first); diverged faces are dropped with a
    warning. image: path, (H, W, 3) uint8 or float in [0, 1]; landmarks: optional list of
    (68, 2) photo-pixel point sets to fit instead of detecting."""
    image = as_image(image)
    located = self.locate(image, landmarks)
    faces = self.reconstruct_located([(image, loc) for loc in located])
    good = [f for f in faces if f.finite]
    if len(good) < len(faces):
      warnings.warn(f"{len(faces) - len(good)} face(s) dropped: reconstruction diverged")
    return good


def _load_refiner(refiner, regressor, regressor_name: Optional[str]):
  """Reconstructor's `refiner` argument as a callable or None (see the class doc); a refiner
  made for crops of another size than the regressor's is a ValueError."""
  if refiner == "auto":
    refiner = "shipped" if regressor_name == "shipped" else None
  if regressor is None or refiner is None:
    return None  # the refiner moves a regressed face's points
  if isinstance(refiner, str):
    from dff3d import refine  # pylint: disable=g-import-not-at-top
    refiner = refine.load_refiner(None if refiner == "shipped" else refiner)
  size = getattr(refiner, "image_size", None)
  if size is not None and size != regressor.image_size:
    raise ValueError(f"the refiner reads {size} px crops, the regressor "
                     f"{regressor.image_size} px")
  return refiner


def _face(loc: Located, r: reconstruction.FaceResult, crop_size: int) -> Face:
  return Face(rect=np.asarray(loc.rect, np.float32), score=float(loc.score), source=loc.source,
              landmarks_2d=r.landmarks_2d, landmarks_3d=r.landmarks_3d,
              rotation=r.photo_rotation,
              coefficients=r.coefficients, vertices=r.vertices,
              photo_vertices=r.photo_vertices, reference_depth=r.reference_depth,
              crop_affine=r.crop_affine, crop_size=crop_size,
              rendering=r.rendering, mask=r.mask)


@functools.lru_cache(maxsize=4)
def default_reconstructor(**options) -> Reconstructor:
  """One Reconstructor per distinct option set, built on first use and kept (compiled)."""
  return Reconstructor(**options)


def reconstruct(image, **options) -> List[Face]:
  """All faces of one image with the shipped regressor (see Reconstructor for options, which
  must be hashable; the Reconstructor is cached per option set)."""
  return default_reconstructor(**options)(image)
