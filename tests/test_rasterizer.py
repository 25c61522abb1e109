"""Tests for dff3d.rasterizer against a float64 NumPy reference rasterizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dff3d import rasterizer as R

H, W = 40, 48


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def reference_raster(screen_vertices, triangles, height, width, cull=False, near=1e-3,
                     edge_tol=1e-4, tie_tol=1e-5):
  """Float64 z-buffer at pixel centres.

  Coverage: all three edge functions >= 0 (oriented by the triangle's area sign). Visibility:
  largest perspective-correct 1/depth (1/depth interpolated linearly in screen space), lower
  triangle id on exact ties.

  Returns:
    ids (B, H, W) int, bary (B, H, W, 3), depth (B, H, W), ambiguous (B, H, W) bool: a
    covering or nearly covering triangle has the pixel centre within `edge_tol` pixels of
    an edge, or the two nearest surfaces tie within `tie_tol` relative 1/depth.
  """
  sv = np.asarray(screen_vertices, np.float64)
  b = sv.shape[0]
  ids = np.full((b, height, width), -1)
  best = np.zeros((b, height, width))
  second = np.zeros((b, height, width))
  bary = np.zeros((b, height, width, 3))
  ambiguous = np.zeros((b, height, width), bool)
  px = np.arange(width) + 0.5
  py = np.arange(height) + 0.5
  for bi in range(b):
    for t, corner in enumerate(triangles):
      x, y, z = sv[bi, corner, 0], sv[bi, corner, 1], sv[bi, corner, 2]
      if np.any(z <= near):
        continue
      area = (x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0])
      if area == 0 or (cull and area >= 0):
        continue
      j0 = max(int(np.ceil(x.min() - 0.5)) - 1, 0)
      j1 = min(int(np.floor(x.max() - 0.5)) + 1, width - 1)
      i0 = max(int(np.ceil(y.min() - 0.5)) - 1, 0)
      i1 = min(int(np.floor(y.max() - 0.5)) + 1, height - 1)
      if j1 < j0 or i1 < i0:
        continue
      gx, gy = np.meshgrid(px[j0:j1 + 1], py[i0:i1 + 1])
      e, dist = [], []
      for i in range(3):
        xa, ya = x[(i + 1) % 3], y[(i + 1) % 3]
        ex, ey = x[(i + 2) % 3] - xa, y[(i + 2) % 3] - ya
        ei = ex * (gy - ya) - ey * (gx - xa)
        e.append(ei)
        dist.append(np.abs(ei) / max(np.hypot(ex, ey), 1e-300))
      lam = np.stack(e, -1) / area
      inside = np.all(lam >= 0, -1)
      near_edge = np.any(np.stack(dist, -1) < edge_tol, -1) & np.all(lam > -1e-3, -1)
      w = (lam / z).sum(-1)
      sl = np.s_[bi, i0:i1 + 1, j0:j1 + 1]
      ambiguous[sl] |= near_edge
      cur_best, cur_second, cur_ids = best[sl], second[sl], ids[sl]
      win = inside & (w > cur_best)
      cur_second[:] = np.where(inside & ~win, np.maximum(cur_second, w), cur_second)
      cur_second[:] = np.where(win, cur_best, cur_second)
      cur_ids[win] = t
      cur_best[win] = w[win]
      bb = bary[sl]
      bb[win] = (lam / z / w[..., None])[win]
  depth = np.where(ids >= 0, 1.0 / np.where(best > 0, best, 1.0), 0.0)
  ambiguous |= (second > 0) & (best - second <= tie_tol * best)
  return ids, bary, depth, ambiguous


def random_mesh(rng, batch=2, height=H, width=W, layers=3, per_kind=(40, 25, 3)):
  """Layers of tiny (< 1 px), normal (2-8 px) and huge (tens of px, partly outside)
  triangles; each layer has its own depth range, so layers never interpenetrate."""
  vertices, triangles = [], []
  n = 0
  for layer in range(layers):
    depth = 2.0 + 3.0 * layer
    for kind, count in enumerate(per_kind):
      size = [(0.2, 1.0), (2.0, 8.0), (25.0, 90.0)][kind][0:2]
      for _ in range(count):
        centre = rng.uniform([-4, -4], [width + 4, height + 4])
        s = rng.uniform(*size)
        corners = centre + rng.normal(size=(3, 2)) * s
        z = depth + rng.uniform(0, 0.8, size=(3, 1))
        vertices.append(np.concatenate([corners, z], 1))
        triangles.append([n, n + 1, n + 2])
        n += 3
  v = np.concatenate(vertices)
  # Per image a small random shift, so the batch elements differ.
  sv = np.stack([v + np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), 0.0])
                 for _ in range(batch)])
  return sv.astype(np.float32), np.asarray(triangles, np.int32)


def pad(sv, tris, vertices=256, triangles=128):
  """Pad a one-image mesh to a common shape (fewer compilations): extra vertices at the
  origin, extra triangles (0, 0, 0), which are degenerate and never drawn."""
  sv = np.asarray(sv, np.float32)
  tris = np.asarray(tris, np.int32)
  assert sv.shape[1] <= vertices and len(tris) <= triangles
  sv = np.concatenate([sv, np.zeros((sv.shape[0], vertices - sv.shape[1], 3), np.float32)], 1)
  tris = np.concatenate([tris, np.zeros((triangles - len(tris), 3), np.int32)])
  return sv, tris


@functools.partial(jax.jit, static_argnames=("image_size", "cull"))
def _raster(sv, tris, image_size=(H, W), cull=False):
  return R.rasterize(sv, tris, image_size, cull_backfaces=cull)


def assert_matches_reference(sv, tris, cull=False, max_ambiguous=0.01, height=H, width=W):
  r = _raster(jnp.asarray(sv), jnp.asarray(tris), (height, width), cull)
  ids, bary, depth, ambiguous = reference_raster(sv, tris, height, width, cull=cull)
  got = np.asarray(r.triangle_id)
  differ = got != ids
  assert ambiguous.mean() <= max_ambiguous, ambiguous.mean()
  assert not np.any(differ & ~ambiguous), np.argwhere(differ & ~ambiguous)[:10]
  same = (got == ids) & (ids >= 0)
  np.testing.assert_allclose(np.asarray(r.barycentrics)[same], bary[same], atol=1e-5)
  np.testing.assert_allclose(np.asarray(r.depth)[same], depth[same], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(r.mask), (got >= 0).astype(np.float32))
  assert np.all(np.asarray(r.barycentrics)[got < 0] == 0)
  return r, ids


# ----------------------------------------------------------------------------------------------
# Visibility and barycentrics
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cull", [False, True])
def test_random_meshes_match_reference(cull):
  rng = np.random.default_rng(0)
  sv, tris = random_mesh(rng)
  r, ids = assert_matches_reference(sv, tris, cull=cull)
  covered = ids >= 0
  assert covered.mean() > 0.5  # the test exercises mostly covered images
  # All three kinds of triangles are visible somewhere.
  visible = np.unique(ids[covered])
  kinds = (visible % 68)
  assert np.any(kinds < 40) and np.any((kinds >= 40) & (kinds < 65)) and np.any(kinds >= 65)


def test_large_triangle_loop_in_many_small_steps(monkeypatch):
  # Tiny windows and steps: triangles straddle windows and steps of the while loop.
  monkeypatch.setattr(R, "_WINDOW", 3)
  monkeypatch.setattr(R, "_BLOCKS_PER_STEP", 5)
  rng = np.random.default_rng(1)
  sv, tris = pad(*random_mesh(rng, batch=1, layers=2, per_kind=(10, 10, 2)))
  # Fresh jit (the constants are read at trace time).
  r = jax.jit(lambda s, t: R.rasterize(s, t, (H, W)))(sv, tris)
  ids, _, _, ambiguous = reference_raster(sv, tris, H, W)
  differ = np.asarray(r.triangle_id) != ids
  assert not np.any(differ & ~ambiguous)


@pytest.mark.parametrize("shares", [(1, 1), (10**9, 1), (10**9, 10**9)])
def test_triangle_paths_overflow_exactly(monkeypatch, shares):
  # (1, 1): every small and medium triangle fits its list; (10**9, 1): no small list, the
  # small triangles go through the 4 x 4 path; (10**9, 10**9): lists of one triangle, all
  # others go through the block loop.
  monkeypatch.setattr(R, "_SMALL_SHARE", shares[0])
  monkeypatch.setattr(R, "_MEDIUM_SHARE", shares[1])
  monkeypatch.setattr(R, "_MEDIUM_PIXELS", 10**9)  # no pixel-based floor: the shares decide
  rng = np.random.default_rng(7)
  sv, tris = pad(*random_mesh(rng, batch=1, layers=2, per_kind=(20, 20, 2)), 256, 128)
  r = jax.jit(lambda s, t: R.rasterize(s, t, (H, W)))(sv, tris)  # fresh trace
  ids, _, _, ambiguous = reference_raster(sv, tris, H, W)
  assert not np.any((np.asarray(r.triangle_id) != ids) & ~ambiguous)
  assert (ids >= 0).mean() > 0.3


@pytest.mark.parametrize("n, capacity", [(1, 1), (31, 5), (64, 64), (1000, 37), (1000, 1200)])
def test_compact_lists_set_flags_in_order(n, capacity):
  rng = np.random.default_rng(n + capacity)
  flags = rng.uniform(size=n) < 0.3
  index, count, slot = jax.jit(R._compact, static_argnums=1)(jnp.asarray(flags), capacity)
  expected = np.flatnonzero(flags)
  assert int(count) == len(expected)
  kept = min(len(expected), capacity)
  np.testing.assert_array_equal(np.asarray(index)[:kept], expected[:kept])
  np.testing.assert_array_equal(np.asarray(index)[kept:], np.arange(kept, capacity) % n)
  rank = np.full(n, capacity)
  rank[expected] = np.arange(len(expected))
  np.testing.assert_array_equal(np.asarray(slot), rank)


def test_overlapping_duplicates_tie_to_lower_id():
  sv = np.array([[[2, 3, 5], [40, 5, 5], [10, 35, 5]]], np.float32)
  sv, tris = pad(sv, np.array([[0, 1, 2], [0, 1, 2], [2, 1, 0]], np.int32))
  r = _raster(sv, tris)
  got = np.asarray(r.triangle_id)
  assert np.all(np.isin(got, [-1, 0]))
  assert (got == 0).sum() > 100


def test_nearer_surface_wins_regardless_of_order():
  quad = np.array([[0, 0], [W, 0], [W, H], [0, H]], np.float32)
  far = np.concatenate([quad, np.full((4, 1), 10.0, np.float32)], 1)
  near_ = np.concatenate([quad * 0.5 + 5, np.full((4, 1), 3.0, np.float32)], 1)
  sv = np.concatenate([far, near_])[None]
  sv, tris = pad(sv, np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]], np.int32))
  got = np.asarray(_raster(sv, tris).triangle_id)[0]
  assert np.all(got >= 0)  # full-image quad: no holes, also along its diagonal
  inner = got[8:20, 8:25]
  assert np.all(np.isin(inner, [2, 3]))


def test_half_image_triangle_has_no_holes():
  # One triangle covering the lower-left half of the image (and beyond it).
  sv = np.array([[[-0.25, -0.25, 4.0], [-0.25, H + 0.25, 4.0], [W + 0.25, H + 0.25, 4.0]]],
                np.float32)
  sv, tris = pad(sv, np.array([[0, 1, 2]], np.int32))
  r, ids = assert_matches_reference(sv, tris, max_ambiguous=0.05)
  got = np.asarray(r.triangle_id)[0]
  jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
  # Pixel centres clearly below the diagonal are all covered.
  below = (ii + 0.25) / (H + 0.5) > (jj + 0.25) / (W + 0.5) + 1e-3
  assert np.all(got[below] == 0)
  assert (got == 0).sum() > 0.45 * H * W


def test_huge_triangle_far_outside_the_image():
  sv = np.array([[[-3000, -2000, 2.0], [4000, -10, 2.0], [20, 5000, 2.0]]], np.float32)
  r = _raster(*pad(sv, np.array([[0, 1, 2]], np.int32)))
  assert np.all(np.asarray(r.triangle_id) == 0)


def test_empty_image():
  rng = np.random.default_rng(2)
  sv, tris = pad(*random_mesh(rng, batch=1, layers=1))
  sv[..., 0] += 500.0  # everything right of the image
  r = _raster(sv, tris)
  assert np.all(np.asarray(r.triangle_id) == -1)
  assert np.all(np.asarray(r.mask) == 0)
  colours = jnp.ones((1, sv.shape[1], 3))
  assert np.all(np.asarray(R.interpolate(colours, r, tris)) == 0)
  assert np.all(np.asarray(R.soft_silhouette(r, sv, tris)) == 0)


def test_degenerate_triangles_are_never_drawn():
  sv = np.array([[[5, 5, 3], [30, 8, 3], [12, 30, 3],
                  [1, 1, 2], [40, 30, 2], [20.5, 15.5, 2],  # collinear points
                  [0, 0, 2], [45, 38, 2]]], np.float32)
  sv, tris = pad(sv, np.array([[0, 1, 2], [3, 4, 5], [6, 7, 7], [4, 4, 4], [6, 7, 6]],
                              np.int32))
  r, ids = assert_matches_reference(sv, tris)
  got = np.asarray(r.triangle_id)
  assert set(np.unique(got)) == {-1, 0}


def test_triangles_behind_the_camera_are_dropped():
  sv = np.array([[[5, 5, 3], [30, 8, 3], [12, 30, 3],
                  [0, 0, 1], [47, 0, 1], [0, 39, -1],     # one vertex behind
                  [0, 0, -2], [47, 0, -2], [47, 39, -2],  # all behind
                  [0, 0, 1], [47, 39, 1e-4], [0, 39, 1]]],  # one at the near plane
                np.float32)
  sv, tris = pad(sv, np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]], np.int32))
  r = _raster(sv, tris)
  got = np.asarray(r.triangle_id)
  assert set(np.unique(got)) == {-1, 0}
  assert_matches_reference(sv, tris)


def test_backface_culling_follows_screen_winding():
  # Counter-clockwise in a y-up view = clockwise on screen (y down) = negative screen area.
  front = np.array([[10, 30, 3], [30, 30, 3], [20, 10, 3]], np.float32)  # y-up CCW
  area = ((front[1, 0] - front[0, 0]) * (front[2, 1] - front[0, 1])
          - (front[2, 0] - front[0, 0]) * (front[1, 1] - front[0, 1]))
  assert area < 0
  sv, tri_front = pad(front[None], np.array([[0, 1, 2]], np.int32))
  _, tri_back = pad(front[None], np.array([[0, 2, 1]], np.int32))
  assert np.any(np.asarray(_raster(sv, tri_front, cull=True).triangle_id) == 0)
  assert np.all(np.asarray(_raster(sv, tri_back, cull=True).triangle_id) == -1)
  assert np.any(np.asarray(_raster(sv, tri_back, cull=False).triangle_id) == 0)


def test_interpolated_depth_equals_raster_depth_and_vertex_ids():
  rng = np.random.default_rng(3)
  sv, tris = pad(*random_mesh(rng, batch=1, layers=2, per_kind=(10, 10, 2)))
  r = _raster(sv, tris)
  z = R.interpolate(jnp.asarray(sv[..., 2:]), r, tris)[..., 0]
  np.testing.assert_allclose(np.asarray(z), np.asarray(r.depth), rtol=1e-5)
  # One-hot vertex ids: the three corners of the visible triangle carry the barycentrics.
  n = sv.shape[1]
  ids = np.asarray(r.triangle_id)[0]
  i, j = np.argwhere(ids >= 0)[7]
  onehot = jnp.eye(n)[None, :, :]
  values = np.asarray(R.interpolate(onehot, r, tris))[0, i, j]
  expect = np.zeros(n)
  expect[tris[ids[i, j]]] += np.asarray(r.barycentrics)[0, i, j]
  np.testing.assert_allclose(values, expect, atol=1e-6)



def test_corner_ids_and_a_hand_built_raster():
  # rasterize stores the visible triangles' corner vertex ids; a Raster built by hand
  # (corner_ids None) interpolates the same values and gradients.
  rng = np.random.default_rng(8)
  sv, tris = random_mesh(rng, batch=2, layers=2, per_kind=(10, 20, 1))
  r = _raster(sv, tris)
  ids = np.asarray(r.triangle_id)
  corners = np.stack([np.asarray(c) for c in r.corner_ids], -1)
  covered = ids >= 0
  np.testing.assert_array_equal(corners[covered], tris[ids[covered]])
  assert corners.min() >= 0 and corners.max() < sv.shape[1]
  plain = R.Raster(r.triangle_id, r.barycentrics, r.depth, r.mask)
  colours = jnp.asarray(rng.uniform(size=(2, sv.shape[1], 3)).astype(np.float32))
  value = lambda raster, c: jnp.sum(R.interpolate(c, raster, tris) ** 2)
  for a, b in zip(jax.value_and_grad(value, 1)(r, colours),
                  jax.value_and_grad(value, 1)(plain, colours)):
    np.testing.assert_allclose(a, b, rtol=1e-6)

# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

def test_gradients_match_finite_differences():
  rng = np.random.default_rng(4)
  # A perspective-looking patch: a grid of normal-size triangles with varying depth.
  gx, gy = np.meshgrid(np.linspace(4, 44, 6), np.linspace(4, 36, 5))
  xy = np.stack([gx.ravel(), gy.ravel()], 1) + rng.normal(0, 0.7, (30, 2))
  z = 3 + 0.05 * xy[:, :1] + rng.uniform(0, 0.5, (30, 1))
  sv = np.concatenate([xy, z], 1)[None].astype(np.float32)
  tris = []
  for r_ in range(4):
    for c in range(5):
      a = r_ * 6 + c
      tris += [[a, a + 1, a + 7], [a, a + 7, a + 6]]
  tris = np.asarray(tris, np.int32)
  colours = rng.uniform(size=(1, 30, 3)).astype(np.float32)
  weights = rng.normal(size=(1, H, W, 3)).astype(np.float32)
  ids = R.visible_triangles(sv, tris, (H, W))

  @jax.jit
  def loss(s, c):
    bary, depth = R.barycentrics(s, tris, ids)
    raster = R.Raster(ids, bary, depth, (ids >= 0).astype(jnp.float32))
    img = R.interpolate(c, raster, tris)
    return jnp.sum(img * weights) + 0.1 * jnp.sum(depth * weights[..., 0])

  g_sv, g_col = jax.grad(loss, (0, 1))(sv, colours)
  eps = np.float32(1e-2)
  for v in [0, 7, 14, 22]:
    for c in range(3):
      d = np.zeros_like(sv)
      d[0, v, c] = eps
      fd = (loss(sv + d, colours) - loss(sv - d, colours)) / (2 * eps)
      np.testing.assert_allclose(g_sv[0, v, c], fd, rtol=2e-2, atol=2e-2)
  for v in [3, 15]:
    d = np.zeros_like(colours)
    d[0, v, 1] = 1.0
    fd = (loss(sv, colours + d) - loss(sv, colours - d)) / 2
    np.testing.assert_allclose(g_col[0, v, 1], fd, rtol=1e-4, atol=1e-3)
  assert np.abs(np.asarray(g_sv)[..., 2]).max() > 0  # depth gets gradients too


def _square(offset_x=0.0):
  """A 16 x 12 px square (two triangles) whose right edge is at x = 30.3 + offset_x."""
  sv = np.array([[[14.3, 10.2, 3], [30.3 + offset_x, 10.2, 3], [30.3 + offset_x, 22.2, 3],
                  [14.3, 22.2, 3]]], np.float32)
  return pad(sv, np.array([[0, 2, 1], [0, 3, 2]], np.int32))


def test_soft_silhouette_tracks_the_outline():
  sv, tris = _square()

  # The raster (visibility) is not differentiable: compute it outside the gradient.
  coverage = jax.jit(lambda s, r: jnp.sum(R.soft_silhouette(r, s, tris)))
  raster = _raster(sv, tris)

  # Soft coverage is close to the true area (16 x 12 = 192 px).
  assert abs(float(coverage(sv, raster)) - 192.0) < 1.0  # corner pixels are not box-filtered
  grad = np.asarray(jax.jit(jax.grad(coverage))(sv, raster))
  # Moving the right edge outward by d adds d * 12 px of area.
  right = grad[0, [1, 2], 0].sum()
  left = grad[0, [0, 3], 0].sum()
  assert 10.0 < right < 14.0 and -14.0 < left < -10.0
  d = 0.1  # no pixel centre crosses the edge
  moved, _ = _square(d)
  fd = (float(coverage(moved, _raster(moved, tris))) - float(coverage(sv, raster))) / d
  assert fd > 0
  np.testing.assert_allclose(right, fd, rtol=0.05)
  # Moving the bottom edge down adds 16 px of area per pixel.
  np.testing.assert_allclose(grad[0, [2, 3], 1].sum(), 16.0, rtol=0.15)
  # Only x, y of the outline corners get gradients, never depth or padding vertices.
  assert np.all(np.isfinite(grad))
  assert np.all(grad[..., 2] == 0) and np.all(grad[0, 4:] == 0)


# Silhouette gradients against a supersampled render: a tilted ellipse (one flat sheet,
# fully inside the image, no occlusion, so the reference is well defined), finely or coarsely
# tessellated, at 8 sub-pixel placements. Loss: sum(soft_silhouette * a smooth weight); its
# gradient with respect to translation x, y, an in-plane rotation and a scale against the
# least-squares slope of the same sum over a hard mask rendered with 8 x 8 samples per pixel,
# over offsets of +-0.75 px of outline motion.

_ELLIPSE_CENTRE = (23.37, 19.71)  # px, in the W x H = 48 x 40 image
_ELLIPSE_AXES = (14.2, 10.3)  # semi-axes, px
_ELLIPSE_TILT = 0.3  # rad
_YY, _XX = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
# A smooth weight that varies along the whole outline, so that no gradient is zero by symmetry.
_OUTLINE_WEIGHT = (1.0 + 0.5 * np.sin(0.23 * _XX + 0.4) + 0.4 * np.cos(0.19 * _YY - 0.3)
                   + 0.3 * np.sin(0.11 * (_XX + _YY))).astype(np.float32)


def _disc_mesh(radii, per_ring):
  """The unit disc as a fan around its centre and strips between rings of points.

  Args:
    radii: ring radii, increasing, the last 1; per_ring: points per ring (odd rings are
      turned by half a step).

  Returns:
    points: (N, 2) float64, N = 1 + len(radii) per_ring (the centre first).
    triangles: (T, 3) int32, T = per_ring (2 len(radii) - 1), all clockwise on screen
      (negative signed area: front faces), consistently oriented.
  """
  m = per_ring
  points = [np.zeros((1, 2))]
  for k, r in enumerate(radii):
    a = 2 * np.pi * (np.arange(m) + 0.5 * (k % 2)) / m
    points.append(r * np.stack([np.cos(a), np.sin(a)], 1))
  ring = lambda k, j: 1 + k * m + (np.asarray(j) % m)
  j = np.arange(m)
  tris = [np.stack([np.zeros(m, int), ring(0, j), ring(0, j + 1)], 1)]
  for k in range(1, len(radii)):
    if k % 2:  # the outer ring is turned forward: its point j lies between inner j and j + 1
      tris += [np.stack([ring(k - 1, j), ring(k, j), ring(k - 1, j + 1)], 1),
               np.stack([ring(k - 1, j + 1), ring(k, j), ring(k, j + 1)], 1)]
    else:  # the inner ring is turned forward
      tris += [np.stack([ring(k - 1, j), ring(k, j), ring(k, j + 1)], 1),
               np.stack([ring(k - 1, j), ring(k, j + 1), ring(k - 1, j + 1)], 1)]
  points, tris = np.concatenate(points), np.concatenate(tris).astype(np.int32)
  x, y = points[tris, 0], points[tris, 1]
  area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
  return points, np.where((area > 0)[:, None], tris[:, ::-1], tris)


def _ellipse_mesh(radii, per_ring):
  """(N, 2) float32 pixel offsets of the tilted ellipse's points from its centre, and its
  (T, 3) int32 triangles, padded to the fine mesh's shape (one compilation for both tests)."""
  points, tris = _disc_mesh(radii, per_ring)
  c, s = np.cos(_ELLIPSE_TILT), np.sin(_ELLIPSE_TILT)
  offsets = (points * _ELLIPSE_AXES) @ np.array([[c, s], [-s, c]])
  sv, tris = pad(np.concatenate([offsets, np.zeros((len(offsets), 1))], 1)[None], tris,
                 1 + 7 * 160, 13 * 160)
  return sv[0, :, :2], tris


def _placed(offsets, params):
  """Screen vertices of the ellipse moved by `params`.

  Args:
    offsets: (N, 2) float32 from `_ellipse_mesh`.
    params: (K, 4) float32 (tx px, ty px, in-plane rotation rad, scale - 1) about the centre.

  Returns:
    (K, N, 3) float32 screen vertices at depth 3.
  """
  tx, ty, turn, scale = (params[:, i, None] for i in range(4))
  c, s = jnp.cos(turn), jnp.sin(turn)
  ox, oy = offsets[None, :, 0], offsets[None, :, 1]
  x = _ELLIPSE_CENTRE[0] + tx + (1 + scale) * (c * ox - s * oy)
  y = _ELLIPSE_CENTRE[1] + ty + (1 + scale) * (s * ox + c * oy)
  return jnp.stack([x, y, jnp.full_like(x, 3.0)], -1)


@jax.jit
def _weighted_coverage_and_grad(offsets, tris, params):
  """sum(soft_silhouette * _OUTLINE_WEIGHT) of the ellipse moved by params (4,), and its
  gradient (4,) with respect to params."""
  def coverage(params):
    sv = _placed(offsets, params[None])
    raster = R.rasterize(jax.lax.stop_gradient(sv), tris, (H, W), cull_backfaces=True)
    return jnp.sum(R.soft_silhouette(raster, sv, tris) * _OUTLINE_WEIGHT)
  return jax.value_and_grad(coverage)(params)


_SUPERSAMPLE = 8


@jax.jit
def _supersampled_weighted_coverage(offsets, tris, params):
  """(K,) sum(coverage * _OUTLINE_WEIGHT) for params (K, 4), with the coverage of a hard
  mask rendered with 8 x 8 samples per pixel (no antialiasing) and box-filtered."""
  f = _SUPERSAMPLE
  sv = _placed(offsets, params) * jnp.array([f, f, 1.0])
  raster = R.rasterize(sv, tris, (f * H, f * W), cull_backfaces=True)
  coverage = raster.mask.reshape(-1, H, f, W, f).mean((2, 4))
  return jnp.sum(coverage * _OUTLINE_WEIGHT, (1, 2))


def _ellipse_placements(count=8):
  """(count, 4) float32 params: sub-pixel shifts (+-1 px), turns (+-0.2) and scalings (+-5%)
  of the ellipse, so that its outline meets the pixel grid differently each time."""
  rng = np.random.default_rng(1)
  return np.stack([rng.uniform(-1, 1, count), rng.uniform(-1, 1, count),
                   rng.uniform(-0.2, 0.2, count), rng.uniform(-0.05, 0.05, count)],
                  1).astype(np.float32)


def _antialiased_and_supersampled(offsets, tris, span=0.75, steps=9):
  """The weighted coverage and its derivatives at every placement, per pixel of outline
  motion (translation x, y in px; rotation and scale times the longer semi-axis, so that the
  outline's farthest point moves by one pixel).

  Returns:
    antialiased, supersampled: (P, 5) float64, columns (value, d/dtx, d/dty, d/drotation,
    d/dscale): `soft_silhouette` with its analytic gradient, and the 8x supersampled hard
    coverage with the least-squares slopes over `steps` offsets spanning +-span px.
  """
  unit = np.array([1.0, 1.0, 1.0 / max(_ELLIPSE_AXES), 1.0 / max(_ELLIPSE_AXES)])
  moves = np.linspace(-span, span, steps)
  antialiased, supersampled = [], []
  for base in _ellipse_placements():
    value, grad = _weighted_coverage_and_grad(offsets, tris, base)
    antialiased.append([float(value), *(np.asarray(grad) * unit)])
    params = np.tile(base, (4, steps, 1))
    for i in range(4):
      params[i, :, i] += moves * unit[i]
    values = np.asarray(_supersampled_weighted_coverage(offsets, tris, params.reshape(-1, 4)),
                        np.float64).reshape(4, steps)
    supersampled.append([values[0, steps // 2],
                         *(np.polyfit(moves, values[i], 1)[0] for i in range(4))])
  return np.asarray(antialiased), np.asarray(supersampled)


# Measured at the 8 placements (antialiased - supersampled; derivatives per pixel of outline
# motion, means of |supersampled| 7.7 / 6.0 / 2.6 / 61.2 for tx / ty / rotation / scale on the
# fine mesh, 9.4 / 5.6 / 2.1 / 49.5 on the coarse one):
#   fine, 7 rings of 160 points (2,080 triangles; the outer strip 0.15-0.2 px wide, its edges
#     0.4-0.55 px long, so that outline pixels lie in interior triangles, as on the ICT face
#     at 48-224 px): value within 0.2%; largest |error| 1.19 / 2.09 / 0.59 / 1.26, mean
#     error 0.17 / -0.27 / 0.06 / 0.38.
#   coarse, a 7-triangle fan: value within 0.1%; largest |error| 1.20 / 1.04 / 1.24 / 0.69,
#     mean 0.00 / 0.02 / 0.18 / 0.15.
# The per-placement error is the pixel-pair approximation where the outline's direction passes
# 45 degrees (the ellipse) or turns at a corner (the fan): there its crossings move from the
# horizontal to the vertical pairs, an error of about one pixel times the weight at each such
# point, of either sign; it averages out over placements. With main's rule before the
# silhouette-edge search (the first edge of the pixel's own triangle that the pair's segment
# leaves through) the fine mesh gives value -7.8% to -11.2%, largest |error| 10.8 / 8.7 / 4.8
# / 18.4, mean -0.54 / 1.73 / 1.14 / -14.8 (scale -24%); the coarse fan value -0.4% to
# -0.9%, largest 2.0 / 3.1 / 2.4 / 4.1, mean -0.03 / -1.09 / -0.71 / -2.67 (corners lost
# where a spoke is crossed first). Both fail every bound below.
@pytest.mark.parametrize("mesh", ["fine", "coarse"])
def test_silhouette_gradients_of_an_ellipse_match_a_supersampled_render(mesh):
  rings = {"fine": ((0.35, 0.65, 0.85, 0.93, 0.97, 0.985, 1.0), 160), "coarse": ((1.0,), 7)}
  offsets, tris = _ellipse_mesh(*rings[mesh])
  antialiased, supersampled = _antialiased_and_supersampled(offsets, tris)
  error = antialiased - supersampled
  np.testing.assert_allclose(antialiased[:, 0], supersampled[:, 0], rtol=5e-3)
  assert np.abs(error[:, 1:]).max() < 3.0, error[:, 1:]
  assert np.abs(error[:, 1:].mean(0)).max() < 0.8, error[:, 1:].mean(0)
  assert supersampled[:, 1:].min() > 1.0  # no derivative is zero by symmetry


@jax.jit
def _occluding_image_grad(offsets, tris, params):
  """(4,) gradient with respect to params of sum(antialiased image * _OUTLINE_WEIGHT): the
  ellipse (colour 1) moved by params, in front of a sheet (colour 0) that covers the image."""
  def image_sum(params):
    front = _placed(offsets, params[None])
    back = jnp.array([[[-5.0, -5.0, 6.0], [W + 5.0, -5.0, 6.0], [W + 5.0, H + 5.0, 6.0],
                       [-5.0, H + 5.0, 6.0]]])
    sv = jnp.concatenate([front, back], 1)
    n = offsets.shape[0]
    both = jnp.concatenate([tris, n + jnp.array([[0, 2, 1], [0, 3, 2]], jnp.int32)])
    raster = R.rasterize(jax.lax.stop_gradient(sv), both, (H, W), cull_backfaces=True)
    colours = jnp.concatenate([jnp.ones((1, n, 1)), jnp.zeros((1, 4, 1))], 1)
    image = R.interpolate(colours, raster, both)
    return jnp.sum(R.antialias(image, raster, sv, both)[0, ..., 0] * _OUTLINE_WEIGHT)
  return jax.grad(image_sum)(params)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "antialias blends only pairs of a covered and an uncovered pixel: an occlusion boundary "
    "inside the covered region (here the ellipse in front of a sheet that fills the image; on "
    "a face the nose over the cheek, the eyelids) is not antialiased, so the image gets no "
    "gradient from its motion. Measured at placement 0 of the fine ellipse: analytic 0 / 0 / "
    "0 / 0 for tx / ty / rotation / scale against the 8x supersampled 5.72 / 7.01 / 3.01 / "
    "65.62 (the ellipse's own coverage slopes)"))
