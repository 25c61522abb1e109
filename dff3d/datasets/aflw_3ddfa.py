"""AFLW in the 3DDFA test-data layout: square face crops with the 21 AFLW landmarks.

The layout of the public 3DDFA / 2DASL "AFLW" data (one folder):

| file                        | shape / content                                               |
|-----------------------------|---------------------------------------------------------------|
| AFLW_GT_crop/imageNNNNN.jpg | S x S RGB crop (S = 120): the photo's box `roi_box`, resized   |
| AFLW_GT_crop.list           | one file name a line; row k of every array belongs to line k  |
| AFLW_GT_pts21.npy           | (N, 2, 21) float32: x row, y row of the 21 points (below)      |
| AFLW_GT_crop_roi_box.npy    | (N, 4) uint16: x0, y0, x1, y1, original photo pixels           |
| AFLW_GT_crop_yaws.npy       | (N,) float32: head yaw in degrees                              |

Points are in 0-based original photo pixels, -1 where not annotated (the real file sets x = -1;
y then holds junk, 452). Their order (image left = the subject's right; checked on
real crops): 0-2 image-left brow outer, centre, inner; 3-5 image-right brow inner, centre,
outer; 6-8 image-left eye outer corner, centre, inner corner; 9-11 image-right eye inner
corner, centre, outer corner; 12 image-left ear lobe; 13-15 nose image-left side, tip,
image-right side; 16 image-right ear lobe; 17-19 mouth image-left corner, centre, image-right
corner; 20 chin.

Pixel convention. 3DDFA crops `img[y0:y1, x0:x1]` and resizes it to S x S. In dff3d's
convention (pixel j covers [j, j + 1), its centre at j + 0.5; dff3d/camera.py) the box covers
[x0, x1) x [y0, y1) and the resampling maps it onto [0, S) x [0, S), pixel centres onto pixel
centres. A 0-based pixel index coordinate p (centre at p) of the photo sits at p + 0.5 in
dff3d's frame, hence
    crop_x = (p_x + 0.5 - x0) * S / (x1 - x0),    crop_y = (p_y + 0.5 - y0) * S / (y1 - y0).

Clipped boxes. The crops are square, and so is the box they were cut from; where that box
ran over the photo's edge 3DDFA padded with black and stored the box clipped to the photo.
In the real file 169 boxes are non-square by more than 1 px: 168 end at the photo's bottom
edge (y1 = 450, the crops show the black rows the clipping predicts) and one starts at its
left edge (x0 = 1). `crop_boxes` recovers the square box (side max(w, h), extended past the
edge it was clipped at) and the formula above uses it. The photo size is not stored, so a
box counts as clipped at the far edge when it ends at the largest x1 (y1) of the file, and
at the near edge when it starts at <= 1.

Optional pseudo-68 labels, `AFLW_GT_pseudo68.npz` (written by a fitting tool, read by
`load_pseudo68`; np.savez of):
  names         (N,) str (numpy unicode or bytes), the crop file names of AFLW_GT_crop.list,
                each once, in any order
  landmarks_68  (N, 68, 2) float32, iBUG-68 points in dff3d crop pixels (same frame as
                `landmarks` here), finite
  fit_error     (N,) float32, the tool's fit residual per crop (lower is better; NaN allowed
                where the fit failed)
  coefficients  optional (N, P) float32, the fitted flat dff3d.coefficients vectors (the
                model's layout; they re-render each crop's face at any crop size), read by
                `load_pseudo68_coefficients`; a fit with a limit covers only some crops
"""

from __future__ import annotations

import collections
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from dff3d.datasets.aflw2000_3d import DatasetFormatError, DatasetNotFoundError

NUM_POINTS = 21
IMAGE_DIR = "AFLW_GT_crop"
LIST_FILE = "AFLW_GT_crop.list"
PTS_FILE = "AFLW_GT_pts21.npy"
BOX_FILE = "AFLW_GT_crop_roi_box.npy"
YAW_FILE = "AFLW_GT_crop_yaws.npy"
PSEUDO68_FILE = "AFLW_GT_pseudo68.npz"
SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05


class Aflw3ddfa(NamedTuple):
  """Result of `load_aflw_3ddfa`; row k of every array belongs to names[k].

  names: N crop file names ("image00002.jpg"), in AFLW_GT_crop.list order.
  image_paths: N pathlib.Path of the crops.
  landmarks: (N, 21, 2) float32 x, y in crop pixels (dff3d convention); 0 where not visible.
  visible: (N, 21) bool, True where the point is annotated.
  yaw_deg: (N,) float32 degrees.
  roi_box: (N, 4) float32 x0, y0, x1, y1 original photo pixels, as stored.
  crop_box: (N, 4) float32 the square box the crop was cut from (`crop_boxes(roi_box)`).
  crop_size: int, the side S of the (square) crops.
  """

  names: list
  image_paths: list
  landmarks: np.ndarray
  visible: np.ndarray
  yaw_deg: np.ndarray
  roi_box: np.ndarray
  crop_box: np.ndarray
  crop_size: int


