"""BFM 2009 loaders on small synthetic files with the real layouts (keys, shape relations,
dtypes, little-endian .bin, 1-based MATLAB indices) but a 12 x 12 vertex face."""

import logging
import os

import numpy as np
import pytest
import scipy.io

from dff3d import bfm
from dff3d.morphable_model import ModelFileError

G = 12                     # grid side: N = 144 "BFM" vertices
N = G * G
K_SHAPE = 199              # BFM 2009 components
K_EXP = 79                 # FaceWarehouse components in Exp_Pca.bin
OFFSET_CM = np.array([0.5, 2.0, 6.0])  # BFM's origin is not the face centroid


def face_grid():
  """(N, 3) cm vertices of a dome 15 cm wide looking towards +z; (T, 3) triangles
  counter-clockwise seen from +z (0-based)."""
  xs, ys = np.meshgrid(np.linspace(-7.5, 7.5, G), np.linspace(-9.0, 9.0, G))
  zs = 4.0 * (1.0 - (xs ** 2 + ys ** 2) / 150.0)
  v = np.stack([xs.ravel(), ys.ravel(), zs.ravel()], -1)
  tri = []
  for i in range(G - 1):
    for j in range(G - 1):
      a, b, c, d = i * G + j, i * G + j + 1, (i + 1) * G + j, (i + 1) * G + j + 1
      tri += [(a, b, d), (a, d, c)]
  return v, np.array(tri)


def make_raw(tmp_path, reverse_winding=False):
  """Write 01_MorphableModel.mat, Exp_Pca.bin, std_exp.txt, BFM_exp_idx.mat,
  BFM_front_idx.mat and facemodel_info.mat; return (paths, arrays)."""
  rng = np.random.default_rng(0)
  v, tri = face_grid()
  if reverse_winding:
    tri = tri[:, ::-1]
  a = {}
  a["shapeMU"] = ((v + OFFSET_CM) / 1e-4).reshape(-1, 1).astype(np.float32)  # micrometres
  a["shapePC"] = rng.normal(size=(3 * N, K_SHAPE)).astype(np.float32) / 30
  a["shapeEV"] = np.linspace(9e4, 1e3, K_SHAPE).reshape(-1, 1).astype(np.float32)
  a["texMU"] = rng.uniform(40, 220, size=(3 * N, 1)).astype(np.float32)
  a["texPC"] = rng.normal(size=(3 * N, K_SHAPE)).astype(np.float32) / 30
  a["texEV"] = np.linspace(500, 5, K_SHAPE).reshape(-1, 1).astype(np.float32)
  a["tl"] = (tri + 1).astype(np.float64)   # 1-based, stored as double
  a["segbin"] = np.zeros((N, 4), np.uint8)
  # Expression vertices: all but the bottom grid row, 1-based (BFM_exp_idx.mat 'trimIndex').
  trim = np.arange(G, N)
  m = trim.size
  a["trimIndex"] = (trim + 1).reshape(-1, 1).astype(np.float64)
  # Front vertices: a subset of the expression vertices, 1-based (BFM_front_idx.mat 'idx').
  x = v[trim, 0]
  front = np.nonzero(np.abs(x) < 7.0)[0]
  a["idx"] = (front + 1).reshape(-1, 1).astype(np.float64)
  a["expMU"] = rng.normal(size=3 * m).astype(np.float32) * 5000
  a["expPC"] = rng.normal(size=(K_EXP, 3 * m)).astype(np.float32) / 20
  a["std_exp"] = np.linspace(8e4, 2e3, K_EXP)
  a["keypoints"] = (rng.choice(front.size, 68, replace=False) + 1).reshape(1, 68).astype(
      np.float64)
  a["_v"], a["_tri"], a["_trim"], a["_front"] = v, tri, trim, front

  p = {k: str(tmp_path / f) for k, f in [
      ("model", "01_MorphableModel.mat"), ("bin", "Exp_Pca.bin"), ("std", "std_exp.txt"),
      ("exp_idx", "BFM_exp_idx.mat"), ("front_idx", "BFM_front_idx.mat"),
      ("info", "facemodel_info.mat")]}
  scipy.io.savemat(p["model"], {k: a[k] for k in (
      "shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV", "tl", "segbin")})
  write_exp_bin(p["bin"], a["expMU"], a["expPC"])
  np.savetxt(p["std"], a["std_exp"])
  scipy.io.savemat(p["exp_idx"], {"trimIndex": a["trimIndex"]})
  scipy.io.savemat(p["front_idx"], {"idx": a["idx"]})
  scipy.io.savemat(p["info"], {"keypoints": a["keypoints"], "tri": np.zeros((1, 3)),
                               "skinmask": np.ones((1, front.size))})
  return p, a


