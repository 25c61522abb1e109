"""The morphable model as a pytree, its geometry and albedo, and the embedded default model.

S = S_mean + E_id a + E_exp d;  T = T_mean + E_alb b   (paper Sec. 3.1).

The embedded default is the ICT face model (MIT licence, dff3d/assets/ICT_LICENSE), face area,
9409 vertices, 80 identity modes (coefficients ~N(0, 1)) and all 53 ARKit-style expression
blendshapes (weights nominally in [0, 1]), in centimetres. ICT has no albedo model: the shipped
albedo is a uniform skin tone plus an 80-dim smooth basis made of low-frequency eigenvectors of
the mesh graph Laplacian times three colour directions (see data_prep/convert_ict.py). It is a
smoothness prior for fitting, not a statistical albedo model learnt from scans.
"""

import functools
import os
from typing import Optional, Tuple

import flax
import jax.numpy as jnp
import numpy as np

from dff3d import coefficients as coeffs_lib
from dff3d import landmarks as lm
from dff3d import rasterizer

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_MODEL_PATH = os.path.join(ASSET_DIR, "ict_face_model.npz")


class ModelFileError(ValueError):
  """A morphable-model file is missing or malformed; the message names the file."""


@flax.struct.dataclass
class MorphableModel:
  """A linear face model. All arrays are float32 unless noted; N vertices, T triangles.

  mean_shape: (N, 3) model space (+y up, +z towards the viewer), model units.
  identity_basis: (Ki, N, 3) offsets per unit coefficient.
  expression_basis: (Ke, N, 3) offsets per unit coefficient.
  albedo_mean: (N, 3) RGB in [0, 1].  albedo_basis: (Ka, N, 3) offsets per unit coefficient.
  triangles: (T, 3) int32, counter-clockwise seen from outside (the front).
  landmarks: (68,) int32 vertex index of each iBUG landmark.
  contour: (16,) int32 landmark positions of the jaw line without the chin (weight 0.5).
  inner: (52,) int32 the other landmark positions (weight 1).
  flip_permutation: (68,) int32 landmark order of the mirrored face.
  face_region: (N,) float32, 1 on the facial skin area that the photometric loss compares
    (forehead to chin, cheek to cheek; no scalp, ears or neck), 0 elsewhere.
  uv: (U, 2) float32 or None; triangle_uv: (T, 3) int32 or None (texture coordinates).
  triangle_twins: (3T,) int32 or None, `rasterizer.half_edge_twins(triangles)`: the mesh
    adjacency that `render` passes to `rasterizer.antialias`. `make_model` computes it once
    (NumPy), so that a model passed as a jit argument (train step, fitting) does not sort its
    edges on every call; when None, `antialias` computes it. Replace it with `triangles`.
  name, units, expression_names: static metadata.
  """
  mean_shape: jnp.ndarray
  identity_basis: jnp.ndarray
  expression_basis: jnp.ndarray
  albedo_mean: jnp.ndarray
  albedo_basis: jnp.ndarray
  triangles: jnp.ndarray
  landmarks: jnp.ndarray
  contour: jnp.ndarray
  inner: jnp.ndarray
  flip_permutation: jnp.ndarray
  face_region: jnp.ndarray
  uv: Optional[jnp.ndarray] = None
  triangle_uv: Optional[jnp.ndarray] = None
  triangle_twins: Optional[jnp.ndarray] = None
  name: str = flax.struct.field(pytree_node=False, default="")
  units: str = flax.struct.field(pytree_node=False, default="")
  expression_names: Tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

  @property
  def num_vertices(self) -> int:
    return int(self.mean_shape.shape[0])

  @property
  def sizes(self) -> Tuple[int, ...]:
    """Coefficient layout for this model, see dff3d.coefficients.layout."""
    return coeffs_lib.layout(self.identity_basis.shape[0], self.albedo_basis.shape[0],
                             self.expression_basis.shape[0])


