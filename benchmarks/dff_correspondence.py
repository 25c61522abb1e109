r"""Dense correspondence of DFF descriptors on held-out synthetic pose pairs: JSON lines.

  python -m benchmarks.dff_correspondence                       # dff3d/assets/dff.npz
  python -m benchmarks.dff_correspondence --weights=W.npz --pairs=32 --image_size=96

For `--pairs` pairs of renders of the same random face (dff3d.synthetic.pose_pairs with seed
--seed, not the training seed; pose, lighting, distance, shift and background re-drawn between
the views; |yaw difference| uniform up to yaw_diff_max) and each descriptor:
  trained     the weights file (as stored, e.g. float16, cast to float32)
  trained_f32 only with --f32_weights: the float32 checkpoint, to measure float16 storage
  untrained   the same DFFNet architecture, random (He) init
  rgb         the pixel's RGB value (nearest colour)
it prints one line per (network, yaw_diff_max) with
  pixels_within_3px     over face pixels of view A whose surface point is visible in view B
                        (nearest B face pixel in mean-face space closer than one median pixel
                        footprint), the fraction whose nearest descriptor among ALL pixels of
                        view B (face and background: the honest search) lies within 3 px of
                        the true partner pixel;
  pixels_within_3px_in_mask   the same with the search restricted to B's face mask;
  landmarks_within_3px  the same at the 68 landmarks visible in both views (A's descriptor
                        bilinearly sampled at the landmark, B's true position its landmark);
  pixels, landmarks     how many were counted; image_size, pairs, seconds.
  describe_size         the side the networks ran at (--describe_size: images resized to it,
                        descriptors resized back and renormalised).
With --timing_sizes=96,224 it instead prints forward and forward+backward (w.r.t. the image,
weights frozen) ms per image of the weights' network.

--mode=real (or both) adds a real-photo, cross-identity measure on AFLW2000-3D (--real_dir,
default ../shared/data/aflw2000_3d_dev beside the repository):

  python -m benchmarks.dff_correspondence --mode=real --real_sizes=96,120

Every image is cropped with dff3d.data.augment.crop_to_landmarks to its ground-truth 68 points
(pt3d_68 x, y + 0.5) at each side S of --real_sizes; --real_pairs pairs of different images
(seed --seed) are drawn for each entry of --real_yaw_diffs (a bound on |yaw_a - yaw_b| in
degrees, or "all"). Networks: shipped (dff3d/assets/dff.npz at its native 96 px), untrained
(the same DFFNet, init seed 0, also through 96 px), rgb (L2-normalised colours) and, with
--dff_path, "file:<basename>" (at --dff_native_size, 0: the crop size). One line per
(network, size, yaw bound) with real_landmarks_within_5pct (real_cross_identity), landmarks,
pairs, image_size, yaw_diff_max (null: all pairs), data (the folder's name), seconds.
"""

import argparse
import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dff3d import dff_training
from dff3d import io as io_lib
from dff3d import landmarks as landmarks_lib
from dff3d import morphable_model as mm
from dff3d import synthetic
from dff3d.data import augment
from dff3d.datasets import aflw2000_3d
from dff3d.models import dff as dff_lib

DEFAULT_WEIGHTS = "dff3d/assets/dff.npz"
SHIPPED_WEIGHTS = os.path.join(mm.ASSET_DIR, "dff.npz")
DEFAULT_REAL_DIR = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
    "aflw2000_3d_dev"))


def median_pitch(position, mask):
  """Median mean-face distance between horizontally adjacent face pixels (cm per pixel)."""
  d = np.linalg.norm(position[:, :, 1:] - position[:, :, :-1], axis=-1)
  both = mask[:, :, 1:] & mask[:, :, :-1]
  return float(np.median(d[both]))


@jax.jit
def _partners(index_a, view_a, view_b, threshold):
  return dff_training.match_pixels(index_a, view_a, view_b, threshold)


