"""Loaders for the Basel Face Model 2009 files users hold (the files are licence-restricted).

Two entry points, both returning a `MorphableModel` (dff3d.morphable_model) in centimetres,
model frame +y up, +z out of the face towards the viewer, +x to the subject's left, albedo in
[0, 1], every basis scaled by its standard deviation so coefficients are ~N(0, 1):

* `load_bfm2009`: the raw `01_MorphableModel.mat` (Paysan et al. 2009) plus the FaceWarehouse
  expression basis `Exp_Pca.bin` of Guo et al. and Deep3DFaceRecon's vertex selections
  (`BFM_exp_idx.mat`, `BFM_front_idx.mat`) and `std_exp.txt`: the same model Deep3DFaceRecon's
  `BFM_model_front.mat` holds, built from the original files.
* `load_bfm_front`: Deep3DFaceRecon's converted `BFM_model_front.mat`.

File layouts assumed (see BUILD_NOTES.md, "Basel Face Model loaders"):

01_MorphableModel.mat (MATLAB v5, scipy.io.loadmat): shapeMU (3N, 1) micrometres, vertex
  coordinates interleaved x0 y0 z0 x1 ...; shapePC (3N, K) orthonormal columns; shapeEV (K, 1)
  standard deviations (BFM's own coef2object computes mu + PC * (coef .* EV)); texMU (3N, 1)
  RGB 0..255; texPC (3N, K); texEV (K, 1); tl (T, 3) 1-based triangles. N = 53490, K = 199.
Exp_Pca.bin (little-endian): int32 K (79, the number of components), float32 mean (3M),
  float32 components (K, 3M) row-major, i.e. component k is contiguous. M = 53215 vertices, the
  BFM vertices listed by BFM_exp_idx.mat. M is not stored: it is derived from the file size.
std_exp.txt: K whitespace-separated standard deviations of the expression components.
BFM_exp_idx.mat: trimIndex (M, 1) 1-based indices into the N BFM vertices.
BFM_front_idx.mat: idx (F, 1) 1-based indices into the M expression vertices; F = 35709.
facemodel_info.mat / BFM_model_front.mat: keypoints (1, 68) 1-based indices into the F front
  vertices (may be stored as float64).
BFM_model_front.mat: meanshape (1, 3F) decimetres (raw / 1e5), idBase (3F, 80) and exBase
  (3F, 64) decimetres already times the standard deviations, meantex (1, 3F) 0..255, texBase
  (3F, 80) 0..255 times the standard deviations, tri (T, 3) 1-based, keypoints (1, 68) 1-based.

Shape checks are relational (sizes agree with each other), never tied to 53490 / 35709, so
small files with the same layout load too. Every missing or malformed file raises
ModelFileError with a one-line message that starts with the file's path.
"""

import logging
import os
from typing import Optional, Sequence

import numpy as np
import scipy.io

from dff3d.morphable_model import ModelFileError, MorphableModel, make_model

log = logging.getLogger(__name__)

# Unit conversions to centimetres.
RAW_BFM_TO_CM = 1e-4      # 01_MorphableModel.mat and Exp_Pca.bin: micrometres.
FRONT_BFM_TO_CM = 10.0    # BFM_model_front.mat: decimetres (Deep3DFaceRecon divides raw by 1e5).
ALBEDO_SCALE = 1.0 / 255.0  # texMU / meantex are 0..255.

NUM_LANDMARKS = 68


# ---- small validated readers ---------------------------------------------------------------
def _fail(path, problem) -> ModelFileError:
  """A ModelFileError whose one-line message names the file and the problem."""
  text = " ".join(str(problem).split())
  return ModelFileError(f"{os.fspath(path)}: {text}")


def _require_file(path, what):
  if path is None:
    raise ModelFileError(f"{what} is required but no path was given")
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise _fail(path, f"{what} not found")
  return path


def _load_mat(path, what, keys: Sequence[str]):
  """The named variables of a MATLAB v5 .mat file; ModelFileError if unreadable or missing."""
  path = _require_file(path, what)
  try:
    data = scipy.io.loadmat(path, variable_names=list(keys))
  except NotImplementedError:
    # scipy raises this for v7.3 files, which are HDF5.
    raise _fail(path, f"{what} is a MATLAB v7.3 (HDF5) file; re-save it in MATLAB with "
                      "save(..., '-v7')") from None
  except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
    raise _fail(path, f"{what} is not a readable MATLAB .mat file ({type(e).__name__}: {e})"
                ) from None
  for key in keys:
    if key not in data:
      raise _fail(path, f"{what} has no variable '{key}'")
  return data


