import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from dff3d import shading


def np_normals(v, tri):
  n = np.zeros_like(v)
  for a, b, c in tri:
    fn = np.cross(v[b] - v[a], v[c] - v[a])
    n[a] += fn; n[b] += fn; n[c] += fn
  return n / np.linalg.norm(n, axis=-1, keepdims=True)


def test_vertex_normals_match_reference_and_point_outwards():
  rng = np.random.default_rng(0)
  # A bumpy height field z = h(x, y) triangulated counter-clockwise seen from +z.
  g = 6
  xs, ys = np.meshgrid(np.arange(g, dtype=float), np.arange(g, dtype=float))
  v = np.stack([xs.ravel(), ys.ravel(), 0.2 * rng.normal(size=g * g)], -1)
  tri = []
  for i in range(g - 1):
    for j in range(g - 1):
      a, b, c, d = i * g + j, i * g + j + 1, (i + 1) * g + j, (i + 1) * g + j + 1
      tri += [(a, b, d), (a, d, c)]
  tri = np.array(tri)
  got = np.asarray(shading.vertex_normals(jnp.asarray(v[None], jnp.float32), tri)[0], np.float64)
  np.testing.assert_allclose(got, np_normals(v, tri), atol=1e-5)
  assert (got[:, 2] > 0).all()


def test_sh_basis_orthonormal_over_sphere():
  # Gauss-Legendre in cos(theta) x uniform in phi: exact for these degree-4 products.
  nodes, weights = np.polynomial.legendre.leggauss(16)
  phi = np.linspace(0, 2 * np.pi, 32, endpoint=False)
  ct, ph = np.meshgrid(nodes, phi, indexing="ij")
  st = np.sqrt(1 - ct ** 2)
  dirs = np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1).reshape(-1, 3)
  w = (weights[:, None] * np.full(phi.shape, 2 * np.pi / len(phi))).reshape(-1)
  with jax.enable_x64(True):
    y = np.asarray(shading.sh_basis(jnp.asarray(dirs)))
  gram = (y * w[:, None]).T @ y
  np.testing.assert_allclose(gram, np.eye(9), atol=1e-12)


def test_irradiance_of_constant_radiance_is_pi():
  # Unit radiance from every direction: L00 = sqrt(4 pi); irradiance = pi everywhere.
  n = jnp.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])
  h = shading.irradiance_basis(n)
  np.testing.assert_allclose(h[:, 0] * math.sqrt(4 * math.pi), math.pi, rtol=1e-6)


def test_shade_matches_reference_and_default_light():
  rng = np.random.default_rng(1)
  n = rng.normal(size=(2, 7, 3)); n /= np.linalg.norm(n, axis=-1, keepdims=True)
  alb = rng.uniform(size=(2, 7, 3)); gamma = rng.normal(size=(2, 27))
  got = shading.shade(jnp.asarray(alb, jnp.float32), jnp.asarray(n, jnp.float32),
                      jnp.asarray(gamma, jnp.float32))
  x, y, z = n[..., 0], n[..., 1], n[..., 2]
  ybasis = np.stack([np.full_like(x, 0.282095), 0.488603 * y, 0.488603 * z, 0.488603 * x,
                     1.092548 * x * y, 1.092548 * y * z, 0.315392 * (3 * z * z - 1),
                     1.092548 * x * z, 0.546274 * (x * x - y * y)], -1)
  bands = np.array([np.pi] + [2 * np.pi / 3] * 3 + [np.pi / 4] * 5)
  ref = alb * np.einsum("bnk,bck->bnc", ybasis * bands, gamma.reshape(2, 3, 9))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  # The default light gives 1.0 towards the camera (+z) and 0.8 side-on.
  lit = shading.shade(jnp.ones((1, 2, 3)), jnp.array([[[0, 0, 1.0], [1.0, 0, 0]]]),
                      shading.default_lighting()[None])
  np.testing.assert_allclose(lit[0, :, 0], [1.0, 0.8], atol=1e-5)


def test_shading_gradients_match_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    v = jnp.asarray(rng.normal(size=(1, 4, 3)))
    tri = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1]])
    alb = jnp.asarray(rng.uniform(size=(1, 4, 3)))
    gamma = jnp.asarray(rng.normal(size=(1, 27)))

    def f(v, alb, gamma):
      return shading.shade(alb, shading.vertex_normals(v, tri), gamma)

    check_grads(f, (v, alb, gamma), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
