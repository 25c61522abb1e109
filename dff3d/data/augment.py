"""Face crops and the paper's augmentations as pure numpy functions (Sec. 4.1).

Paper: horizontal flip, rotation uniform in [-30, 30] degrees, each RGB channel times
U(0.7, 1.3). Every geometric step is a 2D affine between pixel frames (dff3d.camera's helpers:
an affine A (2, 3) maps a point p = (x, y) to A[:, :2] p + A[:, 2]); images move with one
bilinear resampling and landmarks with the same affine, so the two stay consistent.

Conventions (camera.py): images (H, W, 3) float32 in [0, 1]; x right, y down; pixel (row i,
column j) covers [j, j+1) x [i, i+1), its centre is (j + 0.5, i + 0.5). Landmarks are (K, D)
with D >= 2: columns 0 and 1 are x, y in pixels, further columns (e.g. a visibility flag) ride
along unchanged. A positive rotation angle turns the image content counter-clockwise on screen.

Resampling is bilinear (PIL's affine transform, which samples at pixel centres exactly as
above), without anti-aliasing; pixels that come from outside the source image are black.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dff3d import camera
from dff3d import landmarks as landmarks_lib


def _cpu():
  """Context that keeps the small affine computations of dff3d.camera on the host CPU (they
  run per example in input threads; an accelerator round trip there would only cost time)."""
  try:
    return jax.default_device(jax.local_devices(backend="cpu")[0])
  except RuntimeError:  # JAX_PLATFORMS excludes cpu
    return contextlib.nullcontext()


def _np(x):
  return np.asarray(x, np.float64)


def crop_affine(box, size: int) -> np.ndarray:
  """(2, 3) affine from image pixels to a size x size crop of box (x0, y0, x1, y1)."""
  with _cpu():
    return _np(camera.crop_transform(np.asarray(box, np.float32), size))


def compose(a, b) -> np.ndarray:
  """The affine 'a after b' (2, 3)."""
  with _cpu():
    return _np(camera.compose_affine(np.asarray(a, np.float32), np.asarray(b, np.float32)))


def inverse_affine(affine) -> np.ndarray:
  """(2, 3) float64 inverse of a (2, 3) affine, in NumPy (host-side per-face work: no device
  round trip)."""
  a = np.asarray(affine, np.float64)
  lin = np.linalg.inv(a[:, :2])
  return np.concatenate([lin, -(lin @ a[:, 2])[:, None]], 1)


def transform_points(affine, points) -> np.ndarray:
  """Moves (K, D) points (x, y first; other columns unchanged) with a (2, 3) affine."""
  points = np.asarray(points, np.float32)
  with _cpu():
    return np.asarray(camera.apply_affine(np.asarray(affine, np.float32), points), np.float32)


def rotation_affine(angle_deg: float, centre) -> np.ndarray:
  """(2, 3) rotation by angle_deg about centre (x, y); positive = counter-clockwise on screen
  (y points down, so this is the matrix [[c, s], [-s, c]])."""
  t = math.radians(angle_deg)
  c, s = math.cos(t), math.sin(t)
  cx, cy = float(centre[0]), float(centre[1])
  lin = np.array([[c, s], [-s, c]])
  return np.concatenate([lin, (np.array([cx, cy]) - lin @ np.array([cx, cy]))[:, None]], 1)


def flip_affine(width: float) -> np.ndarray:
  """(2, 3) horizontal mirror of an image `width` pixels wide: x -> width - x."""
  return np.array([[-1.0, 0.0, float(width)], [0.0, 1.0, 0.0]])


@functools.partial(jax.jit, static_argnames=("size",))
def _crop_chain(box, angle_deg, do_flip, points, size):
  """crop -> rotation about the crop centre -> optional flip, as one jitted call of the
  dff3d.camera helpers (one dispatch per example instead of a dozen eager ones).
  Returns (affine (2, 3), its inverse, points moved by it)."""
  a = camera.crop_transform(box, size)
  t = jnp.deg2rad(angle_deg)
  c, s = jnp.cos(t), jnp.sin(t)
  h = size / 2.0
  rot = jnp.array([[c, s, h - c * h - s * h], [-s, c, h + s * h - c * h]])
  a = camera.compose_affine(rot, a)
  mirror = jnp.array([[-1.0, 0.0, float(size)], [0.0, 1.0, 0.0]])
  a = jnp.where(do_flip, camera.compose_affine(mirror, a), a)
  return a, camera.invert_affine(a), camera.apply_affine(a, points)


def transform_rotation(rotation, affine) -> np.ndarray:
  """The head rotation of a face after its image moved by a 2D affine (a pose label that
  follows the crop, rotation and flip augmentations).

  The affine's linear part is s Q with Q orthogonal (2, 2) in pixel axes (y down). In camera
  axes (y up, dff3d.camera) it is D Q D, D = diag(1, -1), embedded as L = blockdiag(D Q D, 1):
  a turn of the image about the principal point is a turn of the camera about its optical
  axis, R' = L R; a mirrored image (det Q < 0) shows the mirrored head, R' = L R F with
  F = diag(-1, 1, 1) the model's left-right mirror (a flip alone gives F R F: pitch kept, yaw
  and roll negated). Exact for rotations about the principal point; the perspective of a face
  shifted off it is ignored (scale and shift leave R unchanged).

  Args:
    rotation: (3, 3) model-to-camera rotation (camera.rotation_matrix) in the source frame.
    affine: (2, 3) source pixels -> output pixels (augmented_crop's "affine").
  Returns:
    (3, 3) float32 rotation in the output frame (det +1).
  """
  lin = np.asarray(affine, np.float64)[:, :2]
  u, _, vt = np.linalg.svd(lin)
  q = u @ vt  # the orthogonal factor of s Q
  d = np.diag([1.0, -1.0])
  left = np.eye(3)
  left[:2, :2] = d @ q @ d
  out = left @ np.asarray(rotation, np.float64)
  if np.linalg.det(q) < 0:
    out = out @ np.diag([-1.0, 1.0, 1.0])
  return out.astype(np.float32)


def warp_affine(image, affine, out_height: int, out_width: int) -> np.ndarray:
  """Bilinear resampling: out(p) = image(A^-1 p) for every output pixel centre p.

  Args:
    image: (H, W, 3) float in [0, 1] or uint8.
    affine: (2, 3) map from source pixels to output pixels.
  Returns:
    (out_height, out_width, 3) float32 in [0, 1]; black outside the source.
  """
  with _cpu():
    inv = _np(camera.invert_affine(np.asarray(affine, np.float32)))
  return _warp_with_inverse(image, inv, out_height, out_width)


def _warp_with_inverse(image, inv, out_height, out_width):
  """warp_affine given the inverse affine (output pixels -> source pixels)."""
  coeffs = tuple(np.asarray(inv, np.float64).reshape(-1))  # PIL: output (x, y) -> input
  size = (int(out_width), int(out_height))
  image = np.asarray(image)
  if image.dtype == np.uint8:
    out = Image.fromarray(np.ascontiguousarray(image)).transform(
        size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(out, np.float32) / 255.0
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), "F")
                      .transform(size, Image.Transform.AFFINE, coeffs,
                                 resample=Image.Resampling.BILINEAR), np.float32)
           for c in range(image.shape[-1])]
  return np.stack(chans, -1)


def face_box(landmarks, visible=None, scale: float = 1.6, shift_up: float = 0.1,
             image_shape=None) -> np.ndarray:
  """Square crop box around landmarks: (4,) float32 (x0, y0, x1, y1).

  The box is centred on the bounding box of the (visible) landmarks, moved up by `shift_up`
  times its height (68 landmarks start at the brows; the forehead lies above) and its side is
  `scale` times the larger side of that bounding box (training crops, fitting crops and
  the reconstruction job all use it, so they frame faces alike). With no usable landmark the box is
  the centred square of side max(H, W) of `image_shape` (required then).
  """
  pts = np.asarray(landmarks, np.float64)[:, :2]
  if visible is not None:
    pts = pts[np.asarray(visible, bool)]
  pts = pts[np.all(np.isfinite(pts), 1)]
  if len(pts) < 2 or np.ptp(pts, 0).max() <= 0:
    if image_shape is None:
      raise ValueError("face_box: no usable landmarks and no image_shape for a fallback box")
    h, w = image_shape[:2]
    side = float(max(h, w))
    return np.array([w / 2 - side / 2, h / 2 - side / 2, w / 2 + side / 2, h / 2 + side / 2],
                    np.float32)
  lo, hi = pts.min(0), pts.max(0)
  side = (hi - lo).max() * scale
  cx = (lo[0] + hi[0]) / 2
  cy = (lo[1] + hi[1]) / 2 - shift_up * (hi[1] - lo[1])
  return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)


# ---- deterministic steps ----------------------------------------------------------------------


def flip(image, landmarks):
  """Mirrors an image left-right; 68 landmarks are mirrored and re-ordered with
  dff3d.landmarks.FLIP_PERMUTATION so index i still names the same facial point.

  Returns:
    (image (H, W, 3) float32, landmarks (68, D) float32).
  """
  image = np.asarray(image)
  pts = np.asarray(landmarks, np.float32)
  if pts.shape[0] != landmarks_lib.NUM_LANDMARKS:
    raise ValueError(f"flip needs the 68 iBUG landmarks (a permutation is defined for them "
                     f"only), got {pts.shape[0]} points")
  out = image[:, ::-1]
  out = out.astype(np.float32) / 255.0 if out.dtype == np.uint8 else out.astype(np.float32)
  return np.ascontiguousarray(out), landmarks_lib.flip_landmarks(pts, image.shape[1])


def rotate(image, landmarks, angle_deg: float, centre=None):
  """Rotates image content and landmarks by angle_deg (counter-clockwise on screen) about
  centre (default: the image centre (W / 2, H / 2)); the output keeps the input size."""
  image = np.asarray(image)
  h, w = image.shape[:2]
  centre = (w / 2.0, h / 2.0) if centre is None else centre
  a = rotation_affine(angle_deg, centre)
  return warp_affine(image, a, h, w), transform_points(a, landmarks)


def turn_points(points, shape, turns: int) -> np.ndarray:
  """(K, 2) float64 points of an image of `shape` (H, W, ...) in that image turned by `turns`
  quarter turns counter-clockwise (np.rot90's turn; x' = y, y' = W - x per turn)."""
  pts = np.array(points, np.float64).reshape(-1, 2)
  h, w = shape[:2]
  for _ in range(int(turns) % 4):
    pts = np.stack([pts[:, 1], w - pts[:, 0]], -1)
    h, w = w, h
  return pts


def quarter_turn(image, points, k: int):
  """The image and its points (K, >=2) turned by k * 90 degrees counter-clockwise on screen
  (np.rot90 of the array: exact, no resampling; rotation_affine's direction). Columns past
  x, y (e.g. depth) pass through. Returns (image (W, H, 3) or (H, W, 3), points float64)."""
  pts = np.array(points, np.float64)
  pts[:, :2] = turn_points(pts[:, :2], np.shape(image), k)
  return np.ascontiguousarray(np.rot90(image, int(k) % 4)), pts


def scale_colours(image, factors):
  """image * factors per RGB channel, clipped to [0, 1]: (H, W, 3) float32."""
  image = np.asarray(image)
  image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
  return np.clip(image * np.asarray(factors, np.float32), 0.0, 1.0).astype(np.float32)


def crop(image, landmarks, box, size: int):
  """Resamples the square `box` of the image to size x size and moves the landmarks along.

  Returns:
    (image (size, size, 3) float32, landmarks (K, D) float32 crop pixels, affine (2, 3)
    from source pixels to crop pixels).
  """
  a = crop_affine(box, size)
  return warp_affine(image, a, size, size), transform_points(a, landmarks), a


def crop_to_landmarks(image, landmarks, size: int, scale: float = 1.6, shift_up: float = 0.1,
                      visible=None):
  """crop() of face_box(landmarks, visible, scale, shift_up): (image, landmarks, affine)."""
  box = face_box(landmarks, visible, scale, shift_up, image_shape=np.shape(image))
  return crop(image, landmarks, box, size)


# ---- random steps: pure functions of (image, landmarks, rng) ---------------------------------


def random_flip(image, landmarks, rng: np.random.Generator, prob: float = 0.5):
  """flip() with probability prob; returns (image float32, landmarks)."""
  if rng.uniform() < prob:
    return flip(image, landmarks)
  image = np.asarray(image)
  image = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image
  return image, np.asarray(landmarks, np.float32)


def random_rotation(image, landmarks, rng: np.random.Generator, max_degrees: float = 30.0):
  """rotate() by an angle uniform in [-max_degrees, max_degrees] about the image centre."""
  return rotate(image, landmarks, rng.uniform(-max_degrees, max_degrees))


def random_colour_scale(image, landmarks, rng: np.random.Generator, low: float = 0.7,
                        high: float = 1.3):
  """Each RGB channel times its own U(low, high), clipped to [0, 1]; landmarks unchanged."""
  return scale_colours(image, rng.uniform(low, high, 3)), np.asarray(landmarks, np.float32)


# ---- the pipeline's composed version ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The paper's augmentations; each one off with its neutral value.

  flip_prob: probability of a horizontal flip (0: never). Needs the 68 iBUG landmarks.
  max_rotation_deg: rotation uniform in [-max, max] about the crop centre (0: none).
  colour_range: (low, high) of the per-channel factor, or None for no colour change.
  box_scale_jitter, box_shift_jitter: not the paper's (0, its default, is off): the crop box
    scaled by U(1 - a, 1 + a) and its centre moved by U(-b, b) of its width and height
    (jitter_box), so that the network sees faces framed as a detector or its own re-crop
    frames them, not only exactly at the labels' box.
  box_jitter_prob: the share of examples whose box is jittered when a jitter is on (1: all;
    below 1 the rest keep the labels' box, so that both framings are trained).
  """

  flip_prob: float = 0.5
  max_rotation_deg: float = 30.0
  colour_range: tuple | None = (0.7, 1.3)
  box_scale_jitter: float = 0.0
  box_shift_jitter: float = 0.0
  box_jitter_prob: float = 1.0


def jitter_box(box, rng: np.random.Generator, scale: float, shift: float) -> np.ndarray:
  """A randomly re-framed crop box.

  Args:
    box: (4,) x0, y0, x1, y1 pixels.
    rng: numpy Generator (draw order: scale, then the x and y shifts).
    scale: the box's sides are multiplied by one factor U(1 - scale, 1 + scale).
    shift: its centre moves by U(-shift, shift) of its width along x and of its height
      along y.
  Returns:
    (4,) float32 x0, y0, x1, y1.
  """
  box = np.asarray(box, np.float64)
  half = (box[2:] - box[:2]) / 2
  centre = (box[:2] + box[2:]) / 2 + rng.uniform(-shift, shift, 2) * 2 * half
  half = half * rng.uniform(1 - scale, 1 + scale)
  return np.concatenate([centre - half, centre + half]).astype(np.float32)


def _jitter_drawn(config: AugmentConfig, rng: np.random.Generator) -> bool:
  """Whether this example's box is jittered (one extra draw only when 0 < prob < 1, so a
  jitter on every example draws as before)."""
  if not (config.box_scale_jitter > 0 or config.box_shift_jitter > 0):
    return False
  if config.box_jitter_prob >= 1:
    return True
  return config.box_jitter_prob > 0 and rng.uniform() < config.box_jitter_prob


NO_AUGMENT = AugmentConfig(flip_prob=0.0, max_rotation_deg=0.0, colour_range=None)


def augmented_crop(image, landmarks, visible, rng: np.random.Generator, size: int,
                   config: AugmentConfig = NO_AUGMENT, crop_scale: float = 1.6,
                   crop_shift_up: float = 0.1, flip_permutation=None, box=None) -> dict:
  """Face crop plus augmentation with ONE resampling: crop, then rotate about the crop centre,
  then flip, then colour-scale (equal, up to interpolation, to applying crop(), rotate(),
  flip() and scale_colours() one after another).

  Args:
    image: (H, W, 3) uint8 or float in [0, 1].
    landmarks: (K, 2) pixels; visible: (K,) bool (label present), used for the crop box.
    rng: numpy Generator (draw order: flip, angle, box jitter when on (its share's draw
      first when 0 < box_jitter_prob < 1), colours).
    size: crop side S.
    flip_permutation: (K,) int order of the points of a mirrored face (the landmark set's,
      dff3d.landmark_sets); None: the iBUG-68 permutation (then K must be 68 to flip).
    box: optional (4,) crop box (x0, y0, x1, y1) in source pixels; None: face_box of the
      visible landmarks (e.g. AFLW-21 examples pass the box of their pseudo-68 points so they
      are framed like 68-point crops).

  Returns:
    dict: "image" (S, S, 3) float32 [0, 1]; "landmarks" (K, 2) float32 crop pixels;
    "landmarks_visible" (K,) bool (re-ordered with the landmarks on a flip); "affine" (2, 3)
    float32 source pixels -> crop pixels (before the flip's re-ordering of points).
  """
  pts = np.asarray(landmarks, np.float32)[:, :2]
  vis = np.ones(len(pts), bool) if visible is None else np.asarray(visible, bool)
  if box is None:
    box = face_box(pts, vis, crop_scale, crop_shift_up, image_shape=np.shape(image))
  do_flip = config.flip_prob > 0 and rng.uniform() < config.flip_prob
  angle = (rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)
           if config.max_rotation_deg > 0 else 0.0)
  if _jitter_drawn(config, rng):
    box = jitter_box(box, rng, config.box_scale_jitter, config.box_shift_jitter)
  if flip_permutation is None:
    if do_flip and len(pts) != landmarks_lib.NUM_LANDMARKS:
      raise ValueError(f"flip augmentation needs a flip permutation for {len(pts)} points "
                       "(the iBUG-68 one is the default)")
    flip_permutation = landmarks_lib.FLIP_PERMUTATION
  with _cpu():
    a, inv, moved = (np.asarray(v) for v in _crop_chain(
        np.asarray(box, np.float32), np.float32(angle), np.bool_(do_flip), pts, int(size)))
  out = _warp_with_inverse(image, inv, size, size)
  if do_flip:
    perm = np.asarray(flip_permutation)
    if perm.shape != (len(pts),):
      raise ValueError(f"flip permutation of {perm.shape} for {len(pts)} points")
    moved, vis = moved[perm], vis[perm]
  if config.colour_range is not None:
    out = scale_colours(out, rng.uniform(config.colour_range[0], config.colour_range[1], 3))
  return {"image": out, "landmarks": moved.astype(np.float32), "landmarks_visible": vis,
          "affine": a.astype(np.float32)}
