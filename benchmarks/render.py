"""Rasterizer speed: forward and forward+backward per image, against a NumPy z-buffer.

Prints one JSON object per line (mesh x loss form x batch). Example:

  python -m benchmarks.render --batches 1,8,16

Meshes: the ICT face (`--model_npz`, default the packaged asset; mean shape in cm, +y up,
+z towards the viewer, triangles counter-clockwise from the front) and a Basel-size mesh (the
ICT face subdivided once at edge midpoints: 4x the triangles). Camera: at the origin looking
along -z, the face moved to z = -130 cm, `x_px = W/2 + f X/(-Z)`, `y_px = H/2 - f Y/(-Z)`,
`f = 4.5315 W`.

The timed loss renders vertex colours, composites them over a background, antialiases the
outline (colour and coverage channels) and compares with a target:
`sum((aa_rgb - target)^2) + sum((aa_coverage - target_mask)^2)`; forward+backward is its
gradient with respect to the 3D vertex positions (through the projection) and the colours.
Two forms of the same loss (`--forms`): `batched` calls the rasterizer on batch-sized arrays;
`per_image` wraps the same code in `imagewise.per_image_losses`, which runs each image's
forward and backward together.

Times are medians over `--repeats` interleaved rounds. Every call gets fresh inputs: each
round works through `--images` distinct images in sets of the batch size (16 calls of one
image, or 1 call of 16), after one untimed call. `forward_backward_vs_first_batch` is the
per-image forward+backward time relative to the first form at the first batch size in
`--batches` (by default: batched, batch 1), measured in the same rounds. `compile_s` is the
first call of the forward+backward function (trace, compile and run).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dff3d import imagewise
from dff3d import rasterizer

# The ICT face shipped with the package (same mean shape and triangles as the source release).
DEFAULT_NPZ = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dff3d",
                           "assets", "ict_face_model.npz")


# ----------------------------------------------------------------------------------------------
# Meshes and camera
# ----------------------------------------------------------------------------------------------

def load_face(path):
  """(N, 3) float32 mean shape in cm and (T, 3) int32 triangles of the ICT face."""
  with np.load(path) as data:
    return data["mean_shape"].astype(np.float32), data["triangles"].astype(np.int32)


def subdivide(vertices, triangles):
  """One step of midpoint subdivision: every triangle becomes 4 (same winding)."""
  edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
  unique, inverse = np.unique(np.sort(edges, axis=1), axis=0, return_inverse=True)
  mids = inverse.reshape(3, -1).T + len(vertices)  # (T, 3): midpoints of 01, 12, 20
  new_vertices = np.concatenate([vertices, vertices[unique].mean(axis=1)])
  a, b, c = triangles.T
  ab, bc, ca = mids.T
  new_triangles = np.concatenate([np.stack(t, 1) for t in (
      (a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
  return new_vertices.astype(np.float32), new_triangles.astype(np.int32)


def project(vertices, height, width, distance=130.0):
  """(B, N, 3) model-space cm -> (B, N, 3) screen `(x_px, y_px, depth)`."""
  f = 4.5315 * width
  x, y, z = vertices[..., 0], vertices[..., 1], vertices[..., 2] - distance
  return jnp.stack([width / 2 + f * x / -z, height / 2 - f * y / -z, -z], axis=-1)


def batch_of_faces(mean_shape, batch, seed=0):
  """(B, N, 3) copies of the face with a small random shift and in-plane rotation each."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(batch):
    angle = rng.uniform(-0.05, 0.05)
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float32)
    out.append(mean_shape @ rot.T + rng.uniform(-0.5, 0.5, 3).astype(np.float32))
  return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# NumPy reference z-buffer (forward only)
# ----------------------------------------------------------------------------------------------