def crop_boxes(roi_box) -> np.ndarray:
  """The square boxes the crops were cut from (see "Clipped boxes" in the module docstring).

  Args:
    roi_box: (N, 4) x0, y0, x1, y1 original photo pixels, x1 > x0, y1 > y0.

  Returns:
    (N, 4) float64 square boxes of side max(x1 - x0, y1 - y0); the short side is extended
    beyond x1 (y1), or before x0 (y0) where the box starts at <= 1.
  """
  box = np.asarray(roi_box, np.float64)
  lo, hi = box[:, :2], box[:, 2:]
  side = np.max(hi - lo, axis=1, keepdims=True)
  start = np.where((hi - lo < side) & (lo <= 1), hi - side, lo)
  return np.concatenate([start, start + side], axis=1)


def original_to_crop(points, box, crop_size: int) -> np.ndarray:
  """0-based original photo pixel coordinates -> dff3d crop pixels (module docstring).

  Args:
    points: (N, K, 2) x, y original photo pixels, pixel centres at integers.
    box: (N, 4) x0, y0, x1, y1 of each crop's box (`crop_boxes`).
    crop_size: S, the crop side.

  Returns:
    (N, K, 2) float64 crop pixels, pixel centres at integer + 0.5.
  """
  box = np.asarray(box, np.float64)[:, None, :]
  scale = crop_size / (box[..., 2:] - box[..., :2])
  return (np.asarray(points, np.float64) + 0.5 - box[..., :2]) * scale


def split_of(name: str, validation_fraction: float = VALIDATION_FRACTION) -> str:
  """"validation" or "train" for a crop file name, from a stable hash (zlib.crc32 of UTF-8)."""
  if not 0.0 <= validation_fraction <= 1.0:
    raise ValueError(f"validation_fraction must lie in [0, 1], got {validation_fraction}")
  bucket = zlib.crc32(name.encode("utf-8")) % 10000
  return "validation" if bucket < validation_fraction * 10000 else "train"


def split_indices(listing: Aflw3ddfa, split: str,
                  validation_fraction: float = VALIDATION_FRACTION) -> np.ndarray:
  """(M,) int64 rows of `listing` in `split` ("train" or "validation"), ascending."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return np.array([k for k, name in enumerate(listing.names)
                   if split_of(name, validation_fraction) == split], np.int64)


def _reason(exc: Exception) -> str:
  """The first line of an exception's message (its type name when empty)."""
  return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _repeated(names: list) -> list:
  """The names that occur more than once, in order of first occurrence."""
  return [name for name, count in collections.Counter(names).items() if count > 1]


def _read_list(path: Path) -> list:
  """The names of a .list file (blank lines skipped), or a one-line error naming it."""
  if not path.is_file():
    raise DatasetNotFoundError(f"{path}: no such file")
  names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
  names = [n for n in names if n]
  if not names:
    raise DatasetFormatError(f"{path.name}: lists no image")
  repeated = _repeated(names)
  if repeated:
    raise DatasetFormatError(f"{path.name}: {repeated[0]} is listed more than once")
  return names


def _load_npy(path: Path, trailing: tuple, n: int) -> np.ndarray:
  """A numeric .npy of shape (n, *trailing) as float64, or a one-line error naming it."""
  if not path.is_file():
    raise DatasetNotFoundError(f"{path}: no such file")
  try:
    value = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as exc:
    raise DatasetFormatError(f"{path.name}: not a readable .npy file ({_reason(exc)})") from None
  want = ("N",) + trailing
  if value.ndim != len(want) or value.shape[1:] != trailing:
    raise DatasetFormatError(
        f"{path.name}: shape {value.shape}, expected ({', '.join(map(str, want))})")
  if value.shape[0] != n:
    raise DatasetFormatError(f"{path.name}: {value.shape[0]} rows, but {LIST_FILE} lists {n}")
  if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
    raise DatasetFormatError(f"{path.name}: dtype {value.dtype} is not numeric")
  return value.astype(np.float64)


