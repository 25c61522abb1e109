"""TFDS builders in data_prep/: build tiny datasets in the real layouts, read back TF-free."""

import importlib.util
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from data_prep import common  # noqa: E402
from data_prep.aflw2000_3d_builder import Dff3dAflw20003d  # noqa: E402
from data_prep.aflw_lfpa_builder import Dff3dAflwLfpa  # noqa: E402
from data_prep.celeba_builder import Dff3dCelebA  # noqa: E402
from data_prep.synthetic_builder import Dff3dSynthetic, SyntheticConfig, load_generator  # noqa: E402,E501
from data_prep.w300lp_builder import Dff3d300wLp  # noqa: E402
from dff3d.datasets import celeba  # noqa: E402
from dff3d.datasets.aflw2000_3d import DatasetFormatError, DatasetNotFoundError  # noqa: E402

from tests.conftest import AFLW_SAMPLE_DIR, require  # noqa: E402


def _jpeg(path, seed, size=(20, 24), mode="RGB"):
  """Writes a small noise JPEG; returns its decoded uint8 pixels."""
  rng = np.random.default_rng(seed)
  shape = (size[0], size[1], 3) if mode == "RGB" else size
  Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path, quality=95)
  return np.asarray(Image.open(path))


def _points(seed, n=68):
  return np.random.default_rng(seed).uniform(2, 18, (n, 2)).astype(np.float32)


def _by_name(source):
  return {ex["image_name"].decode() if isinstance(ex["image_name"], bytes)
          else ex["image_name"]: ex for ex in (source[i] for i in range(len(source)))}


def test_no_tensorflow_imported():
  """The whole build/read path must work without TensorFlow installed."""
  assert importlib.util.find_spec("tensorflow") is None
  assert "tensorflow" not in sys.modules


# ---- CelebA ------------------------------------------------------------------------------------


def _celeba_dir(root, label=True):
  img_dir = root / "img_align_celeba"
  img_dir.mkdir(parents=True)
  names = [f"{i:06d}.jpg" for i in range(1, 6)]
  pixels = {n: _jpeg(img_dir / n, i) for i, n in enumerate(names)}
  (root / "list_eval_partition.txt").write_text(
      "000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n000005.jpg 0\n")
  points = {n: _points(i) for i, n in enumerate(names)}
  if label:
    with celeba.open_for_append(root / celeba.LANDMARKS_FILE, celeba.LANDMARKS_HEADER) as f:
      for n in names[:4]:
        f.write(celeba.format_landmarks_line(n, points[n]) + "\n")
    with celeba.open_for_append(root / celeba.FAILURES_FILE, celeba.FAILURES_HEADER) as f:
      f.write("000005.jpg no face found\n")
  return pixels, points


def test_celeba_builder(tmp_path):
  pixels, points = _celeba_dir(tmp_path / "celeba")
  builder = common.build(Dff3dCelebA, tmp_path / "celeba", tmp_path / "data")
  sources = tfds.data_source("dff3d_celeb_a", data_dir=str(tmp_path / "data"))
  assert {k: len(v) for k, v in sources.items()} == {"train": 2, "validation": 1, "test": 1}
  assert builder.info.metadata["skipped_unlabelled"] == {"train": 1, "validation": 0, "test": 0}
  train = _by_name(sources["train"])
  assert sorted(train) == ["000001.jpg", "000002.jpg"]
  ex = train["000002.jpg"]
  np.testing.assert_array_equal(ex["image"], pixels["000002.jpg"])  # bytes stored untouched
  np.testing.assert_allclose(ex["landmarks_68"], points["000002.jpg"], atol=0.006)
  assert ex["landmarks_68"].dtype == np.float32 and ex["landmarks_visible"].all()
  assert np.isnan(ex["yaw_deg"])


