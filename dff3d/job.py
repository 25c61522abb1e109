"""The reconstruction job over files: inputs, output names, streaming, resume, failures.

experiments/reconstruct.py only turns flags into a JobConfig and a Reconstructor and calls
run(). The job reads, detects, reconstructs and writes images in chunks (bounded by a count
and by decoded pixels), so memory does not grow with the folder; each image's files are
written atomically as soon as its chunk is done, its JSON record last (the record marks the
image complete); failures.json is rewritten after every chunk. A rerun skips complete images
(JobConfig.overwrite redoes them). With num_shards > 1 the job takes a stable part of the
inputs (by a hash of the output name), so n copies can share one folder.

Output names mirror each input's path relative to the input folder (or to the common folder
of a glob's matches), without its extension; inputs that would share a name (a.jpg and a.png)
keep their extension in it (a_jpg, a_png). No output path leaves the output folder.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import json
import os
import sys
import time
from typing import Callable, List, NamedTuple, Tuple

import numpy as np

from dff3d import io
from dff3d import outputs as outputs_lib

# Files that annotate an image with the same stem in the same folder: never inputs, never
# failures.
SIDECAR_EXTENSIONS = (".pts", ".mat", ".json")


class Input(NamedTuple):
  """One input image: path as listed (or the skimage: demo token), and its output name
  (a '/'-separated path relative to the output folder, without extension)."""
  path: str
  name: str


class Failure(NamedTuple):
  """One failure line: the input, the stage ("list", "read", "detect", "reconstruct",
  "write") and a one-line message that starts with the input's path."""
  image: str
  stage: str
  error: str


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """Settings of one run (plain values; experiments/reconstruct.py fills them from flags).

  output_dir: the output folder.  kinds: output kinds (outputs.KINDS).
  overwrite: redo images whose outputs are complete.  texture_size: UV texture side.
  chunk_images / chunk_pixels: at most this many images / decoded pixels are held at once.
  shard_index, num_shards: this copy's part of the inputs.  progress: show a tqdm bar.
  """
  output_dir: str
  kinds: Tuple[str, ...] = outputs_lib.DEFAULT_KINDS
  overwrite: bool = False
  texture_size: int = 512
  chunk_images: int = 16
  chunk_pixels: int = 48_000_000
  shard_index: int = 0
  num_shards: int = 1
  progress: bool = True

  @property
  def failures_file(self) -> str:
    if self.num_shards == 1:
      return os.path.join(self.output_dir, "failures.json")
    return os.path.join(self.output_dir,
                        f"failures-{self.shard_index:05d}-of-{self.num_shards:05d}.json")


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def _message(path: str, e) -> str:
  msg = e if isinstance(e, str) else _one_line(e)
  return msg if msg.startswith(path) else f"{path}: {msg}"


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(io.IMAGE_EXTENSIONS)


def _folder_entries(folder: str, recursive: bool):
  """(files, subfolders named like images) under folder; hidden entries skipped."""
  files, dirs = [], []
  walker = os.walk(folder) if recursive else [next(os.walk(folder))]
  for root, subdirs, names in walker:
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    if not recursive:
      dirs += [os.path.join(root, d) for d in subdirs if _is_image_name(d)]
    files += [os.path.join(root, n) for n in names if not n.startswith(".")]
  return files, dirs


def _is_sidecar(path: str, image_stems: set) -> bool:
  stem, ext = os.path.splitext(path)
  return ext.lower() in SIDECAR_EXTENSIONS and stem in image_stems


def _safe_name(rel: str) -> str:
  """A relative path with no empty, '.' or '..' parts, '/'-separated (never absolute)."""
  parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".", "..")]
  return "/".join(parts) or "image"


def _names(paths: List[str], base: str) -> List[str]:
  """Unique output names (see the module docstring) for paths relative to base."""
  rels = [_safe_name(os.path.relpath(p, base)) for p in paths]
  stems = [os.path.splitext(r)[0] for r in rels]
  count = {}
  for s in stems:
    count[s.lower()] = count.get(s.lower(), 0) + 1
  names = []
  for rel, stem in zip(rels, stems):
    ext = os.path.splitext(rel)[1].lstrip(".")
    names.append(stem if count[stem.lower()] == 1 or not ext else f"{stem}_{ext}")
  taken, out = set(), []
  for n in names:  # a clash left after that (a_jpg.png beside a.jpg, a.png): number it
    cand, k = n, 2
    while cand.lower() in taken:
      cand, k = f"{n}_{k}", k + 1
    taken.add(cand.lower())
    out.append(cand)
  return out


