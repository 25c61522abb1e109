import numpy as np
import pytest
import trimesh
from PIL import Image

from dff3d import io


def _mesh():
  v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0.5]], np.float32)
  t = np.array([[0, 1, 2], [1, 3, 2]])
  c = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5]])
  return v, t, c


def test_ply_opens_in_trimesh_with_colours(tmp_path):
  v, t, c = _mesh()
  io.write_ply(tmp_path / "m.ply", v, t, c)
  m = trimesh.load(tmp_path / "m.ply", process=False)
  np.testing.assert_allclose(m.vertices, v)
  np.testing.assert_array_equal(m.faces, t)
  np.testing.assert_array_equal(m.visual.vertex_colors[:, :3], np.round(c * 255))


def test_obj_opens_in_trimesh_with_colours_and_uv(tmp_path):
  v, t, c = _mesh()
  io.write_obj(tmp_path / "c.obj", v, t, colors=c)
  m = trimesh.load(tmp_path / "c.obj", process=False)
  np.testing.assert_allclose(m.vertices, v, atol=1e-6)
  np.testing.assert_array_equal(m.faces, t)
  np.testing.assert_allclose(m.visual.vertex_colors[:, :3] / 255.0, c, atol=1 / 255)
  uv = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
  io.write_obj(tmp_path / "u.obj", v, t, uv=uv, triangle_uv=t)
  m = trimesh.load(tmp_path / "u.obj", process=False)
  assert len(m.faces) == 2 and m.visual.uv is not None


def test_read_image_modes_and_errors(tmp_path):
  rgb = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 3 % 256).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "a.png")
  Image.fromarray(rgb[..., 0]).save(tmp_path / "g.pgm")
  rgba = np.concatenate([rgb, np.full((4, 5, 1), 255, np.uint8)], -1)
  Image.fromarray(rgba).save(tmp_path / "r.png")
  np.testing.assert_allclose(io.read_image(tmp_path / "a.png"), rgb / 255.0, atol=1e-6)
  g = io.read_image(tmp_path / "g.pgm")
  assert g.shape == (4, 5, 3) and np.allclose(g[..., 0], g[..., 2])
  np.testing.assert_allclose(io.read_image(tmp_path / "r.png"), rgb / 255.0, atol=1e-6)
  (tmp_path / "bad.jpg").write_bytes(b"garbage")
  with pytest.raises(io.ImageFileError, match=r"bad.jpg: cannot read image"):
    io.read_image(tmp_path / "bad.jpg")
  with pytest.raises(io.ImageFileError, match=r"none.png: no such file"):
    io.read_image(tmp_path / "none.png")
