"""AFLW2000-3D (Zhu et al., CVPR 2016): read the benchmark's `imageNNNNN.mat` files.

The benchmark ships 2000 pairs `imageNNNNN.jpg` (450 x 450) + `imageNNNNN.mat` (MATLAB v5).
Keys used here (shapes as stored):

| key        | shape    | meaning                                                      |
|------------|----------|--------------------------------------------------------------|
| pt3d_68    | (3, 68)  | 68 landmarks: rows x, y (0-based image pixels), z            |
| Pose_Para  | (1, 7)   | pitch, yaw, roll (radians), tx, ty, tz, scale of the 3DMM fit |
| pt2d       | (2, 21)  | the 21 AFLW landmarks; a missing one has x (or y) = -1        |
| roi        | (1, 4)   | face box as stored (x1, y1, x2, y2; in the original AFLW photo, so it often falls outside the 450 x 450 crop) |
| Shape_Para, Exp_Para, Tex_Para | (199,1), (29,1), (199,1) | fitted 3DMM coefficients |
| Illum_Para, Color_Para | (1, 10), (1, 7) | fitted illumination and colour                |

Only pt3d_68 and Pose_Para are required (the benchmark's metric uses them); a file without
them, or with them malformed, is rejected. The other keys are read when well-formed and left
out (None, or absent for the fit parameters) otherwise, because the files as distributed are
not all regular: in the 300-image dev split image01198.mat has pt2d (2, 23); five files
store Exp_Para (image02832 also Tex_Para and Color_Para) as uint8 zeros, read as float; eleven
Pose_Para hold pitch or roll beyond 90 degrees and image04157's yaw is 187.8 degrees (the same
rotation as yaw -7.8; |yaw| > 90 counts in the 60-90 group, metrics.yaw_groups); image02769's
pt3d_68 reaches x = 460.6, outside the 450-pixel image.

"0-based pixels": pixel i has its centre at coordinate i, as the standard benchmark code uses
them; dff3d puts pixel centres at i + 0.5 (camera.py), so add 0.5 to compare in dff3d's frame.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.io

_IMAGE_RE = re.compile(r"^image(\d{5})\.jpg$")
_MAT_RE = re.compile(r"^image(\d{5})\.mat$")

# key -> stored shape; the loader requires these (the metric uses them).
REQUIRED_KEYS = {"pt3d_68": (3, 68), "Pose_Para": (1, 7)}
# key -> stored shape; read when well-formed, else None in the output (nothing uses them to
# score, so a malformed one never rejects a file).
UNUSED_KEYS = {"pt2d": (2, 21), "roi": (1, 4)}
# key -> (stored shape, output name); included in the output when present and well-formed.
OPTIONAL_KEYS = {
    "Shape_Para": ((199, 1), "shape_para"),
    "Exp_Para": ((29, 1), "exp_para"),
    "Tex_Para": ((199, 1), "tex_para"),
    "Illum_Para": ((1, 10), "illum_para"),
    "Color_Para": ((1, 7), "color_para"),
}


class DatasetFormatError(ValueError):
  """A dataset file exists but is unreadable or malformed; the message names the file."""


class DatasetNotFoundError(FileNotFoundError):
  """A dataset file or directory is missing or holds no usable files; the message names it."""


class Aflw2000Listing(NamedTuple):
  """Result of `list_aflw2000_3d`.

  pairs: sorted list of (image_path, mat_path) Paths with matching `imageNNNNN` stems.
  images_without_mat: sorted image Paths that have no `.mat`.
  mats_without_image: sorted `.mat` Paths that have no image.
  """

  pairs: list
  images_without_mat: list
  mats_without_image: list


def _read_mat(path: Path) -> dict:
  """Returns scipy.io.loadmat's dict, or raises a one-line error naming the file."""
  if not path.is_file():
    raise DatasetNotFoundError(f"{path}: no such file")
  try:
    return scipy.io.loadmat(str(path))
  except Exception as exc:  # scipy raises ValueError, MatReadError, TypeError, ... on junk.
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    raise DatasetFormatError(f"{path.name}: not a readable MATLAB .mat file ({reason})") from None


def _checked(mat: dict, key: str, shape: tuple, name: str) -> np.ndarray:
  """mat[key] as float64 after checking presence, shape and finiteness."""
  if key not in mat:
    raise DatasetFormatError(f"{name}: missing key {key!r}")
  try:
    value = np.asarray(mat[key], dtype=np.float64)
  except (TypeError, ValueError):
    raise DatasetFormatError(f"{name}: key {key!r} is not numeric") from None
  if value.shape != shape:
    raise DatasetFormatError(f"{name}: key {key!r} has shape {value.shape}, expected {shape}")
  if not np.all(np.isfinite(value)):
    raise DatasetFormatError(f"{name}: key {key!r} contains non-finite values")
  return value


def _if_valid(mat: dict, key: str, shape: tuple, name: str):
  """_checked(mat, key, shape, name), or None where that would raise."""
  try:
    return _checked(mat, key, shape, name)
  except DatasetFormatError:
    return None


