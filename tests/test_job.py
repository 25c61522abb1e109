"""dff3d.job: input listing and names, path safety, streaming chunks, resume, failures and
shards, with a stand-in reconstructor (no network, no detector: fast and deterministic)."""

import json
import os

import numpy as np
import pytest

from dff3d import coefficients as coeffs_lib
from dff3d import detect, io, job
from dff3d import morphable_model as mm
from dff3d import reconstructor as rec_lib

KINDS = ("json", "overlay", "coefficients")


def _touch_image(path, value=0.5, size=(20, 24)):
  path.parent.mkdir(parents=True, exist_ok=True)
  io.write_image(path, np.full(size + (3,), value, np.float32))


def _face(image, bad=False):
  """A Face at the image centre with hand-made arrays (NaN everywhere when bad)."""
  model = mm.default_model()
  n = model.mean_shape.shape[0]
  sizes = dict(zip(coeffs_lib.FIELDS, model.sizes))
  c = coeffs_lib.Coefficients(**{f: np.zeros(k, np.float32) for f, k in sizes.items()})
  h, w = image.shape[:2]
  pts = np.stack(np.meshgrid(np.linspace(2, w - 2, 17), np.linspace(2, h - 2, 4)), -1)
  pts = pts.reshape(-1, 2)[:68].astype(np.float32)
  pts = np.concatenate([pts, pts[:68 - len(pts)]])
  val = np.nan if bad else 0.0
  return rec_lib.Face(
      rect=np.array([0, 0, w, h], np.float32), score=1.0, source="hog", landmarks_2d=pts,
      landmarks_3d=np.concatenate([pts, np.full((68, 1), val, np.float32)], 1),
      rotation=np.full(3, val, np.float32), coefficients=c,
      vertices=np.zeros((n, 3), np.float32), photo_vertices=np.zeros((n, 3), np.float32),
      reference_depth=40.0,
      crop_affine=np.array([[1, 0, 0], [0, 1, 0]], np.float32), crop_size=8,
      rendering=np.full((8, 8, 3), 0.7, np.float32), mask=np.ones((8, 8), np.float32))


class FakeReconstructor:
  """locate: one face per image (two for names containing 'two', none for 'empty');
  reconstruct_located: a Face per pair (diverged for images whose red value is 0.9)."""

  def __init__(self, interrupt_after=None):
    self.model = mm.default_model()
    self.calls, self.interrupt_after, self.max_pixels = 0, interrupt_after, 0

  def locate(self, image, landmarks=None):
    del landmarks
    n = 0 if abs(image[0, 0, 0] - 0.2) < 0.01 else 2 if abs(image[0, 0, 0] - 0.3) < 0.01 else 1
    return [rec_lib.Located(np.zeros(4, np.float32), 1.0, "hog")] * n

  def reconstruct_located(self, pairs):
    self.calls += 1
    if self.interrupt_after is not None and self.calls > self.interrupt_after:
      raise KeyboardInterrupt
    self.max_pixels = max(self.max_pixels,
                          sum(im.shape[0] * im.shape[1] for im, _ in {id(p[0]): p for p in
                                                                       pairs}.values()))
    return [_face(im, bad=abs(im[0, 0, 0] - 0.9) < 0.01) for im, _ in pairs]


@pytest.fixture
def folder(tmp_path):
  d = tmp_path / "in"
  _touch_image(d / "a.jpg")
  _touch_image(d / "a.png")
  _touch_image(d / "b.png", value=0.3)             # two faces
  _touch_image(d / "sub" / "c.png")
  _touch_image(d / "sub" / "deep" / "a.jpg")
  _touch_image(d / "empty.png", value=0.2)         # no face
  _touch_image(d / "nan.png", value=0.9)           # diverges
  (d / "zero.jpg").write_bytes(b"")
  (d / "notes.txt").write_text("hello")
  detect.write_pts(d / "a.pts", np.ones((68, 2)))  # sidecar of a.jpg / a.png: not a failure
  (d / "folder.jpg").mkdir()
  return d


