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
"""

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dff3d import dff_training
from dff3d import morphable_model as mm
from dff3d import synthetic
from dff3d.models import dff as dff_lib

DEFAULT_WEIGHTS = "dff3d/assets/dff.npz"


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
  args = p.parse_args(argv)

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
    ref = next(iter(nets.values()))[0] if nets else dff_lib.DFFNet(width=8)
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