def load_aflw2000_3d_mat(path) -> dict:
  """Reads one AFLW2000-3D annotation file.

  Args:
    path: str or Path of an `imageNNNNN.mat`.

  Returns:
    dict of numpy arrays:
      "landmarks_3d": (68, 3) float32, x, y in 0-based image pixels (x right, y down), z in
        the same pixel units (pt3d_68 transposed).
      "pose": (3,) float32, (pitch, yaw, roll) radians (Pose_Para[0, :3]).
      "yaw_deg": () float32, yaw in degrees (what the |yaw| groups use).
      "translation": (3,) float32, Pose_Para[0, 3:6] (tx, ty, tz of the fit).
      "scale": () float32, Pose_Para[0, 6].
      "pt2d": (21, 2) float32, the AFLW landmarks x, y in pixels (-1 where missing);
        None when the file's pt2d is missing or not a finite (2, 21) array.
      "pt2d_visible": (21,) bool, False where the AFLW landmark is missing; None with pt2d.
      "roi": (4,) float32, the stored face box; None when missing or malformed.
      "shape_para" (199,), "exp_para" (29,), "tex_para" (199,), "illum_para" (10,),
      "color_para" (7,): float32, only when the file holds them well-formed.

  Raises:
    DatasetNotFoundError: the file does not exist.
    DatasetFormatError: not a .mat file, or pt3d_68 / Pose_Para missing, of a wrong shape or
      with non-finite values; the one-line message names the file.
  """
  path = Path(path)
  mat = _read_mat(path)
  name = path.name
  arrays = {key: _checked(mat, key, shape, name) for key, shape in REQUIRED_KEYS.items()}
  unused = {key: _if_valid(mat, key, shape, name) for key, shape in UNUSED_KEYS.items()}
  pose = arrays["Pose_Para"][0]
  pt2d = None if unused["pt2d"] is None else unused["pt2d"].T
  out = {
      "landmarks_3d": arrays["pt3d_68"].T.astype(np.float32),
      "pose": pose[:3].astype(np.float32),
      "yaw_deg": np.float32(np.degrees(pose[1])),
      "translation": pose[3:6].astype(np.float32),
      "scale": np.float32(pose[6]),
      "pt2d": None if pt2d is None else pt2d.astype(np.float32),
      "pt2d_visible": None if pt2d is None else ~np.any(pt2d == -1.0, axis=1),
      "roi": None if unused["roi"] is None else unused["roi"][0].astype(np.float32),
  }
  for key, (shape, out_name) in OPTIONAL_KEYS.items():
    value = _if_valid(mat, key, shape, name)
    if value is not None:
      out[out_name] = value.reshape(-1).astype(np.float32)
  return out


def ground_truth(path) -> dict:
  """The benchmark's labels of one AFLW2000-3D .mat in dff3d's pixel convention (pixel i
  covers [i, i + 1)): "gt_2d" (68, 2), "gt_3d" (68, 3) (pt3d_68 with x, y moved by half a
  pixel), "yaw_deg", "visible" (68,) all True. Raises as load_aflw2000_3d_mat."""
  lab = load_aflw2000_3d_mat(path)
  pt3d = lab["landmarks_3d"].copy()
  pt3d[:, :2] += 0.5  # 0-based centres -> dff3d convention
  return {"gt_2d": pt3d[:, :2], "gt_3d": pt3d, "yaw_deg": lab["yaw_deg"],
          "visible": np.ones(68, bool)}


def list_aflw2000_3d(directory) -> Aflw2000Listing:
  """Finds the `imageNNNNN.jpg` + `imageNNNNN.mat` pairs of an AFLW2000-3D directory.

  Only names of exactly that form count (5 digits, lower-case extensions); other files are
  ignored. Subdirectories are not searched.

  Args:
    directory: str or Path.

  Returns:
    Aflw2000Listing(pairs, images_without_mat, mats_without_image), each sorted by name.

  Raises:
    DatasetNotFoundError: the directory does not exist, is not a directory, or holds no pair.
  """
  directory = Path(directory)
  if not directory.exists():
    raise DatasetNotFoundError(f"{directory}: no such directory")
  if not directory.is_dir():
    raise DatasetNotFoundError(f"{directory}: not a directory")
  images, mats = {}, {}
  for entry in os.scandir(directory):
    if (m := _IMAGE_RE.match(entry.name)):
      images[m.group(1)] = Path(entry.path)
    elif (m := _MAT_RE.match(entry.name)):
      mats[m.group(1)] = Path(entry.path)
  pairs = [(images[k], mats[k]) for k in sorted(images.keys() & mats.keys())]
  if not pairs:
    raise DatasetNotFoundError(
        f"expected imageNNNNN.jpg + imageNNNNN.mat files in {directory}, found no pair")
  return Aflw2000Listing(
      pairs=pairs,
      images_without_mat=[images[k] for k in sorted(images.keys() - mats.keys())],
      mats_without_image=[mats[k] for k in sorted(mats.keys() - images.keys())],
  )