def test_image_gradient_at_an_occlusion_boundary_matches_a_supersampled_render():
  offsets, tris = _ellipse_mesh((0.35, 0.65, 0.85, 0.93, 0.97, 0.985, 1.0), 160)
  base = _ellipse_placements()[0]
  unit = np.array([1.0, 1.0, 1.0 / max(_ELLIPSE_AXES), 1.0 / max(_ELLIPSE_AXES)])
  analytic = np.asarray(_occluding_image_grad(offsets, tris, base)) * unit
  # The 8x supersampled image is the ellipse's coverage (colour 1 over 0): its slopes.
  moves = np.linspace(-0.75, 0.75, 9)
  params = np.tile(base, (4, 9, 1))
  for i in range(4):
    params[i, :, i] += moves * unit[i]
  values = np.asarray(_supersampled_weighted_coverage(offsets, tris, params.reshape(-1, 4)),
                      np.float64).reshape(4, 9)
  supersampled = np.array([np.polyfit(moves, values[i], 1)[0] for i in range(4)])
  np.testing.assert_allclose(analytic, supersampled, rtol=0.1)


def test_antialias_sparse_and_dense_paths_agree(monkeypatch):
  # Many small triangles over a background: a long, ragged outline (with holes).
  rng = np.random.default_rng(5)
  sv, tris = random_mesh(rng, batch=2, layers=2, per_kind=(30, 40, 0))
  raster = _raster(jnp.asarray(sv), jnp.asarray(tris), (H, W))
  image = rng.uniform(size=(2, H, W, 3)).astype(np.float32)
  weights = rng.normal(size=(2, H, W, 3)).astype(np.float32)
  count = int(R._outline_pixels(raster.triangle_id >= 0, 1)[1])
  assert count > 100  # a real outline, and more pixels than a capacity of 1 holds

  def run(share):
    monkeypatch.setattr(R, "_OUTLINE_SHARE", share)
    # Fresh functions: the share is read at trace time.
    @jax.jit  # value and gradients in one compiled function per path
    def value_and_grads(im, s):
      value, vjp = jax.vjp(lambda im, s: R.antialias(im, raster, s, tris), im, s)
      return (value,) + vjp(weights)

    return tuple(np.asarray(a) for a in value_and_grads(image, sv))

  sparse = run(1)  # capacity = every pixel: always the list path
  dense = run(10**9)  # capacity 1 < count: the dense fallback
  assert np.abs(sparse[0] - image).max() > 0.05  # the outline was blended
  assert np.abs(sparse[2][..., :2]).max() > 0.1  # and moves with the vertices
  for a, b in zip(sparse, dense):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_outline_search_in_chunks_matches_one_pass(monkeypatch):
  # Silhouette half-edges are searched in chunks of 1/16 of the half-edges. A 7-triangle fan
  # (7 silhouette and 14 interior half-edges) and 21 separate random triangles (silhouette
  # edges only): 70 of 84 half-edges per image are silhouettes, so the default share (5 per
  # chunk) needs 14 chunks, a share of 10**9 one chunk per edge; both must give the
  # crossings of one pass over all half-edges. Before the fix, later chunks also picked up
  # interior half-edges (their slot and negative indices collided with the chunk's first
  # lane): 38 of the 15,360 keys differed, and a coarse fan lost two outline edges.
  rng = np.random.default_rng(12)
  sv, tris = random_mesh(rng, batch=2, layers=1, per_kind=(8, 12, 1))
  points, fan = _disc_mesh((1.0,), 7)
  fan_sv = np.concatenate([points * 9.0 + [20.3, 17.6], np.full((8, 1), 1.5)], 1)
  sv = np.concatenate([np.broadcast_to(fan_sv, (2, 8, 3)), sv], 1).astype(np.float32)
  tris = np.concatenate([fan, tris + 8]).astype(np.int32)
  twins = R.half_edge_twins(tris)
  assert (np.asarray(twins) >= 0).sum() == 14

  def run(share):
    monkeypatch.setattr(R, "_SILHOUETTE_SHARE", share)
    hits = jax.jit(lambda s: R._outline_hits(s, jnp.asarray(tris), twins, H, W, False, 1e-3))
    return np.asarray(hits(jnp.asarray(sv)))  # a fresh trace: the share is read there

  one_pass = run(1)
  assert (one_pass >= 0).sum() > 300, (one_pass >= 0).sum()  # measured 626
  np.testing.assert_array_equal(run(16), one_pass)
  np.testing.assert_array_equal(run(10**9), one_pass)