def list_inputs(spec: str, recursive: bool = False) -> Tuple[List[Input], List[Failure]]:
  """Inputs of a file, folder or glob (or `skimage:NAME`), sorted, and listing failures.

  A folder's files that are not images (by extension) nor sidecars of one are failures, as
  are sub-folders named like images (unless recursive); nothing is dropped silently.
  """
  if spec.startswith("skimage:"):
    return [Input(spec, _safe_name(spec.split(":", 1)[1]))], []
  failures = []
  if os.path.isdir(spec):
    files, dirs = _folder_entries(spec, recursive)
    base = spec
  elif os.path.isfile(spec) or os.path.islink(spec):
    files, dirs, base = [spec], [], os.path.dirname(spec) or "."
  else:
    matches = sorted(glob_lib.glob(spec, recursive=recursive))
    files = [m for m in matches if not os.path.isdir(m)]
    dirs = [m for m in matches if os.path.isdir(m) and _is_image_name(m)]
    base = os.path.commonpath([os.path.dirname(os.path.abspath(m)) for m in matches]) \
        if matches else "."
  failures += [Failure(d, "list", f"{d}: is a folder, not an image") for d in dirs]
  images = sorted(f for f in files if _is_image_name(f))
  stems = {os.path.splitext(f)[0] for f in images}
  for f in sorted(set(files) - set(images)):
    if not _is_sidecar(f, stems):
      failures.append(Failure(f, "list", f"{f}: not an image file (extension "
                                         f"'{os.path.splitext(f)[1]}' is not one of "
                                         f"{', '.join(io.IMAGE_EXTENSIONS)})"))
  names = _names(images, base)
  return [Input(p, n) for p, n in zip(images, names)], failures


def shard(inputs: List[Input], index: int, count: int) -> List[Input]:
  """This shard's inputs: a stable 1/count of them by the SHA-1 of the output name."""
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"shard index {index} is not in [0, {count})")
  if count == 1:
    return list(inputs)
  key = lambda i: int.from_bytes(hashlib.sha1(i.name.encode("utf-8")).digest()[:8], "big")
  return [i for i in inputs if key(i) % count == index]


def output_path(output_dir: str, name: str, suffix: str) -> str:
  """output_dir/name+suffix, its folder created; ValueError when it would leave output_dir
  (e.g. through a symlinked folder)."""
  root = os.path.realpath(output_dir)
  path = os.path.join(output_dir, *(name + suffix).split("/"))
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  real = os.path.realpath(folder)
  if real != root and not real.startswith(root + os.sep):
    raise ValueError(f"{path}: leaves the output folder {output_dir} (through a link)")
  return path


def is_complete(output_dir: str, name: str, kinds) -> bool:
  """True when name's JSON record exists, holds the requested kinds and all its files."""
  json_path = os.path.join(output_dir, *(name + ".json").split("/"))
  try:
    with open(json_path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  if not set(kinds) <= set(record.get("outputs", [])):
    return False
  folder = os.path.dirname(json_path)
  return all(os.path.isfile(os.path.join(folder, p)) for p in outputs_lib.record_files(record))


def load_input(spec: str) -> np.ndarray:
  """(H, W, 3) float32 for a path or `skimage:NAME` (scikit-image's demo images)."""
  if spec.startswith("skimage:"):
    name = spec.split(":", 1)[1]
    try:
      import skimage.data  # optional demo dependency
    except ImportError:
      raise io.ImageFileError(f"{spec}: needs scikit-image (pip install 'dff3d[demo]')") from None
    if not hasattr(skimage.data, name):
      raise io.ImageFileError(f"{spec}: scikit-image has no image '{name}'")
    img = np.asarray(getattr(skimage.data, name)(), np.float32) / 255.0
    img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
    return img
  return io.read_image(spec)


def sidecar_landmarks(spec: str):
  """[(68, 2)] from `<stem>.pts` beside the image, or None when there is none."""
  if spec.startswith("skimage:"):
    return None
  pts_path = os.path.splitext(spec)[0] + ".pts"
  if not os.path.isfile(pts_path):
    return None
  from dff3d import detect
  pts = detect.read_pts(pts_path)
  if pts.shape != (68, 2):
    raise detect.PtsFileError(f"{pts_path}: expected 68 points, found {len(pts)}")
  return [pts]


class _Pending(NamedTuple):
  item: Input
  image: np.ndarray
  located: list


class Summary(NamedTuple):
  """What a run did: images written, faces written, complete images skipped, failures."""
  images: int
  faces: int
  skipped: int
  failures: List[Failure]


class _Run:
  """State of one run: counters, failures, the progress bar."""

  def __init__(self, config: JobConfig, total: int, report: Callable[[str], None]):
    self.config, self.report = config, report
    self.failures: List[Failure] = []
    self.images = self.faces = self.skipped = 0
    self.start = time.time()
    self.bar = None
    if config.progress:
      from tqdm import tqdm
      self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)

  def fail(self, path, stage, e):
    f = Failure(path, stage, _message(path, e))
    self.failures.append(f)
    self.report(f"failed ({stage}): {f.error}")

  def advance(self, n=1):
    if self.bar is not None:
      rate = self.faces / max(time.time() - self.start, 1e-9)
      self.bar.set_postfix(faces=self.faces, faces_per_s=f"{rate:.2f}", refresh=False)
      self.bar.update(n)

  def save_failures(self, previous):
    rows = [f._asdict() for f in previous + self.failures]
    os.makedirs(self.config.output_dir, exist_ok=True)
    io.write_json(self.config.failures_file, rows)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _write_image(run: _Run, reconstructor, p: _Pending, faces) -> None:
  """Write one image's face files, then its record; a failure of any is one line."""
  cfg = run.config
  try:
    json_path = output_path(cfg.output_dir, p.item.name, ".json")
    folder, stem = os.path.dirname(json_path), os.path.basename(p.item.name)
    records = []
    for k, face in enumerate(faces):
      if face is None:
        continue
      records.append(outputs_lib.write_face(folder, f"{stem}_{k}", reconstructor.model,
                                            p.image, face, cfg.kinds, cfg.texture_size,
                                            outputs_lib.overlay_suffix(p.item.path)))
    io.write_json(json_path, {"image": p.item.path, "outputs": list(cfg.kinds),
                              "faces": records})
    run.images += 1
    run.faces += len(records)
  except Exception as e:  # noqa: BLE001 - one line per image, the run goes on
    run.fail(p.item.path, "write", e)