def test_celeba_builder_unlabelled_images_error(tmp_path):
  _celeba_dir(tmp_path / "c", label=False)
  with pytest.raises(DatasetNotFoundError, match="landmarks_68.txt: no such file"):
    common.build(Dff3dCelebA, tmp_path / "c", tmp_path / "data")
  (tmp_path / "c" / celeba.LANDMARKS_FILE).write_text(
      celeba.format_landmarks_line("000001.jpg", _points(0)) + "\n")
  with pytest.raises(DatasetNotFoundError, match="4 images .* no landmarks .* e.g. 000002.jpg"):
    common.build(Dff3dCelebA, tmp_path / "c", tmp_path / "data")


def test_celeba_builder_wrong_manual_dir(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DatasetNotFoundError, match="img_align_celeba"):
    common.build(Dff3dCelebA, tmp_path / "empty", tmp_path / "data")
  with pytest.raises(DatasetNotFoundError, match="no such directory"):
    common.build(Dff3dCelebA, tmp_path / "nope", tmp_path / "data")
  with pytest.raises(DatasetNotFoundError, match="downloads/manual: no such directory"):
    common.build(Dff3dCelebA, None, tmp_path / "data")


def test_celeba_missing_image_and_bad_partition(tmp_path):
  _celeba_dir(tmp_path / "c")
  (tmp_path / "c" / "img_align_celeba" / "000003.jpg").unlink()
  with pytest.raises(DatasetNotFoundError, match="1 images listed .* missing, e.g. 000003.jpg"):
    common.build(Dff3dCelebA, tmp_path / "c", tmp_path / "data")
  (tmp_path / "c" / "list_eval_partition.txt").write_text("000001.jpg train\n")
  with pytest.raises(DatasetFormatError, match="line 1"):
    common.build(Dff3dCelebA, tmp_path / "c", tmp_path / "data")


# ---- 300W-LP -----------------------------------------------------------------------------------


def _w300lp_dir(root):
  """4 images in the real layout: AFW (2 views), AFW_Flip (1), HELEN (1); other folders empty."""
  lp = root / "300W_LP"
  truth = {}
  files = [("AFW", "AFW_134212_1_0"), ("AFW", "AFW_134212_1_3"),
           ("AFW_Flip", "AFW_134212_1_0"), ("HELEN", "HELEN_100032540_1_0")]
  for s in ("AFW", "AFW_Flip", "HELEN", "HELEN_Flip", "IBUG", "IBUG_Flip", "LFPW", "LFPW_Flip"):
    (lp / s).mkdir(parents=True)
  (lp / "Code").mkdir()
  for k, (subset, stem) in enumerate(files):
    _jpeg(lp / subset / f"{stem}.jpg", k)
    pt2d = _points(10 + k).T  # stored (2, 68)
    yaw = 0.1 * (k + 1) * (-1 if subset.endswith("Flip") else 1)
    pose = np.array([[0.05, yaw, -0.02, 200.0, 210.0, 0.0, 0.0012]])
    scipy.io.savemat(lp / subset / f"{stem}.mat", {
        "pt2d": pt2d, "Pose_Para": pose, "Shape_Para": np.full((199, 1), k, np.float64),
        "Exp_Para": np.full((29, 1), -k, np.float64), "roi": np.array([[1.0, 2.0, 19.0, 18.0]]),
        "Tex_Para": np.zeros((199, 1)), "Illum_Para": np.zeros((1, 10)),
        "Color_Para": np.zeros((1, 7))})
    entry = {"pt2d": pt2d.T, "yaw": yaw}
    if not subset.endswith("Flip"):
      (lp / "landmarks" / subset).mkdir(parents=True, exist_ok=True)
      p2, p3 = _points(20 + k), _points(30 + k)
      scipy.io.savemat(lp / "landmarks" / subset / f"{stem}_pts.mat", {"pts_2d": p2, "pts_3d": p3})
      entry.update(pts_2d=p2, pts_3d=p3)
    truth[f"{subset}/{stem}.jpg"] = entry
  return truth


