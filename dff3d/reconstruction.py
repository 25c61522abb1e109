"""Photos and their 68 landmarks -> fitted (or regressed) faces in photo coordinates.

Array functions behind experiments/reconstruct.py and experiments/evaluate.py: crop each face
with data.augment.crop_to_landmarks, fit (dff3d.fitting) or regress the coefficients in fixed-
size batches (one compilation), and map landmarks back to the photo. For faces known only by a
detector's rectangle: detect.crop_box frames a first crop, regress_from_boxes regresses it,
re-crops at the predicted landmarks and regresses again. With a quarter-turn classifier
(dff3d.orientation) the regressor's crops are framed in the frame where each face stands
upright, so faces on their side or upside down are read as upright ones.
"""

import functools
from typing import Callable, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import fitting
from dff3d import morphable_model as mm
from dff3d import orientation as orientation_lib
from dff3d import refine as refine_lib
from dff3d import render as render_lib
from dff3d import shading
from dff3d.data import augment


class FaceResult(NamedTuple):
  """One reconstructed face.

  coefficients: Coefficients without batch dimension.
  crop: (S, S, 3) the crop it was fitted in; crop_affine: (2, 3) photo -> crop pixels.
  landmarks_2d: (68, 2) photo pixels (dff3d convention, centres at integer + 0.5).
  landmarks_3d: (68, 3) photo x, y and z in the same pixel units, larger towards the camera,
    0 at the landmarks' mean depth.
  rendering: (S, S, 3) the face geometry shaded in grey under the default light (black
    background), for overlays; mask: (S, S) its skin-area coverage.
  vertices: (N, 3) the mesh in model space (the model's units).
  photo_vertices: (N, 3) the mesh in photo x, y pixels and z like landmarks_3d's.
  reference_depth: d0, the crop-camera depth at which z is 0 (the 68 points' mean depth).
  quarter_turns: k when the face was read as turned by k * 90 degrees counter-clockwise and
    its crop made in the photo turned back (orientation.upright_crop_affine); coefficients
    are the crop's, photo_rotation the head's pose in the photo.
  The 68 landmarks are the points the reconstruction matched: with config.contour
  'silhouette' (a fit or a refinement) the 17 jaw points slid along the outline, else the
  fixed landmark vertices.
  """
  coefficients: coeffs_lib.Coefficients
  crop: np.ndarray
  crop_affine: np.ndarray
  landmarks_2d: np.ndarray
  landmarks_3d: np.ndarray
  rendering: np.ndarray
  mask: np.ndarray
  vertices: np.ndarray
  photo_vertices: np.ndarray
  reference_depth: float
  quarter_turns: int = 0

  @property
  def photo_rotation(self) -> np.ndarray:
    """(3,) pitch, yaw, roll radians of the head in the photo's frame: the coefficients'
    rotation is the crop's, which is turned by -quarter_turns * 90 degrees from the photo."""
    return photo_rotation(self.coefficients.rotation, self.quarter_turns)


def photo_rotation(rotation, quarter_turns: int) -> np.ndarray:
  """(3,) float32 angles of a crop-frame rotation (3,) seen in a photo whose face stands
  upright in the crop after a turn of -quarter_turns * 90 degrees (a roll of the camera:
  R_photo = Rz(quarter_turns * pi / 2) R_crop; positive roll turns counter-clockwise on
  screen, as augment.rotation_affine does)."""
  k = int(quarter_turns) % 4
  rotation = np.asarray(rotation, np.float64)
  if k == 0:
    return rotation.astype(np.float32)
  r = np.asarray(camera.rotation_matrix(rotation), np.float64)
  turn = np.asarray(camera.rotation_matrix(np.array([0.0, 0.0, k * np.pi / 2])), np.float64)
  return np.asarray(camera.angles_from_matrix(turn @ r), np.float32)


def upright_crops(faces, size: int, quarter_turns=None):
  """(crop (S, S, 3), landmarks (68, 2) crop pixels, affine (2, 3) photo -> crop, k)
  per (image, landmarks (68, 2)) face: augment.crop_to_landmarks's framing, in the frame
  turned by -k * 90 degrees (orientation.upright_crop_affine) when quarter_turns gives k."""
  out = []
  for i, (image, pts) in enumerate(faces):
    k = 0 if quarter_turns is None else int(quarter_turns[i]) % 4
    if k == 0:
      out.append(augment.crop_to_landmarks(image, pts, size) + (0,))
      continue
    affine = orientation_lib.upright_crop_affine(pts, k, size)
    out.append((augment.warp_affine(image, affine, size, size),
                augment.transform_points(affine, pts), affine, k))
  return out


