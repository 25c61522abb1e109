"""Per-face outputs in photo coordinates: camera-frame vertex colours, a depth map and a UV
texture unwrapped from the photo.

Every function reconstructs the face from what a reconstruction returns (reconstruct.
FaceResult): the morphable model, the coefficients WITHOUT batch dimension, `crop_affine`
(2, 3) photo pixels -> crop pixels and the crop side S (FitConfig.image_size). The face is
where rendering puts it: `camera.default_camera(S, S)` in the S x S crop, mapped to the photo
with the inverse affine. Pixel convention as in camera.py: x right, y down, pixel (row i,
column j) centred at (j + 0.5, i + 0.5), in every frame (crop, photo, texture).

Visibility in the photo comes from the project's rasterizer run directly on the face's
screen vertices mapped into photo pixels, over the face's bounding box only (`photo_raster`):
an affine map of screen coordinates keeps 1 / depth linear in screen space, so the z-buffer
and the perspective-correct depth are exact at photo resolution, with no resampling of a crop
raster. The box is clipped to the photo; memory and time grow with the face's area in the
photo, not the photo's. The rasterized grid has at most `max_side` pixels per side: a larger
box is rasterized on a grid of k x k photo-pixel blocks (k the smallest integer that fits),
sampled at the blocks' centres. Grid sizes are rounded up to a few sizes per octave
(`_bucket`) so that faces of similar size share one compilation.

Geometry and rasterization are jitted (one compilation per model, crop size and grid or
texture size); the per-image resampling is NumPy.
"""

import functools
import math
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import morphable_model as mm
from dff3d import rasterizer
from dff3d import shading
from dff3d.data import augment

# Triangles with a vertex at depth <= NEAR (model units) are not drawn (rasterizer default).
NEAR = 1e-3
# Default bound on the photo raster's side (4.2 M grid pixels at most).
MAX_SIDE = 2048


def _batched(c: coeffs_lib.Coefficients) -> coeffs_lib.Coefficients:
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32)[None], c)


@jax.jit
def _geometry_jit(model, c, crop_size):
  verts, alb = mm.geometry(model, c)
  cam = camera.to_camera(verts, c.rotation, c.translation)
  focal, pp = camera.default_camera(crop_size, crop_size)
  screen = camera.project(cam, focal, pp)
  colours = shading.shade(alb, shading.vertex_normals(cam, model.triangles), c.lighting)
  return cam[0], screen[0], colours[0]


def _geometry(model: mm.MorphableModel, c: coeffs_lib.Coefficients, crop_size: int):
  """(vertices_cam (N, 3), crop screen vertices (N, 3), shaded colours (N, 3)) for c with a
  batch dimension of 1, exactly as render.render computes them (the crop size is traced:
  one compilation for all sizes)."""
  return _geometry_jit(model, c, jnp.float32(crop_size))


def camera_vertex_colours(model: mm.MorphableModel, c: coeffs_lib.Coefficients) -> np.ndarray:
  """Shaded vertex colours as rendering computes them (render.Rendering.colours).

  The SH lighting is expressed in the camera frame, so the normals are those of the
  camera-space (rotated) vertices: `shading.shade(albedo, vertex_normals(R v + m), lighting)`.
  (Model-space normals give the colours of the frontal pose, wrong for a turned head.)

  Args:
    model: morphable model (N vertices).
    c: Coefficients without batch dimension.
  Returns:
    (N, 3) float32 RGB, nominally in [0, 1], not clipped.
  """
  return np.asarray(_geometry(model, _batched(c), 1)[2])


# ---- photo-space raster ---------------------------------------------------------------------