def test_w300lp_builder(tmp_path):
  truth = _w300lp_dir(tmp_path / "raw")
  common.build(Dff3d300wLp, tmp_path / "raw", tmp_path / "data")  # parent of 300W_LP/
  src = tfds.data_source("dff3d_300w_lp", split="train", data_dir=str(tmp_path / "data"))
  got = _by_name(src)
  assert sorted(got) == sorted(truth)
  for name, t in truth.items():
    ex = got[name]
    np.testing.assert_allclose(ex["landmarks_68"], t["pt2d"] + 0.5, rtol=1e-6)
    np.testing.assert_allclose(ex["yaw_deg"], np.degrees(t["yaw"]), rtol=1e-5)
    assert ex["pose"].shape == (7,) and ex["shape_para"].shape == (199,)
    assert ex["image"].shape == (20, 24, 3) and ex["image"].dtype == np.uint8
    assert bool(ex["has_pts"]) == ("pts_2d" in t)
    if "pts_2d" in t:
      np.testing.assert_allclose(ex["pts_2d"], t["pts_2d"] + 0.5, rtol=1e-6)
      np.testing.assert_allclose(ex["pts_3d"], t["pts_3d"] + 0.5, rtol=1e-6)
    else:
      assert not ex["pts_2d"].any()
  assert int(got["AFW/AFW_134212_1_3.jpg"]["view"]) == 3
  assert got["AFW_Flip/AFW_134212_1_0.jpg"]["subset"] in (b"AFW_Flip", "AFW_Flip")
  # The no_flip config reads only the unflipped folders.
  common.build(Dff3d300wLp, tmp_path / "raw", tmp_path / "data2", config="no_flip")
  src = tfds.data_source("dff3d_300w_lp/no_flip", split="train", data_dir=str(tmp_path / "data2"))
  assert len(src) == 3


def test_w300lp_incomplete_dir(tmp_path):
  _w300lp_dir(tmp_path / "raw")
  (tmp_path / "raw" / "300W_LP" / "HELEN" / "HELEN_100032540_1_0.mat").unlink()
  with pytest.raises(DatasetNotFoundError, match="HELEN: 1 files without their pair, e.g. "
                     "HELEN_100032540_1_0 has no .mat"):
    common.build(Dff3d300wLp, tmp_path / "raw", tmp_path / "data")
  (tmp_path / "other").mkdir()
  with pytest.raises(DatasetNotFoundError, match="expected the 300W-LP folders AFW, AFW_Flip"):
    common.build(Dff3d300wLp, tmp_path / "other", tmp_path / "data")


def test_w300lp_bad_mat(tmp_path):
  _w300lp_dir(tmp_path / "raw")
  scipy.io.savemat(tmp_path / "raw" / "300W_LP" / "AFW" / "AFW_134212_1_0.mat",
                   {"pt2d": np.zeros((2, 21)), "Pose_Para": np.zeros((1, 7))})
  with pytest.raises(DatasetFormatError, match=r"AFW/AFW_134212_1_0.mat: key 'pt2d' has shape"):
    common.build(Dff3d300wLp, tmp_path / "raw", tmp_path / "data")


# ---- AFLW2000-3D -------------------------------------------------------------------------------


def _aflw_mat(seed):
  rng = np.random.default_rng(seed)
  pt3d = np.stack([rng.uniform(2, 20, 68), rng.uniform(2, 18, 68), rng.uniform(-5, 5, 68)])
  pt2d = rng.uniform(2, 18, (2, 21))
  pt2d[:, 4] = -1.0
  return {"pt3d_68": pt3d, "Pose_Para": np.array([[0.1, 0.3 * seed, 0.0, 1, 2, 3, 0.001]]),
          "pt2d": pt2d, "roi": np.array([[1, 2, 30, 40]])}


