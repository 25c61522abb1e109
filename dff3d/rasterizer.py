"""Triangle rasterization in jax.numpy: exact z-buffer visibility, differentiable barycentrics.

Conventions (see BUILD_NOTES.md): images are NHWC; pixel (row i, column j) covers
`[j, j+1) x [i, i+1)` and is sampled at its centre `(j + 0.5, i + 0.5)`; screen vertices are
`(B, N, 3)` = `(x_px, y_px, depth)` with x right, y down and depth positive in front of the
camera (the camera-space distance `-Z`, e.g. centimetres for the ICT model).

Method (in the style of Genova et al. 2018, "Unsupervised training for 3D morphable model
regression"):

1. Visibility (`visible_triangles`, not differentiable). A pixel centre is covered by a triangle
   when all three edge functions, evaluated at the centre, are >= 0 after orienting them by the
   sign of the triangle's area (inclusive on the edges, so a pixel centre on a shared edge is
   covered by both triangles and decided by the depth test). The visible triangle is the covered
   one with the largest `1 / depth` (perspective-correct: `1 / depth` is interpolated linearly in
   screen space); equal `1 / depth` in float32 goes to the lower triangle id. It is an exact
   z-buffer in float32, resolved with two scatters into one buffer per image: a scatter-max of
   `1 / depth`, then a scatter-min of the triangle id over the fragments that equal the maximum
   (so surfaces closer than float32 rounding of `1 / depth` count as ties).
   Fragments are enumerated per triangle from its pixel bounding box (clipped to the image);
   the triangles are listed (`_compact`, a bit-packed stream compaction) by box size:
   - small (at most 2 x 2 pixel centres; on a dense face mesh at 224 px almost all drawn
     triangles): a fixed 2 x 2 candidate window each;
   - medium (at most 4 x 4): a fixed 4 x 4 window each;
   - every other triangle, of any size, by 4 x 4 pixel blocks of its bounding box. These are
     listed with prefix sums and processed in a `lax.while_loop`, `_BLOCKS_PER_STEP` blocks per
     step, until all are done.
   The small and medium lists have static capacities (a share of the triangles); triangles
   that do not fit move on to the next path, so there is no cap: a triangle covering the
   whole image, or a mesh of only small triangles, is exact (just slower).
   Images are rasterized one after the other (`lax.map`) so that each step's working set stays
   in cache.
2. Barycentrics (`barycentrics`, differentiable). With the triangle ids fixed (stop-gradient),
   the perspective-correct barycentrics and the depth of every covered pixel are recomputed from
   the gathered screen vertices, so gradients reach x, y and depth of the three vertices of the
   visible triangle. `interpolate` then carries gradients to any per-vertex attribute. The
   visible triangles' corner vertex ids are computed once (`Raster.corner_ids`) and shared.
   Values are computed for the whole batch; derivatives image by image. For losses over a
   batch, `dff3d.imagewise.per_image_losses` runs the whole per-image pipeline (rasterizer,
   compositing, loss and gradient) image by image, which keeps each image's per-pixel planes
   in cache: on a CPU at 224 px its per-image time at batch 16 matches batch 1, where the
   batched calls take 1.2-1.5x.
3. Silhouettes (`antialias`, `soft_silhouette`, differentiable). The z-buffer alone gives no
   gradient for moving the outline. `antialias` is an analytic edge antialiasing in the manner of
   nvdiffrast's `antialias` (Laine et al. 2020), restricted to face-against-background
   boundaries: for every pair of 4-neighbour pixels with one covered and one uncovered pixel,
   the point where the segment between the two pixel centres leaves the covered region for the
   last time is found analytically; the pixel on the side of the crossing is blended towards its
   neighbour by the fraction of the pixel (a 1-pixel box filter across the edge) that lies
   beyond the edge. The crossing lies on a silhouette edge: an edge of a drawn triangle with no
   drawn neighbour of the same orientation across it (triangle adjacency: `half_edge_twins`).
   Silhouette edges are listed and every crossing of one with a pixel-pair segment is recorded
   for its pair (a scatter-max ordered by the position along the segment), so the crossing is
   on the outline of the whole drawn mesh, not on an edge of the covered pixel's own triangle:
   on a dense mesh the outline triangles are much smaller than a pixel, and the outline is
   often formed by another sheet of the mesh behind the pixel's (a cheek's contour in front of
   the ear). Only the outline pixels are blended (listed by `_compact`, one
   gather-blend-scatter over them) unless they exceed 1/16 of the image, where a dense path
   over every pixel gives the same result. The crossed edge is chosen without gradients; the
   crossing position moves with that edge's two vertices, so the blended image has a gradient
   with respect to vertex x, y at outline pixels (reverse mode only: `antialias` has a custom
   VJP, so `jax.jvp` / `jacfwd` through it are not supported). For a straight edge moving by
   `d` pixels along its normal, the summed coverage changes by `d` per pixel of edge length, as
   the true area does (the four corner pixels of a polygon are not box-filtered in 2D, a
   sub-pixel error). Horizontal pairs handle edges that are closer to vertical and vertical
   pairs the others, so no edge counts twice.

Winding and culling: a triangle that is counter-clockwise as seen by the viewer in a y-up frame
(the front faces of the morphable models) is clockwise in screen space, because screen y points
down; its screen-space signed area `(x1 - x0) (y2 - y0) - (x2 - x0) (y1 - y0)` is negative. With
`cull_backfaces=True` only triangles with negative screen area are drawn.

Limits:
- No near-plane clipping: a triangle with any vertex at `depth <= near` is dropped whole.
  Vertices far outside the image are used as they are (no guard band), so float32 precision of
  the edge functions degrades for vertices at very large pixel coordinates.
- Zero-area (degenerate) triangles, including those collapsed to a line or a point, are never
  drawn. Non-finite vertices are not supported.
- Visibility is not differentiable (as in Genova et al.); outline gradients come only from
  `antialias` / `soft_silhouette`, and only at face/background boundaries, not at occlusion
  boundaries inside the covered region, nor where the outline is within half a pixel of the
  image border (no neighbour beyond it), nor for features thinner than a pixel between two
  pixel centres (a slit or spike that covers or uncovers no pixel centre).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Small-triangle path: candidate window per triangle (pixel centres per side); the medium
# path uses a _BLOCK x _BLOCK window. List capacities: at most 1 / _SMALL_SHARE of the
# triangles take the small path and 1 / _MEDIUM_SHARE the medium path (overflow moves on to
# the next path). A face mesh with back faces culled has ~45% small triangles at 224 px.
# The medium list holds at least one triangle per _MEDIUM_PIXELS pixels of the image: a
# coarse mesh filling a crop (the ICT face at 224 px: ~6,000 of its 18,460 triangles are
# medium) would otherwise spill most of them into the slower block loop, while a dense mesh
# (Basel-size: ~2,000 of 73,840) needs only its share.
_SMALL = 2
_SMALL_SHARE = 2
_MEDIUM_SHARE = 16
_MEDIUM_PIXELS = 8
# Large-triangle path: block side in pixels; triangles per window and blocks per loop step.
_BLOCK = 4
_WINDOW = 2048
_BLOCKS_PER_STEP = 2048
# Dummy scatter slots that absorb rejected fragments (spread to avoid a serial dependency).
_DUMMY_SLOTS = 1024
_INT32_MAX = 2**31 - 1
# Channel sums are unrolled up to this many channels (XLA:CPU reductions over a short minor
# axis are slow).
_UNROLL_CHANNELS = 16


@flax.struct.dataclass
class Raster:
  """Per-pixel rasterization result for a batch of images.

  Attributes:
    triangle_id: (B, H, W) int32, index into `triangles` of the visible triangle, -1 where no
      triangle covers the pixel centre. Not differentiable.
    barycentrics: (B, H, W, 3) float32, perspective-correct barycentric weights of the visible
      triangle's three vertices (sum to 1), zero where uncovered. Differentiable with respect
      to the screen vertices.
    depth: (B, H, W) float32, depth (same units as the input depth) of the visible surface at
      the pixel centre, zero where uncovered. Differentiable.
    mask: (B, H, W) float32, 1 where covered, 0 elsewhere (hard, not differentiable; see
      `soft_silhouette` for a coverage with outline gradients).
    corner_ids: three (B, H, W) int32 planes, the vertex ids of the visible triangle's
      corners (`triangles[triangle_id, k]`); uncovered pixels hold some valid vertex id, so
      mask with `mask`. Computed once by `rasterize` and shared by `interpolate` and
      `antialias`; None in a `Raster` built by hand (they then compute it).
    cull_backfaces, near: static, the `rasterize` arguments the raster was made with: which
      triangles are drawn, whose outline `antialias` finds. A `Raster` built by hand has
      `rasterize`'s defaults.
  """

  triangle_id: jax.Array
  barycentrics: jax.Array
  depth: jax.Array
  mask: jax.Array
  corner_ids: Optional[Tuple[jax.Array, jax.Array, jax.Array]] = None
  cull_backfaces: bool = flax.struct.field(pytree_node=False, default=False)
  near: float = flax.struct.field(pytree_node=False, default=1e-3)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
# Performance notes for XLA:CPU, which shaped this code (see BUILD_NOTES.md, "Rasterizer"):
# per-element values are kept as separate contiguous planes (slicing an (..., 3, 3) gathered
# array makes every consumer re-read it with a stride, and its transpose becomes pad+add
# chains fused into one huge loop); long elementwise chains that feed several consumers are
# computed once with `_once`, because XLA duplicates them into every consumer.


def _once(fn, *args):
  """`fn(*args)`, computed once into memory.

  XLA:CPU fuses cheap elementwise producers into every consumer, which recomputes long
  chains (like the triangle setup) many times; `optimization_barrier` is removed before
  fusion on CPU. Computing `fn` inside one branch of a conditional with a run-time predicate
  makes a fusion boundary without copies. The predicate `(k | 1) != 0` is always true, so
  the other branch (zeros) never runs. Differentiable like any `lax.cond`.
  """
  probe = jax.tree_util.tree_leaves(args)[0].reshape(-1)[:1].astype(jnp.int32)
  probe = jnp.sum(probe)
  shapes = jax.eval_shape(fn, *args)
  zeros = lambda *_: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  return jax.lax.cond((probe | 1) != 0, fn, zeros, *args)


def _coordinate_planes(values):
  """(B, N, C) -> C planes of shape (B*N,)."""
  values = jnp.asarray(values)  # a NumPy array indexed by traced ids (vmap + jvp) would fail
  b, n, c = values.shape
  return [values[..., ch].reshape(b * n) for ch in range(c)]


def _pixel_centres(height, width):
  """(1, 1, W) and (1, H, 1) float32 x and y of the pixel centres."""
  px = jnp.arange(width, dtype=jnp.float32)[None, None, :] + 0.5
  py = jnp.arange(height, dtype=jnp.float32)[None, :, None] + 0.5
  return px, py


def _edges_at(x, y, px, py):
  """Edge vectors and functions of a triangle at points (px, py).

  Edge i runs from corner i+1 to corner i+2 (opposite corner i);
  `e_i(p) = ex (py - ya) - ey (px - xa)`, so `e_i / (e_0 + e_1 + e_2)` is the screen-space
  barycentric of corner i.

  Returns:
    3 tuples `(ex, ey, e_i)`.
  """
  out = []
  for i in range(3):
    xa, ya = x[(i + 1) % 3], y[(i + 1) % 3]
    ex, ey = x[(i + 2) % 3] - xa, y[(i + 2) % 3] - ya
    out.append((ex, ey, ex * (py - ya) - ey * (px - xa)))
  return out


def _compact(flags, capacity):
  """The positions of the set flags, in order (stream compaction).

  The ranks come from a bit-packed prefix count: 32 flags per uint32 word, a prefix sum over
  the words and a population count below each bit. On XLA:CPU this is ~3x faster than a
  prefix sum over the flags (`cumsum` or `associative_scan`) and touches each flag twice.

  Args:
    flags: (n,) bool.
    capacity: static K >= 1.

  Returns:
    index: (K,) int32; slot i < count holds the position of the i-th set flag, the other
      slots hold `i % n` (distinct positions, so that scatters through unused slots do not
      form serial chains on one address).
    count: int32 number of set flags (the list is complete only if count <= K).
    slot: (n,) int32, the rank of each set flag (>= K: did not fit), K for the others.
  """
  return _once(lambda f: _compact_now(f, capacity), flags)


def _compact_now(flags, capacity):
  """`_compact` (without the fusion boundary)."""
  n = flags.shape[0]
  bits = jnp.pad(flags, (0, -n % 32)).reshape(-1, 32).astype(jnp.uint32)
  words = bits[:, 0]
  for i in range(1, 32):
    words = words | (bits[:, i] << i)
  counts = jax.lax.population_count(words).astype(jnp.int32)
  total = jnp.cumsum(counts)
  below = (jnp.uint32(1) << jnp.arange(32, dtype=jnp.uint32)) - jnp.uint32(1)
  rank = (total - counts)[:, None] + jax.lax.population_count(
      words[:, None] & below[None, :]).astype(jnp.int32)
  slot = jnp.where(flags, rank.reshape(-1)[:n], capacity)
  index = (jnp.arange(capacity, dtype=jnp.int32) % n).at[slot].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop")
  return index, total[-1], slot


# ----------------------------------------------------------------------------------------------
# Visibility
# ----------------------------------------------------------------------------------------------

def _triangle_corners(coords, triangles, num_vertices, flat_triangle=None, batch=None):
  """Screen x, y, depth planes of triangle corners.

  Args:
    coords: 3 planes (B*N,) float32 of screen x, y, depth.
    triangles: (T, 3) int32.
    num_vertices: static N.
    flat_triangle: optional (K,) int32 triangle indices `b * T + t`; default all B*T.
    batch: static B (needed when flat_triangle is None).

  Returns:
    [x, y, z], each a list of three (K,) float32 planes, one per corner.
  """
  t = triangles.shape[0]
  if flat_triangle is None:
    rows = _corner_rows([triangles[:, k][None, :] for k in range(3)], batch, num_vertices)
    index = [r.reshape(-1) for r in rows]
  else:
    base = (flat_triangle // t) * num_vertices
    local = flat_triangle % t
    index = [base + triangles[:, k][local] for k in range(3)]
  return [[plane[index[k]] for k in range(3)] for plane in coords]


def _setup(corners, height, width, cull_backfaces, near):
  """Edge functions, 1/depth plane and clipped pixel bounding box of triangles.

  Edge function i at the pixel centre offset (dx, dy) pixels from the bounding-box origin
  centre is `c[i] + a[i] dx + b[i] dy`, oriented so that the inside of the triangle is >= 0;
  1/depth there is `cw + aw dx + bw dy` (perspective-correct: 1/depth is linear in screen
  space). Coefficients are computed relative to the origin pixel centre, which keeps float32
  precision for small triangles.

  Args:
    corners: [x, y, z], three (K,) float32 planes each.
    height, width: static image size.
    cull_backfaces, near: static, see `visible_triangles`.

  Returns:
    dict of (K,) planes: float32 `c, a, b` (tuples of 3), `cw, aw, bw`; int32 `origin`
    (flat index `row * W + column` of the bounding-box origin pixel) and `nx, ny`
    (bounding-box size in pixel centres, 0 when the triangle is not drawn).
  """
  x, y, z = corners
  x0, x1, x2 = x
  y0, y1, y2 = y
  area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
  in_front = (z[0] > near) & (z[1] > near) & (z[2] > near)
  ok = in_front & (area != 0)
  if cull_backfaces:
    ok &= area < 0

  def span(v0, v1, v2, size):
    # Pixel centres k + 0.5 within [min, max], clipped to [0, size).
    lo = jnp.clip(jnp.minimum(jnp.minimum(v0, v1), v2), -2.0, size + 2.0)
    hi = jnp.clip(jnp.maximum(jnp.maximum(v0, v1), v2), -2.0, size + 2.0)
    first = jnp.maximum(jnp.ceil(lo - 0.5), 0.0)
    last = jnp.minimum(jnp.floor(hi - 0.5), size - 1.0)
    count = jnp.where(ok, jnp.maximum(last - first + 1.0, 0.0), 0.0)
    return first, count

  j0, nx = span(x0, x1, x2, width)
  i0, ny = span(y0, y1, y2, height)
  ox, oy = j0 + 0.5, i0 + 0.5
  sign = jnp.where(area < 0, -1.0, 1.0)
  inv_area = 1.0 / jnp.where(area != 0, area, 1.0)
  c, a, b = [], [], []
  cw = aw = bw = 0.0
  for i, (ex, ey, e) in enumerate(_edges_at(x, y, ox, oy)):
    wi = 1.0 / jnp.where(in_front, z[i], 1.0)
    c.append(sign * e)
    a.append(-sign * ey)
    b.append(sign * ex)
    cw = cw + e * wi
    aw = aw - ey * wi
    bw = bw + ex * wi
  return dict(c=tuple(c), a=tuple(a), b=tuple(b), cw=cw * inv_area, aw=aw * inv_area,
              bw=bw * inv_area, origin=(i0 * width + j0).astype(jnp.int32),
              nx=nx.astype(jnp.int32), ny=ny.astype(jnp.int32))


def _fragments(s, dx, dy, image, height, width, num_pixels):
  """Coverage and 1/depth of candidate pixels.

  Args:
    s: `_setup` dict (broadcast against dx, dy).
    dx, dy: int32 offsets of the candidate from the bounding-box origin.
    image: int32 batch index of the triangle (broadcast).
    height, width: static image size.
    num_pixels: static B*H*W.

  Returns:
    inv_depth: float32 perspective-correct 1/depth at the pixel centre.
    pixel: int32 flat index `(image * H + row) * W + column` where covered (inside the
      clipped bounding box and the triangle, edges inclusive), else a dummy index
      `>= num_pixels`.
  """
  fx = dx.astype(jnp.float32)
  fy = dy.astype(jnp.float32)
  covered = (dx < s["nx"]) & (dy < s["ny"])
  for i in range(3):
    covered &= s["c"][i] + s["a"][i] * fx + s["b"][i] * fy >= 0
  inv_depth = s["cw"] + s["aw"] * fx + s["bw"] * fy
  pixel = image * (height * width) + s["origin"] + dy * width + dx
  spread = jnp.arange(covered.size, dtype=jnp.int32).reshape(covered.shape)
  dummy = num_pixels + (spread & (_DUMMY_SLOTS - 1))
  return inv_depth, jnp.where(covered, pixel, dummy)


def _resolve_ids(idbuf, zbuf, inv_depth, pixel, triangle, num_pixels):
  """Scatter-min of the triangle id of the fragments whose 1/depth equals the z-buffer."""
  win = (pixel < num_pixels) & (inv_depth == zbuf[pixel])
  spread = jnp.arange(pixel.size, dtype=jnp.int32).reshape(pixel.shape)
  target = jnp.where(win, pixel, num_pixels + (spread & (_DUMMY_SLOTS - 1)))
  return idbuf.at[target].min(triangle, mode="promise_in_bounds")


def _large_loop(coords, triangles, num_vertices, is_large, height, width, cull_backfaces,
                near, zbuf, idbuf):
  """Both z-buffer passes for the triangles that neither fixed-window list took.

  These triangles (larger than 4 x 4 pixel centres, or overflow of the lists) are compacted
  into a list and walked in windows of `_WINDOW` triangles; a step rasterizes the next
  `_BLOCKS_PER_STEP` blocks of `_BLOCK x _BLOCK` candidate pixels of the window's bounding
  boxes, in order, until all blocks of all these triangles are done (no cap on size or count).
  Phase 0 scatter-maxes 1/depth into `zbuf`; phase 1 scatter-mins the triangle id of the
  fragments equal to the final `zbuf` (the listed triangles' depths are already in `zbuf`).
  Both phases run the same compiled fragment code, so the equality sees bit-identical values.

  Args:
    coords: 3 planes (B*N,) float32 screen x, y, depth.
    triangles: (T, 3) int32; num_vertices: static N.
    is_large: (B*T,) bool.
    height, width, cull_backfaces, near: static.
    zbuf: (B*H*W + dummies,) float32, max of 1/depth so far (0 = empty).
    idbuf: (B*H*W + dummies,) int32, min visible triangle id so far (T = none).

  Returns:
    zbuf, idbuf after both phases.
  """
  g = is_large.shape[0]
  t = triangles.shape[0]
  num_pixels = zbuf.shape[0] - _DUMMY_SLOTS
  blocks_max = -(-height // _BLOCK) * -(-width // _BLOCK)
  window = max(1, min(_WINDOW, _INT32_MAX // blocks_max))
  steps = _BLOCKS_PER_STEP

  order, count, _ = _compact(is_large, g + window)

  k = jnp.arange(window, dtype=jnp.int32)
  ox = jnp.tile(jnp.arange(_BLOCK, dtype=jnp.int32), _BLOCK)
  oy = jnp.repeat(jnp.arange(_BLOCK, dtype=jnp.int32), _BLOCK)
  log_window = max(1, math.ceil(math.log2(window + 1)))

  def setup(tri):
    corners = _triangle_corners(coords, triangles, num_vertices, flat_triangle=tri)
    return _setup(corners, height, width, cull_backfaces, near)

  def blocks_of(s, tri, cursor, start):
    # Block q of the window -> owning triangle (binary search over the block prefix sum)
    # and the block's position in that triangle's bounding box.
    bx = (s["nx"] + _BLOCK - 1) // _BLOCK
    by = (s["ny"] + _BLOCK - 1) // _BLOCK
    blocks = jnp.where(cursor + k < count, bx * by, 0)
    ends = jnp.cumsum(blocks)  # inclusive, at most window * blocks_max < 2**31
    q = start + jnp.arange(steps, dtype=jnp.int32)
    owner = jnp.zeros_like(q)
    for bit in reversed(range(log_window)):
      probe = owner + (1 << bit)
      hit = (probe <= window) & (ends[jnp.minimum(probe, window) - 1] <= q)
      owner = jnp.where(hit, probe, owner)
    owner = jnp.minimum(owner, window - 1)
    local = q - (ends[owner] - blocks[owner])
    per_row = jnp.maximum(bx[owner], 1)
    so = jax.tree_util.tree_map(lambda v: v[owner], s)
    so["nx"] = jnp.where(q < ends[-1], so["nx"], 0)  # past the last block: nothing
    return so, (local % per_row) * _BLOCK, (local // per_row) * _BLOCK, tri[owner], ends

  def fragments(so, cx, cy, gid):
    s2 = jax.tree_util.tree_map(lambda v: v[:, None], so)
    inv_depth, pixel = _fragments(s2, cx[:, None] + ox, cy[:, None] + oy,
                                  (gid // t)[:, None], height, width, num_pixels)
    return inv_depth, pixel, jnp.broadcast_to((gid % t)[:, None], pixel.shape)

  def body(state):
    phase, cursor, start, zbuf, idbuf = state
    tri = jax.lax.dynamic_slice(order, (cursor,), (window,))
    s = _once(setup, tri)
    so, cx, cy, gid, ends = _once(blocks_of, s, tri, cursor, start)
    inv_depth, pixel, tid = _once(fragments, so, cx, cy, gid)

    def depth_pass(bufs):
      zb, ib = bufs
      return zb.at[pixel].max(inv_depth, mode="promise_in_bounds"), ib

    def id_pass(bufs):
      zb, ib = bufs
      return zb, _resolve_ids(ib, zb, inv_depth, pixel, tid, num_pixels)

    zbuf, idbuf = jax.lax.cond(phase == 0, depth_pass, id_pass, (zbuf, idbuf))
    total = ends[-1]
    reached = jnp.minimum(start + steps, total)
    done = jnp.sum((ends <= reached).astype(jnp.int32))
    consumed = jnp.where(done > 0, ends[jnp.maximum(done - 1, 0)], 0)
    cursor = cursor + done
    start = reached - consumed
    finished = cursor >= count
    phase = jnp.where(finished, phase + 1, phase)
    cursor = jnp.where(finished, 0, cursor)
    start = jnp.where(finished, 0, start)
    return phase, cursor, start, zbuf, idbuf

  init = (jnp.where(count > 0, 0, 2).astype(jnp.int32), jnp.int32(0), jnp.int32(0), zbuf, idbuf)
  _, _, _, zbuf, idbuf = jax.lax.while_loop(lambda st: st[0] < 2, body, init)
  return zbuf, idbuf


def _list_fragments(coords, triangles, num_vertices, index, count, size, height, width,
                    cull_backfaces, near, num_pixels):
  """Fragments of a list of triangles, each tested on a fixed size x size window of pixel
  centres at its bounding-box origin (triangles whose box is larger must not be listed).

  Args:
    coords: 3 planes (B*N,) float32; triangles: (T, 3) int32; num_vertices: static N.
    index: (K,) int32 flat triangle indices `b * T + t`; slots >= count are ignored.
    count: int32; size: static window side.
    height, width, cull_backfaces, near: static; num_pixels: static B*H*W.

  Returns:
    inv_depth, pixel, triangle id: (K, size * size) each, see `_fragments`.
  """
  t = triangles.shape[0]

  def setup(index, count):
    corners = _triangle_corners(coords, triangles, num_vertices, flat_triangle=index)
    s = _setup(corners, height, width, cull_backfaces, near)
    s["nx"] = jnp.where(jnp.arange(index.shape[0], dtype=jnp.int32) < count, s["nx"], 0)
    return s

  def fragments(s, index):
    dx = jnp.tile(jnp.arange(size, dtype=jnp.int32), size)
    dy = jnp.repeat(jnp.arange(size, dtype=jnp.int32), size)
    s2 = jax.tree_util.tree_map(lambda v: v[:, None], s)
    inv_depth, pixel = _fragments(s2, dx, dy, (index // t)[:, None], height, width,
                                  num_pixels)
    return inv_depth, pixel, jnp.broadcast_to((index % t)[:, None], pixel.shape)

  return _once(fragments, _once(setup, index, count), index)


def _visible_batch(screen_vertices, triangles, height, width, cull_backfaces, near):
  """`visible_triangles` for all images at once (one scatter buffer for the batch).

  Triangles are sorted into three paths by their clipped pixel bounding box: up to 2 x 2
  pixel centres ("small", a fixed 2 x 2 window each), up to 4 x 4 ("medium", a 4 x 4
  window) and the rest (the block loop, `_large_loop`). The small and medium lists have
  static capacities (`_SMALL_SHARE`, `_MEDIUM_SHARE`, `_MEDIUM_PIXELS`); what does not fit
  goes down a path (small -> medium -> loop), so every triangle is drawn whatever the mesh.

  Args:
    screen_vertices: (B, N, 3) float32, no gradients; triangles: (T, 3) int32 with T > 0.

  Returns:
    (B, H, W) int32, -1 where uncovered.
  """
  b, n, _ = screen_vertices.shape
  t = triangles.shape[0]
  g = b * t
  coords = _coordinate_planes(screen_vertices)
  num_pixels = b * height * width

  def kinds(coords):
    # 0: not drawn, 1: small, 2: medium, 3: large.
    s = _setup(_triangle_corners(coords, triangles, n, batch=b), height, width,
               cull_backfaces, near)
    extent = jnp.maximum(s["nx"], s["ny"])
    drawn = (s["nx"] > 0) & (s["ny"] > 0)
    return jnp.where(drawn, jnp.where(extent <= _SMALL, 1, jnp.where(extent <= _BLOCK, 2, 3)),
                     0)

  kind = _once(kinds, coords)
  small, small_count, small_slot = _compact(kind == 1, max(1, -(-g // _SMALL_SHARE)))
  is_medium = (kind == 2) | ((kind == 1) & (small_slot >= small.shape[0]))
  medium_capacity = min(g, max(1, -(-g // _MEDIUM_SHARE), num_pixels // _MEDIUM_PIXELS))
  medium, medium_count, medium_slot = _compact(is_medium, medium_capacity)
  is_large = (kind == 3) | (is_medium & (medium_slot >= medium.shape[0]))
  lists = [_list_fragments(coords, triangles, n, index, count, size, height, width,
                           cull_backfaces, near, num_pixels)
           for index, count, size in ((small, small_count, _SMALL),
                                      (medium, medium_count, _BLOCK))]

  zbuf = jnp.zeros((num_pixels + _DUMMY_SLOTS,), jnp.float32)
  for inv_depth, pixel, _ in lists:
    zbuf = zbuf.at[pixel].max(inv_depth, mode="promise_in_bounds")
  idbuf = jnp.full((num_pixels + _DUMMY_SLOTS,), t, jnp.int32)
  zbuf, idbuf = _large_loop(coords, triangles, n, is_large, height, width, cull_backfaces,
                            near, zbuf, idbuf)
  for inv_depth, pixel, tid in lists:
    idbuf = _resolve_ids(idbuf, zbuf, inv_depth, pixel, tid, num_pixels)
  ids = idbuf[:num_pixels].reshape(b, height, width)
  return jnp.where(ids == t, -1, ids)


def visible_triangles(screen_vertices, triangles, image_size: Tuple[int, int], *,
                      cull_backfaces: bool = False, near: float = 1e-3):
  """Exact z-buffer: the visible triangle at every pixel centre (not differentiable).

  Images are processed one after the other (`lax.map`), which keeps each step's working set
  in cache; the per-image time does not grow with the batch.

  Args:
    screen_vertices: (B, N, 3) float32 `(x_px, y_px, depth)`; depth > 0 in front of the camera.
    triangles: (T, 3) int32 vertex indices.
    image_size: static `(H, W)` in pixels.
    cull_backfaces: static; if True draw only triangles that are counter-clockwise in a y-up
      view (negative signed area in y-down screen space).
    near: static; triangles with any vertex at `depth <= near` are not drawn.

  Returns:
    (B, H, W) int32 triangle index, -1 where no triangle covers the pixel centre. Ties in
    float32 1/depth go to the lower triangle index.
  """
  height, width = int(image_size[0]), int(image_size[1])
  b = screen_vertices.shape[0]
  if triangles.shape[0] == 0:
    return jnp.full((b, height, width), -1, jnp.int32)
  screen_vertices = jax.lax.stop_gradient(screen_vertices).astype(jnp.float32)
  triangles = jnp.asarray(triangles, jnp.int32)
  return _per_image_zbuffer(height, width, cull_backfaces, near)(screen_vertices, triangles)


@functools.lru_cache(maxsize=None)
def _per_image_zbuffer(height, width, cull_backfaces, near):
  """`(screen_vertices (B, N, 3), triangles (T, 3)) -> (B, H, W)` ids, one image at a time.

  Under `jax.vmap` the mapped axis is folded into the image axis, so each image still runs
  the unbatched code. Without this rule vmap turns the z-buffer's conditionals (`_once`, the
  block loop's phase switch) into selects on both branches; XLA then recomputes 1/depth in
  separately compiled kernels, and the id pass's exact equality with the z-buffer fails on
  some pixels (seen on an Intel host with `JAX_DISABLE_MOST_OPTIMIZATIONS=1`).
  """
  def run(screen_vertices, triangles):
    one = lambda sv: _visible_batch(sv[None], triangles, height, width, cull_backfaces,
                                    near)[0]
    return jax.lax.map(one, screen_vertices)

  zbuffer = jax.custom_batching.custom_vmap(run)

  @zbuffer.def_vmap
  def _rule(axis_size, in_batched, screen_vertices, triangles):
    sv_batched, tri_batched = in_batched
    if not sv_batched:
      screen_vertices = jnp.broadcast_to(screen_vertices, (axis_size,) + screen_vertices.shape)
    if tri_batched:
      return jax.lax.map(lambda a: zbuffer(*a), (screen_vertices, triangles)), True
    v, b = screen_vertices.shape[:2]
    ids = zbuffer(screen_vertices.reshape((v * b,) + screen_vertices.shape[2:]), triangles)
    return ids.reshape((v, b) + ids.shape[1:]), True

  return zbuffer


# ----------------------------------------------------------------------------------------------
# Differentiable part
# ----------------------------------------------------------------------------------------------

def corner_ids(triangles, triangle_id):
  """The vertex ids of each pixel's visible-triangle corners (`Raster.corner_ids`).

  Args:
    triangles: (T, 3) int32.
    triangle_id: (B, H, W) int32 (-1 = none).
  Returns:
    tuple of 3 (B, H, W) int32 planes, `triangles[triangle_id, k]`; an uncovered pixel p
    holds the corners of triangle `p mod T` (valid ids, to be masked).
  """
  triangle_id = jax.lax.stop_gradient(triangle_id)
  # Uncovered pixels read a different triangle each (their values are masked): one shared
  # triangle would make the backward's scatter-adds a serial chain on its three vertices.
  spread = jnp.arange(triangle_id[0].size, dtype=jnp.int32).reshape(triangle_id.shape[1:])

  def gather(triangle_id, triangles):
    safe = jnp.where(triangle_id >= 0, triangle_id, spread % triangles.shape[0])
    return tuple(triangles[:, k][safe] for k in range(3))

  # Materialised once (`_once` probes its first argument, the ids, which are not constant):
  # left to XLA, the gathers were fused into, and recomputed by, every consumer.
  return _once(gather, triangle_id, jnp.asarray(triangles, jnp.int32))


def _pixel_corners(values, corners, channels=None):
  """Per-pixel corner values: out[ch][k] is a (B, H, W) plane of channel ch at corner k.

  Args:
    values: (B, N, C) per-vertex values.
    corners: 3 (B, H, W) int32 vertex-id planes from `corner_ids`.
    channels: optional number of leading channels to use.
  """
  rows = _corner_rows(corners, *values.shape[:2])
  planes = _coordinate_planes(values if channels is None else values[..., :channels])
  return [[plane[rows[k]] for k in range(3)] for plane in planes]


def _corner_rows(corners, batch, num_vertices):
  """Vertex ids of image b (3 arrays with a leading batch axis of B or 1) as rows of the
  flattened (B*N,) per-vertex planes: `id + b * N`."""
  base = jnp.arange(batch, dtype=jnp.int32) * num_vertices
  base = base.reshape((batch,) + (1,) * (jnp.ndim(corners[0]) - 1))
  return [corners[k] + base for k in range(3)]


def _derivatives_per_image(fn, num_diff):
  """`fn` with its derivatives computed one image at a time.

  `fn(*diff, triangle_id, corners)` maps `num_diff` batched float arrays, the batched
  (B, H, W) triangle ids and the 3 (B, H, W) corner vertex-id planes to batched outputs.
  The value is computed for the whole batch; the
  JVP (and so, by JAX's transposition, the VJP) runs image by image in a `lax.map`,
  recomputing that image's forward (`jax.checkpoint`) instead of keeping batch-sized
  intermediates. On a CPU the batched backward is memory-bound once the per-pixel planes of
  all images stop fitting in cache (batch 16 at 224 px: 3.2 MB per plane); per image they
  fit. Forward and reverse mode both work.
  """

  @jax.custom_jvp
  def wrapped(*args):
    return fn(*args)

  @wrapped.defjvp
  def wrapped_jvp(primals, tangents):
    diff, (triangle_id, corners) = primals[:num_diff], primals[num_diff:]

    def one(image):
      values, directions, ids, image_corners = image
      single = lambda *v: fn(*[x[None] for x in v], ids[None],
                             tuple(c[None] for c in image_corners))
      return jax.tree_util.tree_map(lambda x: x[0], jax.jvp(single, values, directions)[1])

    out_tangent = jax.lax.map(jax.checkpoint(one),
                              (diff, tangents[:num_diff], triangle_id, corners))
    return fn(*primals), out_tangent

  return wrapped


_barycentrics_per_image = _derivatives_per_image(
    lambda sv, ids, corners: _barycentrics_batch(sv, ids, corners), 1)
_interpolate_per_image = _derivatives_per_image(
    lambda attributes, bary, ids, corners: _interpolate_batch(attributes, bary, corners), 2)


def barycentrics(screen_vertices, triangles, triangle_id):
  """Perspective-correct barycentrics and depth for fixed visible triangles (differentiable).

  With the triangle ids fixed, the barycentrics are recomputed from the gathered screen
  vertices, so gradients reach x, y and depth of the visible triangles' corners.

  Args:
    screen_vertices: (B, N, 3) float32 `(x_px, y_px, depth)`.
    triangles: (T, 3) int32.
    triangle_id: (B, H, W) int32 from `visible_triangles` (-1 = none); treated as constant.

  Returns:
    bary: (B, H, W, 3) float32 perspective-correct weights (zero where uncovered).
    depth: (B, H, W) float32 depth at the pixel centre (zero where uncovered).
  """
  triangle_id = jax.lax.stop_gradient(triangle_id)
  return _barycentrics_per_image(screen_vertices.astype(jnp.float32), triangle_id,
                                 corner_ids(triangles, triangle_id))


def _barycentrics_batch(screen_vertices, triangle_id, corners):
  """`barycentrics` for all images at once, given the corner vertex ids."""
  _, height, width = triangle_id.shape
  covered = jax.lax.stop_gradient(triangle_id) >= 0
  x, y, z = _pixel_corners(screen_vertices.astype(jnp.float32), corners)
  z = [jnp.where(covered, zk, 1.0) for zk in z]
  px, py = _pixel_centres(height, width)
  e = [edge for _, _, edge in _edges_at(x, y, px, py)]
  area = e[0] + e[1] + e[2]
  inv_area = 1.0 / jnp.where(covered & (area != 0), area, 1.0)
  q = [e[k] * inv_area / z[k] for k in range(3)]  # screen barycentric / depth
  inv_depth = q[0] + q[1] + q[2]
  ok = covered & (inv_depth != 0)
  rcp = 1.0 / jnp.where(ok, inv_depth, 1.0)
  bary = jnp.stack([jnp.where(ok, q[k] * rcp, 0.0) for k in range(3)], axis=-1)
  return bary, jnp.where(ok, rcp, 0.0)


def rasterize(screen_vertices, triangles, image_size: Tuple[int, int], *,
              cull_backfaces: bool = False, near: float = 1e-3) -> Raster:
  """Rasterize a batch of meshes that share one triangle list.

  Args:
    screen_vertices: (B, N, 3) float32 `(x_px, y_px, depth)`, pixel centres at integer + 0.5,
      y down, depth > 0 in front of the camera.
    triangles: (T, 3) int32 vertex indices.
    image_size: static `(H, W)`.
    cull_backfaces: static; draw only faces that are counter-clockwise in a y-up view
      (clockwise, i.e. negative signed area, in y-down screen space).
    near: static; triangles with any vertex at `depth <= near` are dropped (no clipping).

  Returns:
    `Raster` with (B, H, W) fields; barycentrics and depth carry gradients to the screen
    vertices, triangle ids and mask are constants.
  """
  ids = visible_triangles(screen_vertices, triangles, image_size,
                          cull_backfaces=cull_backfaces, near=near)
  corners = corner_ids(triangles, ids)
  bary, depth = _barycentrics_per_image(screen_vertices.astype(jnp.float32), ids, corners)
  return Raster(triangle_id=ids, barycentrics=bary, depth=depth,
                mask=(ids >= 0).astype(jnp.float32), corner_ids=corners,
                cull_backfaces=cull_backfaces, near=near)


def interpolate(attributes, raster: Raster, triangles):
  """Interpolate per-vertex attributes with the raster's perspective-correct barycentrics.

  Args:
    attributes: (B, N, C) per-vertex values (colours, normals, camera-space positions, ...).
      A (N, C) array is broadcast over the batch.
    raster: `Raster` from `rasterize` with the same triangles.
    triangles: (T, 3) int32.

  Returns:
    (B, H, W, C) attributes at the pixel centres, zero where uncovered. Differentiable with
    respect to the attributes and, through the barycentrics, to the screen vertices.
  """
  ids = jax.lax.stop_gradient(raster.triangle_id)
  b = ids.shape[0]
  if attributes.ndim == 2:
    attributes = jnp.broadcast_to(attributes[None], (b,) + attributes.shape)
  return _interpolate_per_image(attributes, raster.barycentrics, ids,
                                _raster_corner_ids(raster, triangles))


def _raster_corner_ids(raster: Raster, triangles):
  """The raster's corner vertex-id planes, computed when it was built by hand."""
  if raster.corner_ids is not None:
    return tuple(jax.lax.stop_gradient(c) for c in raster.corner_ids)
  return corner_ids(triangles, raster.triangle_id)


def _interpolate_batch(attributes, bary, corners):
  """`interpolate` for all images at once, given the corner vertex ids."""
  b, n, c = attributes.shape
  w = [bary[..., k].astype(attributes.dtype) for k in range(3)]
  if c <= _UNROLL_CHANNELS:
    a = _pixel_corners(attributes, corners)
    return jnp.stack([w[0] * ak[0] + w[1] * ak[1] + w[2] * ak[2] for ak in a], axis=-1)
  rows = _corner_rows(corners, b, n)
  table = attributes.reshape(b * n, c)
  return sum(w[k][..., None] * table[rows[k]] for k in range(3))


# ----------------------------------------------------------------------------------------------
# Outline antialiasing
# ----------------------------------------------------------------------------------------------

_DIRECTIONS = ((2, 1), (2, -1), (1, 1), (1, -1))  # (axis of (B, H, W), step): +x, -x, +y, -y


def _shift(a, axis, step):
  """`out[p] = a[p + step along axis]`, zero where p + step is outside."""
  n = a.shape[axis]
  pad = [(0, 0)] * a.ndim
  if step > 0:
    body = jax.lax.slice_in_dim(a, 1, n, axis=axis)
    pad[axis] = (0, 1)
  else:
    body = jax.lax.slice_in_dim(a, 0, n - 1, axis=axis)
    pad[axis] = (1, 0)
  return jnp.pad(body, pad)


def _channel_dot(a, b):
  """(B, H, W) sum over the channels of a * b, unrolled for few channels."""
  c = a.shape[-1]
  if c > _UNROLL_CHANNELS:
    return jnp.sum(a * b, axis=-1)
  out = a[..., 0] * b[..., 0]
  for ch in range(1, c):
    out = out + a[..., ch] * b[..., ch]
  return out


@jax.custom_vjp
def _blend(image, weights):
  """Blend every pixel with its 4 neighbours.

  Args:
    image: (B, H, W, C).
    weights: 4 x (B, H, W), per direction e of `_DIRECTIONS` the weight of the neighbour
      p + e in pixel p.

  Returns:
    (B, H, W, C) `image + sum_e W_e (S_e image - image)` with `S_e a [p] = a[p + e]`.
  """
  out = image
  for (axis, step), w in zip(_DIRECTIONS, weights):
    out = out + w[..., None] * (_shift(image, axis, step) - image)
  return out


def _blend_fwd(image, weights):
  return _blend(image, weights), (image, weights)


def _blend_bwd(res, g):
  image, weights = res
  d_image = g
  d_weights = []
  for (axis, step), w in zip(_DIRECTIONS, weights):
    wg = w[..., None] * g
    d_image = d_image - wg + _shift(wg, axis, -step)
    d_weights.append(_channel_dot(g, _shift(image, axis, step) - image))
  return d_image, tuple(d_weights)


_blend.defvjp(_blend_fwd, _blend_bwd)


def _dense_outline(covered):
  """4 x (B, H, W) bool per direction d of `_DIRECTIONS`: p covered, p + d inside the image
  and not covered."""
  inside = jnp.ones_like(covered)
  return [covered & ~_shift(covered, axis, step) & _shift(inside, axis, step)
          for axis, step in _DIRECTIONS]


# ----------------------------------------------------------------------------------------------
# Mesh adjacency and outline crossings
# ----------------------------------------------------------------------------------------------
# Half-edge h = 3 t + i is edge i of triangle t: from corner i+1 to corner i+2 (opposite
# corner i, as in `_edges_at`).

# XLA:CPU sorts one integer operand ~5x faster than a key with a payload: traced triangles
# of meshes up to this many vertices get one uint32 key per edge.
_SINGLE_KEY_VERTICES = 65535
# Silhouette half-edges are processed in chunks of 1 / _SILHOUETTE_SHARE of all B * 3T
# half-edges (the ICT face: ~2.2% of its half-edges are silhouettes, one chunk).
_SILHOUETTE_SHARE = 16
# Bits of the crossing fraction t in an outline key (see `_outline_hits`), at most.
_T_BITS = 15


def half_edge_twins(triangles, num_vertices=None):
  """Triangle adjacency: the neighbour's half-edge across every half-edge.

  The twin of half-edge h (vertex u -> v of triangle t) is a half-edge v -> u of another
  triangle: the neighbour across that edge in a consistently oriented mesh. Mesh boundary
  edges, edges whose only other triangle runs the same way (inconsistent winding) and
  degenerate edges (u == v) have none. On a non-manifold edge the twin is the largest
  reversed half-edge id (not necessarily mutual).

  Args:
    triangles: (T, 3) int vertex ids. Concrete (NumPy, or a jax array outside a trace) is
      computed with NumPy and cached; traced (e.g. a model passed as a jit argument) with
      jnp: one sort of the 3T edge keys (the ICT face on a 2-core CPU: ~5 ms; pass the
      result to `antialias` to compute it only once).
    num_vertices: static N > every vertex id; needed only for traced triangles.

  Returns:
    (3T,) int32 twin half-edge ids `3 t' + i'`, -1 where none.
  """
  try:
    tri = np.asarray(triangles)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    if num_vertices is None:
      raise ValueError("half_edge_twins of traced triangles needs num_vertices") from None
    return _twins_traced(jnp.asarray(triangles, jnp.int32), num_vertices)
  tri = np.ascontiguousarray(tri, np.int32).reshape(-1, 3)
  return jnp.asarray(_twins_numpy(tri.tobytes(), tri.shape[0]))


def _edge_ends(tri):
  """(3T,) start and end vertex ids of the half-edges of (T, 3) triangles (NumPy or jnp)."""
  stack = np.stack if isinstance(tri, np.ndarray) else jnp.stack
  return (stack([tri[:, 1], tri[:, 2], tri[:, 0]], 1).reshape(-1),
          stack([tri[:, 2], tri[:, 0], tri[:, 1]], 1).reshape(-1))


@functools.lru_cache(maxsize=8)
def _twins_numpy(tri_bytes, num_triangles):
  """`half_edge_twins` in NumPy, cached by the triangles' bytes; same rule as `_twins_traced`.

  Half-edges are grouped by their undirected edge (`pos`: the first index of its key in
  sorted order); slot `2 pos` holds the largest half-edge of the group that runs from the
  lower to the higher vertex id, slot `2 pos + 1` the largest that runs the other way; a
  half-edge's twin is in the other slot.
  """
  tri = np.frombuffer(tri_bytes, np.int32).reshape(num_triangles, 3).astype(np.int64)
  u, v = _edge_ends(tri)
  n = int(tri.max()) + 1 if tri.size else 1
  key = np.minimum(u, v) * n + np.maximum(u, v)
  pos = np.searchsorted(np.sort(key), key)
  rev = (u > v).astype(np.int64)
  slots = np.full(2 * key.size, -1, np.int64)
  np.maximum.at(slots, 2 * pos + rev, np.arange(key.size))
  return slots[2 * pos + 1 - rev].astype(np.int32)


def _twins_traced(triangles, num_vertices):
  """`half_edge_twins` in jnp (traced triangles), same rule as `_twins_numpy`."""
  u, v = _edge_ends(triangles)
  lo, hi = jnp.minimum(u, v), jnp.maximum(u, v)
  h = jnp.arange(u.shape[0], dtype=jnp.int32)
  if num_vertices <= _SINGLE_KEY_VERTICES:
    key = lo.astype(jnp.uint32) * jnp.uint32(num_vertices) + hi.astype(jnp.uint32)
    pos = jnp.searchsorted(jnp.sort(key), key, side="left", method="scan").astype(jnp.int32)
  else:
    lo_s, hi_s, h_s = jax.lax.sort((lo, hi, h), num_keys=2)
    new = jnp.concatenate([jnp.ones(1, bool), (lo_s[1:] != lo_s[:-1]) | (hi_s[1:] != hi_s[:-1])])
    start = jax.lax.cummax(jnp.where(new, h, 0))
    pos = jnp.zeros_like(h).at[h_s].set(start, unique_indices=True)
  rev = (u > v).astype(jnp.int32)
  slots = jnp.full((2 * h.shape[0],), -1, jnp.int32).at[2 * pos + rev].max(h)
  return slots[2 * pos + 1 - rev]


def _next_corner(i):
  """(i + 1) % 3 for int arrays in [0, 3)."""
  return jnp.where(i == 2, 0, i + 1)


def _vertex_planes(screen_vertices):
  """(B, N, 3) -> screen x, y planes (B*N,) each."""
  return _coordinate_planes(screen_vertices[..., :2])


def _key_bits(num_half_edges):
  """(id_bits, t_bits) of an outline key `(floor(t 2^t_bits) << id_bits) | half_edge`."""
  id_bits = max(1, int(num_half_edges - 1).bit_length())
  t_bits = min(_T_BITS, 31 - id_bits)
  if t_bits < 6:
    raise ValueError(f"antialias supports at most 2^25 / 3 triangles, got {num_half_edges // 3}")
  return id_bits, t_bits


def _triangle_states(screen_vertices, triangles, cull_backfaces, near):
  """Which triangles are drawn, and their orientation (no gradients).

  Args:
    screen_vertices: (B, N, 3) float32; triangles: (T, 3) int32; cull_backfaces, near:
      static, as used for the raster (the rasterizer's rule: non-degenerate, every corner in
      front of `near`, negative screen area if `cull_backfaces`).

  Returns:
    (B, T) int32: 0 not drawn, 1 drawn with negative screen area, 2 drawn with positive.
  """
  b, n, _ = screen_vertices.shape
  x, y, z = _triangle_corners(_coordinate_planes(screen_vertices), triangles, n, batch=b)
  area = (x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0])
  drawn = (z[0] > near) & (z[1] > near) & (z[2] > near) & (area != 0)
  if cull_backfaces:
    drawn &= area < 0
  return jnp.where(drawn, jnp.where(area < 0, 1, 2), 0).reshape(b, -1)


def _silhouette_flags(states, twins):
  """The half-edges on the outline of the drawn triangles (no gradients).

  A half-edge is a silhouette edge when its triangle is drawn and there is no drawn
  neighbour of the same orientation across it: the mesh boundary, a fold to back faces
  (culled, or drawn but folded back onto the same side of the edge), or a neighbour that is
  not drawn. Every boundary point of the union of the drawn triangles lies on one.

  Args:
    states: (B, T) int32 from `_triangle_states`; twins: (3T,) int32 from `half_edge_twins`.

  Returns:
    (B*3T,) bool, half-edge `b * 3T + h`.
  """
  own = jnp.repeat(states, 3, axis=1)
  other = jnp.take(states, jnp.maximum(twins, 0) // 3, axis=1)
  return ((own != 0) & ((twins < 0) | (other != own))).reshape(-1)


def _edge_crossings(xa, ya, xb, yb, sign, k, size_across, size_along, first_line):
  """The k-th crossing of each edge with the lines of one axis (pixel-centre rows or
  columns), as the pixel pair it falls between (no gradients).

  Written for horizontal pairs (lines y = i + 1/2, pairs along x); vertical pairs call it
  with x and y swapped (and the sign negated).

  Args:
    xa, ya, xb, yb: (K,) float32 screen start and end of each half-edge.
    sign: (K,) float32 sign of its triangle's area: the inside of the triangle is where
      `sign * ((xb - xa) (py - ya) - (yb - ya) (px - xa)) >= 0`.
    k: int32, which crossing (0, 1, ...).
    size_across: static number of lines (image rows); size_along: pixels along a line.
    first_line: (K,) int32 first line crossed (see `_line_span`).

  Returns:
    line, p_along: (K,) int32 line and position along it of the covered pixel p.
    forward: (K,) bool, the segment p -> q exits the triangle towards +along (else -along).
    t: (K,) float32 crossing fraction from p's centre towards q in [0, 1].
    ok: (K,) bool, both pixels of the pair are in the image.
  """
  line = first_line + k
  at = line.astype(jnp.float32) + 0.5
  dy = yb - ya
  x_cross = xa + (at - ya) * (xb - xa) / jnp.where(dy != 0, dy, 1.0)
  left = jnp.floor(x_cross - 0.5)
  forward = sign * dy > 0  # the edge function decreases towards +x: leaving the inside
  t = jnp.where(forward, x_cross - (left + 0.5), (left + 1.5) - x_cross)
  ok = (left >= 0) & (left <= size_along - 2) & (line < size_across)
  left = jnp.clip(left, 0, size_along - 2).astype(jnp.int32)
  return line, jnp.where(forward, left, left + 1), forward, jnp.clip(t, 0.0, 1.0), ok


def _line_span(a, b, size):
  """(first, count) int32 of the lines `i + 1/2`, 0 <= i < size, in [min(a, b), max(a, b))."""
  lo = jnp.clip(jnp.minimum(a, b), -1.0, size + 1.0)
  hi = jnp.clip(jnp.maximum(a, b), -1.0, size + 1.0)
  first = jnp.maximum(jnp.ceil(lo - 0.5), 0.0)
  end = jnp.minimum(jnp.ceil(hi - 0.5), float(size))
  return first.astype(jnp.int32), jnp.maximum(end - first, 0.0).astype(jnp.int32)


def _scatter_crossings(keys, lanes, valid, mesh, height, width):
  """Scatter-max every line crossing of the listed silhouette half-edges into `keys`.

  Args:
    keys: (4*B*H*W,) int32 outline keys so far (see `_outline_hits`).
    lanes: (K,) int32 flat half-edge indices `b * 3T + h`; valid: (K,) bool.
    mesh: (tri_flat (3T,) int32, states (B, T) int32, vx, vy (B*N,) float32 screen planes).
    height, width: static image size.
  """
  tri_flat, states, vx, vy = mesh
  batch, t = states.shape
  n = vx.shape[0] // batch
  id_bits, t_bits = _key_bits(3 * t)
  image, half_edge = lanes // (3 * t), lanes % (3 * t)
  corner = half_edge % 3
  start = _next_corner(corner)
  base = image * n
  va = base + tri_flat[half_edge - corner + start]
  vb = base + tri_flat[half_edge - corner + _next_corner(start)]
  xa, ya, xb, yb = vx[va], vy[va], vx[vb], vy[vb]
  sign = jnp.where(states.reshape(-1)[image * t + half_edge // 3] == 1, -1.0, 1.0)
  plane = height * width
  size = keys.shape[0]
  row0, rows = _line_span(ya, yb, height)
  col0, cols = _line_span(xa, xb, width)
  rows, cols = jnp.where(valid, rows, 0), jnp.where(valid, cols, 0)

  def key_of(t):
    tq = jnp.minimum(jnp.floor(t * (1 << t_bits)), (1 << t_bits) - 1).astype(jnp.int32)
    return (tq << id_bits) | half_edge

  def body(carry):
    k, keys = carry
    i, j, fwd, t, ok = _edge_crossings(xa, ya, xb, yb, sign, k, height, width, row0)
    across = jnp.where(ok & (k < rows),
                       jnp.where(fwd, 0, 1) * batch * plane + image * plane + i * width + j,
                       size)
    j, i, fwd, t_down, ok = _edge_crossings(ya, xa, yb, xb, -sign, k, width, height, col0)
    down = jnp.where(ok & (k < cols),
                     jnp.where(fwd, 2, 3) * batch * plane + image * plane + i * width + j,
                     size)
    keys = keys.at[jnp.concatenate([across, down])].max(
        jnp.concatenate([key_of(t), key_of(t_down)]), mode="drop")
    return k + 1, keys

  longest = jnp.maximum(jnp.max(rows), jnp.max(cols))
  return jax.lax.while_loop(lambda c: c[0] < longest, body, (jnp.int32(0), keys))[1]


def _outline_hits(screen_vertices, triangles, twins, height, width, cull_backfaces, near):
  """For every pixel p and direction d: the last exit from the drawn triangles along p -> p + d.

  The union of the drawn triangles (the covered region, occluded parts included) is bounded
  by silhouette edges (`_silhouette_flags`). Every crossing of a silhouette edge with a
  segment between two neighbouring pixel centres is found from the edge (the rows, and the
  columns, of pixel centres between its end points), as an exit from its triangle towards
  one of the two pixels, and recorded for the other pixel p with a scatter-max of a key
  that orders by the fraction t from p: the largest t is where the segment leaves the
  covered region for good (beyond it nothing drawn covers the segment), also when it first
  leaves an occluding sheet (a cheek's contour in front of the ear) and enters another.
  Images are processed one after the other (`lax.map`, so that each one's working set stays
  in cache); an image's silhouette half-edges are listed (`_compact`) and processed in chunks
  of 1/16 of its half-edges (the ICT face: one chunk), each over as many lines as it spans (a
  `lax.while_loop`, as many steps as the longest edge spans lines).

  Args:
    screen_vertices: (B, N, 3) float32 (no gradients); triangles: (T, 3) int32; twins: (3T,)
      int32; height, width, cull_backfaces, near: static, as used for the raster.

  Returns:
    (4, B, H, W) int32 per direction d of `_DIRECTIONS` and pixel p: -1 where no silhouette
    edge crosses the segment p -> p + d leaving its triangle's inside, else the key
    `(floor(t 2^t_bits) << id_bits) | h` (`_key_bits`) of the crossing with the largest t:
    h the half-edge, t in [0, 1] the fraction of the way from p.
  """
  one = lambda sv: _outline_hits_image(sv[None], triangles, twins, height, width,
                                      cull_backfaces, near)
  return jnp.moveaxis(jax.lax.map(one, screen_vertices), 0, 1)


def _outline_hits_image(screen_vertices, triangles, twins, height, width, cull_backfaces,
                        near):
  """`_outline_hits` of one image: (1, N, 3) screen vertices -> (4, H, W) int32 keys."""
  total = 3 * triangles.shape[0]

  def setup(sv, twins):
    states = _triangle_states(sv, triangles, cull_backfaces, near)
    return states, _silhouette_flags(states, twins)

  states, flags = _once(setup, screen_vertices, twins)
  mesh = (triangles.reshape(-1), states, *_vertex_planes(screen_vertices))
  capacity = max(1, total // _SILHOUETTE_SHARE)
  index, count, slot = _compact(flags, capacity)
  lane = jnp.arange(capacity, dtype=jnp.int32)
  keys = jnp.full((4 * height * width,), -1, jnp.int32)
  keys = _scatter_crossings(keys, index, lane < count, mesh, height, width)

  def more(carry):  # further chunks (rarely: more than 1/16 of the half-edges)
    start, keys = carry
    # The silhouette half-edges of ranks start ... start + capacity - 1. Not `slot - start`
    # alone: the other half-edges' slot is `capacity` too, and negative indices wrap.
    in_chunk = flags & (slot >= start) & (slot < start + capacity)
    lanes = (lane % total).at[jnp.where(in_chunk, slot - start, capacity)].set(
        jnp.arange(total, dtype=jnp.int32), mode="drop")
    return start + capacity, _scatter_crossings(keys, lanes, start + lane < count, mesh,
                                                height, width)

  keys = jax.lax.while_loop(lambda c: c[0] < count, more, (jnp.int32(capacity), keys))[1]
  return keys.reshape(4, height, width)


def _unpack_edge(code, tri_flat, num_half_edges):
  """(use, first, va, vb) of outline codes (keys of `_outline_hits`, -1 = none): whether
  there is a crossing, whether it is in p's half (t < 1/2), and the crossed edge's start and
  end vertex ids (valid ids where unused)."""
  id_bits, t_bits = _key_bits(num_half_edges)
  use = code >= 0
  h = jnp.where(use, code & ((1 << id_bits) - 1), 0)
  first = use & ((code >> id_bits) < (1 << (t_bits - 1)))
  corner = h % 3
  start = _next_corner(corner)
  return use, first, tri_flat[h - corner + start], tri_flat[h - corner + _next_corner(start)]


def _keep_give(codes, tri_flat, vx, vy, base, px, py):
  """Box-filter coverage corrections of outline pixel pairs (differentiable in x, y).

  The crossed edge and which pixel of the pair is partially covered come from `codes`
  (no gradients); only the crossing position along the pair's axis carries gradients,
  through the two vertices of the crossed edge. For a covered pixel p whose neighbour p + d
  is not covered, the crossing is at a fraction t of the way: if t < 1/2, p is covered by
  t + 1/2 only and takes weight 1/2 - t of the neighbour's value ("keep"); otherwise p + d
  is covered by t - 1/2 and takes that weight of p's value ("give"). Horizontal pairs use
  only edges closer to vertical (|dy| >= |dx|), vertical pairs the others, so that no edge
  counts twice.

  Args:
    codes: 4 x S int32 per direction of `_DIRECTIONS` (S: (B, H, W) planes or (K,) pixels):
      `_outline_hits` keys at outline pairs, -1 elsewhere.
    tri_flat: (3T,) int32 `triangles.reshape(-1)`.
    vx, vy: (B*N,) float32 screen x, y planes (with gradients).
    base: S int32 `b * N` of each pixel's image; px, py: pixel centres broadcastable to S.

  Returns:
    first: 4 x S bool, the crossing is in p's half (the pair is a "keep").
    keep, give: 4 x S float32 each (zero where unused).
  """
  firsts, keep, give = [], [], []
  for d, (axis, step) in enumerate(_DIRECTIONS):
    use, first, va, vb = _unpack_edge(codes[d], tri_flat, tri_flat.shape[0])
    xa, ya, xb, yb = vx[base + va], vy[base + va], vx[base + vb], vy[base + vb]
    ex, ey = jax.lax.stop_gradient(xb - xa), jax.lax.stop_gradient(yb - ya)
    use &= (jnp.abs(ey) >= jnp.abs(ex)) == (axis == 2)  # an edge of this pair's axis
    first &= use
    # Crossing of the edge with the line through the pair's centres, as a fraction t of the
    # way from p to its neighbour.
    if axis == 2:
      den = jnp.where(use, yb - ya, 1.0)
      t = (xa + (xb - xa) * (py - ya) / den - px) * step
    else:
      den = jnp.where(use, xb - xa, 1.0)
      t = (ya + (yb - ya) * (px - xa) / den - py) * step
    t = jnp.clip(t, 0.0, 1.0)
    firsts.append(first)
    keep.append(jnp.where(first, 0.5 - t, 0.0))
    give.append(jnp.where(use & ~first, t - 0.5, 0.0))
  return firsts, keep, give


def _outline_weights(triangle_id, screen_vertices, triangles, hits):
  """Dense outline blend weights, computed on every pixel.

  Args:
    triangle_id: (B, H, W) int32; screen_vertices: (B, N, 3) float32; triangles: (T, 3)
      int32; hits: (4, B, H, W) int32 from `_outline_hits`.

  Returns:
    4 x (B, H, W) float32 per direction e of `_DIRECTIONS`: weight of neighbour p + e in
    pixel p (see `_blend`): p's own "keep" towards e plus the "give" of neighbour p + e in
    the opposite direction.
  """
  b, height, width = triangle_id.shape
  n = screen_vertices.shape[1]
  px, py = _pixel_centres(height, width)
  base = (jnp.arange(b, dtype=jnp.int32) * n).reshape(b, 1, 1)
  codes = [jnp.where(o, hits[d], -1) for d, o in enumerate(_dense_outline(triangle_id >= 0))]
  _, keep, give = _keep_give(codes, triangles.reshape(-1), *_vertex_planes(screen_vertices),
                             base, px, py)
  return tuple(keep[i] + _shift(give[i ^ 1], axis, step)
               for i, (axis, step) in enumerate(_DIRECTIONS))


def _antialias_dense(image, triangle_id, screen_vertices, triangles, hits):
  """`antialias` on every pixel: planar weights and a 4-neighbour blend."""
  weights = _once(_outline_weights, triangle_id, screen_vertices, triangles, hits)
  return _blend(image, weights)


# Outline pixels handled by the sparse path: at most 1 / _OUTLINE_SHARE of the pixels (a face
# at 224 px has ~630 of 50k, 1.3%); beyond that the dense path runs (exact either way).
_OUTLINE_SHARE = 16


def _outline_pixels(covered, capacity):
  """Compacted flat indices of the outline pixels.

  Args:
    covered: (B, H, W) bool.
    capacity: static K.

  Returns:
    index: (K,) int32 flat indices `(b * H + row) * W + column` of the pixels with an outline
      pair (in raster order), then unused slots (see `_compact`).
    count: int32 number of outline pixels (the list is complete only if count <= K).
  """
  outline = _dense_outline(covered)
  flags = (outline[0] | outline[1] | outline[2] | outline[3]).reshape(-1)
  return _compact(flags, capacity)[:2]


def _antialias_sparse(image, triangle_id, screen_vertices, triangles, hits, index, count):
  """`antialias` on a list of outline pixels: gathers and one scatter-add.

  Every outline pair (p, p + d) becomes one update `out[a] += w (image[b] - image[a])`, with
  a = p, b = p + d for a "keep" and the reverse for a "give"; all updates read the input
  image, as `_blend` does.

  Args:
    image: (B, H, W, C); triangle_id: (B, H, W) int32; screen_vertices: (B, N, 3) float32;
    triangles: (T, 3) int32; hits: (4, B, H, W) int32 from `_outline_hits`; index, count:
    from `_outline_pixels` with count <= K.
  """
  b, height, width, c = image.shape
  n = screen_vertices.shape[1]
  num_pixels = b * height * width

  def pixels(ids, p, count, hits):
    # Per listed pixel (K,): its centre, image offset, 4 neighbours and the outline code of
    # each direction.
    valid = jnp.arange(p.shape[0], dtype=jnp.int32) < count
    column = p % width
    row = (p // width) % height
    codes, neighbour = [], []
    for d, (axis, step) in enumerate(_DIRECTIONS):
      if axis == 2:
        in_image = (column + step >= 0) & (column + step < width)
        q = p + step
      else:
        in_image = (row + step >= 0) & (row + step < height)
        q = p + step * width
      q = jnp.clip(q, 0, num_pixels - 1)
      codes.append(jnp.where(valid & in_image & (ids[q] < 0), hits[d][p], -1))
      neighbour.append(q)
    px = column.astype(jnp.float32) + 0.5
    py = row.astype(jnp.float32) + 0.5
    return (p // (height * width)) * n, px, py, codes, neighbour

  base, px, py, codes, neighbour = _once(pixels, triangle_id.reshape(-1), index, count,
                                         hits.reshape(4, -1))

  def updates(codes, sv):
    first, keep, give = _keep_give(codes, triangles.reshape(-1), *_vertex_planes(sv), base,
                                   px, py)
    target, source, weight = [], [], []
    for d in range(len(_DIRECTIONS)):
      target.append(jnp.where(first[d], index, neighbour[d]))
      source.append(jnp.where(first[d], neighbour[d], index))
      weight.append(keep[d] + give[d])
    return jnp.concatenate(target), jnp.concatenate(source), jnp.concatenate(weight)

  target, source, weight = _once(updates, codes, screen_vertices)
  flat = image.reshape(num_pixels, c)
  if c <= _UNROLL_CHANNELS:  # per-channel planes: no reduction over a short minor axis
    update = jnp.stack([weight * (flat[:, ch][source] - flat[:, ch][target])
                        for ch in range(c)], axis=1)
  else:
    update = weight[:, None] * (flat[source] - flat[target])
  out = flat.astype(update.dtype).at[target].add(update, mode="promise_in_bounds")
  return out.reshape(b, height, width, c)


def antialias(image, raster: Raster, screen_vertices, triangles, twins=None):
  """Analytic antialiasing of the face/background outline (gradients for the silhouette).

  For every covered pixel p and each of its 4 neighbours q that is not covered, the point
  where the segment p -> q leaves the covered region for the last time is found, at a
  fraction t in [0, 1) of the way, with the silhouette edge it crosses (`_outline_hits`):
  an edge of a drawn triangle with no drawn neighbour of the same orientation across it
  (the mesh boundary, a fold to back faces, a neighbour behind the near plane), found from
  the edges, not from p's triangle. Dense meshes have outline triangles far smaller than a
  pixel (the ICT face at 48-224 px): the edge of p's own triangle that the segment leaves
  through is then usually an interior edge, and the covering can continue on another sheet
  of the mesh behind p's (a cheek's contour in front of the ear). With a 1-pixel box filter
  across the edge, p keeps coverage min(1, t + 1/2) and q gains max(0, t - 1/2); the
  affected pixel is blended with the other one's value accordingly. Horizontal neighbours
  use crossings of edges closer to vertical (|dy| >= |dx|), vertical neighbours the others,
  so each edge counts once. The crossings are integer choices (no gradients); t moves with
  the silhouette edge's two vertices, so the blended image has a gradient with respect to
  their x, y.

  The outline pixels are listed (a prefix sum over the coverage) and only they are
  processed, when there are at most 1/16 of all pixels (a face: ~1%); otherwise every pixel
  is processed with dense planes. Both paths give the same result (the crossings are
  computed once, per silhouette edge, for both).

  Args:
    image: (B, H, W, C) float32 image to antialias, e.g. the rendered face composited over a
      background (`interpolate(...) * mask + background * (1 - mask)`).
    raster: `Raster` of the same mesh (its `cull_backfaces` and `near` say which triangles
      are drawn).
    screen_vertices: (B, N, 3) float32 `(x_px, y_px, depth)` used for the raster.
    triangles: (T, 3) int32, consistently oriented (neighbours share an edge in opposite
      directions); an edge between inconsistently wound triangles counts as an outline.
    twins: optional (3T,) int32 `half_edge_twins(triangles)`. Computed here when None: free
      for concrete triangles (NumPy at trace time, cached), one sort per call for traced ones.

  Returns:
    (B, H, W, C) image, equal to `image` away from the outline. Differentiable with respect to
    `image` and to the x, y of the silhouette edges' vertices (occlusion boundaries inside
    the covered region are not antialiased).
  """
  ids = jax.lax.stop_gradient(raster.triangle_id)
  if np.shape(triangles)[0] == 0:  # nothing is covered
    return image
  screen_vertices = jnp.asarray(screen_vertices, jnp.float32)
  if twins is None:
    twins = half_edge_twins(triangles, screen_vertices.shape[1])
  twins = jax.lax.stop_gradient(jnp.asarray(twins, jnp.int32))
  triangles = jnp.asarray(triangles, jnp.int32)
  _, height, width = ids.shape
  hits = _outline_hits(jax.lax.stop_gradient(screen_vertices), triangles, twins, height, width,
                       raster.cull_backfaces, raster.near)
  index, count = _outline_pixels(ids >= 0, max(1, ids.size // _OUTLINE_SHARE))
  return _antialias_either(image, ids, screen_vertices, triangles, hits, index, count)


def _antialias_choose(image, ids, screen_vertices, triangles, hits, index, count, fn):
  """`fn(path)(image, screen_vertices)` with the sparse path when the list is complete."""
  capacity = index.shape[0]
  sparse = fn(lambda im, sv: _antialias_sparse(im, ids, sv, triangles, hits, index, count))
  dense = fn(lambda im, sv: _antialias_dense(im, ids, sv, triangles, hits))
  return jax.lax.cond(count <= capacity, sparse, dense, image, screen_vertices)


@jax.custom_vjp
def _antialias_either(image, ids, screen_vertices, triangles, hits, index, count):
  """Sparse or dense antialiasing, whichever applies, with a custom VJP.

  Differentiating a `lax.cond` makes both branches' residuals outputs of the forward cond
  (the branch not taken fills them with zeros): the dense path's dozens of (B, H, W) planes
  would be written on every call. Here the forward keeps only the inputs and the backward
  recomputes the taken branch under `jax.vjp` (the sparse forward is cheap; the outline
  crossings `hits` are an input, computed once).
  """
  return _antialias_choose(image, ids, screen_vertices, triangles, hits, index, count,
                           lambda path: path)


def _antialias_either_fwd(image, ids, screen_vertices, triangles, hits, index, count):
  out = _antialias_either(image, ids, screen_vertices, triangles, hits, index, count)
  return out, (image, ids, screen_vertices, triangles, hits, index, count)


def _antialias_either_bwd(res, g):
  image, ids, screen_vertices, triangles, hits, index, count = res
  backward = lambda path: lambda im, sv: jax.vjp(path, im, sv)[1](g)
  d_image, d_screen = _antialias_choose(image, ids, screen_vertices, triangles, hits, index,
                                        count, backward)
  return d_image, None, d_screen, None, None, None, None


_antialias_either.defvjp(_antialias_either_fwd, _antialias_either_bwd)


def soft_silhouette(raster: Raster, screen_vertices, triangles, twins=None):
  """Antialiased coverage in [0, 1] with gradients at the outline.

  Args:
    raster: `Raster` of the mesh.
    screen_vertices: (B, N, 3) float32.
    triangles: (T, 3) int32.
    twins: optional (3T,) int32 `half_edge_twins(triangles)` (see `antialias`).

  Returns:
    (B, H, W) float32: `raster.mask` antialiased with `antialias`. Its sum changes by the
    outline's outward motion (pixels) times its length (pixels).
  """
  return antialias(raster.mask[..., None], raster, screen_vertices, triangles,
                   twins)[..., 0]