def write_exp_bin(path, mean, pcs):
  with open(path, "wb") as f:
    f.write(np.array([pcs.shape[0]], "<i4").tobytes())
    f.write(mean.astype("<f4").tobytes())
    f.write(pcs.astype("<f4").tobytes())   # (K, 3M) row-major: component after component


def load_raw(p, **kw):
  args = dict(exp_idx_mat=p["exp_idx"], front_idx_mat=p["front_idx"], std_exp_txt=p["std"])
  args.update(kw)
  return bfm.load_bfm2009(p["model"], p["bin"], **args)


def expected_triangles(tri, keep):
  pos = {int(k): i for i, k in enumerate(keep)}
  return np.array([[pos[i] for i in t] for t in tri if all(int(i) in pos for i in t)])


@pytest.fixture
def raw(tmp_path):
  return make_raw(tmp_path)


# ---- load_bfm2009 ---------------------------------------------------------------------------
def test_bfm2009_shapes_units_and_scaling(raw):
  p, a = raw
  model = load_raw(p)
  keep = a["_trim"][a["_front"]]
  f = keep.size
  assert model.units == "cm"
  assert model.mean_shape.shape == (f, 3)
  assert model.identity_basis.shape == (80, f, 3)
  assert model.expression_basis.shape == (64, f, 3)
  assert model.albedo_mean.shape == (f, 3) and model.albedo_basis.shape == (80, f, 3)
  # Micrometres -> cm, then re-centred on the vertex centroid.
  want = a["_v"][keep] + OFFSET_CM
  np.testing.assert_allclose(model.mean_shape, want - want.mean(0), atol=1e-4)
  xs = np.asarray(model.mean_shape[:, 0])
  assert 10.0 < xs.max() - xs.min() < 16.0   # a face-sized width in cm
  # Identity basis = PC * EV (EV are standard deviations), interleaved x, y, z per vertex.
  pc = a["shapePC"].reshape(N, 3, K_SHAPE)
  want_id = np.transpose(pc[keep][..., :80] * a["shapeEV"][:80, 0] * 1e-4, (2, 0, 1))
  np.testing.assert_allclose(model.identity_basis, want_id, rtol=1e-5, atol=1e-7)
  # Expression basis: (K, 3M) rows in the file, times std_exp, on the front subset of M.
  m = a["_trim"].size
  exp = a["expPC"].reshape(K_EXP, m, 3)[:64, a["_front"]] * a["std_exp"][:64, None, None] * 1e-4
  np.testing.assert_allclose(model.expression_basis, exp, rtol=1e-5, atol=1e-7)
  # Albedo in [0, 1].
  np.testing.assert_allclose(model.albedo_mean, a["texMU"].reshape(N, 3)[keep] / 255, rtol=1e-6)
  assert float(model.albedo_mean.min()) >= 0 and float(model.albedo_mean.max()) <= 1
  tpc = a["texPC"].reshape(N, 3, K_SHAPE)[keep][..., :80] * a["texEV"][:80, 0] / 255
  np.testing.assert_allclose(model.albedo_basis, np.transpose(tpc, (2, 0, 1)), rtol=1e-5,
                             atol=1e-7)


