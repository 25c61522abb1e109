"""AFLW in the 3DDFA layout: the reader and the TFDS builder on generated files, and the real
folder in ../shared/data when present."""

import shutil

import numpy as np
import pytest

from dff3d.datasets import aflw_3ddfa
from dff3d.datasets.aflw2000_3d import DatasetFormatError, DatasetNotFoundError

from tests.conftest import SHARED_DATA
from tests.test_data_builders import _by_name, _jpeg

REAL_DIR = SHARED_DATA / "aflw_3ddfa"

# Boxes with a hand-computed point each (0-based original pixel -> dff3d crop pixel, S = 120).
#   row 0: square, side 240 (scale 0.5): (100, 50) -> ((100.5 - 100) / 2, (50.5 - 50) / 2).
#   row 1: clipped at the photo's bottom (y1 = 480, the file's largest y1): 300 x 280 is the
#     square box [60, 200, 360, 500), scale 0.4: (210, 340) -> (150.5 * 0.4, 140.5 * 0.4).
#   row 2: clipped at the photo's left (x0 = 1): 250 x 270 is the square box [-19, 20, 251,
#     290), scale 120 / 270: (100, 100) -> (119.5 / 2.25, 80.5 / 2.25).
BOXES = [[100, 50, 340, 290], [60, 200, 360, 480], [1, 20, 251, 290], [30, 40, 230, 240],
         [10, 60, 210, 260], [80, 90, 280, 290]]
HAND = [(0, 0, (100, 50), (0.25, 0.25)), (0, 1, (339, 289), (119.75, 119.75)),
        (0, 2, (220, 170), (60.25, 60.25)), (1, 0, (210, 340), (60.2, 56.2)),
        (2, 0, (100, 100), (119.5 / 2.25, 80.5 / 2.25))]


def _names(n_train=4, n_validation=2):
  """imageNNNNN.jpg names, the first n_train of the train split and n_validation of validation."""
  got = {"train": [], "validation": []}
  for k in range(1000):
    name = f"image{k:05d}.jpg"
    split = aflw_3ddfa.split_of(name)
    if len(got[split]) < {"train": n_train, "validation": n_validation}[split]:
      got[split].append(name)
  return got["train"] + got["validation"]


def _write_layout(root, size=120):
  """Writes the 3DDFA AFLW layout with len(BOXES) crops; returns (names, pts, boxes, yaws)."""
  names = _names()
  (root / "AFLW_GT_crop").mkdir(parents=True)
  for k, name in enumerate(names):
    _jpeg(root / "AFLW_GT_crop" / name, k, size=(size, size))
  (root / "AFLW_GT_crop.list").write_text("\n".join(names) + "\n")
  boxes = np.array(BOXES, np.uint16)
  rng = np.random.default_rng(0)
  pts = rng.uniform(boxes[:, None, :2], boxes[:, None, 2:], (len(names), 21, 2))
  for row, point, p, _ in HAND:
    pts[row, point] = p
  pts = pts.transpose(0, 2, 1).astype(np.float32)  # stored (N, 2, 21)
  pts[0, 0, 5], pts[0, 1, 5] = -1.0, 452.0  # as the real file: x = -1, y junk
  pts[3, :, 7] = -1.0
  pts[4, 1, 12] = -1.0
  yaws = np.linspace(-80, 80, len(names)).astype(np.float32)
  np.save(root / "AFLW_GT_pts21.npy", pts)
  np.save(root / "AFLW_GT_crop_roi_box.npy", boxes)
  np.save(root / "AFLW_GT_crop_yaws.npy", yaws)
  return names, pts, boxes, yaws


