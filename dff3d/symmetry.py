"""Left-right mirror symmetry of a morphable model and of its coefficients.

A photo flipped left-right shows the mirrored head. For a mirror-symmetric mesh (each vertex
has a partner at (-x, y, z); the ICT mesh is exactly so) the mirrored face is again a face of
the model: with F = diag(-1, 1, 1) and `perm` the vertex partners,

  shape:    Mir(S)[v] = F S[perm[v]]; identity and expression coefficients map linearly,
            a' = a M + o, M and o by least squares over the basis (exact where the basis
            spans its own mirror image, which a symmetric model's does);
  albedo:   Mir(T)[v] = T[perm[v]] (colours are not vectors: no F);
  pose:     R' = F R F, i.e. (pitch, yaw, roll) -> (pitch, -yaw, -roll) for R = Rz Ry Rx;
            camera-space translation t' = F t (the principal point is the crop centre);
  lighting: the SH functions odd in x (Y11, Y2-2, Y21) change sign.

`flip_average` uses it for test-time augmentation: a regressor run on a crop and on its mirror
image gives two estimates of one face, averaged in coefficient space (BUILD_NOTES,
"Session 14").
"""

import hashlib

import flax
import jax.numpy as jnp
import numpy as np

from dff3d import coefficients as coeffs_lib
from dff3d import shading

# Sign of each of the 9 SH functions (shading.sh_basis order) under x -> -x.
SH_MIRROR_SIGNS = np.array([1, 1, 1, -1, -1, 1, 1, -1, 1], np.float32)


@flax.struct.dataclass
class MirrorMaps:
  """How coefficients of one model mirror.

  vertex: (N,) int32 partner of each vertex.  identity (Ki, Ki), identity_offset (Ki,),
  expression (Ke, Ke), expression_offset (Ke,), albedo (Ka, Ka), albedo_offset (Ka,):
  a' = a @ matrix + offset for each field.  residual: () float, the largest RMS (model units,
  over vertices) by which a mirrored unit basis vector leaves the basis span.
  """
  vertex: jnp.ndarray
  identity: jnp.ndarray
  identity_offset: jnp.ndarray
  expression: jnp.ndarray
  expression_offset: jnp.ndarray
  albedo: jnp.ndarray
  albedo_offset: jnp.ndarray
  residual: float = flax.struct.field(pytree_node=False, default=0.0)


def vertex_mirror(mean_shape, tolerance: float = 1e-3) -> np.ndarray:
  """(N,) int32 index of each vertex's mirror partner: the vertex nearest to (-x, y, z).

  Args:
    mean_shape: (N, 3) model-space vertices, the symmetry plane x = 0.
    tolerance: largest allowed partner distance, as a fraction of the mesh's extent.
  Raises:
    ValueError when a vertex has no partner within the tolerance (an asymmetric mesh).
  """
  from scipy.spatial import cKDTree
  pts = np.asarray(mean_shape, np.float64)
  dist, idx = cKDTree(pts).query(pts * np.array([-1.0, 1.0, 1.0]))
  limit = tolerance * float(np.ptp(pts, 0).max())
  if dist.max() > limit:
    raise ValueError(f"the mesh is not mirror-symmetric: a vertex's mirror partner is "
                     f"{dist.max():.4g} away (tolerance {limit:.4g})")
  return idx.astype(np.int32)


def _mirror_vectors(x, perm, flip_x: bool):
  """(..., N, 3) per-vertex vectors (flip_x: positions / offsets) or colours mirrored."""
  out = np.asarray(x, np.float64)[..., perm, :]
  if flip_x:
    out = out * np.array([-1.0, 1.0, 1.0])
  return out