def test_aflw2000_3d_builder(tmp_path):
  raw = tmp_path / "AFLW2000"
  raw.mkdir()
  mats = {}
  for k in range(1, 5):
    _jpeg(raw / f"image{k:05d}.jpg", k, mode="L" if k == 2 else "RGB")
    mats[k] = _aflw_mat(k)
    scipy.io.savemat(raw / f"image{k:05d}.mat", mats[k])
  common.build(Dff3dAflw20003d, tmp_path, tmp_path / "data")  # parent of AFLW2000/
  src = tfds.data_source("dff3d_aflw2000_3d", split="test", data_dir=str(tmp_path / "data"))
  got = _by_name(src)
  assert len(got) == 4
  for k, m in mats.items():
    ex = got[f"image{k:05d}.jpg"]
    np.testing.assert_allclose(ex["landmarks_68"], m["pt3d_68"][:2].T + 0.5, rtol=1e-6)
    np.testing.assert_allclose(ex["pt3d_68"][:, 2], m["pt3d_68"][2], rtol=1e-6)
    np.testing.assert_allclose(ex["yaw_deg"], np.degrees(0.3 * k), rtol=1e-5)
    assert ex["image"].shape == (20, 24, 3)  # the greyscale file is stored as RGB
    assert not ex["pt2d_21_visible"][4] and ex["pt2d_21_visible"].sum() == 20


def test_aflw2000_3d_builder_lonely_file(tmp_path):
  raw = tmp_path / "a"
  raw.mkdir()
  _jpeg(raw / "image00001.jpg", 0)
  scipy.io.savemat(raw / "image00001.mat", _aflw_mat(1))
  _jpeg(raw / "image00002.jpg", 0)
  with pytest.raises(DatasetNotFoundError, match="1 imageNNNNN files .* e.g. image00002.jpg"):
    common.build(Dff3dAflw20003d, raw, tmp_path / "data")


def test_aflw2000_3d_builder_real_sample(tmp_path):
  sample = require(AFLW_SAMPLE_DIR)
  from dff3d.datasets import load_aflw2000_3d_mat
  common.build(Dff3dAflw20003d, sample, tmp_path / "data")
  src = tfds.data_source("dff3d_aflw2000_3d", split="test", data_dir=str(tmp_path / "data"))
  got = _by_name(src)
  assert len(got) == 16
  ex = got["image00475.jpg"]
  ref = load_aflw2000_3d_mat(sample / "image00475.mat")
  assert ex["image"].shape == (450, 450, 3)
  np.testing.assert_allclose(ex["yaw_deg"], 65.621, atol=1e-3)
  np.testing.assert_allclose(ex["landmarks_68"], ref["landmarks_3d"][:, :2] + 0.5, rtol=1e-6)
  lm = ex["landmarks_68"]
  assert np.all((lm > 0) & (lm < 450))


# ---- AFLW-LFPA ---------------------------------------------------------------------------------


def test_aflw_lfpa_builder(tmp_path):
  raw = tmp_path / "lfpa"
  raw.mkdir()
  p0, p1 = _points(0, 34), _points(1, 34)
  _jpeg(raw / "a.jpg", 0)
  vis = np.ones(34)
  vis[[3, 7]] = 0
  scipy.io.savemat(raw / "a.mat", {"pts": p0.T, "visible": vis, "yaw": 42.0})
  _jpeg(raw / "b.jpg", 1)
  np.savetxt(raw / "b.txt", p1)
  common.build(Dff3dAflwLfpa, raw, tmp_path / "data")
  got = _by_name(tfds.data_source("dff3d_aflw_lfpa", split="test", data_dir=str(tmp_path / "data")))
  np.testing.assert_allclose(got["a.jpg"]["landmarks_34"], p0 + 0.5, rtol=1e-6)
  assert got["a.jpg"]["landmarks_34_visible"].sum() == 32
  assert float(got["a.jpg"]["yaw_deg"]) == 42.0
  np.testing.assert_allclose(got["b.jpg"]["landmarks_34"], p1 + 0.5, rtol=1e-6)
  assert np.isnan(got["b.jpg"]["yaw_deg"]) and got["b.jpg"]["landmarks_34_visible"].all()
  assert not got["b.jpg"]["landmarks_visible"].any()


