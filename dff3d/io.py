"""Files in and out: images, meshes (.obj / .ply) and small JSON helpers.

Only this module, experiments/ and data_prep/ touch files. Errors name the file and the problem
in one line (ImageFileError / MeshFileError), never a deep traceback.
"""

import json
import os

import numpy as np
from PIL import Image


class ImageFileError(ValueError):
  """An image file could not be read; the message names the file."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp")


def read_image(path):
  """Read any PIL-readable image as (H, W, 3) float32 RGB in [0, 1].

  Greyscale is replicated to 3 channels; RGBA is composited over black.
  (16-bit images are scaled by their maximum code value).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageFileError(f"{path}: no such file")
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        arr = np.repeat(arr[..., None], 3, -1)
      elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), np.float32) / 255.0
        arr = rgba[..., :3] * rgba[..., 3:]
      else:
        arr = np.asarray(im.convert("RGB"), np.float32) / 255.0
  except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
    raise ImageFileError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
  if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ImageFileError(f"{path}: unexpected image shape {arr.shape}")
  return np.ascontiguousarray(arr)


def write_image(path, image):
  """Write (H, W, 3) float in [0, 1] (clipped) as an 8-bit image; format from the suffix."""
  arr = np.clip(np.asarray(image, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  Image.fromarray(arr).save(os.fspath(path))


def _colours_u8(colors):
  return np.clip(np.asarray(colors, np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def write_obj(path, vertices, triangles, colors=None, uv=None, triangle_uv=None):
  """Wavefront OBJ with optional per-vertex colours and texture coordinates.

  Args:
    vertices: (N, 3) float; triangles: (T, 3) int, 0-based (written 1-based).
    colors: optional (N, 3) float RGB in [0, 1], written as the widely read 'v x y z r g b'
      extension (MeshLab, trimesh, Blender).
    uv: optional (U, 2) texture coordinates with triangle_uv (T, 3) 0-based indices into uv;
      written as 'vt' lines and 'f v/vt' faces.
  """
  vertices = np.asarray(vertices, np.float64)
  triangles = np.asarray(triangles, np.int64) + 1
  lines = []
  if colors is not None:
    c = np.clip(np.asarray(colors, np.float64), 0.0, 1.0)
    lines += [f"v {x:.6f} {y:.6f} {z:.6f} {r:.4f} {g:.4f} {b:.4f}"
              for (x, y, z), (r, g, b) in zip(vertices, c)]
  else:
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
  if uv is not None and triangle_uv is not None:
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in np.asarray(uv, np.float64)]
    tuv = np.asarray(triangle_uv, np.int64) + 1
    lines += [f"f {a}/{ta} {b}/{tb} {c_}/{tc}"
              for (a, b, c_), (ta, tb, tc) in zip(triangles, tuv)]
  else:
    lines += [f"f {a} {b} {c_}" for a, b, c_ in triangles]
  with open(os.fspath(path), "w") as f:
    f.write("# dff3d mesh\n")
    f.write("\n".join(lines))
    f.write("\n")


def write_ply(path, vertices, triangles, colors=None):
  """Binary little-endian PLY 1.0: float32 x y z, optional uchar red green blue per vertex,
  and 'list uchar int vertex_indices' faces (0-based)."""
  vertices = np.asarray(vertices, np.float32)
  triangles = np.asarray(triangles, np.int32)
  header = ["ply", "format binary_little_endian 1.0", "comment dff3d mesh",
            f"element vertex {len(vertices)}", "property float x", "property float y",
            "property float z"]
  vdtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
  if colors is not None:
    header += ["property uchar red", "property uchar green", "property uchar blue"]
    vdtype += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
  header += [f"element face {len(triangles)}", "property list uchar int vertex_indices",
             "end_header"]
  vert = np.empty(len(vertices), dtype=vdtype)
  vert["x"], vert["y"], vert["z"] = vertices.T
  if colors is not None:
    c = _colours_u8(colors)
    vert["red"], vert["green"], vert["blue"] = c.T
  face = np.empty(len(triangles), dtype=[("n", "u1"), ("i", "<i4", (3,))])
  face["n"] = 3
  face["i"] = triangles
  with open(os.fspath(path), "wb") as f:
    f.write(("\n".join(header) + "\n").encode("ascii"))
    f.write(vert.tobytes())
    f.write(face.tobytes())


def write_json(path, obj):
  """Write JSON with 2-space indent (numpy scalars/arrays converted)."""
  def default(o):
    if isinstance(o, np.ndarray):
      return o.tolist()
    if isinstance(o, np.generic):
      return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")
  with open(os.fspath(path), "w") as f:
    json.dump(obj, f, indent=2, default=default)


def draw_points(image, points, colour=(0.0, 1.0, 0.2), radius=None):
  """Draw small filled discs at points on a copy of an image.

  Args:
    image: (H, W, 3) float in [0, 1]; points: (K, 2) pixels (centres at integer + 0.5).
    radius: disc radius in pixels; default scales with the image (max(1, min(H, W) / 200)).
  Returns:
    (H, W, 3) float32.
  """
  out = np.array(image, np.float32, copy=True)
  h, w = out.shape[:2]
  r = max(1.0, min(h, w) / 200.0) if radius is None else radius
  yy, xx = np.mgrid[0:h, 0:w]
  for x, y in np.asarray(points, np.float64):
    x0, x1 = int(max(0, np.floor(x - r - 1))), int(min(w, np.ceil(x + r + 1)))
    y0, y1 = int(max(0, np.floor(y - r - 1))), int(min(h, np.ceil(y + r + 1)))
    if x0 >= x1 or y0 >= y1:
      continue
    d2 = (xx[y0:y1, x0:x1] + 0.5 - x) ** 2 + (yy[y0:y1, x0:x1] + 0.5 - y) ** 2
    out[y0:y1, x0:x1][d2 <= r * r] = colour
  return out