def ground_truth(view_a, view_b, chunk=2048):
  """Per pair: (A face pixel indices visible in B, their true B pixel indices, the landmarks
  visible in both views (68,) bool); host numpy. Exact nearest match (match_pixels, stride 1);
  the visibility threshold is one median pixel footprint of the pair's A view in mean-face
  space."""
  b = view_a["image"].shape[0]
  keys = ("mean_face_position", "mask")
  out = []
  for i in range(b):
    va = {k: view_a[k][i:i + 1] for k in keys}
    vb = {k: view_b[k][i:i + 1] for k in keys}
    idx_a = np.flatnonzero(np.asarray(va["mask"][0]))
    thr = median_pitch(np.asarray(va["mean_face_position"]), np.asarray(va["mask"]))
    n = len(idx_a)
    padded = np.pad(idx_a, (0, (-n) % chunk), mode="edge").reshape(-1, chunk)
    ib, ok = zip(*[_partners(jnp.asarray(c)[None], va, vb, thr) for c in padded])
    ib = np.concatenate([np.asarray(x[0]) for x in ib])[:n]
    ok = np.concatenate([np.asarray(x[0]) for x in ok])[:n]
    lm = np.asarray(view_a["landmarks_visible"][i]) & np.asarray(view_b["landmarks_visible"][i])
    out.append((idx_a[ok], ib[ok], lm))
  return out


@functools.partial(jax.jit, static_argnames=("restrict",))
def _nearest_jit(queries, desc_b, mask_b, restrict):
  return dff_training.nearest_pixels(queries, desc_b, mask_b if restrict else None)


def _nearest(queries, desc_b, mask_b, restrict, multiple=512):
  """nearest_pixels with the queries padded to a multiple of `multiple` (few compilations)."""
  n = queries.shape[0]
  q = jnp.pad(jnp.asarray(queries), ((0, (-n) % multiple), (0, 0)))
  return np.asarray(_nearest_jit(q, desc_b, mask_b, restrict))[:n]


def evaluate(desc_a, desc_b, view_a, view_b, truth, radius=3.0):
  """Counts (pixel hits, pixel hits with the search in B's mask, pixels, landmark hits,
  landmarks) for descriptor maps (B, H, W, D) of both views."""
  b, h, w, _ = desc_a.shape
  xy = np.asarray(dff_training.pixel_centres(h, w))
  hits = hits_mask = n = lhits = ln = 0
  for i in range(b):
    ia, ib, lm = truth[i]
    flat_a = desc_a[i].reshape(h * w, -1)
    q = flat_a[ia]
    for restrict in (False, True):
      best = _nearest(q, desc_b[i], view_b["mask"][i], restrict)
      ok = int(np.sum(np.linalg.norm(xy[best] - xy[ib], axis=-1) <= radius))
      if restrict:
        hits_mask += ok
      else:
        hits += ok
    n += len(ia)
    if lm.any():
      pts = jnp.asarray(view_a["landmarks"][i][lm])[None]
      ql = dff_lib.sample_descriptors(desc_a[i:i + 1], pts)[0]
      best = _nearest(ql, desc_b[i], view_b["mask"][i], False, multiple=68)
      true_b = np.asarray(view_b["landmarks"][i])[lm]
      lhits += int(np.sum(np.linalg.norm(xy[best] - true_b, axis=-1) <= radius))
      ln += int(lm.sum())
  return hits, hits_mask, n, lhits, ln