def test_bfm2009_triangles_reindexed_and_front_facing(raw):
  p, a = raw
  model = load_raw(p)
  keep = a["_trim"][a["_front"]]
  tri = np.asarray(model.triangles)
  np.testing.assert_array_equal(tri, expected_triangles(a["_tri"], keep))
  assert tri.dtype == np.int32 and tri.max() < keep.size
  assert bfm.front_area(model.mean_shape, tri) > 0


def test_bfm2009_landmarks_from_keypoints(raw, tmp_path):
  p, a = raw
  want = a["keypoints"][0].astype(int) - 1
  # Found beside BFM_front_idx.mat ...
  np.testing.assert_array_equal(load_raw(p).landmarks, want)
  # ... or named explicitly, in a BFM_model_front.mat-style file.
  other = str(tmp_path / "elsewhere.mat")
  scipy.io.savemat(other, {"keypoints": a["keypoints"][:, ::-1].copy()})
  np.testing.assert_array_equal(load_raw(p, landmarks_mat=other).landmarks, want[::-1])
  # Explicit 0-based indices win.
  explicit = np.arange(68, dtype=np.int64) + 3
  np.testing.assert_array_equal(load_raw(p, landmarks=explicit).landmarks, explicit)


def test_bfm2009_requires_landmarks(raw):
  p, _ = raw
  os.remove(p["info"])
  with pytest.raises(ModelFileError, match="landmarks") as e:
    load_raw(p)
  assert p["model"] in str(e.value) and "\n" not in str(e.value)
  # 'keypoints' index the front vertices: without the front selection they cannot be used.
  with pytest.raises(ModelFileError, match="front_idx_mat"):
    load_raw(p, front_idx_mat=None, landmarks_mat=p["front_idx"])


def test_bfm2009_without_front_selection_keeps_expression_vertices(raw):
  p, a = raw
  model = load_raw(p, front_idx_mat=None, landmarks=np.arange(68))
  trim = a["_trim"]
  assert model.mean_shape.shape == (trim.size, 3)
  np.testing.assert_array_equal(model.triangles, expected_triangles(a["_tri"], trim))


def test_bfm2009_expression_basis_over_all_vertices(tmp_path):
  p, a = make_raw(tmp_path)
  pcs = np.random.default_rng(1).normal(size=(K_EXP, 3 * N)).astype(np.float32)
  write_exp_bin(p["bin"], np.zeros(3 * N, np.float32), pcs)
  model = bfm.load_bfm2009(p["model"], p["bin"], std_exp_txt=p["std"], landmarks=np.arange(68))
  assert model.mean_shape.shape == (N, 3)
  np.testing.assert_allclose(model.expression_basis[5, 7],
                             pcs[5, 21:24] * a["std_exp"][5] * 1e-4, rtol=1e-5)
  # Without trimIndex a partial basis is an error naming the .bin.
  write_exp_bin(p["bin"], a["expMU"], a["expPC"])
  with pytest.raises(ModelFileError, match="exp_idx_mat") as e:
    bfm.load_bfm2009(p["model"], p["bin"], std_exp_txt=p["std"], landmarks=np.arange(68))
  assert str(e.value).startswith(p["bin"])


def test_bfm2009_options(raw):
  p, a = raw
  small = load_raw(p, num_identity=10, num_albedo=5, num_expression=7)
  assert small.sizes[:3] == (10, 5, 7)
  # std_exp.txt found beside Exp_Pca.bin.
  base = load_raw(p, std_exp_txt=None)
  assert base.expression_basis.shape[0] == 64
  # Mean expression added on request; no re-centring keeps BFM's origin.
  keep_front = a["_front"]
  with_mean = load_raw(p, include_expression_mean=True, recenter=False)
  no_mean = load_raw(p, recenter=False)
  m = a["_trim"].size
  np.testing.assert_allclose(with_mean.mean_shape - no_mean.mean_shape,
                             a["expMU"].reshape(m, 3)[keep_front] * 1e-4, atol=1e-4)
  keep = a["_trim"][keep_front]
  np.testing.assert_allclose(no_mean.mean_shape, a["_v"][keep] + OFFSET_CM, atol=1e-4)