def landmarks_to_photo(screen_landmarks, crop_affine, image_size, reference_depth=None):
  """Crop-space screen points (K, 3) (x, y, depth) -> photo (K, 3) (x, y, z pixels).

  z = (d0 - depth) * f / d0, scaled like x and y by the crop's zoom: the weak-perspective
  depth in pixels, positive towards the camera. d0 is reference_depth, by default the points'
  mean depth (pass the landmarks' mean depth to put a whole mesh in the landmarks' z).
  """
  inv = augment.inverse_affine(crop_affine)
  pts = np.asarray(screen_landmarks, np.float64)
  xy = pts[:, :2] @ inv[:, :2].T + inv[:, 2]
  depth = pts[:, 2]
  d0 = depth.mean() if reference_depth is None else float(reference_depth)
  zoom = float(np.sqrt(abs(np.linalg.det(inv[:, :2]))))
  focal = float(camera.default_focal(image_size))
  z = (d0 - depth) * focal / d0 * zoom
  return np.concatenate([xy, z[:, None]], -1).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("size",))
def grey_render(model: mm.MorphableModel, c: coeffs_lib.Coefficients, size: int):
  """The geometry of `c` in a neutral grey albedo under the default light (for overlays)."""
  grey = model.replace(albedo_mean=jnp.full_like(model.albedo_mean, 0.75))
  c = c.replace(albedo=jnp.zeros_like(c.albedo),
                lighting=jnp.broadcast_to(shading.default_lighting(), c.lighting.shape))
  return render_lib.render(grey, c, (size, size))


_screen_landmarks = jax.jit(fitting.screen_landmarks, static_argnames=("image_size", "slide"))


def reconstruct_faces(model: mm.MorphableModel, faces, config: fitting.FitConfig,
                      batch_size: int = 8, regressor: Optional[Callable] = None,
                      on_batch: Optional[Callable[[int], None]] = None,
                      dff_fn: Optional[Callable] = None, orientation: Optional[Callable] = None,
                      quarter_turns=None, refiner: Optional[Callable] = None
                      ) -> List[FaceResult]:
  """Reconstruct faces given as (image (H, W, 3) float32, landmarks (68, 2)) pairs.

  Args:
    config: FitConfig; its image_size is the crop side.
    batch_size: faces per compiled batch (the last batch is padded, results dropped).
    regressor: optional crops -> Coefficients (e.g. train.load_regressor); then the
      photometric stage refines its output for config.photo_steps steps.
    on_batch: called with the number of faces finished after each batch (progress).
    dff_fn: optional frozen DFF (images -> unit descriptors): adds L_dff to the photometric
      stage (models.dff.load_frozen_dff).
    orientation: optional quarter-turn classifier (orientation.load_orientation): each face
      is cropped where it stands upright (upright_crops); quarter_turns: or the turns (n,)
      themselves. Without either every crop is the photo's own frame.
    refiner: optional landmark refiner (refine.load_refiner) for the regressor path: it
      moves the regressed face's 68 points (refine.refine_faces), and the face follows them.
  Returns:
    FaceResult per input face, in order.
  """
  if orientation is not None and quarter_turns is None:
    quarter_turns = orientation_lib.quarter_turns(orientation, faces)
  cropped = upright_crops(faces, config.image_size, quarter_turns)
  return _reconstruct_crops(model, cropped, config, batch_size, regressor, on_batch, dff_fn,
                            refiner)