def _real(path, key, a) -> np.ndarray:
  """`a` as a real numeric array, else ModelFileError."""
  a = np.asarray(a)
  if a.dtype.kind not in "fiu":
    raise _fail(path, f"'{key}' has dtype {a.dtype}, expected a real numeric array")
  if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
    raise _fail(path, f"'{key}' contains NaN or infinite values")
  return a


def _indices(path, key, a, count, base=1) -> np.ndarray:
  """Integer indices (any real dtype holding integers) shifted to 0-based and checked in range."""
  a = _real(path, key, a)
  if a.dtype.kind == "f":
    if not np.all(a == np.round(a)):
      raise _fail(path, f"'{key}' holds non-integer values, expected {base}-based indices")
  a = a.astype(np.int64) - base
  if a.size and (a.min() < 0 or a.max() >= count):
    raise _fail(path, f"'{key}' has indices in [{a.min() + base}, {a.max() + base}], expected "
                      f"{base}-based indices in [{base}, {count - 1 + base}]")
  return a


def _vector(path, key, a, size=None) -> np.ndarray:
  """A (n,), (n, 1) or (1, n) array as a flat float64 vector of `size` entries (if given)."""
  a = _real(path, key, a)
  if a.ndim > 2 or (a.ndim == 2 and min(a.shape) != 1):
    raise _fail(path, f"'{key}' has shape {a.shape}, expected a vector")
  a = a.reshape(-1).astype(np.float64)
  if size is not None and a.size != size:
    raise _fail(path, f"'{key}' has {a.size} entries, expected {size}")
  return a


def _matrix(path, key, a, rows, min_cols) -> np.ndarray:
  a = _real(path, key, a)
  if a.ndim != 2 or a.shape[0] != rows or a.shape[1] < min_cols:
    raise _fail(path, f"'{key}' has shape {a.shape}, expected ({rows}, >= {min_cols})")
  return a


def _triangles(path, key, a, num_vertices) -> np.ndarray:
  a = _real(path, key, a)
  if a.ndim != 2 or a.shape[1] != 3 or a.shape[0] == 0:
    raise _fail(path, f"'{key}' has shape {a.shape}, expected (T, 3) triangles")
  return _indices(path, key, a, num_vertices)


def _landmark_vector(path, key, a, num_vertices, base) -> np.ndarray:
  a = _real(path, key, a)
  if a.size != NUM_LANDMARKS or (a.ndim == 2 and min(a.shape) != 1) or a.ndim > 2:
    raise _fail(path, f"'{key}' has shape {a.shape}, expected {NUM_LANDMARKS} vertex indices")
  return _indices(path, key, a.reshape(-1), num_vertices, base=base)


def _unique(path, key, idx):
  if np.unique(idx).size != idx.size:
    raise _fail(path, f"'{key}' lists some vertex more than once")


def _scaled_basis(flat_rows, k, scale, n):
  """Leading k columns of (3n, K) rows x0 y0 z0 x1 ..., column j times scale[j] (or a scalar),
  as (k, n, 3) float32."""
  cols = np.asarray(flat_rows[:, :k], np.float32)
  cols = cols * np.asarray(scale, np.float32)
  return np.transpose(cols.reshape(n, 3, k), (2, 0, 1))


def _check_sizes(num_identity, num_albedo, num_expression):
  for what, k in (("num_identity", num_identity), ("num_albedo", num_albedo),
                  ("num_expression", num_expression)):
    if int(k) != k or k < 0:
      raise ValueError(f"{what} must be a non-negative integer, got {k!r}")