def face_region_from_landmarks(mean_shape, landmarks):
  """Facial skin area of a model: (N,) float32 in {0, 1}.

  Vertices inside the ellipse, in the frontal (x, y) plane, that spans the jaw landmarks'
  width and runs from the chin to a quarter of the brow-to-chin height above the brows,
  and in front of the jaw landmarks' mean depth minus 1 unit (drops ears and the back of the
  head). Model space +y up, +z towards the viewer.
  """
  v = np.asarray(mean_shape, np.float64)
  pts = v[np.asarray(landmarks)]
  brow, chin = pts[17:27, 1].max(), pts[8, 1]
  top = brow + 0.25 * (brow - chin)
  cx = pts[[0, 16], 0].mean()
  half_w = 0.5 * (pts[16, 0] - pts[0, 0]) * 1.04
  cy, half_h = (top + chin) / 2.0, (top - chin) / 2.0 * 1.04
  if not (half_w > 0 and half_h > 0):  # degenerate landmarks (toy models): whole mesh
    return np.ones(len(v), np.float32)
  inside = ((v[:, 0] - cx) / half_w) ** 2 + ((v[:, 1] - cy) / half_h) ** 2 <= 1.0
  front = v[:, 2] > pts[0:17, 2].min() - 1.0 * (half_w / 7.5)
  return (inside & front).astype(np.float32)


def make_model(mean_shape, identity_basis, expression_basis, albedo_mean, albedo_basis,
               triangles, landmarks, uv=None, triangle_uv=None, name="", units="",
               expression_names=(), face_region=None):
  """Build a MorphableModel from numpy arrays (cast to float32 / int32), with the iBUG
  contour / inner split and flip permutation of dff3d.landmarks and the triangles' half-edge
  twins; the face region defaults to face_region_from_landmarks."""
  if face_region is None:
    face_region = face_region_from_landmarks(mean_shape, landmarks)
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
  i32 = lambda a: jnp.asarray(np.asarray(a, np.int32))
  return MorphableModel(
      mean_shape=f32(mean_shape), identity_basis=f32(identity_basis),
      expression_basis=f32(expression_basis), albedo_mean=f32(albedo_mean),
      albedo_basis=f32(albedo_basis), triangles=i32(triangles), landmarks=i32(landmarks),
      contour=i32(lm.CONTOUR), inner=i32(lm.INNER), flip_permutation=i32(lm.FLIP_PERMUTATION),
      face_region=f32(face_region),
      uv=None if uv is None else f32(uv),
      triangle_uv=None if triangle_uv is None else i32(triangle_uv),
      triangle_twins=rasterizer.half_edge_twins(np.asarray(triangles, np.int32)),
      name=name, units=units, expression_names=tuple(str(s) for s in expression_names))


def shape(model: MorphableModel, identity, expression):
  """Model-space vertices S = S_mean + E_id a + E_exp d.

  Args:
    identity: (B, Ki); expression: (B, Ke).
  Returns:
    (B, N, 3) model units.
  """
  return (model.mean_shape[None]
          + jnp.einsum("bk,knc->bnc", identity, model.identity_basis)
          + jnp.einsum("bk,knc->bnc", expression, model.expression_basis))


def albedo(model: MorphableModel, albedo_coeffs):
  """Per-vertex albedo T = T_mean + E_alb b: (B, Ka) -> (B, N, 3), not clipped."""
  return model.albedo_mean[None] + jnp.einsum("bk,knc->bnc", albedo_coeffs, model.albedo_basis)


def geometry(model: MorphableModel, c: coeffs_lib.Coefficients):
  """(vertices (B, N, 3) model space, albedo (B, N, 3)) from Coefficients."""
  return shape(model, c.identity, c.expression), albedo(model, c.albedo)


def landmark_points(model: MorphableModel, vertices):
  """The 68 landmark vertices: (B, N, D) -> (B, 68, D)."""
  return vertices[:, model.landmarks]


