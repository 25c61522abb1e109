"""Rotations, full-perspective projection and crop transforms.

Conventions (also in BUILD_NOTES.md):
- Model space: +y up, +z out of the face towards the viewer, +x to the subject's left.
- Rotation from angles (pitch, yaw, roll) in radians about x, y, z:
  R = Rz(roll) @ Ry(yaw) @ Rx(pitch); points move as p' = R p.
- Camera space: camera at the origin looking along -z, +y up; p_cam = R p + m.
- Screen: x_px = cx + f X / (-Z), y_px = cy - f Y / (-Z), depth = -Z (> 0 in front).
- Pixels: x right, y down; pixel (row i, column j) has its centre at (j + 0.5, i + 0.5), so
  the principal point of a W x H crop is (W / 2, H / 2), the image centre.
"""

import jax.numpy as jnp

# Deep3DFaceRecon's focal length, 1015 px for a 224 px crop, as a fraction of the crop width.
FOCAL_PER_PIXEL = 1015.0 / 224.0
# Default distance from camera to the model origin, in model units (centimetres for ICT): with
# FOCAL_PER_PIXEL the mean ICT face's 68 landmarks then span 1 / 1.6 of the crop width, the
# framing of data.augment.face_box (scale 1.6), so a crop of a real face and an untrained
# regressor's mean face agree.
DEFAULT_DISTANCE = 110.0


def default_focal(width):
  """Focal length in pixels for a crop `width` pixels wide (same field of view at any size)."""
  return FOCAL_PER_PIXEL * width


def rotation_matrix(angles):
  """Rotation matrices from Euler angles.

  Args:
    angles: (..., 3) radians, (pitch, yaw, roll) about the x, y and z axes.

  Returns:
    (..., 3, 3) R = Rz(roll) @ Ry(yaw) @ Rx(pitch); orthonormal with det 1.
  """
  angles = jnp.asarray(angles)
  cx, cy, cz = (jnp.cos(angles[..., i]) for i in range(3))
  sx, sy, sz = (jnp.sin(angles[..., i]) for i in range(3))
  one, zero = jnp.ones_like(cx), jnp.zeros_like(cx)
  rx = jnp.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1)
  ry = jnp.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1)
  rz = jnp.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1)
  shape = angles.shape[:-1] + (3, 3)
  return rz.reshape(shape) @ ry.reshape(shape) @ rx.reshape(shape)


def angles_from_matrix(r):
  """Inverse of rotation_matrix for |yaw| < 90 degrees.

  Args:
    r: (..., 3, 3) rotation matrices.
  Returns:
    (..., 3) (pitch, yaw, roll) radians.
  """
  yaw = jnp.arcsin(jnp.clip(-r[..., 2, 0], -1.0, 1.0))
  pitch = jnp.arctan2(r[..., 2, 1], r[..., 2, 2])
  roll = jnp.arctan2(r[..., 1, 0], r[..., 0, 0])
  return jnp.stack([pitch, yaw, roll], -1)


def to_camera(vertices, angles, translation):
  """Model space -> camera space, p_cam = R p + m.

  Args:
    vertices: (B, N, 3) model space.
    angles: (B, 3) radians (pitch, yaw, roll).
    translation: (B, 3) model units.
  Returns:
    (B, N, 3) camera space (camera looks along -z).
  """
  r = rotation_matrix(angles)
  return jnp.einsum("bij,bnj->bni", r, vertices) + translation[:, None, :]


def project(points_cam, focal, principal_point):
  """Full-perspective projection to screen vertices.

  Args:
    points_cam: (B, N, 3) camera space; visible points have z < 0.
    focal: scalar or (B,) focal length in pixels.
    principal_point: (2,) or (B, 2) pixels (cx, cy), usually (W / 2, H / 2).
  Returns:
    (B, N, 3) screen vertices (x_px, y_px, depth) with depth = -z. Points at or behind the
    camera get depth <= 0 and finite (meaningless) x, y; the rasterizer drops them.
  """
  focal = jnp.asarray(focal, points_cam.dtype)
  focal = focal.reshape(focal.shape + (1,) * (2 - focal.ndim)) if focal.ndim else focal
  pp = jnp.asarray(principal_point, points_cam.dtype)
  pp = pp.reshape((-1, 1, 2))
  depth = -points_cam[..., 2]
  safe = jnp.where(jnp.abs(depth) > 1e-6, depth, 1e-6)
  x = pp[..., 0] + focal * points_cam[..., 0] / safe
  y = pp[..., 1] - focal * points_cam[..., 1] / safe
  return jnp.stack([x, y, depth], -1)


def default_camera(height, width):
  """(focal, principal_point) for an H x W crop: FOCAL_PER_PIXEL * W and the image centre."""
  return default_focal(width), jnp.array([width / 2.0, height / 2.0], jnp.float32)


# ---- 2D affine transforms between image frames --------------------------------------------
# An affine A (..., 2, 3) maps a pixel coordinate p (x, y) to A[:, :2] p + A[:, 2]. Since pixel
# centres sit at integer + 0.5 in every frame, a scale about the origin maps the continuous
# pixel area correctly (the corner (0, 0) is the image corner).


def crop_transform(box, size):
  """Affine from original-image pixels to a size x size crop of `box`.

  Args:
    box: (..., 4) (x0, y0, x1, y1) in original-image pixels (the crop's outer corners).
    size: crop side in pixels.
  Returns:
    (..., 2, 3) affine; the crop may be non-square-scaled if the box is not square.
  """
  box = jnp.asarray(box, jnp.float32)
  sx = size / (box[..., 2] - box[..., 0])
  sy = size / (box[..., 3] - box[..., 1])
  zero = jnp.zeros_like(sx)
  row0 = jnp.stack([sx, zero, -sx * box[..., 0]], -1)
  row1 = jnp.stack([zero, sy, -sy * box[..., 1]], -1)
  return jnp.stack([row0, row1], -2)


def apply_affine(affine, points):
  """Apply (..., 2, 3) affines to points (..., K, 2+) (extra columns pass through)."""
  xy = jnp.einsum("...ij,...kj->...ki", affine[..., :2], points[..., :2]) + affine[..., None, :, 2]
  return jnp.concatenate([xy, points[..., 2:]], -1)


def invert_affine(affine):
  """Inverse of (..., 2, 3) affines."""
  a = affine[..., :2]
  inv = jnp.linalg.inv(a)
  t = -jnp.einsum("...ij,...j->...i", inv, affine[..., 2])
  return jnp.concatenate([inv, t[..., None]], -1)


def compose_affine(a, b):
  """The affine 'a after b': p -> a(b(p)). Both (..., 2, 3)."""
  lin = a[..., :2] @ b[..., :2]
  t = jnp.einsum("...ij,...j->...i", a[..., :2], b[..., 2]) + a[..., 2]
  return jnp.concatenate([lin, t[..., None]], -1)