# ---- geometry helpers -----------------------------------------------------------------------
def reindex_triangles(triangles, keep):
  """Triangles of the sub-mesh made of the vertices `keep` (in that order).

  Args:
    triangles: (T, 3) int, 0-based indices into the full vertex set.
    keep: (M,) int, distinct 0-based indices into the full vertex set; output vertex i is
      full vertex keep[i].
  Returns:
    (T', 3) int32 indices into the M kept vertices; triangles that use a dropped vertex are
    removed; the order and winding of the kept triangles is unchanged.
  """
  triangles = np.asarray(triangles, np.int64)
  keep = np.asarray(keep, np.int64)
  size = max(int(triangles.max(initial=-1)), int(keep.max(initial=-1))) + 1
  new_index = np.full(size, -1, np.int64)
  new_index[keep] = np.arange(keep.size)
  mapped = new_index[triangles]
  return mapped[np.all(mapped >= 0, axis=1)].astype(np.int32)


def front_area(vertices, triangles) -> float:
  """Signed area of the mesh projected on the xy plane, seen from +z.

  Positive when the triangles are counter-clockwise seen from +z, i.e. when the normals
  cross(v1 - v0, v2 - v0) of a face looking towards +z point out of the face.
  """
  v = np.asarray(vertices, np.float64)
  t = np.asarray(triangles, np.int64)
  n = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
  return 0.5 * float(n[:, 2].sum())


def _orient(triangles, mean_shape, flip_winding, source):
  """Apply `flip_winding` (True / False) or, when None, flip iff the mean face's triangles are
  clockwise seen from the front (+z), so that normals point out of the face."""
  if flip_winding is None:
    flip_winding = front_area(mean_shape, triangles) < 0.0
    if flip_winding:
      log.info("%s: triangles are clockwise seen from +z on the mean face; flipped their "
               "winding so normals point out of the face", source)
  return triangles[:, ::-1].copy() if flip_winding else triangles


def _finish(source, mean_shape, id_basis, exp_basis, alb_mean, alb_basis, triangles, landmarks,
            recenter, flip_winding, name) -> MorphableModel:
  if recenter:
    mean_shape = mean_shape - mean_shape.mean(axis=0, keepdims=True)
  triangles = _orient(triangles, mean_shape, flip_winding, source)
  return make_model(mean_shape, id_basis, exp_basis, alb_mean, alb_basis, triangles, landmarks,
                    name=name, units="cm")


def _explicit_landmarks(landmarks, num_vertices):
  lmk = np.asarray(landmarks)
  if lmk.shape != (NUM_LANDMARKS,) or lmk.dtype.kind not in "iu":
    raise ValueError(f"landmarks must be ({NUM_LANDMARKS},) integer vertex indices, got "
                     f"shape {lmk.shape} dtype {lmk.dtype}")
  if lmk.min() < 0 or lmk.max() >= num_vertices:
    raise ValueError(f"landmarks must index the {num_vertices} model vertices (0-based), got "
                     f"values in [{lmk.min()}, {lmk.max()}]")
  return lmk.astype(np.int64)


# ---- Exp_Pca.bin ----------------------------------------------------------------------------
def read_exp_pca_bin(path, num_vertices: Optional[int] = None):
  """The FaceWarehouse expression PCA of Guo et al. as distributed for Deep3DFaceRecon.

  Layout (little-endian): int32 K; float32 mean (3M); float32 components (K, 3M), component
  after component, coordinates interleaved x, y, z per vertex.

  Args:
    path: Exp_Pca.bin.
    num_vertices: M when known (the length of BFM_exp_idx.mat's trimIndex); otherwise M is
      derived from the file size.
  Returns:
    (mean (3M,) float32, components (3M, K) float32), in the raw BFM unit (micrometres),
    components not scaled by their standard deviations.
  """
  path = _require_file(path, "expression basis (Exp_Pca.bin)")
  size = os.path.getsize(path)
  if size < 4:
    raise _fail(path, f"truncated Exp_Pca.bin: {size} bytes, too short for the int32 header")
  with open(path, "rb") as f:
    k = int(np.frombuffer(f.read(4), "<i4")[0])
    payload = f.read()
  if not 1 <= k <= 10000:
    raise _fail(path, f"bad Exp_Pca.bin header: component count {k} (expected e.g. 79)")
  num_floats, rest = divmod(len(payload), 4)
  if num_vertices is None:
    if rest or num_floats % (3 * (k + 1)):
      raise _fail(path, f"truncated or malformed Exp_Pca.bin: {len(payload)} data bytes is not "
                        f"(1 + {k}) x 3M float32 values for any vertex count M")
    num_vertices = num_floats // (3 * (k + 1))
  expected = 4 * 3 * num_vertices * (k + 1)
  if len(payload) < expected:
    raise _fail(path, f"truncated Exp_Pca.bin: {len(payload) + 4} bytes, expected {expected + 4}"
                      f" for {k} components over {num_vertices} vertices")
  if len(payload) > expected:
    raise _fail(path, f"Exp_Pca.bin has {len(payload) - expected} bytes more than the {k} "
                      f"components over {num_vertices} vertices need (wrong vertex selection?)")
  data = np.frombuffer(payload, "<f4").astype(np.float32)
  n3 = 3 * num_vertices
  mean = data[:n3]
  components = data[n3:].reshape(k, n3).T
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(components))):
    raise _fail(path, "Exp_Pca.bin contains NaN or infinite values")
  return mean, components