def _basis_mirror(basis, mean, perm, flip_x: bool):
  """(M (K, K), offset (K,), residual) with mean + (a M + o) B ~ Mir(mean + a B)."""
  k = basis.shape[0]
  if k == 0:
    return np.zeros((0, 0), np.float32), np.zeros((0,), np.float32), 0.0
  b = np.asarray(basis, np.float64).reshape(k, -1)                     # (K, 3N)
  mb = _mirror_vectors(basis, perm, flip_x).reshape(k, -1)
  dm = (_mirror_vectors(mean, perm, flip_x) - np.asarray(mean, np.float64)).reshape(1, -1)
  sol, *_ = np.linalg.lstsq(b.T, np.concatenate([mb, dm]).T, rcond=None)   # (K, K + 1)
  m, offset = sol[:, :k].T, sol[:, k]
  resid = mb - m @ b
  rms = float(np.sqrt((resid ** 2).reshape(k, -1, 3).sum(-1).mean(-1)).max())
  return m.astype(np.float32), offset.astype(np.float32), rms


# mirror_maps results by model_fingerprint: the least squares take ~2.5 s for the ICT model,
# and every flip-averaged load_regressor needs them.
_MAPS_CACHE: dict = {}
_MAPS_CACHE_SIZE = 4


def model_fingerprint(model) -> str:
  """SHA-1 of the arrays mirror_maps reads (~40 ms for the ICT model)."""
  h = hashlib.sha1()
  for a in (model.mean_shape, model.identity_basis, model.expression_basis,
            model.albedo_basis, model.albedo_mean):
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def mirror_maps(model) -> MirrorMaps:
  """The MirrorMaps of a morphable model (NumPy, float64 least squares), computed once per
  model: later calls with the same arrays return the cached maps."""
  key = model_fingerprint(model)
  if key not in _MAPS_CACHE:
    if len(_MAPS_CACHE) >= _MAPS_CACHE_SIZE:
      _MAPS_CACHE.pop(next(iter(_MAPS_CACHE)))
    _MAPS_CACHE[key] = _compute_mirror_maps(model)
  return _MAPS_CACHE[key]


def _compute_mirror_maps(model) -> MirrorMaps:
  perm = vertex_mirror(model.mean_shape)
  ident = _basis_mirror(model.identity_basis, model.mean_shape, perm, True)
  expr = _basis_mirror(model.expression_basis, model.mean_shape, perm, True)
  alb = _basis_mirror(model.albedo_basis, model.albedo_mean, perm, False)
  return MirrorMaps(vertex=jnp.asarray(perm), identity=jnp.asarray(ident[0]),
                    identity_offset=jnp.asarray(ident[1]), expression=jnp.asarray(expr[0]),
                    expression_offset=jnp.asarray(expr[1]), albedo=jnp.asarray(alb[0]),
                    albedo_offset=jnp.asarray(alb[1]),
                    residual=max(ident[2], expr[2], alb[2]))


def mirror_coefficients(c: coeffs_lib.Coefficients, maps: MirrorMaps) -> coeffs_lib.Coefficients:
  """The coefficients of the mirrored face (fields (B, ...) each; see the module docstring)."""
  channels = c.lighting.shape[-1] // shading.NUM_SH
  return c.replace(
      identity=c.identity @ maps.identity + maps.identity_offset,
      expression=c.expression @ maps.expression + maps.expression_offset,
      albedo=c.albedo @ maps.albedo + maps.albedo_offset,
      rotation=c.rotation * jnp.array([1.0, -1.0, -1.0]),
      translation=c.translation * jnp.array([-1.0, 1.0, 1.0]),
      lighting=c.lighting * jnp.tile(jnp.asarray(SH_MIRROR_SIGNS), channels))


def flip_average(c: coeffs_lib.Coefficients, c_of_mirror: coeffs_lib.Coefficients,
                 maps: MirrorMaps) -> coeffs_lib.Coefficients:
  """Mean of a crop's estimate `c` and the mirrored estimate from its left-right flipped
  crop: (B, ...) fields each. Angles are averaged as numbers (the two estimates are close)."""
  m = mirror_coefficients(c_of_mirror, maps)
  return coeffs_lib.Coefficients(*[(getattr(c, f) + getattr(m, f)) / 2.0
                                   for f in coeffs_lib.FIELDS])
