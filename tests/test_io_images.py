"""dff3d.io: image formats, EXIF, bit depth, bad files, atomic writers, depth PNG, textured OBJ."""

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import trimesh
from PIL import Image, features

from dff3d import io

LOSSY = (".jpg", ".jpeg", ".jpe", ".jfif", ".webp")


def _quadrants(h=16, w=16):
  """(h, w, 3) float image: top-left red, top-right green, bottom-left blue, bottom-right white."""
  img = np.zeros((h, w, 3), np.float32)
  img[: h // 2, : w // 2] = (1, 0, 0)
  img[: h // 2, w // 2:] = (0, 1, 0)
  img[h // 2:, : w // 2] = (0, 0, 1)
  img[h // 2:, w // 2:] = (1, 1, 1)
  return img


def _png_rgb16(path, rgb16):
  """Hand-made 16-bit-per-channel RGB PNG (PIL cannot write one)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
  h, w, _ = rgb16.shape
  raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))
  header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 = RGB
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                   + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ---- reading ----------------------------------------------------------------------------------

def test_image_extensions_are_lowercase_dotted_and_readable_by_pil():
  assert isinstance(io.IMAGE_EXTENSIONS, tuple)
  for ext in (".jpe", ".tif", ".tiff", ".webp", ".gif", ".pbm", ".pnm"):
    assert ext in io.IMAGE_EXTENSIONS
  registered = Image.registered_extensions()
  for ext in io.IMAGE_EXTENSIONS:
    assert ext.startswith(".") and ext == ext.lower() and ext in registered
  assert "photo.TIFF".lower().endswith(io.IMAGE_EXTENSIONS)


@pytest.mark.parametrize("ext", io.IMAGE_EXTENSIONS)
def test_every_listed_format_round_trips(tmp_path, ext):
  if ext == ".webp" and not features.check("webp"):
    pytest.skip("PIL built without WebP")
  img = _quadrants()
  io.write_image(tmp_path / f"a{ext}", img)
  got = io.read_image(tmp_path / f"a{ext}")
  assert got.shape == (16, 16, 3) and got.dtype == np.float32
  if ext in LOSSY:
    assert np.abs(got - img).mean() < 0.05
  elif ext == ".pbm" and Image.open(tmp_path / f"a{ext}").mode == "1":
    assert set(np.unique(got)) <= {0.0, 1.0}
  else:
    np.testing.assert_allclose(got, img, atol=1e-6)


def test_gif_and_webp_animations_give_first_frame(tmp_path):
  frames = [Image.new("RGB", (6, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
  frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
  assert Image.open(tmp_path / "a.gif").n_frames == 2
  np.testing.assert_allclose(io.read_image(tmp_path / "a.gif")[0, 0], [1, 0, 0])
  if features.check("webp"):
    frames[0].save(tmp_path / "a.webp", save_all=True, append_images=frames[1:], lossless=True)
    np.testing.assert_allclose(io.read_image(tmp_path / "a.webp")[0, 0], [1, 0, 0])


def test_exif_orientation_makes_sideways_photo_upright(tmp_path):
  raw = np.zeros((16, 32, 3), np.uint8)  # stored 32 wide, 16 tall
  raw[:8, :8] = 255  # marked top-left corner of the stored pixels
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  Image.fromarray(raw).save(tmp_path / "side.jpg", exif=exif, quality=95)
  Image.fromarray(raw).save(tmp_path / "plain.jpg", quality=95)
  assert io.read_image(tmp_path / "plain.jpg").shape == (16, 32, 3)
  up = io.read_image(tmp_path / "side.jpg")
  assert up.shape == (32, 16, 3)
  # Turning the stored image clockwise moves its top-left corner to the top right.
  assert up[:8, 8:].mean() > 0.9 and up[:8, :8].mean() < 0.1 and up[8:].mean() < 0.1


def test_16bit_png_scaled_by_bit_depth_not_maximum(tmp_path):
  dark = np.linspace(0, 1000, 20).reshape(4, 5).astype(np.uint16)
  im = Image.fromarray(dark)
  assert im.mode == "I;16"
  im.save(tmp_path / "dark.png")
  assert Image.open(tmp_path / "dark.png").mode in ("I;16", "I")
  got = io.read_image(tmp_path / "dark.png")
  assert got.shape == (4, 5, 3)
  np.testing.assert_allclose(got[..., 1], dark / 65535.0, atol=1e-6)
  assert abs(got.max() - 1000 / 65535) < 1e-6  # ~0.015, not 1.0
  full = np.array([[0, 65535]], np.uint16)
  Image.fromarray(full).save(tmp_path / "full.png")
  np.testing.assert_allclose(io.read_image(tmp_path / "full.png")[0, :, 0], [0, 1])
  # 8-bit stays / 255 even when dark.
  Image.fromarray(np.full((2, 2), 10, np.uint8)).save(tmp_path / "dark8.png")
  np.testing.assert_allclose(io.read_image(tmp_path / "dark8.png"), 10 / 255, atol=1e-6)


def test_16bit_tiff_pgm_rgb_and_float_tiff(tmp_path):
  dark = np.array([[0, 500], [1000, 2000]], np.uint16)
  Image.fromarray(dark).save(tmp_path / "l.tif")
  Image.fromarray(dark.astype(">u2")).save(tmp_path / "b.tif")
  Image.fromarray(dark).save(tmp_path / "g.pgm")  # PIL reads 16-bit PGM back as mode 'I'
  assert {Image.open(tmp_path / n).mode for n in ("l.tif", "b.tif", "g.pgm")} == {
      "I;16", "I;16B", "I"}
  for name in ("l.tif", "b.tif", "g.pgm"):
    np.testing.assert_allclose(io.read_image(tmp_path / name)[..., 2], dark / 65535.0,
                               atol=1e-6, err_msg=name)
  # 16 bits per channel RGB: PIL keeps the top 8 bits; the scale must still follow the data.
  rgb16 = np.array([[[1000, 30000, 65535], [256, 512, 0]]], np.uint16)
  _png_rgb16(tmp_path / "rgb16.png", rgb16)
  np.testing.assert_allclose(io.read_image(tmp_path / "rgb16.png"), rgb16 / 65535.0,
                             atol=1 / 255)
  f = np.array([[-0.5, 0.25], [1.5, 0.75]], np.float32)
  Image.fromarray(f).save(tmp_path / "f.tif")
  assert Image.open(tmp_path / "f.tif").mode == "F"
  np.testing.assert_allclose(io.read_image(tmp_path / "f.tif")[..., 0], [[0, 0.25], [1, 0.75]])


def test_alpha_and_palette_composite_over_black(tmp_path):
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., :3] = 200
  rgba[..., 3] = [[255, 0], [51, 255]]
  Image.fromarray(rgba).save(tmp_path / "a.png")
  got = io.read_image(tmp_path / "a.png")
  np.testing.assert_allclose(got[..., 0], 200 / 255 * rgba[..., 3] / 255, atol=1e-6)
  la = Image.fromarray(rgba[..., [0, 3]], "LA")
  la.save(tmp_path / "la.png")
  np.testing.assert_allclose(io.read_image(tmp_path / "la.png"), got, atol=1e-6)


def _bad(tmp_path, name, content):
  p = tmp_path / name
  if content is None:
    p.mkdir()
  else:
    p.write_bytes(content)
  return p


def _truncated(tmp_path, ext):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(tmp_path / f"t{ext}")
  data = (tmp_path / f"t{ext}").read_bytes()
  return data[: len(data) // 2]


@pytest.mark.parametrize("name,kind,expect", [
    ("folder.png", "dir", "is a directory"),
    ("empty.png", "empty", "empty file"),
    ("notes.jpg", "text", "cannot read image"),
    ("cut.jpg", "truncated", "cannot read image"),
    ("cut.png", "truncated", "cannot read image"),
])
def test_bad_files_raise_one_line_image_file_error(tmp_path, name, kind, expect):
  content = {"dir": None, "empty": b"", "text": b"just some text\nwith lines\n",
             "truncated": _truncated(tmp_path, os.path.splitext(name)[1])
             if kind == "truncated" else None}[kind]
  p = _bad(tmp_path, name, content)
  with pytest.raises(io.ImageFileError) as e:
    io.read_image(p)
  msg = str(e.value)
  assert msg.startswith(f"{p}: ") and expect in msg and "\n" not in msg
  assert e.value.__cause__ is None  # no chained PIL traceback
  assert e.value.__context__ is None or e.value.__suppress_context__


@pytest.mark.parametrize("side", [12, 20])  # 144 px: PIL warns; 400 px: PIL raises
def test_decompression_bomb_rejected(tmp_path, monkeypatch, side):
  Image.new("RGB", (side, side)).save(tmp_path / "big.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with pytest.raises(io.ImageFileError, match=r"big\.png: image too large") as e:
    io.read_image(tmp_path / "big.png")
  assert "\n" not in str(e.value)


# ---- atomic writers ---------------------------------------------------------------------------

def test_atomic_output_uses_hidden_temp_then_replaces(tmp_path):
  target = tmp_path / "out.txt"
  target.write_text("old")
  with io.atomic_output(target, "w") as f:
    f.write("new")
    tmp = [n for n in os.listdir(tmp_path) if n != "out.txt"]
    assert len(tmp) == 1 and tmp[0].startswith(".") and tmp[0].endswith(".tmp")
    assert str(os.getpid()) in tmp[0]
    assert target.read_text() == "old"
  assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]
  with pytest.raises(RuntimeError):
    with io.atomic_output(target, "wb") as f:
      f.write(b"partial")
      raise RuntimeError("boom")
  assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def _all_writers(d):
  v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
  t = np.array([[0, 1, 2]])
  return {
      "image": lambda: io.write_image(d / "a.png", np.zeros((2, 2, 3))),
      "obj": lambda: io.write_obj(d / "a.obj", v, t, colors=np.ones((3, 3))),
      "ply": lambda: io.write_ply(d / "a.ply", v, t),
      "json": lambda: io.write_json(d / "a.json", {"x": np.float32(1)}),
      "npz": lambda: io.write_npz(d / "a.npz", v=v),
      "depth": lambda: io.write_depth_png(d / "a.png", np.ones((2, 2)), np.ones((2, 2), bool)),
      "textured": lambda: io.write_textured_obj(d / "a.obj", v, t, v[:, :2], t,
                                                np.zeros((2, 2, 3))),
  }


@pytest.mark.parametrize("writer", list(_all_writers(None)))
def test_every_writer_leaves_nothing_when_it_fails(tmp_path, monkeypatch, writer):
  def fail(src, dst):
    raise OSError("disk full")
  monkeypatch.setattr(io.os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    _all_writers(tmp_path)[writer]()
  assert os.listdir(tmp_path) == []
  monkeypatch.undo()
  _all_writers(tmp_path)[writer]()
  assert os.listdir(tmp_path) and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_writer_failing_mid_write_keeps_old_file(tmp_path, monkeypatch):
  io.write_npz(tmp_path / "a.npz", x=np.arange(3))
  with pytest.raises(Exception):  # an object array that cannot be pickled fails mid-file
    io.write_npz(tmp_path / "a.npz", x=np.arange(5), bad=np.array([lambda: 0], object))
  np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["x"], np.arange(3))
  def half_save(self, fp, format=None, **kw):
    fp.write(b"\x89PNG half")
    raise OSError("encoder died")
  monkeypatch.setattr(Image.Image, "save", half_save)
  with pytest.raises(OSError, match="encoder died"):
    io.write_image(tmp_path / "new.png", np.zeros((2, 2, 3)))
  assert sorted(os.listdir(tmp_path)) == ["a.npz"]


def test_write_npz_writes_exactly_the_given_name(tmp_path):
  io.write_npz(tmp_path / "arrays.bin", a=np.arange(4), b=np.eye(2))
  assert os.listdir(tmp_path) == ["arrays.bin"]
  with np.load(tmp_path / "arrays.bin") as z:
    np.testing.assert_array_equal(z["a"], np.arange(4))
    np.testing.assert_array_equal(z["b"], np.eye(2))


@pytest.mark.parametrize("bad", [float("nan"), [1.0, float("inf")], {"a": np.float32("nan")},
                                 {"deep": [{"x": np.array([0.0, -np.inf])}]}])
def test_write_json_rejects_nan_and_inf(tmp_path, bad):
  with pytest.raises(ValueError, match=r"r\.json: NaN or infinity") as e:
    io.write_json(tmp_path / "r.json", {"value": bad})
  assert "\n" not in str(e.value)
  assert os.listdir(tmp_path) == []


def test_write_json_is_strict_and_converts_numpy(tmp_path):
  obj = {"a": np.float32(0.5), "b": np.arange(3), "c": [np.int64(2)], "d": None}
  io.write_json(tmp_path / "r.json", obj)
  text = (tmp_path / "r.json").read_text()
  def no_constants(name):
    raise AssertionError(f"non-standard JSON constant {name}")
  assert json.loads(text, parse_constant=no_constants) == {"a": 0.5, "b": [0, 1, 2], "c": [2],
                                                           "d": None}


# ---- depth PNG --------------------------------------------------------------------------------

def test_write_depth_png_is_16bit_and_round_trips(tmp_path):
  rng = np.random.default_rng(1)
  depth = rng.uniform(0.3, 1.7, (30, 40))
  mask = rng.random((30, 40)) > 0.3
  depth[~mask] = -5.0  # garbage where there is no surface must not matter
  depth[0, 0], mask[0, 0] = np.nan, True  # a non-finite depth counts as no surface
  info = io.write_depth_png(tmp_path / "d.png", depth, mask)
  assert info["file"] == "d.png" and info["invalid"] == 0
  assert set(info) >= {"file", "scale", "offset", "invalid"}
  json.dumps(info, allow_nan=False)
  im = Image.open(tmp_path / "d.png")
  assert im.format == "PNG" and im.mode in ("I;16", "I")
  value = np.asarray(im).astype(np.int64)
  valid = mask & np.isfinite(depth)
  assert (value[~valid] == 0).all() and value[valid].min() == 1 and value[valid].max() == 65535
  decoded = info["offset"] + value / info["scale"]
  step = (depth[valid].max() - depth[valid].min()) / 65534
  assert np.abs(decoded[valid] - depth[valid]).max() <= 0.5 * step + 1e-12
  assert step < 3e-5  # 1.4 m range -> ~21 micrometres per code


def test_write_depth_png_constant_and_empty(tmp_path):
  info = io.write_depth_png(tmp_path / "c.png", np.full((3, 3), 2.5), np.eye(3, dtype=bool))
  value = np.asarray(Image.open(tmp_path / "c.png")).astype(np.int64)
  np.testing.assert_allclose((info["offset"] + value / info["scale"])[np.eye(3, dtype=bool)], 2.5)
  assert (value[~np.eye(3, dtype=bool)] == 0).all()
  io.write_depth_png(tmp_path / "e.png", np.ones((3, 3)), np.zeros((3, 3), bool))
  assert (np.asarray(Image.open(tmp_path / "e.png")) == 0).all()
  with pytest.raises(ValueError, match=r"x\.png: depth must be"):
    io.write_depth_png(tmp_path / "x.png", np.ones((3, 3)), np.ones((3, 2), bool))


# ---- textured OBJ -----------------------------------------------------------------------------

def _textured_quad():
  v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0.5]], np.float64)
  t = np.array([[0, 1, 2], [1, 3, 2]])
  # Each vertex sits at the centre of one texture quadrant (OBJ: v = 1 is the top row).
  uv = np.array([[0.25, 0.75], [0.75, 0.75], [0.25, 0.25], [0.75, 0.25]])
  expected = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]])
  return v, t, uv, expected


def _check_textured(path, v, t, uv, expected, size):
  m = trimesh.load(path, process=False)
  assert len(m.vertices) == len(v) and len(m.faces) == len(t)
  image = m.visual.material.image
  assert image is not None and image.size == size
  order = [int(np.argmin(np.linalg.norm(v - p, axis=1))) for p in m.vertices]
  np.testing.assert_allclose(m.vertices, v[order], atol=1e-6)
  np.testing.assert_allclose(m.visual.uv, uv[order], atol=1e-6)
  colours = trimesh.visual.color.uv_to_color(m.visual.uv, image)[:, :3]
  np.testing.assert_array_equal(colours, expected[order])


def test_textured_obj_opens_in_trimesh_with_texture(tmp_path):
  v, t, uv, expected = _textured_quad()
  io.write_textured_obj(tmp_path / "face.obj", v, t, uv, t, _quadrants(8, 8))
  assert sorted(os.listdir(tmp_path)) == ["face.mtl", "face.obj", "face.png"]
  obj = (tmp_path / "face.obj").read_text().splitlines()
  assert "mtllib face.mtl" in obj and any(s.startswith("usemtl ") for s in obj)
  assert sum(s.startswith("vt ") for s in obj) == 4 and "f 1/1 2/2 3/3" in obj
  mtl = (tmp_path / "face.mtl").read_text().splitlines()
  assert any(s.startswith("newmtl ") for s in mtl) and "map_Kd face.png" in mtl
  assert all(any(s.startswith(k + " ") for s in mtl) for k in ("Ka", "Kd", "Ks"))
  _check_textured(tmp_path / "face.obj", v, t, uv, expected, (8, 8))
  # Names are relative: the folder still works after moving it.
  moved = shutil.move(tmp_path, tmp_path.parent / (tmp_path.name + "_moved"))
  _check_textured(os.path.join(moved, "face.obj"), v, t, uv, expected, (8, 8))


def test_textured_obj_custom_texture_name(tmp_path):
  v, t, uv, expected = _textured_quad()
  io.write_textured_obj(tmp_path / "m.obj", v, t, uv, t, _quadrants(16, 16),
                        texture_name="albedo.png")
  assert "map_Kd albedo.png" in (tmp_path / "m.mtl").read_text()
  _check_textured(tmp_path / "m.obj", v, t, uv, expected, (16, 16))


def test_atomic_output_writes_into_devices_without_replacing_them():
  import stat  # pylint: disable=g-import-not-at-top
  io.write_json("/dev/null", {"a": 1})
  assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_cmyk_jpeg_reads_as_rgb(tmp_path):
  rgb = np.zeros((16, 20, 3), np.uint8)
  rgb[:, :10] = (200, 30, 40)   # a red half and a blue half
  rgb[:, 10:] = (20, 40, 190)
  path = tmp_path / "cmyk.jpg"
  Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
  with Image.open(path) as im:
    assert im.mode == "CMYK"
  out = io.read_image(path)
  assert out.shape == (16, 20, 3)
  np.testing.assert_allclose(out[8, 3], rgb[8, 3] / 255.0, atol=0.08)
  np.testing.assert_allclose(out[8, 16], rgb[8, 16] / 255.0, atol=0.08)