def _write_pseudo68(root, names, order=None, overrides=None):
  """AFLW_GT_pseudo68.npz with rows in `order` (default: as `names`) and arrays replaced by
  `overrides`; returns {name: (landmarks_68, fit_error)}."""
  rng = np.random.default_rng(1)
  by_name = {n: (rng.uniform(0, 120, (68, 2)).astype(np.float32), np.float32(k + 0.5))
             for k, n in enumerate(names)}
  rows = [names[k] for k in (order if order is not None else range(len(names)))]
  arrays = {"names": np.array(rows), "landmarks_68": np.stack([by_name[n][0] for n in rows]),
            "fit_error": np.array([by_name[n][1] for n in rows], np.float32)}
  arrays.update(overrides or {})
  np.savez(root / aflw_3ddfa.PSEUDO68_FILE, **arrays)
  return by_name


def test_load_converts_to_crop_pixels(tmp_path):
  names, pts, boxes, yaws = _write_layout(tmp_path)
  data = aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  n = len(names)
  assert data.names == names and data.crop_size == 120
  assert [p.name for p in data.image_paths] == names and all(p.is_file() for p in data.image_paths)
  assert data.landmarks.shape == (n, 21, 2) and data.landmarks.dtype == np.float32
  assert data.visible.shape == (n, 21) and data.visible.dtype == bool
  for row, point, _, want in HAND:
    np.testing.assert_allclose(data.landmarks[row, point], want, rtol=1e-5)
  np.testing.assert_array_equal(data.roi_box, boxes.astype(np.float32))
  np.testing.assert_array_equal(data.crop_box[1], [60, 200, 360, 500])
  np.testing.assert_array_equal(data.crop_box[2], [-19, 20, 251, 290])
  np.testing.assert_array_equal(data.crop_box[3:], boxes[3:])
  np.testing.assert_array_equal(data.yaw_deg, yaws)
  # Every row against the formula, with the square box (side = x1 - x0 for rows 3-5).
  b = data.crop_box.astype(np.float64)[:, None]
  ref = (pts.transpose(0, 2, 1) + 0.5 - b[..., :2]) * 120 / (b[..., 2:] - b[..., :2])
  np.testing.assert_allclose(data.landmarks[data.visible], ref[data.visible], rtol=1e-5)


def test_visibility(tmp_path):
  _write_layout(tmp_path)
  data = aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  hidden = {(0, 5), (3, 7), (4, 12)}
  assert {tuple(map(int, rc)) for rc in np.argwhere(~data.visible)} == hidden
  for row, point in hidden:
    np.testing.assert_array_equal(data.landmarks[row, point], [0.0, 0.0])


def test_nonfinite_point_is_invisible(tmp_path):
  _, pts, _, _ = _write_layout(tmp_path)
  pts[2, 0, 9] = np.nan
  np.save(tmp_path / "AFLW_GT_pts21.npy", pts)
  data = aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  assert not data.visible[2, 9] and np.all(data.landmarks[2, 9] == 0)


def test_split_of_is_stable_and_both_splits_occur():
  names = [f"image{k:05d}.jpg" for k in range(100)]
  splits = [aflw_3ddfa.split_of(n) for n in names]
  assert splits == [aflw_3ddfa.split_of(n) for n in names]
  assert splits.count("validation") == 3 and splits.count("train") == 97
  # zlib.crc32 is the same on every platform and run; pin two names.
  assert aflw_3ddfa.split_of("image00038.jpg") == "validation"
  assert aflw_3ddfa.split_of("image00002.jpg") == "train"
  assert all(aflw_3ddfa.split_of(n, 1.0) == "validation" for n in names)
  assert all(aflw_3ddfa.split_of(n, 0.0) == "train" for n in names)
  with pytest.raises(ValueError, match="validation_fraction"):
    aflw_3ddfa.split_of("image00002.jpg", 5.0)


def test_split_indices(tmp_path):
  names, _, _, _ = _write_layout(tmp_path)
  data = aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  train = aflw_3ddfa.split_indices(data, "train")
  val = aflw_3ddfa.split_indices(data, "validation")
  np.testing.assert_array_equal(train, [0, 1, 2, 3])  # _names orders train first
  np.testing.assert_array_equal(val, [4, 5])
  assert train.dtype == np.int64
  with pytest.raises(ValueError, match="split must be one of"):
    aflw_3ddfa.split_indices(data, "test")


