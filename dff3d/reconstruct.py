"""Photos and their 68 landmarks -> fitted (or regressed) faces in photo coordinates.

Array functions behind experiments/reconstruct.py and experiments/evaluate.py: crop each face
with data.augment.crop_to_landmarks, fit (dff3d.fitting) or regress the coefficients in fixed-
size batches (one compilation), and map landmarks back to the photo.
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
  """
  coefficients: coeffs_lib.Coefficients
  crop: np.ndarray
  crop_affine: np.ndarray
  landmarks_2d: np.ndarray
  landmarks_3d: np.ndarray
  rendering: np.ndarray
  mask: np.ndarray


def landmarks_to_photo(screen_landmarks, crop_affine, image_size):
  """Crop-space screen landmarks (68, 3) (x, y, depth) -> photo (68, 3) (x, y, z pixels).

  z = (mean depth - depth) * f / mean depth, scaled like x and y by the crop's zoom: the
  weak-perspective depth in pixels, positive towards the camera.
  """
  inv = np.asarray(camera.invert_affine(jnp.asarray(crop_affine, jnp.float32)))
  xy = np.asarray(camera.apply_affine(inv, jnp.asarray(screen_landmarks[:, :2])))
  depth = np.asarray(screen_landmarks[:, 2], np.float64)
  zoom = float(np.sqrt(abs(np.linalg.det(inv[:, :2]))))
  focal = float(camera.default_focal(image_size))
  z = (depth.mean() - depth) * focal / depth.mean() * zoom
  return np.concatenate([xy, z[:, None]], -1).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("size",))
def grey_render(model: mm.MorphableModel, c: coeffs_lib.Coefficients, size: int):
  """The geometry of `c` in a neutral grey albedo under the default light (for overlays)."""
  grey = model.replace(albedo_mean=jnp.full_like(model.albedo_mean, 0.75))
  c = c.replace(albedo=jnp.zeros_like(c.albedo),
                lighting=jnp.broadcast_to(shading.default_lighting(), c.lighting.shape))
  return render_lib.render(grey, c, (size, size))


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
  s = config.image_size
  crops, targets, affines = [], [], []
  for image, pts in faces:
    crop, crop_pts, affine = augment.crop_to_landmarks(image, pts, s)
    crops.append(crop)
    targets.append(crop_pts[:, :2])
    affines.append(affine)
  results = []
  for start in range(0, len(crops), batch_size):
    idx = list(range(start, min(start + batch_size, len(crops))))
    padded = idx + [idx[-1]] * (batch_size - len(idx))
    x = np.stack([crops[i] for i in padded])
    t = np.stack([targets[i] for i in padded])
    if regressor is not None:
      c = regressor(jnp.asarray(x))
      if config.photo_steps > 0:
        c = fitting.fit_photometric(model, c, x, t, config, dff_fn=dff_fn)
    else:
      c = fitting.fit(model, x, t, config, dff_fn=dff_fn)
    r = grey_render(model, c, s)
    screen_lm = np.asarray(r.screen_vertices[:, model.landmarks])
    for row, i in enumerate(idx):
      lm3 = landmarks_to_photo(screen_lm[row], affines[i], s)
      results.append(FaceResult(
          coefficients=jax.tree_util.tree_map(lambda a: np.asarray(a[row]), c),
          crop=crops[i], crop_affine=np.asarray(affines[i], np.float32),
          landmarks_2d=lm3[:, :2], landmarks_3d=lm3,
          rendering=np.asarray(r.image[row]), mask=np.asarray(r.skin_mask[row])))
    if on_batch is not None:
      on_batch(len(idx))
  return results