def test_winding_auto_flip(tmp_path, caplog):
  p, a = make_raw(tmp_path, reverse_winding=True)
  keep = a["_trim"][a["_front"]]
  stored = expected_triangles(a["_tri"], keep)      # clockwise seen from +z
  with caplog.at_level(logging.INFO, logger="dff3d.bfm"):
    model = load_raw(p)
  assert "flipped" in caplog.text
  np.testing.assert_array_equal(model.triangles, stored[:, ::-1])
  assert bfm.front_area(model.mean_shape, model.triangles) > 0
  np.testing.assert_array_equal(load_raw(p, flip_winding=False).triangles, stored)
  # Forcing a flip on a correctly wound file reverses it.
  (tmp_path / "ok").mkdir()
  p2, _ = make_raw(tmp_path / "ok")
  forced = load_raw(p2, flip_winding=True)
  assert bfm.front_area(forced.mean_shape, forced.triangles) < 0


def test_reindex_triangles_arbitrary_order():
  tri = np.array([[0, 1, 2], [2, 3, 4], [1, 4, 5]])
  keep = np.array([4, 2, 3, 0])   # vertex 1 and 5 dropped, order shuffled
  np.testing.assert_array_equal(bfm.reindex_triangles(tri, keep), [[1, 2, 0]])


# ---- load_bfm_front -------------------------------------------------------------------------
def write_front(path, a, tri0):
  """BFM_model_front.mat as Deep3DFaceRecon's conversion writes it (decimetres, bases times
  their standard deviations, texture 0..255, 1-based tri / keypoints)."""
  keep = a["_trim"][a["_front"]]
  f = keep.size
  m = a["_trim"].size
  sel = lambda flat, k: flat.reshape(N, 3, -1)[keep].reshape(3 * f, -1)[:, :k]
  id_base = sel(a["shapePC"] * a["shapeEV"].T, 80) / 1e5
  tex_base = sel(a["texPC"] * a["texEV"].T, 80)
  ex = (a["expPC"].T * a["std_exp"][None]).reshape(m, 3, K_EXP)[a["_front"]]
  ex_base = ex.reshape(3 * f, K_EXP)[:, :64] / 1e5
  scipy.io.savemat(path, {
      "meanshape": (a["shapeMU"].reshape(N, 3)[keep] / 1e5).reshape(1, -1),
      "meantex": a["texMU"].reshape(N, 3)[keep].reshape(1, -1),
      "idBase": id_base, "exBase": ex_base, "texBase": tex_base,
      "tri": (tri0 + 1).astype(np.float64), "keypoints": a["keypoints"],
      "point_buf": np.ones((f, 8)), "tri_mask2": (tri0[:5] + 1).astype(np.float64),
      "frontmask2_idx": np.arange(1, f + 1)[:, None].astype(np.float64),
      "skinmask": np.ones((1, f))})


def test_front_matches_raw_conversion(raw, tmp_path):
  p, a = raw
  keep = a["_trim"][a["_front"]]
  tri0 = expected_triangles(a["_tri"], keep)
  path = str(tmp_path / "BFM_model_front.mat")
  write_front(path, a, tri0)
  front = bfm.load_bfm_front(path)
  ref = load_raw(p)
  assert front.units == "cm"
  assert front.mean_shape.shape == ref.mean_shape.shape
  for field in ("mean_shape", "identity_basis", "expression_basis", "albedo_mean",
                "albedo_basis"):
    np.testing.assert_allclose(getattr(front, field), getattr(ref, field), rtol=1e-4,
                               atol=1e-5, err_msg=field)
  np.testing.assert_array_equal(front.triangles, tri0)
  np.testing.assert_array_equal(front.landmarks, a["keypoints"][0].astype(int) - 1)
  # Decimetres -> cm: the face is ~15 cm wide, not 1.5.
  xs = np.asarray(front.mean_shape[:, 0])
  assert 10.0 < xs.max() - xs.min() < 16.0
  small = bfm.load_bfm_front(path, num_identity=3, num_albedo=4, num_expression=5,
                             landmarks=np.arange(68))
  assert small.sizes[:3] == (3, 4, 5)
  np.testing.assert_array_equal(small.landmarks, np.arange(68))