def _check_boxes(box: np.ndarray, names: list, path: Path) -> None:
  """Raises a one-line DatasetFormatError for an empty box or a non-square unclipped one."""
  size = box[:, 2:] - box[:, :2]
  if not np.all(np.isfinite(box)) or np.any(size <= 0):
    k = int(np.argmax(~np.all(np.isfinite(size) & (size > 0), axis=1)))
    raise DatasetFormatError(
        f"{path.name}: row {k} ({names[k]}) box {box[k].tolist()} has x1 <= x0 or y1 <= y0")
  short = size < size.max(axis=1, keepdims=True) - 1
  at_edge = (box[:, :2] <= 1) | (box[:, 2:] >= box[:, 2:].max(axis=0))
  bad = np.any(short & ~at_edge, axis=1)
  if bad.any():
    k = int(np.argmax(bad))
    raise DatasetFormatError(
        f"{path.name}: row {k} ({names[k]}) box {box[k].tolist()} is {size[k, 0]:g} x "
        f"{size[k, 1]:g} px, not square (1 px tolerance) and not clipped at the photo's edge")


def _crop_size(path: Path) -> int:
  """The side of a square crop JPEG (reads the header only)."""
  try:
    with Image.open(path) as im:
      width, height = im.size
  except OSError as exc:
    raise DatasetFormatError(f"{path.name}: cannot read image ({type(exc).__name__})") from None
  if width != height:
    raise DatasetFormatError(f"{path.name}: crop is {width} x {height} px, expected square")
  return width