def test_half_edge_twins_concrete_and_traced_agree():
  # The ellipse mesh, one triangle wound the wrong way, a degenerate one and a non-manifold
  # edge: NumPy (concrete triangles), the one-key sort (traced, N <= 65535) and the
  # three-key sort (traced, larger N) give the same twins.
  _, tris = _disc_mesh((0.5, 1.0), 12)
  tris = np.concatenate([tris, [[1, 2, 3], [5, 5, 6], [0, 1, 14]]]).astype(np.int32)
  twins = np.asarray(R.half_edge_twins(tris))
  for n in (tris.max() + 1, 70000):
    traced = jax.jit(lambda t, n=n: R.half_edge_twins(t, n))(jnp.asarray(tris))
    np.testing.assert_array_equal(np.asarray(traced), twins)
  u, v = tris[:, [1, 2, 0]].reshape(-1), tris[:, [2, 0, 1]].reshape(-1)
  has = twins >= 0
  np.testing.assert_array_equal(u[twins[has]], v[has])  # a twin runs the other way
  np.testing.assert_array_equal(v[twins[has]], u[has])
  assert not has[3 * 37 + 2]  # the degenerate edge 5 -> 5
  assert has.sum() > 90 and (~has).sum() > 10, has.sum()  # measured 101 and 16