def test_front_winding_auto_flip(raw, tmp_path):
  p, a = raw
  keep = a["_trim"][a["_front"]]
  tri0 = expected_triangles(a["_tri"], keep)
  path = str(tmp_path / "BFM_model_front.mat")
  write_front(path, a, tri0[:, ::-1])
  np.testing.assert_array_equal(bfm.load_bfm_front(path).triangles, tri0)
  np.testing.assert_array_equal(bfm.load_bfm_front(path, flip_winding=False).triangles,
                                tri0[:, ::-1])


# ---- malformed files ------------------------------------------------------------------------
def _resave(path, **changes):
  data = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
  for k, v in changes.items():
    if v is None:
      data.pop(k)
    else:
      data[k] = v
  scipy.io.savemat(path, data)


def _write_bytes(path, data):
  with open(path, "wb") as f:
    f.write(data)


def _truncate(path, nbytes):
  with open(path, "rb") as f:
    data = f.read()
  _write_bytes(path, data[:len(data) - nbytes])


V73_HEADER = (b"MATLAB 7.3 MAT-file".ljust(116) + b"\0" * 8 + b"\x00\x02IM" + b"\0" * 64)

RAW_CASES = {
    "model_not_found": ("model", lambda p, a: os.remove(p["model"]), "not found"),
    "model_not_mat": ("model", lambda p, a: _write_bytes(p["model"], b"hello\n" * 40),
                      "not a readable"),
    "model_v73": ("model", lambda p, a: _write_bytes(p["model"], V73_HEADER), "v7.3"),
    "model_truncated": ("model", lambda p, a: _truncate(p["model"], 5000), ""),
    "missing_shapePC": ("model", lambda p, a: _resave(p["model"], shapePC=None), "shapePC"),
    "shapePC_rows": ("model", lambda p, a: _resave(p["model"], shapePC=a["shapePC"][:-3]),
                     "shapePC"),
    "shapeEV_length": ("model", lambda p, a: _resave(p["model"], shapeEV=a["shapeEV"][:50]),
                       "shapeEV"),
    "shapeMU_dtype": ("model", lambda p, a: _resave(p["model"], shapeMU="abc"), "dtype"),
    "texMU_complex": ("model", lambda p, a: _resave(p["model"], texMU=a["texMU"] * 1j),
                      "dtype"),
    "tl_shape": ("model", lambda p, a: _resave(p["model"], tl=a["tl"][:, :2]), "tl"),
    "tl_range": ("model", lambda p, a: _resave(p["model"], tl=a["tl"] + N), "tl"),
    "tl_fraction": ("model", lambda p, a: _resave(p["model"], tl=a["tl"] + 0.5), "tl"),
    "bin_not_found": ("bin", lambda p, a: os.remove(p["bin"]), "not found"),
    "bin_truncated": ("bin", lambda p, a: _truncate(p["bin"], 100), "truncated"),
    "bin_empty": ("bin", lambda p, a: _write_bytes(p["bin"], b"\1\0"), "truncated"),
    "bin_bad_header": ("bin", lambda p, a: _write_bytes(
        p["bin"], np.array([-5], "<i4").tobytes() + b"\0" * 400), "header"),
    "bin_extra_bytes": ("bin", lambda p, a: _write_bytes(
        p["bin"], open(p["bin"], "rb").read() + b"\0" * 12), "more"),
    "std_count": ("std", lambda p, a: np.savetxt(p["std"], a["std_exp"][:60]), "standard dev"),
    "std_text": ("std", lambda p, a: _write_bytes(p["std"], b"one two\n"), "numbers"),
    "trim_missing_key": ("exp_idx", lambda p, a: scipy.io.savemat(
        p["exp_idx"], {"other": a["trimIndex"]}), "trimIndex"),
    "trim_range": ("exp_idx", lambda p, a: _resave(p["exp_idx"], trimIndex=a["trimIndex"] * 2),
                   "trimIndex"),
    "trim_zero_based": ("exp_idx", lambda p, a: _resave(
        p["exp_idx"], trimIndex=a["trimIndex"] - G - 1), "trimIndex"),
    "front_range": ("front_idx", lambda p, a: _resave(p["front_idx"], idx=a["idx"] + 500),
                    "idx"),
    "front_duplicate": ("front_idx", lambda p, a: _resave(
        p["front_idx"], idx=np.concatenate([a["idx"], a["idx"][:1]])), "more than once"),
    "front_matrix": ("front_idx", lambda p, a: _resave(
        p["front_idx"], idx=np.ones((4, 4))), "idx"),
    "keypoints_count": ("info", lambda p, a: _resave(p["info"], keypoints=a["keypoints"][:, :67]),
                        "keypoints"),
    "keypoints_range": ("info", lambda p, a: _resave(p["info"], keypoints=a["keypoints"] + 1000),
                        "keypoints"),
    "keypoints_missing": ("info", lambda p, a: _resave(p["info"], keypoints=None), "keypoints"),
}