def test_listing_names_and_failures(folder):
  inputs, failures = job.list_inputs(str(folder))
  names = {os.path.relpath(i.path, folder): i.name for i in inputs}
  assert names == {"a.jpg": "a_jpg", "a.png": "a_png", "b.png": "b", "empty.png": "empty",
                   "nan.png": "nan", "zero.jpg": "zero"}
  listed = sorted(os.path.basename(f.image) for f in failures)
  assert listed == ["folder.jpg", "notes.txt"]
  assert all(f.stage == "list" and f.error.startswith(f.image) for f in failures)
  inputs, failures = job.list_inputs(str(folder), recursive=True)
  names = {os.path.relpath(i.path, folder): i.name for i in inputs}
  assert names["sub/c.png"] == "sub/c" and names["sub/deep/a.jpg"] == "sub/deep/a"
  assert [os.path.basename(f.image) for f in failures] == ["notes.txt"]


def test_glob_names_stay_inside(folder, tmp_path):
  # a glob reaching up with '..': names are relative to the matches' common folder
  spec = str(folder / "sub" / ".." / "sub" / "*" / "*.jpg")
  inputs, _ = job.list_inputs(spec)
  assert [i.name for i in inputs] == ["a"]
  assert job._safe_name("../../etc/passwd") == "etc/passwd"
  assert job._safe_name("/abs/x") == "abs/x"
  out = tmp_path / "out"
  out.mkdir()
  os.symlink(tmp_path / "in", out / "link")
  with pytest.raises(ValueError, match="leaves the output folder"):
    job.output_path(str(out), "link/x", ".json")
  assert job.output_path(str(out), "sub/x", ".json") == str(out / "sub" / "x.json")


def _run(inputs, out, rec=None, listing=(), **kw):
  config = job.JobConfig(output_dir=str(out), kinds=KINDS, progress=False, **kw)
  lines = []
  summary = job.run(inputs, rec or FakeReconstructor(), config, list(listing), lines.append)
  return summary, lines