def numpy_render(screen, triangles, colours, height, width, cull_backfaces=True):
  """Plain vectorised NumPy z-buffer of one image: visibility, barycentrics, colours.

  Candidate pixels are enumerated per triangle over its clipped bounding box (one vectorised
  pass over all triangles per offset in the largest box); the nearest fragment per pixel is
  found with one `lexsort`.

  Returns:
    (H, W, 3) float32 image, (H, W) int triangle ids.
  """
  v = screen[triangles].astype(np.float64)  # (T, 3, 3)
  x, y, z = v[..., 0], v[..., 1], v[..., 2]
  area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
  ok = (area != 0) & np.all(z > 1e-3, axis=1)
  if cull_backfaces:
    ok &= area < 0
  j0 = np.maximum(np.ceil(x.min(1) - 0.5), 0).astype(int)
  j1 = np.minimum(np.floor(x.max(1) - 0.5), width - 1).astype(int)
  i0 = np.maximum(np.ceil(y.min(1) - 0.5), 0).astype(int)
  i1 = np.minimum(np.floor(y.max(1) - 0.5), height - 1).astype(int)
  ok &= (j1 >= j0) & (i1 >= i0)
  t = np.nonzero(ok)[0]
  x, y, z, area, j0, j1, i0, i1 = x[t], y[t], z[t], area[t], j0[t], j1[t], i0[t], i1[t]
  pix, inv_depth, tid = [], [], []
  for dy in range(int((i1 - i0).max(initial=-1)) + 1):
    for dx in range(int((j1 - j0).max(initial=-1)) + 1):
      sel = (i0 + dy <= i1) & (j0 + dx <= j1)
      px, py = j0[sel] + dx + 0.5, i0[sel] + dy + 0.5
      xs, ys, zs = x[sel], y[sel], z[sel]
      lam = np.stack([(xs[:, (k + 2) % 3] - xs[:, (k + 1) % 3]) * (py - ys[:, (k + 1) % 3])
                      - (ys[:, (k + 2) % 3] - ys[:, (k + 1) % 3]) * (px - xs[:, (k + 1) % 3])
                      for k in range(3)], 1) / area[sel, None]
      inside = np.all(lam >= 0, axis=1)
      pix.append(((i0[sel] + dy) * width + j0[sel] + dx)[inside])
      inv_depth.append((lam / zs).sum(1)[inside])
      tid.append(t[sel][inside])
  pix, inv_depth, tid = np.concatenate(pix), np.concatenate(inv_depth), np.concatenate(tid)
  order = np.lexsort((tid, -inv_depth, pix))
  first = np.ones(len(order), bool)
  first[1:] = pix[order][1:] != pix[order][:-1]
  win = order[first]
  ids = np.full(height * width, -1)
  ids[pix[win]] = tid[win]
  # Perspective-correct barycentrics and colours of the visible triangles.
  covered = np.nonzero(ids >= 0)[0]
  vt = screen[triangles[ids[covered]]].astype(np.float64)
  px, py = covered % width + 0.5, covered // width + 0.5
  e = np.stack([(vt[:, (k + 2) % 3, 0] - vt[:, (k + 1) % 3, 0]) * (py - vt[:, (k + 1) % 3, 1])
                - (vt[:, (k + 2) % 3, 1] - vt[:, (k + 1) % 3, 1]) * (px - vt[:, (k + 1) % 3, 0])
                for k in range(3)], 1)
  q = e / e.sum(1, keepdims=True) / vt[..., 2]
  bary = q / q.sum(1, keepdims=True)
  image = np.zeros((height * width, 3), np.float32)
  image[covered] = np.einsum("pk,pkc->pc", bary, colours[triangles[ids[covered]]])
  return image.reshape(height, width, 3), ids.reshape(height, width)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def make_loss(triangles, height, width, cull_backfaces):
  """Scalar image + silhouette loss of (vertices (B,N,3) cm, colours (B,N,3)), written on
  batch-sized arrays."""

  def loss(vertices, colours, target, target_mask):
    screen = project(vertices, height, width)
    raster = rasterizer.rasterize(screen, triangles, (height, width),
                                  cull_backfaces=cull_backfaces)
    rgb = rasterizer.interpolate(colours, raster, triangles)
    background = jnp.full_like(rgb, 0.5)
    mask = raster.mask[..., None]
    composite = jnp.concatenate([rgb * mask + background * (1 - mask), mask], axis=-1)
    out = rasterizer.antialias(composite, raster, screen, triangles)
    return (jnp.sum((out[..., :3] - target) ** 2)
            + jnp.sum((out[..., 3] - target_mask) ** 2))

  return loss


def make_per_image_loss(triangles, height, width, cull_backfaces):
  """The same loss, evaluated image by image with `imagewise.per_image_losses` (each image's
  forward and backward run together while its planes are in cache)."""
  loss = make_loss(triangles, height, width, cull_backfaces)

  def per_image(vertices, colours, target, target_mask):
    one = lambda diff, const: loss(*diff, *const)
    return jnp.sum(imagewise.per_image_losses(one, (vertices, colours), (target, target_mask)))

  return per_image


LOSS_FORMS = {"batched": make_loss, "per_image": make_per_image_loss}