def _read_std(path, count):
  path = _require_file(path, "expression standard deviations (std_exp.txt)")
  try:
    std = np.loadtxt(path, dtype=np.float64, ndmin=1).reshape(-1)
  except Exception as e:  # noqa: BLE001
    raise _fail(path, f"not a text file of numbers ({type(e).__name__}: {e})") from None
  if std.size != count:
    raise _fail(path, f"has {std.size} standard deviations, expected {count} (one per "
                      "Exp_Pca.bin component)")
  if not np.all(np.isfinite(std)) or np.any(std < 0):
    raise _fail(path, "standard deviations must be finite and non-negative")
  return std


def _sibling(path, name):
  if path is None:
    return None
  candidate = os.path.join(os.path.dirname(os.path.abspath(os.fspath(path))), name)
  return candidate if os.path.isfile(candidate) else None


# ---- loaders --------------------------------------------------------------------------------
def _xyz_vector(path, key, value):
  """A (3N,) float vector of interleaved x, y, z, or a one-line error naming the file."""
  vec = _real(path, key, value)
  if vec.size == 0 or vec.size % 3:
    raise _fail(path, f"'{key}' has {vec.size} entries, expected 3N")
  return _vector(path, key, vec)


def load_bfm2009(model_mat, exp_pca_bin, exp_idx_mat=None, front_idx_mat=None,
                 std_exp_txt=None, landmarks=None, landmarks_mat=None, num_identity=80,
                 num_albedo=80, num_expression=64, include_expression_mean=False,
                 recenter=True, flip_winding=None, name="bfm2009") -> MorphableModel:
  """BFM 2009 + FaceWarehouse expressions from the original files, as Deep3DFaceRecon builds them.

  Vertex selection (as Deep3DFaceRecon's transferBFM09): the expression basis covers the M
  BFM vertices trimIndex of `exp_idx_mat`; `front_idx_mat` picks F of those M. Output vertex i
  is BFM vertex trimIndex[idx[i]] and expression vertex idx[i]. Without `front_idx_mat` all M
  expression vertices are kept; without `exp_idx_mat` the expression basis must cover all N
  BFM vertices. Triangles are BFM's `tl` re-indexed to the kept vertices; triangles that use a
  dropped vertex are removed.

  Args:
    model_mat: 01_MorphableModel.mat.
    exp_pca_bin: Exp_Pca.bin.
    exp_idx_mat: BFM_exp_idx.mat (key trimIndex), or None when Exp_Pca.bin covers all vertices.
    front_idx_mat: BFM_front_idx.mat (key idx), or None to keep every expression vertex.
    std_exp_txt: std_exp.txt; None looks for std_exp.txt beside exp_pca_bin.
    landmarks: (68,) int 0-based indices into the returned model's vertices; overrides
      landmarks_mat.
    landmarks_mat: a .mat with 'keypoints' (68 1-based indices into the front vertices), e.g.
      Deep3DFaceRecon's facemodel_info.mat or BFM_model_front.mat; needs front_idx_mat. None
      looks for facemodel_info.mat, then BFM_model_front.mat, beside front_idx_mat.
    num_identity, num_albedo, num_expression: leading components kept (80, 80, 64 in the paper).
    include_expression_mean: add Exp_Pca.bin's mean expression to the mean shape. Deep3DFaceRecon
      ignores it (False), so the BFM mean face stays neutral.
    recenter: subtract the centroid of the mean shape's vertices (Deep3DFaceRecon does).
    flip_winding: True / False to force; None flips iff the triangles are clockwise seen from
      +z on the mean face (logged), so normals point out of the face.
    name: the model's name.
  Returns:
    MorphableModel, units "cm": mean_shape (V, 3), identity_basis (num_identity, V, 3),
    expression_basis (num_expression, V, 3), albedo_mean (V, 3) in [0, 1], albedo_basis
    (num_albedo, V, 3), each basis = component x standard deviation, converted.
  Raises:
    ModelFileError: a file is missing or malformed (the message names it), or no landmarks.
  """
  _check_sizes(num_identity, num_albedo, num_expression)
  model_mat = os.fspath(model_mat)
  keys = ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV", "tl")
  raw = _load_mat(model_mat, "BFM 2009 model (01_MorphableModel.mat)", keys)
  shape_mu = _xyz_vector(model_mat, "shapeMU", raw["shapeMU"])
  n3 = shape_mu.size
  n = n3 // 3
  shape_pc = _matrix(model_mat, "shapePC", raw["shapePC"], n3, num_identity)
  shape_ev = _vector(model_mat, "shapeEV", raw["shapeEV"], shape_pc.shape[1])
  tex_mu = _vector(model_mat, "texMU", raw["texMU"], n3)
  tex_pc = _matrix(model_mat, "texPC", raw["texPC"], n3, num_albedo)
  tex_ev = _vector(model_mat, "texEV", raw["texEV"], tex_pc.shape[1])
  tl = _triangles(model_mat, "tl", raw["tl"], n)

  # Vertex selections.
  if exp_idx_mat is not None:
    exp_idx_mat = os.fspath(exp_idx_mat)
    trim = _load_mat(exp_idx_mat, "expression vertex list (BFM_exp_idx.mat)", ["trimIndex"])
    trim = _indices(exp_idx_mat, "trimIndex", _vector(exp_idx_mat, "trimIndex",
                                                      trim["trimIndex"]), n)
    _unique(exp_idx_mat, "trimIndex", trim)
  else:
    trim = np.arange(n)
  m = trim.size
  if front_idx_mat is not None:
    front_idx_mat = os.fspath(front_idx_mat)
    front = _load_mat(front_idx_mat, "front vertex list (BFM_front_idx.mat)", ["idx"])
    front = _indices(front_idx_mat, "idx", _vector(front_idx_mat, "idx", front["idx"]), m)
    _unique(front_idx_mat, "idx", front)
  else:
    front = np.arange(m)
  keep = trim[front]   # output vertex -> BFM vertex
  num_out = keep.size

  # Landmarks (resolved before the big arrays are processed, so errors come early).
  if landmarks is not None:
    lmk = _explicit_landmarks(landmarks, num_out)
  else:
    if landmarks_mat is None:
      landmarks_mat = (_sibling(front_idx_mat, "facemodel_info.mat")
                       or _sibling(front_idx_mat, "BFM_model_front.mat"))
    if landmarks_mat is None:
      raise ModelFileError(
          f"{model_mat}: BFM 2009 has no 68-point landmarks; pass landmarks=(68,) vertex "
          "indices or landmarks_mat= a .mat with 'keypoints' (e.g. Deep3DFaceRecon's "
          "facemodel_info.mat) together with front_idx_mat")
    landmarks_mat = os.fspath(landmarks_mat)
    if front_idx_mat is None:
      raise _fail(landmarks_mat, "'keypoints' index the front vertices; front_idx_mat "
                                 "(BFM_front_idx.mat) is required to use them")
    kp = _load_mat(landmarks_mat, "landmark file", ["keypoints"])
    lmk = _landmark_vector(landmarks_mat, "keypoints", kp["keypoints"], num_out, base=1)

  # Expression basis.
  exp_pca_bin = _require_file(exp_pca_bin, "expression basis (Exp_Pca.bin)")
  if exp_idx_mat is None:
    exp_mean, exp_pc = read_exp_pca_bin(exp_pca_bin)
    if exp_mean.size != n3:
      raise _fail(exp_pca_bin, f"covers {exp_mean.size // 3} vertices but the BFM model has {n}; "
                               "pass exp_idx_mat (BFM_exp_idx.mat)")
  else:
    exp_mean, exp_pc = read_exp_pca_bin(exp_pca_bin, num_vertices=m)
  if exp_pc.shape[1] < num_expression:
    raise _fail(exp_pca_bin, f"has {exp_pc.shape[1]} expression components, "
                             f"{num_expression} requested")
  if std_exp_txt is None:
    std_exp_txt = _sibling(exp_pca_bin, "std_exp.txt")
    if std_exp_txt is None:
      raise _fail(exp_pca_bin, "needs its standard deviations: pass std_exp_txt (std_exp.txt "
                               "is not beside it)")
  exp_std = _read_std(std_exp_txt, exp_pc.shape[1])

  # Assemble in centimetres, bases times their standard deviations, selected vertices.
  scale = RAW_BFM_TO_CM
  mean_shape = shape_mu.reshape(n, 3)[keep] * scale
  if include_expression_mean:
    mean_shape = mean_shape + exp_mean.astype(np.float64).reshape(m, 3)[front] * scale
  id_basis = _scaled_basis(shape_pc, num_identity, shape_ev[:num_identity] * scale, n)
  id_basis = id_basis[:, keep]
  exp_basis = _scaled_basis(exp_pc, num_expression, exp_std[:num_expression] * scale, m)
  exp_basis = exp_basis[:, front]
  alb_mean = tex_mu.reshape(n, 3)[keep] * ALBEDO_SCALE
  alb_basis = _scaled_basis(tex_pc, num_albedo, tex_ev[:num_albedo] * ALBEDO_SCALE, n)
  alb_basis = alb_basis[:, keep]
  triangles = reindex_triangles(tl, keep)
  if triangles.shape[0] == 0:
    raise _fail(model_mat, "no triangle of 'tl' has all three vertices in the selection")
  return _finish(model_mat, mean_shape, id_basis, exp_basis, alb_mean, alb_basis, triangles,
                 lmk, recenter, flip_winding, name)