class PhotoRaster(NamedTuple):
  """The z-buffer of a face over its box in the photo.

  Grid pixel (row r, column q) covers photo pixels [x0 + k q, x0 + k (q + 1)) x
  [y0 + k r, y0 + k (r + 1)) and is sampled at its centre, photo (x0 + k (q + 0.5),
  y0 + k (r + 0.5)) (k = 1: the photo pixel centre itself).

  origin: (x0, y0) int photo pixel of the box's top-left corner.
  scale: k, photo pixels per grid pixel (int >= 1).
  box_shape: (h, w) the box in photo pixels (clipped to the photo); 0 when empty.
  triangle_id: (gh, gw) int32 visible triangle (-1: none); the grid may extend past the box.
  depth: (gh, gw) float32 camera-space depth -Z of the visible surface (model units), 0 where
    uncovered.
  grid_vertices: (N, 3) float32 vertices in grid pixels (x, y) and depth.
  """
  origin: Tuple[int, int]
  scale: int
  box_shape: Tuple[int, int]
  triangle_id: np.ndarray
  depth: np.ndarray
  grid_vertices: np.ndarray


def _bucket(n: int) -> int:
  """n rounded up to a multiple of 2^(floor(log2 n) - 2) (>= 16): 4 sizes per octave, at
  most 25% larger."""
  n = max(int(n), 1)
  step = max(16, 2 ** (int(math.floor(math.log2(n))) - 2))
  return -(-n // step) * step


@functools.partial(jax.jit, static_argnames=("size", "cull_backfaces"))
def _raster(vertices, triangles, size, cull_backfaces):
  """(triangle_id (H, W), depth (H, W)) of one mesh in screen coordinates."""
  r = rasterizer.rasterize(vertices[None], triangles, size, cull_backfaces=cull_backfaces,
                           near=NEAR)
  return r.triangle_id[0], r.depth[0]


def _front_triangles(model, affine):
  """The triangles, reversed in winding when the affine mirrors (det < 0), so that the
  rasterizer's back-face culling keeps the faces rendering keeps."""
  tri = np.asarray(model.triangles, np.int32)
  return tri[:, ::-1].copy() if np.linalg.det(np.asarray(affine)[:, :2]) < 0 else tri


def _to_photo(inv, screen):
  """(K, 3) crop screen (x, y, depth) -> (K, 2) float64 photo pixels."""
  xy = np.asarray(screen, np.float64)[:, :2]
  return xy @ inv[:, :2].T + inv[:, 2]


def photo_raster(model: mm.MorphableModel, c: coeffs_lib.Coefficients, crop_affine,
                 crop_size: int, photo_shape, max_side: int = MAX_SIDE,
                 screen_vertices=None) -> PhotoRaster:
  """Rasterize the face in photo pixels over its bounding box (back faces culled).

  Args:
    model, c (no batch dimension), crop_affine (2, 3) photo -> crop pixels, crop_size S.
    photo_shape: (H, W, ...) of the photo.
    max_side: bound on the grid's side; larger boxes use k x k photo-pixel grid pixels.
    screen_vertices: optional (N, 3) crop screen vertices of c, when already computed.
  Returns:
    PhotoRaster.
  """
  height, width = int(photo_shape[0]), int(photo_shape[1])
  if screen_vertices is None:
    screen_vertices = _geometry(model, _batched(c), crop_size)[1]
  screen = np.asarray(screen_vertices, np.float64)
  inv = augment.inverse_affine(crop_affine)
  xy = _to_photo(inv, screen)
  front = (screen[:, 2] > NEAR) & np.all(np.isfinite(xy), axis=1)
  tri = _front_triangles(model, inv)
  if front.any():
    lo = np.floor(xy[front].min(0)).astype(np.int64)
    hi = np.ceil(xy[front].max(0)).astype(np.int64)
    x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
    x1, y1 = min(int(hi[0]), width), min(int(hi[1]), height)
  else:
    x0 = y0 = x1 = y1 = 0
  bw, bh = max(x1 - x0, 0), max(y1 - y0, 0)
  k = max(1, -(-max(bw, bh) // int(max_side)))
  gh, gw = _bucket(-(-bh // k)), _bucket(-(-bw // k))
  grid = np.concatenate([(xy - [x0, y0]) / k, screen[:, 2:3]], 1).astype(np.float32)
  if bw == 0 or bh == 0:
    return PhotoRaster((x0, y0), k, (bh, bw), np.full((gh, gw), -1, np.int32),
                       np.zeros((gh, gw), np.float32), grid)
  ids, depth = _raster(jnp.asarray(grid), jnp.asarray(tri), (gh, gw), True)
  return PhotoRaster((x0, y0), k, (bh, bw), np.asarray(ids), np.asarray(depth), grid)


def _to_photo_plane(values, pr: PhotoRaster, photo_shape, fill=0):
  """A (gh, gw) grid plane -> (H, W) photo plane: nearest grid pixel, `fill` outside the box."""
  height, width = int(photo_shape[0]), int(photo_shape[1])
  out = np.full((height, width), fill, values.dtype)
  bh, bw = pr.box_shape
  if bh and bw:
    k = pr.scale
    up = values if k == 1 else np.repeat(np.repeat(values, k, 0), k, 1)
    x0, y0 = pr.origin
    out[y0:y0 + bh, x0:x0 + bw] = up[:bh, :bw]
  return out


def _depth_scale(crop_affine, crop_size: int):
  """Photo pixels per unit of 1 - depth / d0 in reconstruct.landmarks_to_photo's z,
  z = (d0 - depth) * f / d0 * zoom: f * zoom."""
  zoom = float(np.sqrt(abs(np.linalg.det(augment.inverse_affine(crop_affine)[:, :2]))))
  return float(camera.default_focal(crop_size)) * zoom


def depth_map(model: mm.MorphableModel, c: coeffs_lib.Coefficients, crop_affine,
              crop_size: int, photo_shape, max_side: int = MAX_SIDE, reference_depth=None):
  """The reconstructed surface's depth per photo pixel, in photo-pixel units.

  z has the definition of reconstruct.landmarks_to_photo (FaceResult.landmarks_3d[:, 2]):
  z = (d0 - depth) * f / d0 * zoom, with depth the camera-space distance -Z of the visible
  surface at the pixel centre, f the crop's focal length (camera.default_focal(S)), zoom =
  sqrt |det| of the crop -> photo affine and d0 the reference depth, by default the mean
  depth of the model's 68 landmark vertices; so z is larger towards the camera and the map
  at a visible landmark's pixel equals its landmarks_3d z (up to the surface's slope over
  the sub-pixel offset). Where the landmarks' d0 is that of other points (a reconstruction
  whose jaw landmarks slid to the outline), pass it as reference_depth.

  Args:
    model: morphable model; c: Coefficients without batch dimension.
    crop_affine: (2, 3) photo pixels -> crop pixels; crop_size: S.
    photo_shape: (H, W, ...) of the photo.
    max_side: see photo_raster (boxes larger than this are sampled every k photo pixels).
    reference_depth: optional d0, model units (camera-space distance).
  Returns:
    depth: (H, W) float32 z in photo pixels, 0 outside the mask.
    mask: (H, W) bool, pixels whose centre the face surface covers (front faces only; only
      the face's bounding box is ever rasterized).
  """
  screen = np.asarray(_geometry(model, _batched(c), crop_size)[1])
  pr = photo_raster(model, c, crop_affine, crop_size, photo_shape, max_side,
                    screen_vertices=screen)
  d0 = (float(np.mean(screen[np.asarray(model.landmarks), 2], dtype=np.float64))
        if reference_depth is None else float(reference_depth))
  per_unit = _depth_scale(crop_affine, crop_size)
  covered = pr.triangle_id >= 0
  z = np.where(covered, (d0 - pr.depth.astype(np.float64)) / d0 * per_unit, 0.0)
  return (_to_photo_plane(z.astype(np.float32), pr, photo_shape),
          _to_photo_plane(covered, pr, photo_shape, False))


# ---- UV texture -----------------------------------------------------------------------------

def uv_raster(model: mm.MorphableModel, texture_size: int = 512):
  """Which triangle covers each texel, and where.

  Texel (row i, column j) is at uv = ((j + 0.5) / T, 1 - (i + 0.5) / T) (OBJ convention: v up,
  image row 0 at v = 1). The model's UV triangles (uv[triangle_uv]) are rasterized with
  x = u T, y = (1 - v) T and constant depth, no culling; UV triangles do not overlap (where
  they would, the lower triangle id wins).

  Args:
    model: a model with uv (U, 2) and triangle_uv (T, 3).
    texture_size: T.
  Returns:
    triangle_id: (T, T) int32 model triangle (-1: no triangle).
    barycentrics: (T, T, 3) float32 weights of the triangle's corners (in triangle_uv order,
      which is the order of model.triangles' corners), 0 where uncovered.
  Raises:
    ValueError: the model has no texture coordinates.
  """
  if model.uv is None or model.triangle_uv is None:
    raise ValueError(f"morphable model {model.name or '(unnamed)'} has no texture "
                     "coordinates (uv / triangle_uv)")
  uv = np.asarray(model.uv, np.float32)
  t = int(texture_size)
  screen = np.stack([uv[:, 0] * t, (1.0 - uv[:, 1]) * t, np.ones(len(uv), np.float32)], 1)
  tri = jnp.asarray(np.asarray(model.triangle_uv, np.int32))
  ids, bary = _uv_raster(jnp.asarray(screen), tri, (t, t))
  return np.asarray(ids), np.asarray(bary)


@functools.partial(jax.jit, static_argnames=("size",))
def _uv_raster(screen, triangles, size):
  r = rasterizer.rasterize(screen[None], triangles, size, cull_backfaces=False)
  return r.triangle_id[0], r.barycentrics[0]


def _bilinear(photo, x, y):
  """Sample (H, W, C) at photo pixel coordinates (K,) x, y (centres at integer + 0.5),
  clamped to the border. Returns (K, C) float32."""
  height, width = photo.shape[:2]
  fx, fy = x - 0.5, y - 0.5
  j0 = np.clip(np.floor(fx).astype(np.int64), 0, width - 1)
  i0 = np.clip(np.floor(fy).astype(np.int64), 0, height - 1)
  j1, i1 = np.minimum(j0 + 1, width - 1), np.minimum(i0 + 1, height - 1)
  wx = np.clip(fx - j0, 0.0, 1.0)[:, None].astype(np.float32)
  wy = np.clip(fy - i0, 0.0, 1.0)[:, None].astype(np.float32)
  top = photo[i0, j0] * (1 - wx) + photo[i0, j1] * wx
  bottom = photo[i1, j0] * (1 - wx) + photo[i1, j1] * wx
  return top * (1 - wy) + bottom * wy


def unwrap_texture(model: mm.MorphableModel, c: coeffs_lib.Coefficients, crop_affine,
                   crop_size: int, photo, texture_size: int = 512,
                   depth_tolerance: float = 0.005, max_side: int = MAX_SIDE):
  """A UV texture sampled from the photo where the surface is visible in it.

  Texel (row i, column j) is at uv = ((j + 0.5) / T, 1 - (i + 0.5) / T) (OBJ convention: v up,
  image row 0 at v = 1), so the texture can be written as the image of an OBJ/MTL material.
  Per texel: its triangle and barycentrics (uv_raster) give a surface point; that point is
  projected with the crop's camera and mapped to the photo by the inverse crop affine, and
  the photo is sampled there bilinearly at full resolution.

  A texel is visible when its triangle faces the camera (the rasterizer's culling test, in
  photo orientation) and is not occluded: at the photo raster pixel p containing the point
  (photo_raster), the depth of the texel's own triangle's plane evaluated at p's centre is at
  most (1 + depth_tolerance) x the z-buffer depth there. Evaluating the texel's plane at the
  pixel centre, not at the point, makes the test exact for the triangle the rasterizer chose
  (same plane) and leaves only curvature between neighbouring triangles for the tolerance;
  occluders (the nose over the far cheek) are centimetres in front.

  Args:
    model: a model with uv / triangle_uv; c: Coefficients without batch dimension.
    crop_affine: (2, 3) photo pixels -> crop pixels; crop_size: S.
    photo: (H, W, C) float (kept in its own range) or uint8 (scaled to [0, 1]).
    texture_size: T.
    depth_tolerance: relative depth slack of the occlusion test.
    max_side: see photo_raster.
  Returns:
    texture: (T, T, C) float32, 0 at invisible texels.
    visible: (T, T) bool, the texels sampled from the photo.
  Raises:
    ValueError: the model has no texture coordinates.
  """
  tid, bary = uv_raster(model, texture_size)  # raises without uv
  photo = np.asarray(photo)
  photo = photo.astype(np.float32) / 255.0 if photo.dtype == np.uint8 else photo.astype(
      np.float32)
  if photo.ndim == 2:
    photo = photo[..., None]
  t = int(texture_size)
  cam, screen, _ = (np.asarray(a, np.float64) for a in _geometry(model, _batched(c), crop_size))
  pr = photo_raster(model, c, crop_affine, crop_size, photo.shape, max_side, screen_vertices=screen)
  inv = augment.inverse_affine(crop_affine)
  texture = np.zeros((t, t, photo.shape[-1]), np.float32)
  visible = np.zeros((t, t), bool)
  flat = np.flatnonzero(tid.reshape(-1) >= 0)
  if flat.size == 0 or pr.box_shape[0] == 0 or pr.box_shape[1] == 0:
    return texture, visible
  tri = np.asarray(model.triangles, np.int64)[tid.reshape(-1)[flat]]  # (K, 3)
  w = bary.reshape(-1, 3)[flat].astype(np.float64)  # corners in model.triangles order
  point = np.einsum("kc,kcd->kd", w, cam[tri])  # camera-space surface point
  focal, pp = camera.default_camera(crop_size, crop_size)
  depth = -point[:, 2]
  ok = depth > NEAR
  safe = np.where(ok, depth, 1.0)
  sx = float(pp[0]) + float(focal) * point[:, 0] / safe
  sy = float(pp[1]) - float(focal) * point[:, 1] / safe
  xy = _to_photo(inv, np.stack([sx, sy], 1))
  height, width = photo.shape[:2]
  ok &= (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
  # Front-facing: negative signed area in the grid (y down), as the rasterizer culls (the
  # opposite sign when the crop affine mirrors, see _front_triangles).
  g = pr.grid_vertices.astype(np.float64)
  gx, gy, gz = g[tri, 0], g[tri, 1], g[tri, 2]
  area = (gx[:, 1] - gx[:, 0]) * (gy[:, 2] - gy[:, 0]) - (gx[:, 2] - gx[:, 0]) * (
      gy[:, 1] - gy[:, 0])
  ok &= area * np.sign(np.linalg.det(inv[:, :2])) < 0
  # The grid pixel holding the point and the z-buffer there.
  k = pr.scale
  x0, y0 = pr.origin
  col = np.floor((xy[:, 0] - x0) / k).astype(np.int64)
  row = np.floor((xy[:, 1] - y0) / k).astype(np.int64)
  gh, gw = pr.depth.shape
  ok &= (col >= 0) & (col < gw) & (row >= 0) & (row < gh)
  col, row = np.clip(col, 0, gw - 1), np.clip(row, 0, gh - 1)
  zbuf = pr.depth[row, col].astype(np.float64)
  ok &= pr.triangle_id[row, col] >= 0
  # The texel's own triangle plane at the pixel centre: screen barycentrics there, then
  # perspective-correct depth 1 / sum(b_k / z_k).
  px, py = col + 0.5, row + 0.5
  e = [(gx[:, (i + 2) % 3] - gx[:, (i + 1) % 3]) * (py - gy[:, (i + 1) % 3])
       - (gy[:, (i + 2) % 3] - gy[:, (i + 1) % 3]) * (px - gx[:, (i + 1) % 3])
       for i in range(3)]
  safe_area = np.where(area != 0, area, 1.0)
  inv_depth = sum(e[i] / safe_area / np.where(gz[:, i] > NEAR, gz[:, i], 1.0)
                  for i in range(3))
  own = np.where(inv_depth > 0, 1.0 / np.where(inv_depth > 0, inv_depth, 1.0), np.inf)
  ok &= own <= zbuf * (1.0 + depth_tolerance)
  sel = flat[ok]
  texture.reshape(-1, texture.shape[-1])[sel] = _bilinear(photo, xy[ok, 0], xy[ok, 1])
  visible.reshape(-1)[sel] = True
  return texture, visible
