r"""The reconstruction job on folders of 1080p photos: time per image and per stage, peak RSS.

  python benchmarks/reconstruct.py                               # everything below
  python benchmarks/reconstruct.py --sizes=20,100,400 --paths=regressor --micro=
  python benchmarks/reconstruct.py --sizes=20 --paths=fitting --micro=
  python benchmarks/reconstruct.py --sizes= --micro=regressor,detect,write

Photos: copies of scikit-image's public-domain `astronaut` (bundled, no download) on a
1920 x 1080 canvas (a smooth random background), scaled so that the face (dlib HOG's
rectangle) is --face_min..--face_max px, placed at a random position with the whole face box
inside, randomly mirrored and brightened, saved as JPEG (quality 90). Deterministic by --seed;
the 20- and 100-photo folders are the first 20 / 100 of the 400 (hard links).

Each job run (--paths x --sizes, the fitting path only on --fitting_sizes; plus a regressor
run per --refine_steps on the smallest size) is a fresh subprocess, so its peak RSS (VmHWM)
is its own: it builds the Reconstructor as
experiments/reconstruct.py does (batch --batch_size), runs dff3d.job.run once on a separate
one-photo folder (the warm-up: compiles everything; its wall time is "first_call_s"), resets
the timers, then runs dff3d.job.run on the folder (outputs --outputs, progress off) and prints
one JSON line:

  images, faces, failures, flip_average (--flip_average: each regression also runs on the
    mirrored crops and averages, the job's default), path ("regressor": the shipped
    regressor, two passes;
    "fitting": Reconstructor(regressor=None, landmarks="dlib"), the fit to dlib's 68 points
    with the CLI's FitConfig), batch_size, refine_steps,
  seconds_per_image: the folder's job wall time / images, everything compiled;
  seconds_per_image_incl_compile: the same plus compile_s / images, where compile_s =
    first_call_s - seconds_per_image (what one cold job on the folder costs, Python start-up
    and model loading excluded: those are startup_s);
  detect_ms_per_image: time in Reconstructor.locate (detect_boxes; with "fitting" also dlib's
    68 points, split out in stage_ms_per_image);
  regress_ms_per_face: median regressor call (jax.block_until_ready) / batch_size, i.e. per
    face at a full batch; regress_ms_per_face_job: all regressor time / faces (two passes and
    the padding of the last batch included); null on the fitting path;
  refine_ms_per_face: median fitting.fit_photometric call / batch_size (0 when refine_steps=0;
    on the fitting path the photometric stage of the fit); fit_ms_per_face: median
    fitting.fit call / batch_size (fitting path only);
  stage_ms_per_image: wall ms per image of read (JPEG decode to float), detect, reconstruct
    (Reconstructor.reconstruct_located, all of it), regress, refine, fit, landmarks (dlib 68
    points), write (all files of an image), and inside write: mesh_colours, obj, overlay
    (warp + blend + points), overlay_points, png (io.write_image: to uint8 + PNG encode), npz,
    json;
  peak_rss_mb: VmHWM at the end; rss_after_warmup_mb: VmHWM after the warm-up (the folder's
    growth is the difference); cpu_s / cpu_per_wall: the child's CPU time during the folder's
    job (less than 2 per wall second on 2 cores means it was waiting for the CPU or disk);
  machine, load_avg: (1-minute load at the start and end of the run).

--micro adds, each in its own subprocess:
  regressor: train.load_regressor() on (B, S, S, 3) crops of the photo's face for each
    --micro_batches: median of --repeats calls after warm-up, ms per call and per face;
  detect: per --detect_sides max_side, on the first 20 photos: ms per image of
    detect.detect_boxes(detector="auto") on the float image as the job gives it, split into
    float -> uint8, downscale and HOG (upsample 1), and found (a box whose crop box has IoU
    >= 0.5 with the known face's);
  write: a 1080p photo written with io.write_image as PNG (as the job writes overlays) and
    as JPEG (quality 90); JPEG decode to uint8 (PIL) vs to float32 (io.read_image).
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

WIDTH, HEIGHT = 1920, 1080
# dlib HOG's rectangle on skimage.data.astronaut() (512 x 512), upsample 1: x0, y0, x1, y1.
ASTRONAUT_RECT = (175.0, 76.0, 266.0, 167.0)
ASTRONAUT_SIDE = 512


# ---- photos ---------------------------------------------------------------------------------

def make_photo(rng, face_min, face_max):
  """(uint8 (1080, 1920, 3) photo, (4,) face rectangle x0, y0, x1, y1 in its pixels)."""
  from PIL import Image
  from skimage import data
  x0, y0, x1, y1 = ASTRONAUT_RECT
  rect_side = ((x1 - x0) + (y1 - y0)) / 2
  face = rng.uniform(face_min, face_max)
  n = int(round(ASTRONAUT_SIDE * face / rect_side))
  s = n / ASTRONAUT_SIDE
  flip = bool(rng.integers(2))
  src = Image.fromarray(data.astronaut())
  if flip:
    src = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x0, x1 = ASTRONAUT_SIDE - x1, ASTRONAUT_SIDE - x0
  src = np.asarray(src.resize((n, n), Image.BICUBIC), np.float32)
  src = np.clip(src * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
  # Face centre anywhere that keeps a margin of 1.1 rectangle sides (more than the crop box's
  # half side, 0.76) inside the canvas.
  margin = 1.1 * rect_side * s
  cx = rng.uniform(margin, WIDTH - margin)
  cy = rng.uniform(margin, HEIGHT - margin)
  ox = int(round(cx - (x0 + x1) / 2 * s))
  oy = int(round(cy - (y0 + y1) / 2 * s))
  # Background: a horizontal gradient between two random colours, plus mild noise.
  c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
  t = np.linspace(0, 1, WIDTH, dtype=np.float32)[None, :, None]
  canvas = np.broadcast_to(c0 + (c1 - c0) * t, (HEIGHT, WIDTH, 3)).astype(np.float32)
  canvas = canvas + rng.normal(0, 4, (HEIGHT, 1, 1)).astype(np.float32)
  canvas = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
  canvas.paste(Image.fromarray(src), (ox, oy))
  rect = np.array([x0 * s + ox, y0 * s + oy, x1 * s + ox, y1 * s + oy], np.float32)
  return np.asarray(canvas), rect


def make_photos(folder, count, seed, face_min, face_max):
  """count JPEGs photo_NNNN.jpg in folder; returns {name: face rectangle (list)}."""
  from PIL import Image
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  rects = {}
  for i in range(count):
    img, rect = make_photo(rng, face_min, face_max)
    name = f"photo_{i:04d}.jpg"
    Image.fromarray(img).save(os.path.join(folder, name), quality=90)
    rects[name] = [round(float(v), 1) for v in rect]
  return rects


def linked_folder(pool, names, folder):
  os.makedirs(folder, exist_ok=True)
  for n in names:
    try:
      os.link(os.path.join(pool, n), os.path.join(folder, n))
    except OSError:
      shutil.copy(os.path.join(pool, n), os.path.join(folder, n))


# ---- measurement helpers --------------------------------------------------------------------

def machine():
  model = platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"cpu": model, "cpus": cpus, "python": platform.python_version()}


def vm_hwm_mb():
  """Peak resident set size of this process (VmHWM), MB; ru_maxrss where /proc is missing."""
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


class Timers:
  """Named lists of (seconds, batch rows or None) of wrapped calls."""

  def __init__(self):
    self.calls = {}

  def reset(self):
    self.calls = {}

  def wrap(self, name, fn, block=False, rows=None):
    """fn timed under name; block: wait for JAX results; rows(args) -> batch rows."""
    import jax

    def timed(*args, **kwargs):
      t = time.perf_counter()
      out = fn(*args, **kwargs)
      if block:
        out = jax.block_until_ready(out)
      self.calls.setdefault(name, []).append(
          (time.perf_counter() - t, rows(args) if rows else None))
      return out
    return timed

  def total(self, name):
    return sum(t for t, _ in self.calls.get(name, []))

  def median_per_row(self, name):
    """Median over calls of seconds / batch rows (ms), None without calls."""
    c = self.calls.get(name, [])
    if not c:
      return None
    return float(np.median([t / r for t, r in c])) * 1e3


class _TimedRegressor:
  """A regressor that times its calls (waiting for the result), keeping its attributes."""

  def __init__(self, fn, timers):
    self._fn, self.image_size, self.config = fn, fn.image_size, getattr(fn, "config", None)
    self._call = timers.wrap("regress", fn, block=True, rows=lambda a: a[0].shape[0])

  def __call__(self, images):
    return self._call(images)


def _instrument(rec, timers):
  """Wrap the library functions the job calls (module attributes, looked up at call time)."""
  from dff3d import detect, fitting, io, outputs, texture
  from dff3d import job as job_lib
  job_lib.load_input = timers.wrap("read", job_lib.load_input)
  rec.locate = timers.wrap("detect", rec.locate)
  rec.reconstruct_located = timers.wrap("reconstruct", rec.reconstruct_located)
  detect.landmarks_in_box = timers.wrap("landmarks", detect.landmarks_in_box)
  if rec.regressor is not None:
    rec.regressor = _TimedRegressor(rec.regressor, timers)
  batch_rows = lambda a: a[2].shape[0]  # images (B, S, S, 3) is the third argument of both
  fitting.fit_photometric = timers.wrap("refine", fitting.fit_photometric, block=True,
                                        rows=batch_rows)
  fitting.fit = timers.wrap("fit", fitting.fit, block=True, rows=lambda a: a[1].shape[0])
  outputs.write_face = timers.wrap("write", outputs.write_face)
  texture.camera_vertex_colours = timers.wrap("mesh_colours", texture.camera_vertex_colours)
  io.write_obj = timers.wrap("obj", io.write_obj)
  outputs.overlay = timers.wrap("overlay", outputs.overlay)
  io.draw_points = timers.wrap("overlay_points", io.draw_points)
  io.write_image = timers.wrap("png", io.write_image)
  io.write_npz = timers.wrap("npz", io.write_npz)
  io.write_json = timers.wrap("json", io.write_json)


STAGES = ("read", "detect", "landmarks", "reconstruct", "regress", "refine", "fit", "write",
          "mesh_colours", "obj", "overlay", "overlay_points", "png", "npz", "json")


# ---- child: one job run ---------------------------------------------------------------------

def child_job(spec):
  load_start = os.getloadavg()[0]
  t0 = time.perf_counter()
  from dff3d import fitting
  from dff3d import job as job_lib
  from dff3d import outputs
  from dff3d import reconstructor as reconstructor_lib
  path = spec["path"]
  # As experiments/reconstruct.py builds it from its default flags.
  fit_config = fitting.FitConfig(image_size=224, photo_steps=40, contour="silhouette")
  rec = reconstructor_lib.Reconstructor(
      regressor="shipped" if path == "regressor" else None,
      landmarks="regressor" if path == "regressor" else "dlib",
      detector=spec["detector"], refine_steps=spec["refine_steps"],
      batch_size=spec["batch_size"], fit_config=fit_config, max_side=spec["max_side"],
      flip_average=bool(spec["flip_average"]))
  timers = Timers()
  _instrument(rec, timers)
  kinds = outputs.parse_kinds(spec["outputs"].split(","))

  def job(folder, out):
    inputs, listing = job_lib.list_inputs(folder)
    config = job_lib.JobConfig(output_dir=out, kinds=kinds, progress=False,
                               chunk_images=spec["chunk_images"])
    return job_lib.run(inputs, rec, config, listing, report=lambda s: None)

  startup = time.perf_counter() - t0
  t = time.perf_counter()
  warm = job(spec["warmup_folder"], os.path.join(spec["out"], "warmup"))
  first_call = time.perf_counter() - t
  first_regress = timers.calls.get("regress", [(None,)])[0][0]
  warm_stages = {k: round(timers.total(k), 2) for k in STAGES if k in timers.calls}
  rss_warm = vm_hwm_mb()
  timers.reset()
  c0 = cpu_s()
  t = time.perf_counter()
  summary = job(spec["folder"], os.path.join(spec["out"], "job"))
  job_s = time.perf_counter() - t
  cpu = cpu_s() - c0
  n = max(summary.images, 1)
  faces = max(summary.faces, 1)
  per_image = job_s / n
  bs = spec["batch_size"]
  r = lambda v, d=2: None if v is None else round(v, d)
  refine = timers.median_per_row("refine")
  line = {
      "benchmark": "job", "path": path, "images": summary.images, "faces": summary.faces,
      "failures": len(summary.failures) - len(warm.failures),
      "batch_size": bs, "refine_steps": spec["refine_steps"],
      "flip_average": bool(spec["flip_average"]),
      "detector": spec["detector"], "max_side": spec["max_side"], "outputs": spec["outputs"],
      "seconds_per_image": r(per_image, 3),
      "seconds_per_image_incl_compile": r(per_image + (first_call - per_image) / n, 3),
      "first_call_s": r(first_call), "compile_s": r(first_call - per_image),
      "first_regress_call_s": r(first_regress), "first_call_stage_s": warm_stages,
      "startup_s": r(startup), "job_s": r(job_s),
      "detect_ms_per_image": r(timers.total("detect") / n * 1e3, 1),
      "regress_ms_per_face": r(timers.median_per_row("regress")),
      "regress_ms_per_face_job": (r(timers.total("regress") / faces * 1e3)
                                  if "regress" in timers.calls else None),
      "refine_ms_per_face": r(refine) if refine is not None else 0,
      "fit_ms_per_face": r(timers.median_per_row("fit"), 1),
      "stage_ms_per_image": {k: round(timers.total(k) / n * 1e3, 1) for k in STAGES
                             if k in timers.calls},
      "peak_rss_mb": round(vm_hwm_mb()), "rss_after_warmup_mb": round(rss_warm),
      "cpu_s": r(cpu, 1), "cpu_per_wall": r(cpu / job_s),
      "machine": machine(), "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
  }
  if summary.failures:
    line["first_failure"] = summary.failures[len(warm.failures)].error \
        if len(summary.failures) > len(warm.failures) else None
  return line


# ---- child: micro benchmarks ----------------------------------------------------------------

def _face_crop(photo, rect, size):
  from dff3d import detect
  from dff3d.data import augment
  box = detect.box_from_rectangle(rect)
  affine = augment.crop_affine(box, size)
  return augment.warp_affine(photo, affine, size, size)


def child_regressor(spec):
  import jax
  import jax.numpy as jnp
  from dff3d import io, train
  load_start = os.getloadavg()[0]
  photo = io.read_image(spec["photo"])
  rows = []
  for flip in (False, True):  # one network call per face, and the job's flip-averaged two
    fn = train.load_regressor(flip_average=flip)
    s = fn.image_size
    crop = _face_crop(photo, np.asarray(spec["rect"]), s)
    for b in spec["batches"]:
      x = jnp.asarray(np.repeat(crop[None], b, 0))
      t = time.perf_counter()
      jax.block_until_ready(fn(x))
      compile_s = time.perf_counter() - t
      for _ in range(3):
        jax.block_until_ready(fn(x))
      times = []
      for _ in range(spec["repeats"]):
        t = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t)
      ms = float(np.median(times)) * 1e3
      rows.append({"benchmark": "regressor", "batch_size": b, "image_size": s,
                   "backbone": getattr(fn.config, "backbone", None), "flip_average": flip,
                   "ms_per_call": round(ms, 2), "ms_per_face": round(ms / b, 2),
                   "ms_per_face_min": round(min(times) * 1e3 / b, 2),
                   "first_call_s": round(compile_s, 2), "repeats": spec["repeats"],
                   "machine": machine(),
                   "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)]})
  return rows


def child_detect(spec):
  from dff3d import detect, io
  load_start = os.getloadavg()[0]
  items = [(io.read_image(p), np.asarray(rect, np.float32)) for p, rect in spec["photos"]]
  detect.detect_boxes(items[0][0])  # loads the models
  rows = []
  for side in spec["sides"]:
    found, total, u8_ms, small_ms, hog_ms = 0, [], [], [], []
    for image, rect in items:
      t = time.perf_counter()
      boxes = detect.detect_boxes(image, detector="auto", max_side=side)
      total.append(time.perf_counter() - t)
      truth = detect.box_from_rectangle(rect)
      found += bool(boxes) and bool(max(detect.box_iou(detect.crop_box(b), truth)
                                        for b in boxes) >= 0.5)
      # The same work, stage by stage (detect_boxes' private steps).
      t = time.perf_counter()
      u8 = detect._to_uint8(image)  # pylint: disable=protected-access
      t1 = time.perf_counter()
      small, _ = detect._downscaled(u8, side)  # pylint: disable=protected-access
      t2 = time.perf_counter()
      detect._hog_model().run(small, 1, 0.0)  # pylint: disable=protected-access
      t3 = time.perf_counter()
      u8_ms.append(t1 - t)
      small_ms.append(t2 - t1)
      hog_ms.append(t3 - t2)
    med = lambda v: round(float(np.median(v)) * 1e3, 1)
    rows.append({"benchmark": "detect", "detector": "auto", "max_side": side,
                 "images": len(items), "found": int(found), "ms_per_image": med(total),
                 "to_uint8_ms": med(u8_ms), "downscale_ms": med(small_ms), "hog_ms": med(hog_ms),
                 "machine": machine(),
                 "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)]})
  return rows


def child_write(spec):
  from PIL import Image
  from dff3d import io
  load_start = os.getloadavg()[0]
  photo = spec["photo"]
  med = lambda f: round(float(np.median([_seconds(f) for _ in range(spec["repeats"])])) * 1e3, 1)
  img = io.read_image(photo)
  out = os.path.join(spec["out"], "overlay")
  row = {"benchmark": "write", "image": [WIDTH, HEIGHT],
         "read_float_ms": med(lambda: io.read_image(photo)),
         "read_uint8_ms": med(lambda: np.asarray(Image.open(photo).convert("RGB"))),
         "write_png_ms": med(lambda: io.write_image(out + ".png", img)),
         "write_jpg_ms": med(lambda: io.write_image(out + ".jpg", img)),
         "png_kb": round(os.path.getsize(out + ".png") / 1024),
         "jpg_kb": round(os.path.getsize(out + ".jpg") / 1024),
         "machine": machine(), "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)]}
  return [row]


def _seconds(f):
  t = time.perf_counter()
  f()
  return time.perf_counter() - t


CHILDREN = {"job": child_job, "regressor": child_regressor, "detect": child_detect,
            "write": child_write}


# ---- parent ---------------------------------------------------------------------------------

def spawn(spec, timeout):
  """Runs one child (this file with --child); relays and returns its JSON lines."""
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  try:
    p = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    print(json.dumps({"benchmark": spec["kind"], "error": f"timed out after {timeout} s",
                      **{k: spec[k] for k in ("path", "images") if k in spec}}), flush=True)
    return []
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
  if p.returncode != 0 or not lines:
    tail = (p.stderr or "").strip().splitlines()[-5:]
    print(json.dumps({"benchmark": spec["kind"], "error": f"exit {p.returncode}",
                      "stderr_tail": tail}), flush=True)
  for ln in lines:
    print(ln, flush=True)
  return [json.loads(ln) for ln in lines]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="20,100,400", help="folder sizes (photos)")
  p.add_argument("--paths", default="regressor,fitting", help="regressor,fitting")
  p.add_argument("--fitting_sizes", default="20,100",
                 help="sizes the fitting path runs on (of --sizes; it is slow)")
  p.add_argument("--refine_steps", default="20",
                 help="extra regressor runs with these refine_steps, on the smallest size")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--chunk_images", type=int, default=16)
  p.add_argument("--detector", default="auto")
  p.add_argument("--max_side", type=int, default=1024, help="detect_boxes max_side")
  p.add_argument("--outputs", default="json,mesh,overlay,coefficients")
  p.add_argument("--flip_average", type=int, default=1, choices=(0, 1),
                 help="job runs: 1 (the job's default) averages each face with its mirror image")
  p.add_argument("--micro", default="regressor,detect,write")
  p.add_argument("--micro_batches", default="1,8,16")
  p.add_argument("--detect_sides", default="640,800,1024")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--face_min", type=float, default=150)
  p.add_argument("--face_max", type=float, default=400)
  p.add_argument("--work_dir", default=None, help="default: a temporary folder, removed")
  p.add_argument("--timeout", type=int, default=1800, help="seconds per child")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.child:
    spec = json.loads(a.child)
    out = CHILDREN[spec["kind"]](spec)
    for row in out if isinstance(out, list) else [out]:
      print(json.dumps(row), flush=True)
    return

  ints = lambda s: [int(v) for v in s.split(",") if v.strip()]
  sizes, paths = ints(a.sizes), [v for v in a.paths.split(",") if v]
  micro = [v for v in a.micro.split(",") if v]
  work = a.work_dir or tempfile.mkdtemp(prefix="dff3d_bench_")
  try:
    t = time.perf_counter()
    count = max(sizes + ([20] if "detect" in micro else []) + [1])
    pool = os.path.join(work, "pool")
    warm = os.path.join(work, "warmup")
    manifest = os.path.join(work, "photos.json")
    key = {"seed": a.seed, "face": [a.face_min, a.face_max]}
    try:  # a --work_dir kept from an earlier run with the same settings and enough photos
      with open(manifest, encoding="utf-8") as f:
        old = json.load(f)
      rects = dict(sorted(old["rects"].items())[:count]) if (
          old["key"] == key and len(old["rects"]) >= count) else None
    except (OSError, ValueError, KeyError):
      rects = None
    reused = rects is not None
    if not reused:
      for d in [pool, warm] + [os.path.join(work, f"photos_{n}") for n in sizes]:
        shutil.rmtree(d, ignore_errors=True)
      rects = make_photos(pool, count, a.seed, a.face_min, a.face_max)
      make_photos(warm, 1, a.seed + 1, a.face_min, a.face_max)
      with open(manifest, "w", encoding="utf-8") as f:
        json.dump({"key": key, "rects": rects}, f)
    names = sorted(rects)
    sides = [((r[2] - r[0]) + (r[3] - r[1])) / 2 for r in rects.values()]
    print(json.dumps({"benchmark": "photos", "count": count, "size": [WIDTH, HEIGHT],
                      "face_px": [round(min(sides)), round(max(sides))], "seed": a.seed,
                      "reused": reused, "generate_s": round(time.perf_counter() - t, 1),
                      "mb": round(sum(os.path.getsize(os.path.join(pool, n))
                                      for n in names) / 2**20, 1)}), flush=True)
    base = dict(kind="job", batch_size=a.batch_size, chunk_images=a.chunk_images,
                detector=a.detector, max_side=a.max_side, outputs=a.outputs,
                warmup_folder=warm, flip_average=a.flip_average)
    runs = []
    for path in paths:
      for n in sizes:
        if path == "fitting" and n not in ints(a.fitting_sizes):
          continue
        runs.append(dict(base, path=path, images=n, refine_steps=0))
    if "regressor" in paths and sizes:
      for steps in ints(a.refine_steps):
        runs.append(dict(base, path="regressor", images=min(sizes), refine_steps=steps))
    for spec in runs:
      folder = os.path.join(work, f"photos_{spec['images']}")
      if not os.path.isdir(folder):
        linked_folder(pool, names[:spec["images"]], folder)
      out = tempfile.mkdtemp(prefix="out_", dir=work)
      spawn(dict(spec, folder=folder, out=out), a.timeout)
      shutil.rmtree(out, ignore_errors=True)
    first = os.path.join(pool, names[0])
    if "regressor" in micro:
      spawn(dict(kind="regressor", photo=first, rect=rects[names[0]],
                 batches=ints(a.micro_batches), repeats=a.repeats), a.timeout)
    if "detect" in micro:
      spawn(dict(kind="detect", sides=ints(a.detect_sides),
                 photos=[(os.path.join(pool, n), rects[n]) for n in names[:20]]), a.timeout)
    if "write" in micro:
      spawn(dict(kind="write", photo=first, out=work, repeats=5), a.timeout)
  finally:
    if not a.work_dir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