def timed_ms(fn, args):
  """Wall time of one call in ms (the result is waited for)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return 1e3 * (time.perf_counter() - start)


def device_name():
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({os.cpu_count()} cores)"
  return f"{d.platform} ({d.device_kind})"


def input_sets(mean_shape, colours_one, batch, images, size, rng):
  """`images // batch` distinct (vertices, colours, target, target_mask) sets of `batch`
  images each, so that every batch size works through the same amount of fresh input data per
  round (repeating a single image would leave everything in the cache and flatter small
  batches)."""
  sets = []
  for k in range(max(1, images // batch)):
    vertices = jnp.asarray(batch_of_faces(mean_shape, batch, seed=k))
    colours = jnp.broadcast_to(jnp.asarray(colours_one), (batch,) + colours_one.shape)
    target = jnp.asarray(rng.uniform(size=(batch, size, size, 3)).astype(np.float32))
    target_mask = jnp.asarray((rng.uniform(size=(batch, size, size)) > 0.5).astype(np.float32))
    sets.append((vertices, colours, target, target_mask))
  return sets


def run(mesh_name, mean_shape, triangles, size, batches, forms, repeats, cull_backfaces,
        images):
  """Times every (loss form, batch size) in interleaved rounds (one round: NumPy, then forward
  and forward+backward of each case), so that all figures, and the ratios between them, see
  the same machine conditions; this machine is shared and its speed drifts by 2x over minutes.
  Each round makes, per case and function, one untimed call and then one timed call per input
  set. Ratios are relative to the first form at the first batch size."""
  height = width = size
  rng = np.random.default_rng(1)
  colours_one = rng.uniform(size=mean_shape.shape).astype(np.float32)
  # NumPy baseline on image 0, same input.
  screen0 = np.asarray(project(jnp.asarray(batch_of_faces(mean_shape, 1)), height, width))[0]
  numpy_fn = lambda: numpy_render(screen0, triangles, colours_one, height, width,
                                  cull_backfaces)
  sets = {batch: input_sets(mean_shape, colours_one, batch, images, size, rng)
          for batch in batches}
  cases = []
  for form in forms:
    loss = LOSS_FORMS[form](jnp.asarray(triangles), height, width, cull_backfaces)
    forward = jax.jit(loss)
    forward_backward = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for batch in batches:
      compile_s = timed_ms(forward_backward, sets[batch][0]) / 1e3
      timed_ms(forward, sets[batch][0])  # compile the forward too
      cases.append(dict(form=form, batch=batch, sets=sets[batch], compile_s=compile_s,
                        functions=((forward, "fwd"), (forward_backward, "fwd_bwd")),
                        fwd=[], fwd_bwd=[]))
  numpy_times = []
  for _ in range(repeats):
    start = time.perf_counter()
    numpy_fn()
    numpy_times.append(1e3 * (time.perf_counter() - start))
    for case in cases:
      for fn, key in case["functions"]:
        timed_ms(fn, case["sets"][-1])  # untimed: the first call after a switch
        case[key] += [timed_ms(fn, args) / case["batch"] for args in case["sets"]]
  numpy_ms = float(np.median(numpy_times))
  first = float(np.median(cases[0]["fwd_bwd"]))
  for case in cases:
    fwd, fwd_bwd = float(np.median(case["fwd"])), float(np.median(case["fwd_bwd"]))
    print(json.dumps(dict(
        mesh=mesh_name, vertices=int(mean_shape.shape[0]), triangles=int(len(triangles)),
        height=height, width=width, batch=case["batch"], loss_form=case["form"],
        cull_backfaces=cull_backfaces,
        forward_ms_per_image=round(fwd, 3), forward_backward_ms_per_image=round(fwd_bwd, 3),
        forward_backward_min_ms_per_image=round(float(np.min(case["fwd_bwd"])), 3),
        forward_backward_vs_first_batch=round(fwd_bwd / first, 3),
        compile_s=round(case["compile_s"], 2), numpy_forward_ms_per_image=round(numpy_ms, 2),
        speedup_vs_numpy=round(numpy_ms / fwd, 2), device=device_name(),
        repeats=repeats)), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model_npz", default=DEFAULT_NPZ)
  parser.add_argument("--meshes", default="ict,basel_size")
  parser.add_argument("--batches", default="1,8,16")
  parser.add_argument("--forms", default="batched,per_image",
                      help="loss forms: batched (batch-sized arrays), per_image "
                           "(imagewise.per_image_losses)")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=7, help="timing rounds")
  parser.add_argument("--images", type=int, default=16,
                      help="distinct images per round, in sets of each batch size")
  parser.add_argument("--no_cull", action="store_true", help="draw back faces too")
  args = parser.parse_args()
  if not os.path.exists(args.model_npz):
    raise SystemExit(f"--model_npz: no such file: {args.model_npz}")
  mean_shape, triangles = load_face(args.model_npz)
  meshes = {"ict": (mean_shape, triangles), "basel_size": subdivide(mean_shape, triangles)}
  batches = [int(b) for b in args.batches.split(",")]
  forms = args.forms.split(",")
  unknown = sorted(set(forms) - set(LOSS_FORMS))
  if unknown:
    raise SystemExit(f"--forms: unknown {unknown}; choose from {sorted(LOSS_FORMS)}")
  for name in args.meshes.split(","):
    run(name, *meshes[name], args.size, batches, forms, args.repeats, not args.no_cull,
        args.images)


if __name__ == "__main__":
  main()
