"""dff3d.texture: camera-frame vertex colours, the photo depth map and the UV unwrap.

Compile budget: one jitted render at S = 64, one photo raster grid (every test face gets a
crop affine that puts its box at ~150 x ~90 photo pixels, one grid bucket) and one texture
size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from dff3d import camera
from dff3d import morphable_model as mm
from dff3d import reconstruction as reconstruct
from dff3d import render
from dff3d import shading
from dff3d import texture
from dff3d.data import augment

S = 64
PHOTO_SHAPE = (200, 160, 3)
BOX_HEIGHT = 150.0  # photo pixels spanned by the whole mesh's projection
T = 128
DISTANCE = 150.0  # the whole head inside the crop (warped photos are black outside it)


@pytest.fixture(scope="module")
def model():
  return mm.default_model()


_render = jax.jit(functools.partial(render.render, antialias=False), static_argnums=(2,))


def _coefficients(model, yaw_deg, pitch_deg=0.0):
  """Batch-1 Coefficients: the mean face at DISTANCE, turned by yaw (and pitch)."""
  c = mm.zero_coefficients(model, 1, distance=DISTANCE)
  angles = np.deg2rad([[pitch_deg, yaw_deg, 0.0]]).astype(np.float32)
  return c.replace(rotation=jnp.asarray(angles), translation=c.translation.at[0, 0].set(0.7))


def _unbatched(c):
  return jax.tree_util.tree_map(lambda a: np.asarray(a[0]), c)


def _crop_affine(screen, anchor, box_height):
  """photo -> crop (2, 3): scale + shift putting the mesh's crop-space projection (N, 3)
  at box_height photo pixels, about centred in the photo (of box_height / BOX_HEIGHT x
  PHOTO_SHAPE), with the crop point `anchor` (2,) on a photo pixel centre."""
  lo, hi = screen[:, :2].min(0), screen[:, :2].max(0)
  a = (hi[1] - lo[1]) / box_height  # crop pixels per photo pixel
  centre_photo = np.array([PHOTO_SHAPE[1] / 2, PHOTO_SHAPE[0] / 2]) * box_height / BOX_HEIGHT
  anchor_photo = centre_photo + (anchor - (lo + hi) / 2) / a
  anchor_photo = np.floor(anchor_photo) + 0.5
  shift = anchor - a * anchor_photo
  return np.array([[a, 0, shift[0]], [0, a, shift[1]]], np.float32)


def _face(model, yaw_deg, pitch_deg=0.0, m=None, box_height=BOX_HEIGHT):
  """(coefficients (no batch), rendering, crop_affine) of a test face; the nose tip (iBUG 30)
  lies on a photo pixel centre."""
  c = _coefficients(model, yaw_deg, pitch_deg)
  r = _render(m if m is not None else model, c, (S, S))
  screen = np.asarray(r.screen_vertices[0], np.float64)
  return _unbatched(c), r, _crop_affine(screen, screen[int(model.landmarks[30]), :2], box_height)


def test_camera_vertex_colours_are_the_rendered_colours(model):
  c, r, _ = _face(model, 60.0)
  colours = texture.camera_vertex_colours(model, c)
  assert colours.shape == (model.num_vertices, 3)
  np.testing.assert_allclose(colours, np.asarray(r.colours[0]), atol=1e-5)
  # The exporter's old way: normals of the unrotated model-space vertices.
  cb = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], c)
  verts, alb = mm.geometry(model, cb)
  model_space = shading.shade(alb, shading.vertex_normals(verts, model.triangles), cb.lighting)
  assert np.abs(np.asarray(model_space[0]) - colours).max() > 0.05


@pytest.mark.parametrize("yaw", [0.0, 30.0])
def test_depth_map_matches_landmarks_3d_z(model, yaw):
  c, r, affine = _face(model, yaw, pitch_deg=-10.0)
  depth, mask = texture.depth_map(model, c, affine, S, PHOTO_SHAPE)
  assert depth.shape == mask.shape == PHOTO_SHAPE[:2]
  assert depth.dtype == np.float32 and mask.dtype == bool
  lm3 = reconstruct.landmarks_to_photo(np.asarray(r.screen_vertices[0, model.landmarks]),
                                       affine, S)
  x, y, z = lm3[30]  # nose tip, at a pixel centre (see _face)
  assert abs(x % 1 - 0.5) < 1e-3 and abs(y % 1 - 0.5) < 1e-3
  assert mask[int(y), int(x)]
  assert abs(depth[int(y), int(x)] - z) < 0.02, (depth[int(y), int(x)], z)
  assert abs(z) > 10  # a real test: the nose tip is well in front of the landmarks' mean
  # Another reference depth d0 (landmarks_to_photo's reference_depth) moves z alike.
  d0 = float(np.asarray(r.screen_vertices[0, model.landmarks, 2]).mean()) + 1.0
  shifted, _ = texture.depth_map(model, c, affine, S, PHOTO_SHAPE, reference_depth=d0)
  lm3_shifted = reconstruct.landmarks_to_photo(
      np.asarray(r.screen_vertices[0, model.landmarks]), affine, S, d0)
  assert abs(shifted[int(y), int(x)] - lm3_shifted[30, 2]) < 0.02
  assert abs(lm3_shifted[30, 2] - z) > 1.0
  # Only the face is in the mask, and it matches the rendered face's coverage: the crop's
  # hard mask warped to the photo (nearest), away from the outline.
  assert not mask[:3].any() and not mask[-3:].any()
  assert np.all(depth[~mask] == 0)
  warped = augment.warp_affine(np.repeat(np.asarray(r.raster.mask[0])[..., None], 3, -1),
                               np.asarray(camera.invert_affine(jnp.asarray(affine))),
                               *PHOTO_SHAPE[:2])[..., 0]
  inside, outside = warped > 0.99, warped < 0.01
  assert mask[inside].mean() > 0.99 and not mask[outside].mean() > 0.01


def test_depth_map_bounded_grid(model):
  """A box larger than max_side is rasterized on k x k photo-pixel blocks: a face twice the
  usual size with max_side 160 gives k = 2 (and the usual grid)."""
  c, r, affine = _face(model, 30.0, box_height=2 * BOX_HEIGHT)
  shape = (2 * PHOTO_SHAPE[0], 2 * PHOTO_SHAPE[1])
  depth, mask = texture.depth_map(model, c, affine, S, shape, max_side=160)
  assert texture.photo_raster(model, c, affine, S, shape, max_side=160).scale == 2
  lm3 = reconstruct.landmarks_to_photo(np.asarray(r.screen_vertices[0, model.landmarks]),
                                       affine, S)
  x, y, z = lm3[30]
  assert mask[int(y), int(x)] and abs(depth[int(y), int(x)] - z) < 2.0
  warped = augment.warp_affine(np.repeat(np.asarray(r.raster.mask[0])[..., None], 3, -1),
                               np.asarray(camera.invert_affine(jnp.asarray(affine))),
                               *shape)[..., 0]
  assert mask[warped > 0.99].mean() > 0.98 and mask[warped < 0.01].mean() < 0.02


def test_uv_raster_follows_the_texel_convention(model):
  tid, bary = texture.uv_raster(model, T)
  assert tid.shape == (T, T) and bary.shape == (T, T, 3)
  covered = tid >= 0
  assert 0.5 < covered.mean() < 1.0
  uv = np.asarray(model.uv)[np.asarray(model.triangle_uv)[tid[covered]]]  # (K, 3, 2)
  got = np.einsum("kc,kcd->kd", bary[covered], uv)
  i, j = np.nonzero(covered)
  want = np.stack([(j + 0.5) / T, 1.0 - (i + 0.5) / T], -1)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_unwrap_requires_uv(model):
  c, _, affine = _face(model, 0.0)
  with pytest.raises(ValueError, match="texture coordinates"):
    texture.unwrap_texture(model.replace(uv=None, triangle_uv=None), c, affine, S,
                           np.zeros(PHOTO_SHAPE, np.float32), texture_size=T)


def _patterned(model):
  """The model with a smooth 3D colour pattern as its albedo."""
  v = np.asarray(model.mean_shape)
  x, y = v[:, 0], v[:, 1]
  albedo = np.stack([0.5 + 0.35 * np.sin(0.5 * x + 0.3 * y), 0.5 + 0.35 * np.cos(0.45 * y),
                     0.5 + 0.3 * np.sin(0.45 * (x - y))], -1).astype(np.float32)
  return model.replace(albedo_mean=jnp.asarray(albedo))


def _texel_points(model, tid, bary, values):
  """Per covered texel, values (N, D) interpolated at its surface point: (K, D)."""
  corners = np.asarray(model.triangles)[tid[tid >= 0]]
  return np.einsum("kc,kcd->kd", bary[tid >= 0], np.asarray(values)[corners])


@pytest.mark.parametrize("yaw", [20.0, 70.0])
def test_unwrap_reproduces_the_rendered_pattern(model, yaw):
  m = _patterned(model)
  c, r, affine = _face(model, yaw, m=m)
  photo = augment.warp_affine(np.asarray(r.image[0]),
                              np.asarray(camera.invert_affine(jnp.asarray(affine))),
                              *PHOTO_SHAPE[:2])
  tex, visible = texture.unwrap_texture(m, c, affine, S, photo, texture_size=T)
  assert tex.shape == (T, T, 3) and visible.shape == (T, T) and tex.dtype == np.float32
  assert np.all(tex[~visible] == 0)
  tid, bary = texture.uv_raster(m, T)
  assert not (visible & (tid < 0)).any()
  # Only front faces (negative signed area in the y-down crop, what rendering culls).
  sv = np.asarray(r.screen_vertices[0], np.float64)[np.asarray(m.triangles)[tid[visible]]]
  area = ((sv[:, 1, 0] - sv[:, 0, 0]) * (sv[:, 2, 1] - sv[:, 0, 1])
          - (sv[:, 2, 0] - sv[:, 0, 0]) * (sv[:, 1, 1] - sv[:, 0, 1]))
  assert np.all(area < 0), np.sum(area >= 0)
  # Expected: the rendered (camera-frame shaded) colour at each texel's surface point.
  want = _texel_points(m, tid, bary, texture.camera_vertex_colours(m, c))
  got, vis = tex[tid >= 0], visible[tid >= 0]
  region = _texel_points(m, tid, bary, np.asarray(m.face_region)[:, None])[:, 0] > 0.5
  err = np.abs(got - want).mean(-1)
  assert vis[region].mean() > (0.6 if yaw < 45 else 0.3)
  assert np.median(err[vis & region]) < 0.01, np.median(err[vis & region])
  # Away from the crop's outline (where the 64 px render's black background bleeds into the
  # upsampled photo) nearly every visible texel has the rendered colour.
  cam = _texel_points(m, tid, bary, r.vertices_cam[0])
  focal, pp = camera.default_camera(S, S)
  crop_xy = np.asarray(camera.project(jnp.asarray(cam[None], jnp.float32), focal, pp))[0]
  col, row = (np.clip(np.floor(crop_xy[:, k]).astype(int), 0, S - 1) for k in (0, 1))
  interior = ndimage.binary_erosion(np.asarray(r.raster.mask[0]) > 0, iterations=2)[row, col]
  sel = vis & region & interior
  assert sel.sum() > 1000
  assert np.mean(err[sel] < 0.05) > 0.97, np.mean(err[sel] < 0.05)
  # Cheeks, by the mean face's normals: +x is the subject's left, turned away by a positive
  # yaw (and hidden behind the nose at 70 degrees); the near cheek stays visible.
  p = _texel_points(m, tid, bary, m.mean_shape)
  n = _texel_points(m, tid, bary, shading.vertex_normals(m.mean_shape[None], m.triangles)[0])
  cheek = region & (np.abs(p[:, 1] + 1.5) < 2.5) & (n[:, 2] > 0.7) & (np.abs(n[:, 0]) > 0.3)
  far, near = cheek & (n[:, 0] > 0), cheek & (n[:, 0] < 0)
  assert far.sum() > 20 and near.sum() > 20
  assert vis[near].mean() > 0.95, vis[near].mean()
  if yaw > 45:
    assert vis[far].mean() < 0.05, vis[far].mean()
  else:
    assert vis[far].mean() > 0.95, vis[far].mean()