def timing(net, params, size, batch, min_time=2.0):
  """Median ms per image of the jitted forward and of value_and_grad w.r.t. the input image
  through the frozen weights (how the regressor's L_dff uses the DFF)."""
  x = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 3))
  fwd = jax.jit(lambda im: dff_lib.frozen_apply(net, params, im))
  fb = jax.jit(jax.value_and_grad(lambda im: jnp.sum(dff_lib.frozen_apply(net, params, im)[..., 0])))
  out = {}
  for name, fn in (("forward", fwd), ("forward_backward", fb)):
    jax.block_until_ready(fn(x))
    times, start = [], time.perf_counter()
    while not times or time.perf_counter() - start < min_time:
      t = time.perf_counter()
      jax.block_until_ready(fn(x))
      times.append(time.perf_counter() - t)
    times.sort()
    out[f"{name}_ms_per_image"] = round(1e3 * times[len(times) // 2] / batch, 2)
  return out


# ---- real photos: cross-identity landmark correspondence ------------------------------------

@jax.jit
def _pair_matches(desc, points, pairs):
  """Flat index in B of the descriptor nearest to A's (bilinear) descriptor at each point.

  desc (N, S, S, D), points (N, K, 2) crop pixels, pairs (P, 2) int (a, b) -> (P, K) int32.
  """
  def one(ab):
    q = dff_lib.sample_descriptors(desc[ab[0]][None], points[ab[0]][None])[0]
    return dff_training.nearest_pixels(q, desc[ab[1]], chunk=q.shape[0])
  return jax.lax.map(one, pairs)


def describe_all(describe_fn, crops, batch=16):
  """describe_fn (jitted) over crops (N, S, S, 3) in batches of `batch` (the last padded, so
  one compilation): (N, S, S, D) float32 jnp array."""
  fn = jax.jit(describe_fn)
  n = crops.shape[0]
  padded = np.pad(np.asarray(crops, np.float32), ((0, (-n) % batch), (0, 0), (0, 0), (0, 0)))
  parts = [fn(jnp.asarray(padded[i:i + batch])) for i in range(0, len(padded), batch)]
  return jnp.concatenate(parts)[:n]


def real_cross_identity(describe_fn, crops, landmarks, pairs, radius_frac=0.05,
                        points=landmarks_lib.INNER, batch=16) -> dict:
  """Cross-identity landmark correspondence of a descriptor between pairs of face crops.

  For each pair (a, b) and each scored landmark inside both crops, A's descriptor bilinearly
  sampled at A's landmark (dff_lib.sample_descriptors) looks for its nearest descriptor (L2:
  most cosine-similar for unit descriptors) among ALL S x S pixels of B; a hit when that
  pixel's centre lies within radius_frac * S of B's same landmark. Points outside either crop
  ([0, S) in x and y) are skipped.

  Args:
    describe_fn: images (B, S, S, 3) float32 in [0, 1] -> descriptors (B, S, S, D).
    crops: (N, S, S, 3) float32 in [0, 1].
    landmarks: (N, K, 2) float x, y in crop pixels (pixel centres at integer + 0.5).
    pairs: (P, 2) int indices into crops, (a, b) with a the query crop.
    radius_frac: hit radius as a fraction of the crop side S.
    points: indices into K of the landmarks scored (default the 52 INNER of the 68 iBUG
      points); None: all K.
    batch: crops described per describe_fn call.
  Returns:
    dict: "real_landmarks_within_5pct" (hits / landmarks; named after the default radius),
    "hits", "landmarks" (scored points), "skipped" (points outside a crop), "pairs",
    "radius_px".
  """
  crops = np.asarray(crops, np.float32)
  lm = np.asarray(landmarks, np.float32)
  lm = lm if points is None else lm[:, np.asarray(points)]
  pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
  size = crops.shape[1]
  inside = np.all((lm >= 0) & (lm < size), axis=-1)
  valid = inside[pairs[:, 0]] & inside[pairs[:, 1]]
  desc = describe_all(describe_fn, crops, batch)
  best = np.asarray(_pair_matches(desc, jnp.asarray(lm), jnp.asarray(pairs)))
  found = np.asarray(dff_training.pixel_centres(size, size), np.float64)[best]
  err = np.linalg.norm(found - lm[pairs[:, 1]].astype(np.float64), axis=-1)
  radius = radius_frac * size
  hits, n = int(np.sum(valid & (err <= radius))), int(valid.sum())
  return {"real_landmarks_within_5pct": hits / max(n, 1), "hits": hits, "landmarks": n,
          "skipped": int(valid.size - n), "pairs": len(pairs), "radius_px": radius}


def draw_pairs(yaw_deg, n, yaw_diff_max=None, seed=0):
  """Up to n distinct unordered pairs of different images, |yaw_a - yaw_b| <= yaw_diff_max
  (None: any), uniformly without replacement, each in a random order: (P, 2) int32."""
  yaw = np.asarray(yaw_deg, np.float64)
  a, b = np.triu_indices(len(yaw), 1)
  if yaw_diff_max is not None:
    keep = np.abs(yaw[a] - yaw[b]) <= yaw_diff_max
    a, b = a[keep], b[keep]
  rng = np.random.default_rng(seed)
  pick = rng.choice(len(a), size=min(n, len(a)), replace=False)
  out = np.stack([a[pick], b[pick]], 1)
  swap = rng.uniform(size=len(out)) < 0.5
  out[swap] = out[swap, ::-1]
  return out.astype(np.int32)


def load_real_crops(directory, sizes):
  """AFLW2000-3D images cropped to their ground-truth 68 points (augment.crop_to_landmarks).

  Returns (crops {S: (N, S, S, 3) float32}, landmarks {S: (N, 68, 2) float32 crop pixels},
  yaw_deg (N,) float32, skipped: names of the .mat files the loader rejected).
  """
  crops = {s: [] for s in sizes}
  lms = {s: [] for s in sizes}
  yaw, skipped = [], []
  for img_path, mat_path in aflw2000_3d.list_aflw2000_3d(directory).pairs:
    try:
      lab = aflw2000_3d.load_aflw2000_3d_mat(mat_path)
    except aflw2000_3d.DatasetFormatError:
      skipped.append(mat_path.name)
      continue
    gt = lab["landmarks_3d"][:, :2] + 0.5  # 0-based centres -> dff3d's pixel centres
    image = io_lib.read_image(img_path)
    for s in sizes:
      c, l, _ = augment.crop_to_landmarks(image, gt, s)
      crops[s].append(c)
      lms[s].append(l)
    yaw.append(lab["yaw_deg"])
  stack = lambda d: {s: np.stack(v) for s, v in d.items()}
  return stack(crops), stack(lms), np.asarray(yaw, np.float32), skipped


def _untrained_like(path, native_size):
  """A frozen DFF of the same architecture as `path`, init seed 0, loaded like the file (the
  params go through a float32 temporary .npz so load_frozen_dff's resize path is shared)."""
  net, _ = dff_lib.load_dff(path)
  f = 2 ** net.levels
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, f, f, 3)))["params"]
  with tempfile.TemporaryDirectory() as tmp:
    tmp_path = os.path.join(tmp, "untrained.npz")
    dff_lib.save_dff_params(tmp_path, params, net, dtype=np.float32)
    return dff_lib.load_frozen_dff(tmp_path, native_size)