# ---- errors: one per case, each a single line that names the file -----------------------------


def _save(name, value):
  return lambda root: np.save(root / name, value)


def _edit_npy(name, fn):
  def edit(root):
    value = np.load(root / name)
    np.save(root / name, fn(value))
  return edit


def _set_box(row, box):
  def fn(boxes):
    boxes[row] = box
    return boxes
  return _edit_npy("AFLW_GT_crop_roi_box.npy", fn)


def _remove(path):
  return lambda root: (root / path).unlink()


def _write(path, text):
  return lambda root: (root / path).write_text(text)


def _replace_first_crop(root):
  name = (root / "AFLW_GT_crop.list").read_text().split()[0]
  _jpeg(root / "AFLW_GT_crop" / name, 0, size=(100, 120))


ERROR_CASES = {
    "no list": (_remove("AFLW_GT_crop.list"), DatasetNotFoundError,
                r"AFLW_GT_crop.list: no such file"),
    "empty list": (_write("AFLW_GT_crop.list", "\n\n"), DatasetFormatError,
                   r"AFLW_GT_crop.list: lists no image"),
    "repeated name": (_write("AFLW_GT_crop.list", "a.jpg\nb.jpg\na.jpg\n"), DatasetFormatError,
                      r"AFLW_GT_crop.list: a.jpg is listed more than once"),
    "no pts": (_remove("AFLW_GT_pts21.npy"), DatasetNotFoundError,
               r"AFLW_GT_pts21.npy: no such file"),
    "no boxes": (_remove("AFLW_GT_crop_roi_box.npy"), DatasetNotFoundError,
                 r"AFLW_GT_crop_roi_box.npy: no such file"),
    "no yaws": (_remove("AFLW_GT_crop_yaws.npy"), DatasetNotFoundError,
                r"AFLW_GT_crop_yaws.npy: no such file"),
    "junk npy": (_write("AFLW_GT_crop_yaws.npy", "not numpy"), DatasetFormatError,
                 r"AFLW_GT_crop_yaws.npy: not a readable .npy file"),
    "pts transposed": (_edit_npy("AFLW_GT_pts21.npy", lambda p: p.transpose(0, 2, 1)),
                       DatasetFormatError,
                       r"AFLW_GT_pts21.npy: shape \(6, 21, 2\), expected \(N, 2, 21\)"),
    "pts short": (_edit_npy("AFLW_GT_pts21.npy", lambda p: p[:5]), DatasetFormatError,
                  r"AFLW_GT_pts21.npy: 5 rows, but AFLW_GT_crop.list lists 6"),
    "boxes wide": (_edit_npy("AFLW_GT_crop_roi_box.npy", lambda b: b[:, [0, 1, 2, 3, 3]]),
                   DatasetFormatError,
                   r"AFLW_GT_crop_roi_box.npy: shape \(6, 5\), expected \(N, 4\)"),
    "boxes long": (_edit_npy("AFLW_GT_crop_roi_box.npy", lambda b: b[[0, 1, 2, 3, 4, 5, 5]]),
                   DatasetFormatError,
                   r"AFLW_GT_crop_roi_box.npy: 7 rows, but AFLW_GT_crop.list lists 6"),
    "yaws short": (_edit_npy("AFLW_GT_crop_yaws.npy", lambda y: y[:3]), DatasetFormatError,
                   r"AFLW_GT_crop_yaws.npy: 3 rows, but AFLW_GT_crop.list lists 6"),
    "yaws text": (_save("AFLW_GT_crop_yaws.npy", np.array(list("abcdef"))), DatasetFormatError,
                  r"AFLW_GT_crop_yaws.npy: dtype <U1 is not numeric"),
    "empty box": (_set_box(3, [230, 40, 30, 240]), DatasetFormatError,
                  r"AFLW_GT_crop_roi_box.npy: row 3 \(image\d{5}.jpg\) box .* x1 <= x0"),
    "non-square box": (_set_box(4, [10, 60, 210, 250]), DatasetFormatError,
                       r"AFLW_GT_crop_roi_box.npy: row 4 \(image\d{5}.jpg\) box .* is 200 x "
                       r"190 px, not square \(1 px tolerance\)"),
    "no crop folder": (lambda root: shutil.rmtree(root / "AFLW_GT_crop"), DatasetNotFoundError,
                       r"AFLW_GT_crop: no such directory"),
    "missing crop": (lambda root: sorted((root / "AFLW_GT_crop").iterdir())[1].unlink(),
                     DatasetNotFoundError,
                     r"AFLW_GT_crop: 1 crops listed in AFLW_GT_crop.list are missing, e.g. "
                     r"image\d{5}.jpg"),
    "non-square crop": (_replace_first_crop, DatasetFormatError,
                        r"image\d{5}.jpg: crop is 120 x 100 px, expected square"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_load_errors(tmp_path, case):
  _write_layout(tmp_path)
  edit, error, pattern = ERROR_CASES[case]
  edit(tmp_path)
  with pytest.raises(error, match=pattern) as info:
    aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  assert "\n" not in str(info.value)


def test_load_missing_directory(tmp_path):
  with pytest.raises(DatasetNotFoundError, match=r"nope: no such directory \(expected the "
                     r"3DDFA AFLW layout: AFLW_GT_crop/"):
    aflw_3ddfa.load_aflw_3ddfa(tmp_path / "nope")


def test_square_within_one_pixel_is_accepted(tmp_path):
  _write_layout(tmp_path)
  _set_box(4, [10, 60, 211, 259])(tmp_path)  # 201 x 199: 2 px off, but ...
  with pytest.raises(DatasetFormatError, match="not square"):
    aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  _set_box(4, [10, 60, 211, 260])(tmp_path)  # ... 201 x 200 passes
  data = aflw_3ddfa.load_aflw_3ddfa(tmp_path)
  np.testing.assert_array_equal(data.crop_box[4], [10, 60, 211, 261])


def test_load_pseudo68_matches_rows_by_name(tmp_path):
  names = _names()
  by_name = _write_pseudo68(tmp_path, names, order=[3, 0, 5, 1, 4, 2])
  pts, err = aflw_3ddfa.load_pseudo68(tmp_path / aflw_3ddfa.PSEUDO68_FILE, names)
  assert pts.shape == (6, 68, 2) and pts.dtype == np.float32 and err.dtype == np.float32
  for k, name in enumerate(names):
    np.testing.assert_array_equal(pts[k], by_name[name][0])
    assert err[k] == by_name[name][1]


PSEUDO68_ERRORS = {
    "names differ": (None, dict(names=np.array([f"x{k}.jpg" for k in range(6)])),
                     r"AFLW_GT_pseudo68.npz: names do not match AFLW_GT_crop.list: 6 listed "
                     r"crops have no row, 6 rows name no listed crop, 0 repeated, e.g. image"),
    "names repeated": ([0, 1, 2, 3, 4, 4], None,
                       r"AFLW_GT_pseudo68.npz: names do not match .* 1 listed crops have no "
                       r"row, 0 rows name no listed crop, 1 repeated"),
    "names numeric": (None, dict(names=np.array([1, 2, 3, 4, 5, 6])),
                      r"AFLW_GT_pseudo68.npz: 'names' must be a 1-D str array"),
    "short landmarks": (None, dict(landmarks_68=np.zeros((6, 21, 2), np.float32)),
                        r"AFLW_GT_pseudo68.npz: landmarks_68 \(6, 21, 2\) / fit_error \(6,\), "
                        r"expected \(6, 68, 2\) / \(6,\)"),
    "nan landmarks": (None, dict(landmarks_68=np.full((6, 68, 2), np.nan, np.float32)),
                      r"AFLW_GT_pseudo68.npz: landmarks_68 contains non-finite values"),
}


@pytest.mark.parametrize("case", sorted(PSEUDO68_ERRORS))
def test_load_pseudo68_errors(tmp_path, case):
  names = _names()
  order, overrides, pattern = PSEUDO68_ERRORS[case]
  _write_pseudo68(tmp_path, names, order, overrides)
  with pytest.raises(DatasetFormatError, match=pattern) as info:
    aflw_3ddfa.load_pseudo68(tmp_path / aflw_3ddfa.PSEUDO68_FILE, names)
  assert "\n" not in str(info.value)


def test_load_pseudo68_missing_key_and_file(tmp_path):
  np.savez(tmp_path / "p.npz", names=np.array(_names()))
  with pytest.raises(DatasetFormatError, match=r"p.npz: missing array 'landmarks_68'"):
    aflw_3ddfa.load_pseudo68(tmp_path / "p.npz", _names())
  with pytest.raises(DatasetNotFoundError, match=r"q.npz: no such file"):
    aflw_3ddfa.load_pseudo68(tmp_path / "q.npz", _names())


# ---- the TFDS builder --------------------------------------------------------------------------


def _build(tmp_path, config=None):
  tfds = pytest.importorskip("tensorflow_datasets")
  from data_prep import common  # pylint: disable=g-import-not-at-top
  from data_prep.aflw_3ddfa_builder import Dff3dAflw3ddfa  # pylint: disable=g-import-not-at-top
  common.build(Dff3dAflw3ddfa, tmp_path / "raw", tmp_path / "data", config=config)
  name = "dff3d_aflw_3ddfa" + (f"/{config}" if config else "")
  return tfds.data_source(name, data_dir=str(tmp_path / "data"))


def test_builder(tmp_path):
  names, _, _, yaws = _write_layout(tmp_path / "raw")
  _write_pseudo68(tmp_path / "raw", names)  # present, but the default config ignores it
  data = aflw_3ddfa.load_aflw_3ddfa(tmp_path / "raw")
  sources = _build(tmp_path)
  assert {k: len(v) for k, v in sources.items()} == {"train": 4, "validation": 2}
  got = {**_by_name(sources["train"]), **_by_name(sources["validation"])}
  assert sorted(_by_name(sources["validation"])) == sorted(names[4:])
  for k, name in enumerate(names):
    ex = got[name]
    assert ex["image"].shape == (120, 120, 3) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"], _jpeg(tmp_path / "pix.jpg", k, (120, 120)))
    np.testing.assert_array_equal(ex["landmarks"], data.landmarks[k])
    np.testing.assert_array_equal(ex["landmarks_visible"], data.visible[k])
    assert ex["landmarks"].dtype == np.float32 and ex["landmarks_visible"].dtype == bool
    assert float(ex["yaw_deg"]) == yaws[k]
    np.testing.assert_array_equal(ex["roi_box"], BOXES[k])
    assert "box_landmarks" not in ex and "pseudo68_fit_error" not in ex
    assert ex["landmark_set"] in ("aflw21", b"aflw21")
  assert not got[names[0]]["landmarks_visible"][5]
  # the input pipeline reads a built example as an AFLW-21 row (padded to 68, set index 1)
  from dff3d import landmark_sets
  from dff3d.data import pipeline
  row = pipeline.InputPipeline(sources["train"], pipeline.eval_config(1, image_size=32)).example(0)
  assert row["landmark_set"] == landmark_sets.INDEX["aflw21"] and row["landmarks"].shape == (68, 2)
  assert not row["landmarks_visible"][21:].any()


def test_builder_pseudo68(tmp_path):
  names, _, _, _ = _write_layout(tmp_path / "raw")
  by_name = _write_pseudo68(tmp_path / "raw", names, order=[5, 4, 3, 2, 1, 0])
  sources = _build(tmp_path, "pseudo68")
  got = {**_by_name(sources["train"]), **_by_name(sources["validation"])}
  assert sorted(got) == sorted(names)
  for name, (pts, err) in by_name.items():
    np.testing.assert_array_equal(got[name]["box_landmarks"], pts)
    assert float(got[name]["pseudo68_fit_error"]) == err
    assert got[name]["landmarks"].shape == (21, 2)


def test_builder_pseudo68_errors(tmp_path):
  names, _, _, _ = _write_layout(tmp_path / "raw")
  with pytest.raises(DatasetNotFoundError, match=r"AFLW_GT_pseudo68.npz: no such file"):
    _build(tmp_path, "pseudo68")
  _write_pseudo68(tmp_path / "raw", names[:5] + ["image99999.jpg"])
  with pytest.raises(DatasetFormatError, match=r"AFLW_GT_pseudo68.npz: names do not match "
                     r"AFLW_GT_crop.list: 1 listed crops have no row, 1 rows name no listed "
                     r"crop, 0 repeated, e.g. " + names[5]):
    _build(tmp_path, "pseudo68")


def test_builder_rejects_a_crop_of_another_size(tmp_path):
  names, _, _, _ = _write_layout(tmp_path / "raw")
  _jpeg(tmp_path / "raw" / "AFLW_GT_crop" / names[3], 0, size=(96, 96))
  with pytest.raises(DatasetFormatError, match=names[3] + r": crop is 96 x 96 px, expected "
                     r"120 x 120"):
    _build(tmp_path)


def test_build_registers_the_builder():
  # In a subprocess: data_prep.build defines absl flags (--dataset, ...) that other launchers
  # imported by the test session define too.
  pytest.importorskip("tensorflow_datasets")
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-c", "from data_prep import build; "
                        "print(build.builder_class('aflw_3ddfa').name)"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "dff3d_aflw_3ddfa"


# ---- the real folder ---------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_DIR.exists(), reason=f"{REAL_DIR} not present (the shared data "
                    "folder sits beside a development checkout; fresh clones run without it)")
def test_real_folder():
  data = aflw_3ddfa.load_aflw_3ddfa(REAL_DIR)
  assert len(data.names) == 17590 and data.crop_size == 120
  assert data.landmarks.shape == (17590, 21, 2)
  assert 0.2 < 1 - data.visible.mean() < 0.3  # about a quarter not annotated
  assert np.all(data.landmarks[~data.visible] == 0)
  pts = data.landmarks[data.visible]
  assert np.mean(np.all((pts >= -20) & (pts <= 140), axis=1)) > 0.999
  assert np.mean(np.all((pts >= 0) & (pts <= 120), axis=1)) > 0.99
  side = data.crop_box[:, 2:] - data.crop_box[:, :2]
  assert np.all(side[:, 0] == side[:, 1])
  # 169 boxes are clipped at the photo's edge (module docstring): 168 at the bottom, one left.
  roi = data.roi_box
  clipped = np.abs((roi[:, 2] - roi[:, 0]) - (roi[:, 3] - roi[:, 1])) > 1
  assert clipped.sum() == 169
  assert len(aflw_3ddfa.split_indices(data, "validation")) == 891
  # A frontal face with all 21 points (looked at): image-left eye outer corner (6) left of its
  # inner corner (8), ear lobes (12, 16) outside the eyes, chin (20) lowest.
  k = data.names.index("image04415.jpg")
  x, y = data.landmarks[k, :, 0], data.landmarks[k, :, 1]
  assert data.visible[k].all()
  assert x[6] < x[8] < x[9] < x[11] and x[12] < x[6] and x[16] > x[11]
  assert x[17] < x[18] < x[19] and x[13] < x[14] < x[15] and y[20] == y.max()
