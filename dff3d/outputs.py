"""What the reconstruction job writes for one face, and the JSON record that lists it.

Kinds (`--outputs`): json (always: the record that marks an image done), mesh (OBJ with
shaded vertex colours), overlay (the photo with the reconstruction and its landmarks: JPEG
for a JPEG photo, else PNG), coefficients (NPZ), depth (16-bit PNG of the surface's z in photo pixels, its decoding in the
record), texture (OBJ + MTL + PNG: a UV texture unwrapped from the photo where the surface is
visible). Every file is written atomically (dff3d.io).
"""

import os

import numpy as np

from dff3d import coefficients as coeffs_lib
from dff3d import io
from dff3d import texture
from dff3d.data import augment

KINDS = ("json", "mesh", "overlay", "coefficients", "depth", "texture")
DEFAULT_KINDS = ("json", "mesh", "overlay", "coefficients")


def parse_kinds(items) -> tuple:
  """Validated output kinds in KINDS order ("json" always included); ValueError naming an
  unknown kind."""
  items = [k.strip() for k in items if k.strip()]
  unknown = sorted(set(items) - set(KINDS))
  if unknown:
    raise ValueError(f"unknown output kind(s) {unknown}; choose from {list(KINDS)}")
  return tuple(k for k in KINDS if k in set(items) | {"json"})


def overlay(image, face, alpha: float = 0.7) -> np.ndarray:
  """(H, W, 3): the grey-shaded reconstruction (skin area) blended over the photo, with the
  68 landmarks the reconstruction matched drawn on top. Only the crop's footprint in the
  photo is warped and blended (time independent of the photo's size)."""
  h, w = image.shape[:2]
  inv = augment.inverse_affine(face.crop_affine)
  s = face.rendering.shape[0]
  corners = np.array([[0, 0], [s, 0], [0, s], [s, s]], np.float64) @ inv[:, :2].T + inv[:, 2]
  x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
  x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int), [w, h])
  out = np.array(image, np.float32, copy=True)
  if x1 > x0 and y1 > y0:
    window = inv - np.array([[0, 0, x0], [0, 0, y0]], np.float64)  # crop -> window pixels
    ren = augment.warp_affine(face.rendering, window, y1 - y0, x1 - x0)
    m = augment.warp_affine(face.mask[..., None], window, y1 - y0, x1 - x0)[..., :1]
    part = out[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = part * (1 - alpha * m) + ren * alpha * m
  return io.draw_points(out, face.landmarks_2d)


def _round(a, digits=3):
  return np.round(np.asarray(a, np.float64), digits).tolist()


def face_record(face) -> dict:
  """The JSON fields of one face that do not name files (all finite floats)."""
  return {"bbox": _round(face.rect), "score": float(face.score), "source": face.source,
          "landmarks_2d": _round(face.landmarks_2d), "landmarks_3d": _round(face.landmarks_3d),
          "pose_deg": face.pose_deg}


# PIL save options per overlay format (PNG level 1: 3x faster than the default level).
_OVERLAY_OPTIONS = {".jpg": {"quality": 92}, ".png": {"compress_level": 1}}


def overlay_suffix(input_path: str) -> str:
  """".jpg" for a JPEG photo (its overlay is a photo too: JPEG encodes a 1080p overlay ~20x
  faster than PNG at compress level 1, BUILD_NOTES), else ".png" (lossless in, lossless out)."""
  return ".jpg" if os.path.splitext(input_path)[1].lower() in (".jpg", ".jpeg") else ".png"


def write_face(out_dir: str, name: str, model, image, face, kinds, texture_size: int = 512,
               overlay_format: str = ".png"):
  """Write face `name`'s files (kinds other than json) into out_dir; returns its JSON record.

  Args:
    name: file stem of this face, e.g. "photo_0" (no folder part).
    image: (H, W, 3) float32 photo; face: reconstructor.Face.
    overlay_format: ".png" or ".jpg" (quality 92), see overlay_suffix.
  """
  rec = face_record(face)
  c = face.coefficients
  path = lambda suffix: os.path.join(out_dir, name + suffix)
  if "mesh" in kinds:
    colours = texture.camera_vertex_colours(model, c)
    io.write_obj(path(".obj"), face.vertices, model.triangles, colors=np.clip(colours, 0, 1),
                 uv=model.uv, triangle_uv=model.triangle_uv)
    rec["mesh"] = name + ".obj"
  if "overlay" in kinds:
    io.write_image(path(overlay_format), overlay(image, face),
                   **_OVERLAY_OPTIONS[overlay_format])
    rec["overlay"] = name + overlay_format
  if "coefficients" in kinds:
    io.write_npz(path(".npz"), crop_affine=face.crop_affine,
                 vector=np.asarray(coeffs_lib.concat(c)),
                 **{f: np.asarray(getattr(c, f)) for f in coeffs_lib.FIELDS})
    rec["coefficients"] = name + ".npz"
  if "depth" in kinds:
    depth, mask = texture.depth_map(model, c, face.crop_affine, face.crop_size, image.shape[:2],
                                    reference_depth=face.reference_depth)
    rec["depth"] = io.write_depth_png(path("_depth.png"), depth, mask)
  if "texture" in kinds:
    tex, _ = texture.unwrap_texture(model, c, face.crop_affine, face.crop_size, image,
                                    texture_size)
    io.write_textured_obj(path("_textured.obj"), face.vertices, model.triangles, model.uv,
                          model.triangle_uv, tex)
    rec["textured_mesh"] = name + "_textured.obj"
  return rec


def record_files(record: dict) -> list:
  """File names (relative to the record's folder) that an image record lists."""
  files = []
  for face in record.get("faces", []):
    for key in ("mesh", "overlay", "coefficients", "textured_mesh"):
      if key in face:
        files.append(face[key])
    if "depth" in face:
      files.append(face["depth"]["file"])
  return files
