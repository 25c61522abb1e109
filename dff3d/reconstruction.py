"""Photos and their 68 landmarks -> fitted (or regressed) faces in photo coordinates.

Array functions behind experiments/reconstruct.py and experiments/evaluate.py: crop each face
with data.augment.crop_to_landmarks, fit (dff3d.fitting) or regress the coefficients in fixed-
size batches (one compilation), and map landmarks back to the photo. For faces known only by a
detector's rectangle: detect.crop_box frames a first crop, regress_from_boxes regresses it,
re-crops at the predicted landmarks and regresses again.
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
                      dff_fn: Optional[Callable] = None) -> List[FaceResult]:
  """Reconstruct faces given as (image (H, W, 3) float32, landmarks (68, 2)) pairs.

  Args:
    config: FitConfig; its image_size is the crop side.
    batch_size: faces per compiled batch (the last batch is padded, results dropped).
    regressor: optional crops -> Coefficients (e.g. train.load_regressor); then the
      photometric stage refines its output for config.photo_steps steps.
    on_batch: called with the number of faces finished after each batch (progress).
    dff_fn: optional frozen DFF (images -> unit descriptors): adds L_dff to the photometric
      stage (models.dff.load_frozen_dff).
  Returns:
    FaceResult per input face, in order.
  """
  cropped = [augment.crop_to_landmarks(image, pts, config.image_size) for image, pts in faces]
  return _reconstruct_crops(model, cropped, config, batch_size, regressor, on_batch, dff_fn)


def _reconstruct_crops(model, cropped, config, batch_size, regressor, on_batch, dff_fn):
  """reconstruct_faces on (crop (S, S, 3), target landmarks (68, 2) crop pixels or None,
  affine (2, 3) photo -> crop) triples; targets are used only by a fit or a refinement."""
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
      if config.photo_steps > 0:
        c = fitting.fit_photometric(model, c, x, t, config, dff_fn=dff_fn)
    r = grey_render(model, c, s)
    screen_lm = np.asarray(_screen_landmarks(problem, c, s, slide))
    screen = np.asarray(r.screen_vertices)
    verts = np.asarray(mm.geometry(model, c)[0])
    for row, i in enumerate(idx):
      crop, _, affine = cropped[i]
      d0 = float(screen_lm[row, :, 2].mean())
      lm3 = landmarks_to_photo(screen_lm[row], affine, s, d0)
      results.append(FaceResult(
          coefficients=jax.tree_util.tree_map(lambda a: np.asarray(a[row]), c),
          crop=crop, crop_affine=np.asarray(affine, np.float32),
          landmarks_2d=lm3[:, :2], landmarks_3d=lm3,
          rendering=np.asarray(r.image[row]), mask=np.asarray(r.skin_mask[row]),
          vertices=verts[row], photo_vertices=landmarks_to_photo(screen[row], affine, s, d0),
          reference_depth=d0))
    if on_batch is not None:
      on_batch(len(idx))
  return results


def regress_from_boxes(model: mm.MorphableModel, faces, config: fitting.FitConfig,
                       regressor: Callable, batch_size: int = 8,
                       on_batch: Optional[Callable[[int], None]] = None,
                       dff_fn: Optional[Callable] = None) -> List[FaceResult]:
  """Two passes of a regressor for faces located only by a box (e.g. detect.crop_box).

  Pass 1 regresses the crop of each box (only approximately framed); pass 2 is
  reconstruct_faces with pass 1's 68 landmarks (photo pixels): it re-crops at
  augment.face_box of them, the framing the regressor was trained on, regresses again and,
  when config.photo_steps > 0, refines towards pass 1's landmarks.

  Args:
    faces: (image (H, W, 3) float32, box (4,) x0, y0, x1, y1 photo pixels) pairs.
    config: FitConfig; image_size is the crop side (the regressor's own).
    regressor, batch_size, on_batch (called in pass 2 only), dff_fn: as reconstruct_faces.
  Returns:
    FaceResult per input face, in order (pass 2's).
  """
  s = config.image_size
  cropped = []
  for image, box in faces:
    affine = augment.crop_affine(box, s)
    cropped.append((augment.warp_affine(image, affine, s, s), None, affine))
  first = _reconstruct_crops(model, cropped, config.replace(photo_steps=0), batch_size,
                             regressor, None, None)
  again = [(image, face.landmarks_2d) for (image, _), face in zip(faces, first)]
  return reconstruct_faces(model, again, config, batch_size, regressor, on_batch, dff_fn)