def real_describers(names, dff_path=None, dff_native_size=0):
  """{network name: (describe_fn, native size or None, weights path or None)}."""
  native = dff_lib.SHIPPED_NATIVE_SIZE
  out = {}
  if "shipped" in names:
    out["shipped"] = (dff_lib.load_frozen_dff(SHIPPED_WEIGHTS, native), native, SHIPPED_WEIGHTS)
  if "untrained" in names:
    out["untrained"] = (_untrained_like(SHIPPED_WEIGHTS, native), native, None)
  if "rgb" in names:
    out["rgb"] = (dff_lib.l2_normalize, None, None)
  if dff_path:
    size = dff_native_size or None
    out["file:" + os.path.basename(dff_path)] = (
        dff_lib.load_frozen_dff(dff_path, size), size, dff_path)
  return out


def run_real(args):
  """Prints the real-photo lines (see the module docstring)."""
  sizes = [int(v) for v in args.real_sizes.split(",")]
  yaws = [None if v == "all" else float(v) for v in args.real_yaw_diffs.split(",")]
  t = time.time()
  crops, lms, yaw, skipped = load_real_crops(args.real_dir, sizes)
  load_seconds = time.time() - t
  nets = real_describers(args.real_networks.split(","), args.dff_path, args.dff_native_size)
  pair_lists = {y: draw_pairs(yaw, args.real_pairs, y, args.seed) for y in yaws}
  for name, (fn, native, weights) in nets.items():
    for s in sizes:
      for y, pairs in pair_lists.items():
        t = time.time()
        r = real_cross_identity(fn, crops[s], lms[s], pairs)
        print(json.dumps({
            "network": name,
            "real_landmarks_within_5pct": round(r["real_landmarks_within_5pct"], 4),
            "hits": r["hits"], "landmarks": r["landmarks"], "skipped_points": r["skipped"],
            "pairs": r["pairs"], "image_size": s, "describe_size": native or s,
            "yaw_diff_max": y,
            "mean_abs_yaw_diff": round(float(np.mean(np.abs(yaw[pairs[:, 0]] -
                                                            yaw[pairs[:, 1]]))), 1),
            "radius_px": round(r["radius_px"], 3), "points": "inner_52",
            "data": os.path.basename(os.path.normpath(args.real_dir)), "images": len(yaw),
            "skipped_files": skipped, "seed": args.seed, "weights": weights,
            "load_seconds": round(load_seconds, 1),
            "seconds": round(time.time() - t, 1)}), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--weights", default=DEFAULT_WEIGHTS)
  p.add_argument("--f32_weights", default=None, help="float32 file of the same weights")
  p.add_argument("--pairs", type=int, default=32)
  p.add_argument("--image_size", type=int, default=96)
  p.add_argument("--seed", type=int, default=1234, help="not the training seed")
  p.add_argument("--yaw_diffs", default="30,60")
  p.add_argument("--networks", default="trained,untrained,rgb")
  p.add_argument("--batch", type=int, default=8, help="pairs rendered / described at once")
  p.add_argument("--describe_size", type=int, default=0,
                 help="run the networks on images resized to this side and resize the "
                      "descriptors back (bilinear, renormalised); 0: native size")
  p.add_argument("--timing_sizes", default="",
                 help="e.g. 96,224: only time the weights' network at these sizes")
  p.add_argument("--timing_batch", type=int, default=8)
  p.add_argument("--mode", default="synthetic", choices=("synthetic", "real", "both"))
  p.add_argument("--real_dir", default=DEFAULT_REAL_DIR, help="AFLW2000-3D images + .mat")
  p.add_argument("--real_sizes", default="96", help="crop sides S, e.g. 96,120")
  p.add_argument("--real_pairs", type=int, default=200)
  p.add_argument("--real_yaw_diffs", default="30,all",
                 help="bounds on |yaw_a - yaw_b| in degrees; 'all': no bound")
  p.add_argument("--real_networks", default="shipped,untrained,rgb")
  p.add_argument("--dff_path", default=None, help="another DFF .npz: network 'file:<name>'")
  p.add_argument("--dff_native_size", type=int, default=0,
                 help="side --dff_path's network runs at (resize); 0: the crop size")
  args = p.parse_args(argv)

  if args.mode in ("real", "both"):
    run_real(args)
    if args.mode == "real":
      return

  if args.timing_sizes:
    net, params = dff_lib.load_dff(args.weights)
    for size in [int(v) for v in args.timing_sizes.split(",")]:
      print(json.dumps({"network": "trained", "config": net.config(), "input": size,
                        "batch": args.timing_batch, "device": str(jax.devices()[0]),
                        **timing(net, params, size, args.timing_batch)}), flush=True)
    return

  model = mm.default_model()
  nets = {}
  names = args.networks.split(",")
  if "trained" in names:
    nets["trained"] = dff_lib.load_dff(args.weights)
  if args.f32_weights:
    nets["trained_f32"] = dff_lib.load_dff(args.f32_weights)
    names.insert(names.index("trained") + 1 if "trained" in names else 0, "trained_f32")
  if "untrained" in names:
    ref = next(iter(nets.values()))[0] if nets else dff_lib.DFFNet(width=16)  # shipped shape
    x = jnp.zeros((1, args.image_size, args.image_size, 3))
    nets["untrained"] = (ref, jax.jit(ref.init)(jax.random.key(7, impl="unsafe_rbg"), x)["params"])
  def apply(net, prm, im):
    if not args.describe_size or args.describe_size == im.shape[1]:
      return net.apply({"params": prm}, im)
    b, h, w, _ = im.shape
    small = jax.image.resize(im, (b, args.describe_size, args.describe_size, 3), "linear")
    d = net.apply({"params": prm}, small)
    return dff_lib.l2_normalize(jax.image.resize(d, (b, h, w, d.shape[-1]), "linear"))

  describe = {k: jax.jit(functools.partial(apply, net)) for k, (net, _) in nets.items()}
  pairs = jax.jit(synthetic.pose_pairs, static_argnames=("batch", "size", "max_yaw_diff"))

  for yaw in [float(y) for y in args.yaw_diffs.split(",")]:
    counts = {k: np.zeros(5, np.int64) for k in names}
    seconds = {k: 0.0 for k in names}
    for start in range(0, args.pairs, args.batch):
      nb = min(args.batch, args.pairs - start)
      key = jax.random.fold_in(jax.random.PRNGKey(args.seed), int(yaw) * 100003 + start)
      va, vb = pairs(key, model, nb, args.image_size, yaw)
      truth = ground_truth(va, vb)
      for name in names:
        t = time.time()
        if name == "rgb":
          da, db = va["image"], vb["image"]
        else:
          prm = nets[name][1]
          da, db = describe[name](prm, va["image"]), describe[name](prm, vb["image"])
        counts[name] += evaluate(da, db, va, vb, truth)
        seconds[name] += time.time() - t
    for name in names:
      hits, hits_mask, n, lhits, ln = counts[name].tolist()
      print(json.dumps({
          "network": name, "yaw_diff_max": yaw,
          "pixels_within_3px": round(hits / max(n, 1), 4),
          "pixels_within_3px_in_mask": round(hits_mask / max(n, 1), 4),
          "landmarks_within_3px": round(lhits / max(ln, 1), 4),
          "pixels": n, "landmarks": ln, "image_size": args.image_size, "pairs": args.pairs,
          "weights": args.weights if name == "trained" else
                     (args.f32_weights if name == "trained_f32" else None),
          "describe_size": args.describe_size or args.image_size,
          "seconds": round(seconds[name], 1)}), flush=True)


if __name__ == "__main__":
  main()