def test_aflw_lfpa_missing_annotation(tmp_path):
  raw = tmp_path / "lfpa"
  raw.mkdir()
  _jpeg(raw / "a.jpg", 0)
  with pytest.raises(DatasetNotFoundError, match="e.g. a has no a NAME.mat / NAME.txt"):
    common.build(Dff3dAflwLfpa, raw, tmp_path / "data")


# ---- synthetic ---------------------------------------------------------------------------------


def fake_generate(seed, index, size):
  """Stands in for dff3d.synthetic.generate with the same output contract."""
  rng = np.random.default_rng([seed, index])
  vid = rng.integers(-1, 100, (size, size)).astype(np.int32)
  return {"image": rng.uniform(0, 1, (size, size, 3)).astype(np.float32),
          "landmarks": rng.uniform(0, size, (68, 2)).astype(np.float32),
          "landmarks_visible": rng.uniform(size=68) > 0.2,
          "coefficients": np.full(7, index, np.float32),
          "vertex_id": vid, "barycentric": rng.dirichlet(np.ones(3), (size, size)).astype(
              np.float32), "mask": vid >= 0}


def _check_synthetic(tmp_path, generator, size, num_train=3, num_test=2):
  cfg = SyntheticConfig(name="tiny", size=size, num_train=num_train, num_test=num_test, seed=5,
                        generator=generator)
  common.build(Dff3dSynthetic, None, tmp_path / "data", config=cfg)
  src = tfds.data_source("dff3d_synthetic/tiny", data_dir=str(tmp_path / "data"))
  assert len(src["train"]) == num_train and len(src["test"]) == num_test
  fn = load_generator(generator)
  for split in ("train", "test"):
    for i in range(len(src[split])):
      ex = src[split][i]
      ref = fn(5, int(ex["index"]), size)
      np.testing.assert_allclose(ex["image"] / 255.0, ref["image"], atol=0.5 / 255 + 1e-6)
      np.testing.assert_array_equal(ex["landmarks_68"], ref["landmarks"])
      np.testing.assert_array_equal(ex["landmarks_visible"], ref["landmarks_visible"])
      np.testing.assert_array_equal(ex["vertex_id"], ref["vertex_id"])
      np.testing.assert_array_equal(ex["barycentric"], ref["barycentric"])
      np.testing.assert_array_equal(ex["mask"], ref["mask"])
      np.testing.assert_array_equal(ex["coefficients"], np.ravel(ref["coefficients"]))
  assert [int(src["test"][i]["index"]) for i in range(num_test)] == list(
      range(num_train, num_train + num_test))


def test_synthetic_builder_with_stand_in_generator(tmp_path):
  _check_synthetic(tmp_path, "tests.test_data_builders:fake_generate", 8)


def test_synthetic_builder_real_generator(tmp_path):
  if importlib.util.find_spec("dff3d.synthetic") is None:
    pytest.skip("dff3d.synthetic (the synthetic face generator) is not in this checkout yet")
  # Size 64 as tests/test_synthetic.py: in a full run both share one jit compilation (~25 s
  # on a shared 2-core CPU), the cost of this test.
  _check_synthetic(tmp_path, "dff3d.synthetic:generate", 64, num_train=1, num_test=1)


def test_synthetic_missing_generator(tmp_path):
  cfg = SyntheticConfig(name="bad", size=8, num_train=1, num_test=0,
                        generator="dff3d.no_such_module:generate")
  with pytest.raises(ModuleNotFoundError, match="no_such_module"):
    common.build(Dff3dSynthetic, None, tmp_path / "data", config=cfg)