def load_bfm_front(path, num_identity=80, num_albedo=80, num_expression=64, landmarks=None,
                   recenter=True, flip_winding=None, name="bfm2009_front") -> MorphableModel:
  """Deep3DFaceRecon's BFM_model_front.mat (35709 vertices, 80 / 64 / 80 components).

  The file's shape is in decimetres and its bases already include the standard deviations;
  shapes and bases are multiplied by 10 (centimetres), the texture divided by 255.

  Args:
    path: BFM_model_front.mat.
    num_identity, num_albedo, num_expression: leading components kept (at most what the file has).
    landmarks: (68,) int 0-based vertex indices overriding the file's 'keypoints'.
    recenter: subtract the centroid of the mean shape's vertices (Deep3DFaceRecon's default).
    flip_winding: True / False to force; None flips iff clockwise seen from +z (logged).
    name: the model's name.
  Returns:
    MorphableModel, units "cm" (see load_bfm2009).
  Raises:
    ModelFileError naming the file when it is missing or malformed.
  """
  _check_sizes(num_identity, num_albedo, num_expression)
  path = os.fspath(path)
  keys = ["meanshape", "idBase", "exBase", "meantex", "texBase", "tri"]
  if landmarks is None:
    keys.append("keypoints")
  data = _load_mat(path, "BFM front model (BFM_model_front.mat)", keys)
  mean = _xyz_vector(path, "meanshape", data["meanshape"])
  n3 = mean.size
  n = n3 // 3
  id_base = _matrix(path, "idBase", data["idBase"], n3, num_identity)
  exp_base = _matrix(path, "exBase", data["exBase"], n3, num_expression)
  tex = _vector(path, "meantex", data["meantex"], n3)
  tex_base = _matrix(path, "texBase", data["texBase"], n3, num_albedo)
  tri = _triangles(path, "tri", data["tri"], n)
  if landmarks is not None:
    lmk = _explicit_landmarks(landmarks, n)
  else:
    lmk = _landmark_vector(path, "keypoints", data["keypoints"], n, base=1)

  s = FRONT_BFM_TO_CM
  return _finish(path, mean.reshape(n, 3) * s,
                 _scaled_basis(id_base, num_identity, s, n),
                 _scaled_basis(exp_base, num_expression, s, n),
                 tex.reshape(n, 3) * ALBEDO_SCALE,
                 _scaled_basis(tex_base, num_albedo, ALBEDO_SCALE, n),
                 tri.astype(np.int32), lmk, recenter, flip_winding, name)
