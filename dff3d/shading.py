"""Vertex normals, real spherical harmonics and Lambertian SH shading (paper Sec. 3.1).

Colour of vertex i: C_i = t_i * sum_b gamma_{c,b} H_b(n_i) per channel c, with the 9 real SH
basis functions Y_lm (l <= 2) pre-multiplied by the Lambertian kernel's band factors
A_0 = pi, A_1 = 2 pi / 3, A_2 = pi / 4 (Ramamoorthi & Hanrahan 2001), so gamma are the SH
coefficients of the incident radiance and H_b(n) @ gamma is the irradiance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

# Real SH normalisation constants, in the order
# Y00, Y1-1 (y), Y10 (z), Y11 (x), Y2-2 (xy), Y2-1 (yz), Y20 (3z^2-1), Y21 (xz), Y22 (x^2-y^2).
SH_C0 = 0.5 * math.sqrt(1.0 / math.pi)
SH_C1 = math.sqrt(3.0 / (4.0 * math.pi))
SH_C2 = 0.5 * math.sqrt(15.0 / math.pi)
SH_C20 = 0.25 * math.sqrt(5.0 / math.pi)
SH_C22 = 0.25 * math.sqrt(15.0 / math.pi)
# Lambertian band factors A_l for the 9 functions.
LAMBERT_BANDS = np.array([math.pi] + [2.0 * math.pi / 3.0] * 3 + [math.pi / 4.0] * 5,
                         dtype=np.float32)
NUM_SH = 9


def vertex_normals(vertices, triangles):
  """Area-weighted unit vertex normals.

  Args:
    vertices: (B, N, 3) any frame; triangles: (T, 3) int, counter-clockwise seen from outside.
  Returns:
    (B, N, 3) unit normals (sum of adjacent triangles' cross products, which weights each by
    twice its area, then normalised); isolated vertices get (0, 0, 1).
  """
  v0 = vertices[:, triangles[:, 0]]
  v1 = vertices[:, triangles[:, 1]]
  v2 = vertices[:, triangles[:, 2]]
  face_n = jnp.cross(v1 - v0, v2 - v0)  # (B, T, 3), |.| = 2 area
  n = jnp.zeros_like(vertices)
  for k in range(3):
    n = n.at[:, triangles[:, k]].add(face_n)
  # Normalised component by component, not with `linalg.norm` and a broadcast length: XLA:CPU
  # sends reductions over a length-3 minor axis (the norm, and the transpose of the
  # broadcast) to YNNPACK, which took 1.2 ms of the ICT face's fwd+bwd at batch 1
  # (BUILD_NOTES, "Rasterizer"). The inner `where` keeps the gradient finite at n = 0.
  x, y, z = n[..., 0], n[..., 1], n[..., 2]
  squared = x * x + y * y + z * z
  ok = squared > 1e-24
  inv = jax.lax.rsqrt(jnp.where(ok, squared, 1.0))
  return jnp.stack([jnp.where(ok, x * inv, 0.0), jnp.where(ok, y * inv, 0.0),
                    jnp.where(ok, z * inv, 1.0)], axis=-1)


def sh_basis(normals):
  """The 9 orthonormal real SH functions Y_lm (l = 0, 1, 2) at unit directions.

  Args:
    normals: (..., 3) unit vectors (x, y, z).
  Returns:
    (..., 9) in the order Y00, Y1-1, Y10, Y11, Y2-2, Y2-1, Y20, Y21, Y22; orthonormal over
    the sphere: integral Y_a Y_b dS = delta_ab.
  """
  x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
  return jnp.stack([
      jnp.full_like(x, SH_C0),
      SH_C1 * y, SH_C1 * z, SH_C1 * x,
      SH_C2 * x * y, SH_C2 * y * z, SH_C20 * (3.0 * z * z - 1.0), SH_C2 * x * z,
      SH_C22 * (x * x - y * y)], -1)


def irradiance_basis(normals):
  """H_b(n) = A_l Y_lm(n): (..., 9), the Lambertian-convolved SH basis."""
  return sh_basis(normals) * LAMBERT_BANDS


def default_lighting():
  """(27,) a soft frontal light: ambient giving irradiance 0.8 plus a +z (towards the camera
  in a frontal pose) band-1 term of 0.2, identical for r, g, b."""
  per_channel = np.zeros(NUM_SH, np.float32)
  per_channel[0] = 0.8 / (math.pi * SH_C0)
  per_channel[2] = 0.2 / (2.0 * math.pi / 3.0 * SH_C1)
  return jnp.asarray(np.tile(per_channel, 3))


def shade(albedo, normals, lighting):
  """Lambertian SH shading.

  Args:
    albedo: (B, N, 3) in [0, 1].
    normals: (B, N, 3) unit normals in the frame the lighting is expressed in (camera space
      in the render pipeline, so light stays fixed when the head turns).
    lighting: (B, 27) channel-major SH coefficients.
  Returns:
    (B, N, 3) vertex colours C = albedo * (H(n) @ gamma_c); not clipped.
  """
  h = irradiance_basis(normals)  # (B, N, 9)
  gamma = lighting.reshape(lighting.shape[0], 3, NUM_SH)
  irradiance = jnp.einsum("bnk,bck->bnc", h, gamma)
  return albedo * irradiance