def load_aflw_3ddfa(directory) -> Aflw3ddfa:
  """Reads the 3DDFA AFLW layout (module docstring); opens only the first crop.

  Args:
    directory: str or Path of the folder holding AFLW_GT_crop/ and the .list / .npy files.

  Returns:
    Aflw3ddfa (N rows in AFLW_GT_crop.list order). A point is visible when its x and y are
    finite and >= 0; invisible points get coordinates 0.

  Raises:
    DatasetNotFoundError: the directory, AFLW_GT_crop/, the .list, a .npy or a listed crop
      is missing.
    DatasetFormatError: an unreadable or mis-shaped file, array lengths that disagree with
      the list, an empty or non-square (unclipped) box, a non-square first crop; the one-line
      message names the file.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise DatasetNotFoundError(f"{directory}: no such directory (expected the 3DDFA AFLW "
                               f"layout: {IMAGE_DIR}/, {LIST_FILE}, {PTS_FILE}, ...)")
  names = _read_list(directory / LIST_FILE)
  n = len(names)
  pts = _load_npy(directory / PTS_FILE, (2, NUM_POINTS), n)
  box = _load_npy(directory / BOX_FILE, (4,), n)
  yaw = _load_npy(directory / YAW_FILE, (), n)
  _check_boxes(box, names, directory / BOX_FILE)
  image_dir = directory / IMAGE_DIR
  if not image_dir.is_dir():
    raise DatasetNotFoundError(f"{image_dir}: no such directory")
  paths = [image_dir / name for name in names]
  missing = [p.name for p in paths if not os.path.isfile(p)]
  if missing:
    raise DatasetNotFoundError(f"{image_dir}: {len(missing)} crops listed in {LIST_FILE} are "
                               f"missing, e.g. {missing[0]}")
  size = _crop_size(paths[0])
  square = crop_boxes(box)
  points = pts.transpose(0, 2, 1)  # (N, 21, 2)
  with np.errstate(invalid="ignore"):
    visible = np.all(np.isfinite(points) & (points >= 0), axis=-1)
  crop = original_to_crop(np.where(visible[..., None], points, 0.0), square, size)
  return Aflw3ddfa(
      names=names, image_paths=paths,
      landmarks=np.where(visible[..., None], crop, 0.0).astype(np.float32),
      visible=visible, yaw_deg=yaw.astype(np.float32), roi_box=box.astype(np.float32),
      crop_box=square.astype(np.float32), crop_size=size)


def _read_pseudo68(path) -> tuple[dict, list]:
  """(arrays, names as str) of a pseudo-68 .npz, or a one-line error naming the file."""
  path = Path(path)
  if not path.is_file():
    raise DatasetNotFoundError(f"{path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {key: npz[key] for key in npz.files}
  except (OSError, ValueError, EOFError) as exc:
    raise DatasetFormatError(f"{path.name}: not a readable .npz of str / float arrays "
                             f"({_reason(exc)})") from None
  if "names" not in arrays:
    raise DatasetFormatError(f"{path.name}: missing array 'names'")
  stored = arrays["names"]
  if stored.dtype.kind not in "US" or stored.ndim != 1:
    raise DatasetFormatError(f"{path.name}: 'names' must be a 1-D str array, got "
                             f"{stored.dtype} {stored.shape}")
  return arrays, [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in stored.tolist()]


def load_pseudo68(path, names) -> tuple[np.ndarray, np.ndarray]:
  """Reads AFLW_GT_pseudo68.npz (module docstring) in the row order of `names`.

  Args:
    path: str or Path of the .npz; names: the N crop names (Aflw3ddfa.names).

  Returns:
    landmarks_68 (N, 68, 2) float32 crop pixels, fit_error (N,) float32, row k for names[k].

  Raises:
    DatasetNotFoundError: no such file. DatasetFormatError: unreadable, a key missing, wrong
      shapes, non-finite landmarks, or names that are not exactly `names`; one line naming it.
  """
  path = Path(path)
  arrays, stored = _read_pseudo68(path)
  for key in ("landmarks_68", "fit_error"):
    if key not in arrays:
      raise DatasetFormatError(f"{path.name}: missing array {key!r}")
  m = len(stored)
  pts, err = arrays["landmarks_68"], arrays["fit_error"]
  if pts.shape != (m, 68, 2) or err.shape != (m,):
    raise DatasetFormatError(f"{path.name}: landmarks_68 {pts.shape} / fit_error {err.shape}, "
                             f"expected ({m}, 68, 2) / ({m},) for {m} names")
  if not np.all(np.isfinite(pts)):
    raise DatasetFormatError(f"{path.name}: landmarks_68 contains non-finite values")
  row = {name: k for k, name in enumerate(stored)}
  absent = [name for name in names if name not in row]
  unknown = sorted(set(stored) - set(names))
  repeated = _repeated(stored)
  if absent or unknown or repeated:
    example = (absent or unknown or repeated)[0]
    raise DatasetFormatError(
        f"{path.name}: names do not match {LIST_FILE}: {len(absent)} listed crops have no row, "
        f"{len(unknown)} rows name no listed crop, {len(repeated)} repeated, e.g. {example}")
  order = np.array([row[name] for name in names], np.int64)
  return pts[order].astype(np.float32), err[order].astype(np.float32)


def load_pseudo68_coefficients(path, names, num_coefficients: int = 0):
  """The fitted coefficients of a pseudo-68 .npz in the row order of `names`.

  Unlike `load_pseudo68` the file may cover only some of `names` (a fit with --limit) and
  may hold rows of other crops (ignored).

  Args:
    path: str or Path of the .npz (data_prep.aflw_pseudo68); names: N crop names.
    num_coefficients: when > 0, the P the caller's model needs (coefficients.size(sizes)).

  Returns:
    (coefficients (N, P) float32 flat dff3d.coefficients vectors, fit_error (N,) float32,
    found (N,) bool); rows of names the file lacks are NaN and found False.

  Raises:
    DatasetNotFoundError: no such file. DatasetFormatError: unreadable, no "coefficients"
      (files written before they were stored), wrong shapes, non-finite coefficients, or
      another P than num_coefficients; one line naming the file.
  """
  path = Path(path)
  arrays, stored = _read_pseudo68(path)
  if "coefficients" not in arrays:
    raise DatasetFormatError(f"{path.name}: no 'coefficients' array (written before fitted "
                             f"coefficients were stored); re-run data_prep.aflw_pseudo68")
  flat, err = arrays["coefficients"], arrays.get("fit_error")
  m = len(stored)
  err = np.full((m,), np.nan, np.float32) if err is None else err
  if flat.ndim != 2 or flat.shape[0] != m or err.shape != (m,):
    raise DatasetFormatError(f"{path.name}: coefficients {flat.shape} / fit_error {err.shape}, "
                             f"expected ({m}, P) / ({m},) for {m} names")
  if num_coefficients and flat.shape[1] != num_coefficients:
    raise DatasetFormatError(f"{path.name}: coefficients have {flat.shape[1]} entries, the "
                             f"model needs {num_coefficients} (fitted with another model?)")
  if not np.all(np.isfinite(flat)):
    raise DatasetFormatError(f"{path.name}: coefficients contain non-finite values")
  repeated = _repeated(stored)
  if repeated:
    raise DatasetFormatError(f"{path.name}: {len(repeated)} names repeated, e.g. {repeated[0]}")
  row = {name: k for k, name in enumerate(stored)}
  order = np.array([row.get(name, -1) for name in names], np.int64)
  found = order >= 0
  coefficients = np.full((len(names), flat.shape[1]), np.nan, np.float32)
  fit_error = np.full((len(names),), np.nan, np.float32)
  coefficients[found], fit_error[found] = flat[order[found]], err[order[found]]
  return coefficients, fit_error, found