def zero_coefficients(model: MorphableModel, batch: int, distance: Optional[float] = None):
  """Mean face, frontal, at `distance` in front of the camera, with default lighting.

  Returns Coefficients with batch dimension `batch`.
  """
  from dff3d import camera, shading  # local import keeps module import order flat
  ki, ka, ke, _, _, _ = model.sizes
  d = camera.DEFAULT_DISTANCE if distance is None else distance
  z = lambda n: jnp.zeros((batch, n), jnp.float32)
  return coeffs_lib.Coefficients(
      identity=z(ki), albedo=z(ka), expression=z(ke), rotation=z(3),
      translation=jnp.tile(jnp.array([[0.0, 0.0, -d]], jnp.float32), (batch, 1)),
      lighting=jnp.tile(shading.default_lighting()[None], (batch, 1)))


# ---- our npz format -----------------------------------------------------------------------
_REQUIRED = {"mean_shape": 2, "identity_basis": 3, "expression_basis": 3, "albedo_mean": 2,
             "albedo_basis": 3, "triangles": 2, "landmarks_68": 1}


def load_npz(path) -> MorphableModel:
  """Load a model saved by save_npz (the embedded asset uses this format).

  Raises ModelFileError naming the file when it is missing, unreadable or malformed.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ModelFileError(f"{path}: morphable model file not found")
  try:
    data = np.load(path, allow_pickle=False)
    arrays = {k: data[k] for k in data.files}
  except Exception as e:  # noqa: BLE001 - any numpy/zip failure is a bad file
    raise ModelFileError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
  for key, ndim in _REQUIRED.items():
    if key not in arrays:
      raise ModelFileError(f"{path}: missing array '{key}'")
    if arrays[key].ndim != ndim:
      raise ModelFileError(f"{path}: '{key}' has {arrays[key].ndim} dims, expected {ndim}")
  n = arrays["mean_shape"].shape[0]
  for key in ("identity_basis", "expression_basis", "albedo_basis"):
    if arrays[key].shape[1:] != (n, 3):
      raise ModelFileError(f"{path}: '{key}' has shape {arrays[key].shape}, expected (K, {n}, 3)")
  tri = arrays["triangles"]
  if tri.shape[1] != 3 or tri.min() < 0 or tri.max() >= n:
    raise ModelFileError(f"{path}: 'triangles' must be (T, 3) indices into {n} vertices")
  if arrays["landmarks_68"].shape != (68,):
    raise ModelFileError(f"{path}: 'landmarks_68' has shape {arrays['landmarks_68'].shape}, "
                         "expected (68,)")
  meta = lambda k, default="": str(arrays[k]) if k in arrays else default
  return make_model(arrays["mean_shape"], arrays["identity_basis"], arrays["expression_basis"],
                    arrays["albedo_mean"], arrays["albedo_basis"], tri, arrays["landmarks_68"],
                    uv=arrays.get("uv"), triangle_uv=arrays.get("triangle_uv"),
                    name=meta("name"), units=meta("units"),
                    expression_names=tuple(arrays.get("expression_names", ())))


def save_npz(path, model: MorphableModel, basis_dtype=np.float32):
  """Write a model in the format load_npz reads; bases stored as `basis_dtype`."""
  arrays = dict(
      mean_shape=np.asarray(model.mean_shape, np.float32),
      identity_basis=np.asarray(model.identity_basis).astype(basis_dtype),
      expression_basis=np.asarray(model.expression_basis).astype(basis_dtype),
      albedo_mean=np.asarray(model.albedo_mean, np.float32),
      albedo_basis=np.asarray(model.albedo_basis).astype(basis_dtype),
      triangles=np.asarray(model.triangles, np.int32),
      landmarks_68=np.asarray(model.landmarks, np.int32),
      name=np.array(model.name), units=np.array(model.units),
      expression_names=np.array(model.expression_names, dtype=str))
  if model.uv is not None:
    arrays["uv"] = np.asarray(model.uv, np.float32)
    arrays["triangle_uv"] = np.asarray(model.triangle_uv, np.int32)
  np.savez_compressed(path, **arrays)


@functools.lru_cache(maxsize=None)
def default_model() -> MorphableModel:
  """The embedded ICT face model (see module docstring); loaded once per process."""
  return load_npz(DEFAULT_MODEL_PATH)
