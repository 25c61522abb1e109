"""Tests of the AFLW2000-3D reader on generated files and on the shared 16-image sample."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from dff3d import metrics
from dff3d.datasets import (DatasetFormatError, DatasetNotFoundError, list_aflw2000_3d,
                            load_aflw2000_3d_mat)

SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/aflw2000_3d_sample"
DEV_DIR = SAMPLE_DIR.parent / "aflw2000_3d_dev"

# Pose_Para[0, 1] of each sample file, in degrees (read once from the files and checked by
# eye: 10 near-frontal, 4 half-profile, 2 near-profile faces), and the |yaw| groups they give.
SAMPLE_YAW_DEG = {
    "image00050": 0.939, "image00081": 17.907, "image00251": -54.685, "image00430": 4.687,
    "image00475": 65.621, "image00514": -5.273, "image00516": -35.709, "image01038": 11.065,
    "image01322": -5.382, "image02283": -14.137, "image02420": 70.899, "image02545": 10.969,
    "image02616": 37.968, "image03324": -10.937, "image03614": 17.553, "image04331": 45.451,
}
SAMPLE_YAW_GROUP = {
    "image00050": 0, "image00081": 0, "image00251": 1, "image00430": 0,
    "image00475": 2, "image00514": 0, "image00516": 1, "image01038": 0,
    "image01322": 0, "image02283": 0, "image02420": 2, "image02545": 0,
    "image02616": 1, "image03324": 0, "image03614": 0, "image04331": 1,
}


def _fake_mat_dict(seed=0, yaw=0.3):
  """A dict in the AFLW2000-3D .mat layout with known values."""
  rng = np.random.default_rng(seed)
  pt3d = np.stack([rng.uniform(100, 350, 68), rng.uniform(150, 380, 68),
                   rng.uniform(-100, 80, 68)]).astype(np.float32)
  pt2d = rng.uniform(100, 350, (2, 21))
  pt2d[0, [3, 9]] = -1.0  # missing AFLW points: x = -1 (y holds junk, as in the real files)
  pt2d[1, [3, 9]] = 452.0
  return {
      "pt3d_68": pt3d,
      "Pose_Para": np.array([[-0.1, yaw, 0.05, 230.0, 210.0, -110.0, 0.0015]], np.float32),
      "Shape_Para": rng.normal(size=(199, 1)),
      "Exp_Para": rng.normal(size=(29, 1)),
      "Tex_Para": rng.normal(size=(199, 1)),
      "Illum_Para": rng.normal(size=(1, 10)),
      "Color_Para": rng.normal(size=(1, 7)).astype(np.float32),
      "pt2d": pt2d,
      "roi": np.array([[162, 52, 1182, 1072]], np.int16),
  }


def _write(path, mat):
  scipy.io.savemat(str(path), mat)
  return path


def _one_line(excinfo, name):
  message = str(excinfo.value)
  assert "\n" not in message and name in message
  return message


# ---------------------------------------------------------------------------- generated files


def test_load_generated_mat(tmp_path):
  mat = _fake_mat_dict()
  out = load_aflw2000_3d_mat(_write(tmp_path / "image00007.mat", mat))
  assert out["landmarks_3d"].shape == (68, 3) and out["landmarks_3d"].dtype == np.float32
  np.testing.assert_array_equal(out["landmarks_3d"], mat["pt3d_68"].T)
  np.testing.assert_allclose(out["pose"], [-0.1, 0.3, 0.05], rtol=1e-6)
  assert out["yaw_deg"] == pytest.approx(np.degrees(0.3), rel=1e-6)
  np.testing.assert_allclose(out["translation"], [230.0, 210.0, -110.0])
  assert out["scale"] == pytest.approx(0.0015)
  np.testing.assert_allclose(out["pt2d"], mat["pt2d"].T.astype(np.float32))
  assert out["pt2d_visible"].shape == (21,)
  assert not out["pt2d_visible"][[3, 9]].any() and out["pt2d_visible"].sum() == 19
  np.testing.assert_array_equal(out["roi"], [162, 52, 1182, 1072])
  for name, size in [("shape_para", 199), ("exp_para", 29), ("tex_para", 199),
                     ("illum_para", 10), ("color_para", 7)]:
    assert out[name].shape == (size,) and out[name].dtype == np.float32


def test_optional_fit_parameters_may_be_absent(tmp_path):
  mat = _fake_mat_dict()
  del mat["Tex_Para"], mat["Illum_Para"]
  out = load_aflw2000_3d_mat(_write(tmp_path / "image00001.mat", mat))
  assert "tex_para" not in out and "illum_para" not in out and "shape_para" in out


@pytest.mark.parametrize("key", ["pt3d_68", "Pose_Para"])
def test_missing_required_key(tmp_path, key):
  mat = _fake_mat_dict()
  del mat[key]
  path = _write(tmp_path / "image00050.mat", mat)
  with pytest.raises(DatasetFormatError) as excinfo:
    load_aflw2000_3d_mat(path)
  assert _one_line(excinfo, "image00050.mat") == f"image00050.mat: missing key '{key}'"
  assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize("key,bad", [("pt3d_68", np.zeros((68, 3))),
                                     ("Pose_Para", np.zeros((1, 6)))])
def test_wrong_shape(tmp_path, key, bad):
  mat = _fake_mat_dict()
  mat[key] = bad
  with pytest.raises(DatasetFormatError, match=rf"image00002\.mat: key '{key}' has shape") as e:
    load_aflw2000_3d_mat(_write(tmp_path / "image00002.mat", mat))
  _one_line(e, "image00002.mat")


@pytest.mark.parametrize("key,bad", [("pt2d", np.ones((2, 23))),  # as image01198.mat
                                     ("pt2d", None), ("pt2d", np.full((2, 21), np.nan)),
                                     ("roi", np.zeros((1, 5))), ("roi", None)])
def test_unused_keys_never_reject_a_file(tmp_path, key, bad):
  mat = _fake_mat_dict()
  mat[key] = bad
  if bad is None:
    del mat[key]
  out = load_aflw2000_3d_mat(_write(tmp_path / "image01198.mat", mat))
  np.testing.assert_array_equal(out["landmarks_3d"], mat["pt3d_68"].T)
  assert out["yaw_deg"] == pytest.approx(np.degrees(0.3), rel=1e-6)
  assert out[key] is None
  other = "roi" if key == "pt2d" else "pt2d"
  assert out[other] is not None  # the well-formed one is kept
  assert (out["pt2d_visible"] is None) == (key == "pt2d")


def test_malformed_fit_parameter_is_left_out(tmp_path):
  mat = _fake_mat_dict()
  mat["Exp_Para"] = np.zeros((199, 1))
  mat["Tex_Para"] = np.zeros((199, 1), np.uint8)  # stored as uint8 in some real files
  out = load_aflw2000_3d_mat(_write(tmp_path / "image00002.mat", mat))
  assert "exp_para" not in out
  assert out["tex_para"].dtype == np.float32 and not out["tex_para"].any()


def test_non_finite_landmarks(tmp_path):
  mat = _fake_mat_dict()
  mat["pt3d_68"][0, 5] = np.nan
  with pytest.raises(DatasetFormatError, match="image00003.mat: key 'pt3d_68' contains non-fin"):
    load_aflw2000_3d_mat(_write(tmp_path / "image00003.mat", mat))


def test_not_a_mat_file(tmp_path):
  path = tmp_path / "image00004.mat"
  path.write_bytes(b"\xff\xd8\xff\xe0 this is a jpeg, really\n second line\n")
  with pytest.raises(DatasetFormatError, match=r"image00004\.mat: not a readable MATLAB") as e:
    load_aflw2000_3d_mat(path)
  _one_line(e, "image00004.mat")


def test_missing_file(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="image00005.mat: no such file") as e:
    load_aflw2000_3d_mat(tmp_path / "image00005.mat")
  assert isinstance(e.value, FileNotFoundError)


def test_list_pairs_and_orphans(tmp_path):
  for stem in ["image00003", "image00001", "image00002"]:
    (tmp_path / f"{stem}.jpg").write_bytes(b"")
    _write(tmp_path / f"{stem}.mat", _fake_mat_dict())
  (tmp_path / "image00010.jpg").write_bytes(b"")  # image without .mat
  _write(tmp_path / "image00020.mat", _fake_mat_dict())  # .mat without image
  (tmp_path / "README.md").write_text("ignored")
  (tmp_path / "image1.jpg").write_bytes(b"")  # not 5 digits: ignored
  listing = list_aflw2000_3d(tmp_path)
  assert [(i.name, m.name) for i, m in listing.pairs] == [
      ("image00001.jpg", "image00001.mat"), ("image00002.jpg", "image00002.mat"),
      ("image00003.jpg", "image00003.mat")]
  assert [p.name for p in listing.images_without_mat] == ["image00010.jpg"]
  assert [p.name for p in listing.mats_without_image] == ["image00020.mat"]
  pairs, _, _ = listing
  assert pairs == listing.pairs


def test_list_errors(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="no such directory") as e:
    list_aflw2000_3d(tmp_path / "absent")
  _one_line(e, "absent")
  (tmp_path / "image00001.jpg").write_bytes(b"")
  with pytest.raises(DatasetNotFoundError,
                     match=r"expected imageNNNNN\.jpg \+ imageNNNNN\.mat files in ") as e:
    list_aflw2000_3d(tmp_path)
  _one_line(e, str(tmp_path))
  with pytest.raises(DatasetNotFoundError, match="not a directory"):
    list_aflw2000_3d(tmp_path / "image00001.jpg")


# ---------------------------------------------------------------------------- real sample


@pytest.fixture(scope="module")
def sample_listing():
  if not SAMPLE_DIR.is_dir():
    pytest.skip(f"AFLW2000-3D sample not found at {SAMPLE_DIR} (shared data not present)")
  return list_aflw2000_3d(SAMPLE_DIR)


def test_sample_all_load(sample_listing):
  assert len(sample_listing.pairs) == 16
  assert not sample_listing.images_without_mat and not sample_listing.mats_without_image
  for _, mat_path in sample_listing.pairs:
    out = load_aflw2000_3d_mat(mat_path)
    lm = out["landmarks_3d"]
    assert lm.shape == (68, 3) and np.isfinite(lm).all()
    # Landmarks lie inside the 450 x 450 image and |pose angles| < 90 degrees.
    assert (lm[:, :2] > 0).all() and (lm[:, :2] < 450).all()
    assert (np.abs(np.degrees(out["pose"])) < 90).all()
    assert len(out) == 13  # all optional fit parameters present


def test_sample_yaw_groups(sample_listing):
  stems = [mat.stem for _, mat in sample_listing.pairs]
  assert stems == sorted(SAMPLE_YAW_DEG)
  yaw = np.array([load_aflw2000_3d_mat(m)["yaw_deg"] for _, m in sample_listing.pairs])
  np.testing.assert_allclose(yaw, [SAMPLE_YAW_DEG[s] for s in stems], atol=1e-3)
  groups = metrics.yaw_groups(yaw)
  np.testing.assert_array_equal(groups, [SAMPLE_YAW_GROUP[s] for s in stems])
  np.testing.assert_array_equal(np.bincount(groups, minlength=3), [10, 4, 2])


def test_dev_split_all_load():
  """Every real file of the 300-image dev split loads; only image01198.mat (pt2d (2, 23))
  loses its pt2d."""
  if not DEV_DIR.is_dir():
    pytest.skip(f"AFLW2000-3D dev split not found at {DEV_DIR} (shared data not present)")
  listing = list_aflw2000_3d(DEV_DIR)
  assert len(listing.pairs) == 300
  no_pt2d = []
  for _, mat_path in listing.pairs:
    out = load_aflw2000_3d_mat(mat_path)
    assert out["landmarks_3d"].shape == (68, 3) and np.isfinite(out["landmarks_3d"]).all()
    if out["pt2d"] is None:
      no_pt2d.append(mat_path.name)
  assert no_pt2d == ["image01198.mat"]