def test_run_writes_reports_and_resumes(folder, tmp_path):
  inputs, listing = job.list_inputs(str(folder), recursive=True)
  out = tmp_path / "out"
  summary, lines = _run(inputs, out, listing=listing, chunk_images=2)
  assert summary.images == 5 and summary.faces == 6 and summary.skipped == 0
  stages = {os.path.basename(f.image): f.stage for f in summary.failures}
  assert stages == {"notes.txt": "list", "zero.jpg": "read", "empty.png": "detect",
                    "nan.png": "reconstruct"}
  assert len(lines) == 4 and all("\n" not in ln for ln in lines)
  # failures.json: strict JSON, the same failures
  saved = json.loads((out / "failures.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  assert [f["image"] for f in saved] == [f.image for f in summary.failures]
  rec = json.loads((out / "b.json").read_text())
  assert [f["overlay"] for f in rec["faces"]] == ["b_0.png", "b_1.png"]
  # a JPEG photo's overlay is a JPEG (PNG took ~20x longer to encode at 1080p)
  rec_jpg = json.loads((out / "a_jpg.json").read_text())
  assert [f["overlay"] for f in rec_jpg["faces"]] == ["a_jpg_0.jpg"]
  with open(out / "a_jpg_0.jpg", "rb") as f:
    assert f.read(3) == b"\xff\xd8\xff"
  assert (out / "sub" / "deep" / "a.json").is_file() and (out / "a_jpg_0.npz").is_file()
  assert not (out / "nan.json").exists()
  assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
  # rerun: complete images skipped; overwrite redoes them
  summary, lines = _run(inputs, out)
  assert summary.skipped == 5 and summary.images == 0
  assert any("skipping 5" in ln for ln in lines)
  (out / "b_1.png").unlink()  # an incomplete image is redone
  summary, _ = _run(inputs, out)
  assert summary.skipped == 4 and summary.images == 1
  summary, _ = _run(inputs, out, overwrite=True)
  assert summary.images == 5


def test_interrupted_run_keeps_finished_chunks(folder, tmp_path):
  inputs, _ = job.list_inputs(str(folder), recursive=True)
  out = tmp_path / "out"
  with pytest.raises(KeyboardInterrupt):
    _run(inputs, out, rec=FakeReconstructor(interrupt_after=1), chunk_images=2)
  done = sorted(p.name for p in out.rglob("*.json") if p.name != "failures.json")
  assert len(done) == 2  # the first chunk (two images) is on disk
  json.loads((out / "failures.json").read_text())  # valid after the interruption
  first = {p: p.stat().st_mtime_ns for p in out.rglob("a_*")}
  summary, lines = _run(inputs, out)
  assert summary.skipped == 2 and summary.images == 3
  assert {p: p.stat().st_mtime_ns for p in first} == first  # nothing done twice


def test_one_failed_write_does_not_stop_the_run(folder, tmp_path):
  inputs, _ = job.list_inputs(str(folder))
  out = tmp_path / "out"
  (out / "a_png_0.png").mkdir(parents=True)  # the overlay of a.png cannot be written
  summary, _ = _run(inputs, out)
  write_fail = [f for f in summary.failures if f.stage == "write"]
  assert [os.path.basename(f.image) for f in write_fail] == ["a.png"]
  assert (out / "a_jpg.json").is_file() and (out / "b.json").is_file()
  assert not (out / "a_png.json").exists()


def test_chunks_bound_the_pixels_held(tmp_path):
  d = tmp_path / "in"
  for i in range(7):
    _touch_image(d / f"p{i}.png", size=(100, 100))
  inputs, _ = job.list_inputs(str(d))
  rec = FakeReconstructor()
  summary, _ = _run(inputs, tmp_path / "out", rec=rec, chunk_pixels=25_000)
  assert summary.images == 7
  assert rec.calls == 3 and rec.max_pixels <= 30_000


def test_shards_partition_and_match_one_run(folder, tmp_path):
  inputs, _ = job.list_inputs(str(folder), recursive=True)
  parts = [job.shard(inputs, i, 3) for i in range(3)]
  assert sorted(sum(parts, []), key=lambda i: i.name) == sorted(inputs, key=lambda i: i.name)
  assert all(parts) or len(inputs) < 3
  # stable: a shard's part does not depend on which other inputs exist
  assert job.shard(inputs[:4], 1, 3) == [i for i in parts[1] if i in inputs[:4]]
  with pytest.raises(ValueError):
    job.shard(inputs, 3, 3)
  one = tmp_path / "one"
  _run(inputs, one)
  two = tmp_path / "two"
  for i in range(2):
    _run(job.shard(inputs, i, 2), two, shard_index=i, num_shards=2)
  files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*")
                              if p.is_file() and not p.name.startswith("failures"))
  assert files(one) == files(two)
  for rel in files(one):
    assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
  shard_failures = sum((json.loads(p.read_text()) for p in two.glob("failures-*.json")), [])
  assert sorted(f["image"] for f in shard_failures) == sorted(
      f["image"] for f in json.loads((one / "failures.json").read_text()))


KILL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
import test_job
from dff3d import job

class KillOnSecondChunk(test_job.FakeReconstructor):
  def reconstruct_located(self, pairs):
    if self.calls == 1:
      os.kill(os.getpid(), signal.SIGKILL)
    return super().reconstruct_located(pairs)

inputs, _ = job.list_inputs({folder!r}, recursive=True)
config = job.JobConfig(output_dir={out!r}, kinds=test_job.KINDS, progress=False, chunk_images=2)
job.run(inputs, KillOnSecondChunk(), config, report=lambda s: None)
"""


def test_sigkill_loses_at_most_the_chunk_in_flight(folder, tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  out = tmp_path / "out"
  tests = os.path.dirname(os.path.abspath(__file__))
  script = KILL_SCRIPT.format(tests=tests, folder=str(folder), out=str(out))
  res = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(tests),
                       capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == -9, res.stderr[-2000:]
  done = sorted(str(p.relative_to(out)) for p in out.rglob("*.json"))
  assert done == ["a_jpg.json", "a_png.json", "failures.json"]
  json.loads((out / "failures.json").read_text())
  inputs, _ = job.list_inputs(str(folder), recursive=True)
  summary, _ = _run(inputs, out)
  assert summary.skipped == 2 and summary.images == 3