def test_batched_derivatives_match_single_images_in_both_modes():
  # Derivatives of barycentrics / interpolate run image by image (custom JVP): a batch of two
  # must give each image's own gradient, and forward mode must agree with reverse mode.
  rng = np.random.default_rng(11)
  sv, tris = random_mesh(rng, batch=2, layers=2, per_kind=(10, 20, 1))
  colours = rng.uniform(size=(2, sv.shape[1], 3)).astype(np.float32)
  weights = rng.normal(size=(2, H, W, 3)).astype(np.float32)
  ids = R.visible_triangles(sv, tris, (H, W))

  def loss(s, c, ids, w):
    bary, depth = R.barycentrics(s, tris, ids)
    raster = R.Raster(ids, bary, depth, (ids >= 0).astype(jnp.float32))
    return jnp.sum(R.interpolate(c, raster, tris) * w) + 0.1 * jnp.sum(depth * w[..., 0])

  grad = jax.jit(jax.grad(loss, (0, 1)))
  g_sv, g_col = grad(sv, colours, ids, weights)
  for i in range(2):
    one = grad(sv[i:i + 1], colours[i:i + 1], ids[i:i + 1], weights[i:i + 1])
    np.testing.assert_allclose(g_sv[i:i + 1], one[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_col[i:i + 1], one[1], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(g_sv)).max() > 0 and np.abs(np.asarray(g_col)).max() > 0
  d_sv = rng.normal(size=sv.shape).astype(np.float32)
  d_col = rng.normal(size=colours.shape).astype(np.float32)
  _, forward = jax.jvp(lambda s, c: loss(s, c, ids, weights), (sv, colours), (d_sv, d_col))
  reverse = np.sum(np.asarray(g_sv) * d_sv) + np.sum(np.asarray(g_col) * d_col)
  np.testing.assert_allclose(float(forward), reverse, rtol=1e-4)


def test_vmap_over_visibility_runs_the_unbatched_z_buffer():
  # vmap folds its axis into the images (custom batching rule): every vmapped layout must give
  # bit-identical ids to the plain call, and gradients through a vmapped rasterize must equal
  # the batched ones (the rule must not get in the way of autodiff).
  rng = np.random.default_rng(12)
  sv, tris = random_mesh(rng, batch=4, layers=2, per_kind=(15, 15, 2))
  want = np.asarray(R.visible_triangles(sv, tris, (H, W)))
  assert (want >= 0).mean() > 0.3
  vis = lambda s, t: R.visible_triangles(s, t, (H, W))
  got = jax.jit(jax.vmap(vis, in_axes=(0, None)))(sv.reshape(2, 2, *sv.shape[1:]), tris)
  np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), want)
  nested = jax.vmap(jax.vmap(vis, in_axes=(0, None)), in_axes=(0, None))
  got = nested(sv.reshape(2, 2, 1, *sv.shape[1:]), tris)
  np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), want)
  # Batched triangles (a different topology per element): reversing the triangle order maps
  # triangle i to T-1-i, and ties between equal depths can only move to the other id.
  both = np.stack([tris, tris[::-1]])
  got = np.asarray(jax.vmap(vis, in_axes=(None, 0))(sv[:1], both))
  np.testing.assert_array_equal(got[0], want[:1])
  t = len(tris)
  np.testing.assert_array_equal(got[1] >= 0, want[:1] >= 0)
  flipped = np.where(got[1] >= 0, t - 1 - got[1], -1)
  assert (flipped == want[:1]).mean() > 0.99
  # Both arguments batched.
  got = np.asarray(jax.vmap(vis)(sv[:2, None], both))
  np.testing.assert_array_equal(got[0, 0], want[0])

  colours = rng.uniform(size=sv.shape).astype(np.float32)

  def loss(s, c):
    r = R.rasterize(s, tris, (H, W))
    return jnp.sum(R.interpolate(c, r, tris) ** 2)

  batched = jax.grad(loss, (0, 1))(sv, colours)
  mapped = jax.vmap(jax.grad(loss, (0, 1)))(sv[:, None], colours[:, None])
  for b_, m_ in zip(batched, mapped):
    assert np.abs(np.asarray(b_)).max() > 0
    np.testing.assert_allclose(np.asarray(m_)[:, 0], np.asarray(b_), rtol=1e-5, atol=1e-5)
  # Forward mode under vmap, with NumPy attributes closed over (they are indexed by traced
  # corner ids inside the JVP).
  direction = rng.normal(size=sv.shape).astype(np.float32)
  forward = lambda s, d: jax.jvp(lambda s_: loss(s_, colours[:1]), (s,), (d,))[1]
  mapped = jax.vmap(forward)(sv[:, None], direction[:, None])
  want = [forward(sv[i:i + 1], direction[i:i + 1]) for i in range(len(sv))]
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(want), rtol=1e-4, atol=1e-4)
