"""The reconstruction job's logic (experiments/reconstruct.py holds only its flags): inputs,
landmarks from .pts or the detector, fitting in batches, and the files written per image."""

import glob
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dff3d import camera
from dff3d import coefficients as coeffs_lib
from dff3d import io
from dff3d import morphable_model as mm
from dff3d import reconstruct as reconstruction
from dff3d import shading
from dff3d.data import augment


def list_inputs(spec):
  """Image paths (or the skimage demo token) for a file, folder or glob; sorted."""
  if spec.startswith("skimage:"):
    return [spec]
  if os.path.isdir(spec):
    paths = [os.path.join(spec, f) for f in os.listdir(spec)]
  elif os.path.isfile(spec):
    return [spec]
  else:
    paths = glob.glob(spec)
  return sorted(p for p in paths if p.lower().endswith(io.IMAGE_EXTENSIONS))


def load_image(spec):
  """(stem, image (H, W, 3) float32) for a path or `skimage:NAME`."""
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
    return name, img
  return os.path.splitext(os.path.basename(spec))[0], io.read_image(spec)


def find_faces(spec, image, upsample, min_score=0.0):
  """List of (bbox (4,), landmarks (68, 2)) from `<stem>.pts` or the detector."""
  from dff3d import detect
  pts_path = os.path.splitext(spec)[0] + ".pts"
  if not spec.startswith("skimage:") and os.path.isfile(pts_path):
    pts = detect.read_pts(pts_path)
    if pts.shape != (68, 2):
      raise detect.PtsFileError(f"{pts_path}: expected 68 points, found {len(pts)}")
    box = np.concatenate([pts.min(0), pts.max(0)]).astype(np.float32)
    return [(box, pts.astype(np.float32))]
  return [(f.bbox, f.landmarks)
          for f in detect.detect_faces(image, upsample=upsample, min_score=min_score)]


class Progress:
  """One console line with done / total, rate and ETA."""

  def __init__(self, total):
    self.total, self.done, self.start = total, 0, time.time()

  def step(self, n=1):
    self.done += n
    el = time.time() - self.start
    eta = el / self.done * (self.total - self.done) if self.done else 0.0
    sys.stderr.write(f"\r[{self.done}/{self.total}] {el:.1f}s elapsed, ETA {eta:.1f}s   ")
    if self.done >= self.total:
      sys.stderr.write("\n")
    sys.stderr.flush()


def overlay(image, face, alpha=0.7):
  """The shaded reconstruction (skin area) blended over the photo, with the 68 landmarks."""
  h, w = image.shape[:2]
  inv = np.asarray(camera.invert_affine(jnp.asarray(face.crop_affine)))
  ren = augment.warp_affine(face.rendering, inv, h, w)
  m = augment.warp_affine(np.repeat(face.mask[..., None], 3, -1), inv, h, w)[..., :1]
  out = image * (1 - alpha * m) + ren * alpha * m
  return io.draw_points(out, face.landmarks_2d)


def write_face(out_dir, stem, k, model, image, box, face):
  """Write mesh, overlay and coefficients of face k; return its JSON record."""
  name = f"{stem}_{k}"
  c = face.coefficients
  batched = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], c)
  verts, alb = mm.geometry(model, batched)
  colours = shading.shade(alb, shading.vertex_normals(verts, model.triangles), c.lighting[None])
  io.write_obj(os.path.join(out_dir, name + ".obj"), np.asarray(verts[0]), model.triangles,
               colors=np.clip(np.asarray(colours[0]), 0, 1), uv=model.uv,
               triangle_uv=model.triangle_uv)
  io.write_image(os.path.join(out_dir, name + ".png"), overlay(image, face))
  np.savez(os.path.join(out_dir, name + ".npz"), crop_affine=face.crop_affine,
           vector=np.asarray(coeffs_lib.concat(c)),
           **{f: np.asarray(getattr(c, f)) for f in coeffs_lib.FIELDS})
  pitch, yaw, roll = np.rad2deg(np.asarray(c.rotation, np.float64)).tolist()
  return {"bbox": [float(v) for v in box], "landmarks_2d": face.landmarks_2d.round(3).tolist(),
          "landmarks_3d": face.landmarks_3d.round(3).tolist(),
          "pose_deg": {"yaw": yaw, "pitch": pitch, "roll": roll},
          "mesh": name + ".obj", "overlay": name + ".png", "coefficients": name + ".npz"}


def run(inputs, out_dir, model, config, batch_size, checkpoint=None, upsample=1, min_score=0.0,
        dff_fn=None):
  """Run the job over input specs; returns (faces written per image, failures)."""
  os.makedirs(out_dir, exist_ok=True)
  failures, faces, owners = [], [], []
  records = {}
  for spec in inputs:  # read and find faces; one bad file never stops the run
    try:
      stem, image = load_image(spec)
      found = find_faces(spec, image, upsample, min_score)
      if not found:
        raise ValueError(f"{spec}: no face found")
    except Exception as e:  # noqa: BLE001 - reported per file, one line each
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      msg = msg if msg.startswith(spec) else f"{spec}: {msg}"
      print(f"skipped: {msg}", file=sys.stderr)
      failures.append({"image": spec, "error": msg})
      continue
    records[spec] = (stem, image, [])
    for k, (box, pts) in enumerate(found):
      faces.append((image, pts))
      owners.append((spec, k, box))
  regressor = None
  if checkpoint:
    from dff3d import train  # the regressor side, only when a checkpoint is given
    regressor = train.load_regressor(checkpoint, model)
    config = config.replace(image_size=regressor.image_size)  # crops the network was trained on
  progress = Progress(len(faces))
  results = reconstruction.reconstruct_faces(model, faces, config, batch_size, regressor,
                                             on_batch=progress.step, dff_fn=dff_fn)
  for (spec, k, box), face in zip(owners, results):
    stem, image, recs = records[spec]
    recs.append(write_face(out_dir, stem, k, model, image, box, face))
  for spec, (stem, _, recs) in records.items():
    io.write_json(os.path.join(out_dir, stem + ".json"), {"image": spec, "faces": recs})
  io.write_json(os.path.join(out_dir, "failures.json"), failures)
  return records, failures