def _check_one_line(err, path, needle):
  msg = str(err)
  assert "\n" not in msg, msg
  assert msg.startswith(path), msg
  assert needle.lower() in msg.lower(), msg


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_raw_file_errors(tmp_path, case):
  p, a = make_raw(tmp_path)
  which, mutate, needle = RAW_CASES[case]
  mutate(p, a)
  with pytest.raises(ModelFileError) as e:
    load_raw(p)
  _check_one_line(e.value, p[which], needle)


def test_raw_too_many_components(raw):
  p, _ = raw
  with pytest.raises(ModelFileError) as e:
    load_raw(p, num_identity=200)
  _check_one_line(e.value, p["model"], "shapePC")
  with pytest.raises(ModelFileError) as e:
    load_raw(p, num_expression=80)
  _check_one_line(e.value, p["bin"], "80 requested")


FRONT_CASES = {
    "not_found": (lambda path, a: os.remove(path), "not found"),
    "garbage": (lambda path, a: _write_bytes(path, b"\x89PNG" * 100), "not a readable"),
    "missing_idBase": (lambda path, a: _resave(path, idBase=None), "idBase"),
    "idBase_rows": (lambda path, a: _resave(path, idBase=np.ones((30, 80))), "idBase"),
    "exBase_cols": (lambda path, a: _resave(path, exBase=np.ones((3 * len(a["_front"]), 10))),
                    "exBase"),
    "meantex_length": (lambda path, a: _resave(path, meantex=np.ones((1, 12))), "meantex"),
    "meanshape_not_3n": (lambda path, a: _resave(path, meanshape=np.ones((1, 100))),
                         "meanshape"),
    "meanshape_dtype": (lambda path, a: _resave(path, meanshape="x" * 9), "dtype"),
    "tri_range": (lambda path, a: _resave(path, tri=np.array([[1.0, 2.0, 10 ** 6]])), "tri"),
    "keypoints_shape": (lambda path, a: _resave(path, keypoints=np.ones((2, 68))), "keypoints"),
}


@pytest.mark.parametrize("case", sorted(FRONT_CASES))
def test_front_file_errors(raw, tmp_path, case):
  p, a = raw
  keep = a["_trim"][a["_front"]]
  path = str(tmp_path / "BFM_model_front.mat")
  write_front(path, a, expected_triangles(a["_tri"], keep))
  mutate, needle = FRONT_CASES[case]
  mutate(path, a)
  with pytest.raises(ModelFileError) as e:
    bfm.load_bfm_front(path)
  _check_one_line(e.value, path, needle)