def _reconstruct_crops(model, cropped, config, batch_size, regressor, on_batch, dff_fn,
                       refiner=None):
  """reconstruct_faces on (crop (S, S, 3), target landmarks (68, 2) crop pixels or None,
  affine (2, 3) photo -> crop, quarter turns k) tuples; targets are used only by a fit or a
  refinement."""
  s = config.image_size
  results = []
  slide = config.contour == "silhouette" and (regressor is None or config.photo_steps > 0)
  problem = fitting.landmark_problem(model, slide)  # once per call, not per batch
  for start in range(0, len(cropped), batch_size):
    idx = list(range(start, min(start + batch_size, len(cropped))))
    padded = idx + [idx[-1]] * (batch_size - len(idx))
    x = np.stack([cropped[i][0] for i in padded])
    if regressor is None or config.photo_steps > 0:
      t = np.stack([cropped[i][1][:, :2] for i in padded])
    if regressor is None:
      c = fitting.fit(model, x, t, config, dff_fn=dff_fn)
    else:
      c = regressor(jnp.asarray(x))
      if refiner is not None:
        c = refine_lib.refine_faces(model, refiner, jnp.asarray(x), c, problem=problem)
      if config.photo_steps > 0:
        c = fitting.fit_photometric(model, c, x, t, config, dff_fn=dff_fn)
    r = grey_render(model, c, s)
    screen_lm = np.asarray(_screen_landmarks(problem, c, s, slide))
    screen = np.asarray(r.screen_vertices)
    verts = np.asarray(mm.geometry(model, c)[0])
    for row, i in enumerate(idx):
      crop, _, affine, turns = cropped[i]
      d0 = float(screen_lm[row, :, 2].mean())
      lm3 = landmarks_to_photo(screen_lm[row], affine, s, d0)
      results.append(FaceResult(
          coefficients=jax.tree_util.tree_map(lambda a: np.asarray(a[row]), c),
          crop=crop, crop_affine=np.asarray(affine, np.float32),
          landmarks_2d=lm3[:, :2], landmarks_3d=lm3,
          rendering=np.asarray(r.image[row]), mask=np.asarray(r.skin_mask[row]),
          vertices=verts[row], photo_vertices=landmarks_to_photo(screen[row], affine, s, d0),
          reference_depth=d0, quarter_turns=turns))
    if on_batch is not None:
      on_batch(len(idx))
  return results


def regress_from_boxes(model: mm.MorphableModel, faces, config: fitting.FitConfig,
                       regressor: Callable, batch_size: int = 8,
                       on_batch: Optional[Callable[[int], None]] = None,
                       dff_fn: Optional[Callable] = None,
                       orientation: Optional[Callable] = None,
                       quarter_turns=None, refiner: Optional[Callable] = None
                       ) -> List[FaceResult]:
  """Two passes of a regressor for faces located only by a box (e.g. detect.crop_box).

  Pass 1 regresses the crop of each box (only approximately framed); pass 2 is
  reconstruct_faces with pass 1's 68 landmarks (photo pixels): it re-crops at
  augment.face_box of them, the framing the regressor was trained on, regresses again and,
  when config.photo_steps > 0, refines towards pass 1's landmarks.

  Args:
    faces: (image (H, W, 3) float32, box (4,) x0, y0, x1, y1 photo pixels) pairs.
    config: FitConfig; image_size is the crop side (the regressor's own).
    regressor, batch_size, on_batch (called in pass 2 only), dff_fn: as reconstruct_faces.
    orientation: optional quarter-turn classifier (orientation.load_orientation): it reads
      each box once; both passes crop in the frame where the face stands upright.
    quarter_turns: optional (n,) turns already known (e.g. a face found in a turned copy of
      the photo); None entries are read by `orientation` (0 without one).
    refiner: optional landmark refiner, in both passes (as reconstruct_faces).
  Returns:
    FaceResult per input face, in order (pass 2's).
  """
  s = config.image_size
  known = [None] * len(faces) if quarter_turns is None else list(quarter_turns)
  turns = np.array([0 if k is None else int(k) % 4 for k in known], np.int64)
  unknown = [i for i, k in enumerate(known) if k is None]
  if orientation is not None and unknown:
    corners = [(faces[i][0], orientation_lib.box_points(faces[i][1])) for i in unknown]
    turns[unknown] = orientation_lib.quarter_turns(orientation, corners)
  cropped = []
  for (image, box), k in zip(faces, turns):
    affine = orientation_lib.upright_box_affine(box, k, s)
    cropped.append((augment.warp_affine(image, affine, s, s), None, affine, int(k)))
  first = _reconstruct_crops(model, cropped, config.replace(photo_steps=0), batch_size,
                             regressor, None, None, refiner)
  again = [(image, face.landmarks_2d) for (image, _), face in zip(faces, first)]
  return reconstruct_faces(model, again, config, batch_size, regressor, on_batch, dff_fn,
                           quarter_turns=turns, refiner=refiner)