def _flush(run: _Run, reconstructor, pending: List[_Pending], previous) -> None:
  """Reconstruct the pending images' faces together, write them, save failures."""
  pairs = [(p.image, loc) for p in pending for loc in p.located]
  try:
    faces = reconstructor.reconstruct_located(pairs) if pairs else []
  except Exception as e:  # noqa: BLE001 - the whole chunk failed (e.g. out of memory)
    for p in pending:
      run.fail(p.item.path, "reconstruct", e)
    faces = None
  if faces is not None:
    start = 0
    for p in pending:
      mine = faces[start:start + len(p.located)]
      start += len(p.located)
      good = []
      for k, face in enumerate(mine):
        if face.finite:
          good.append(face)
        else:
          good.append(None)
          run.fail(p.item.path, "reconstruct", f"face {k}: the reconstruction diverged "
                                               "(non-finite values); not written")
      if any(f is not None for f in good):
        _write_image(run, reconstructor, p, good)
  run.advance(len(pending))
  run.save_failures(previous)


def run(inputs: List[Input], reconstructor, config: JobConfig, listing_failures=(),
        report: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Summary:
  """Reconstruct inputs (after list_inputs and shard) into config.output_dir.

  Args:
    inputs: this shard's Inputs; reconstructor: a reconstructor.Reconstructor.
    listing_failures: Failures found while listing (written to failures.json too).
    report: receives one line per failure.
  Returns:
    Summary. failures.json (or this shard's failures file) holds the same failures.
  """
  os.makedirs(config.output_dir, exist_ok=True)
  previous = list(listing_failures)
  for f in previous:
    report(f"failed ({f.stage}): {f.error}")
  todo = []
  skipped = 0
  for item in inputs:
    if not config.overwrite and is_complete(config.output_dir, item.name, config.kinds):
      skipped += 1
    else:
      todo.append(item)
  if skipped:
    report(f"skipping {skipped} image(s) whose outputs are complete (overwrite to redo)")
  state = _Run(config, len(todo), report)
  state.skipped = skipped
  state.save_failures(previous)
  pending: List[_Pending] = []
  pixels = 0
  try:
    for item in todo:
      try:
        image = load_input(item.path)
      except Exception as e:  # noqa: BLE001
        state.fail(item.path, "read", e)
        state.advance()
        continue
      try:
        located = reconstructor.locate(image, sidecar_landmarks(item.path))
        if not located:
          raise ValueError("no face found")
      except Exception as e:  # noqa: BLE001
        state.fail(item.path, "detect", e)
        state.advance()
        continue
      pending.append(_Pending(item, image, located))
      pixels += image.shape[0] * image.shape[1]
      if len(pending) >= config.chunk_images or pixels >= config.chunk_pixels:
        _flush(state, reconstructor, pending, previous)
        pending, pixels = [], 0
    if pending:
      _flush(state, reconstructor, pending, previous)
    state.save_failures(previous)
  finally:
    state.close()
  return Summary(state.images, state.faces, skipped, previous + state.failures)
