"""300W-LP (Zhu et al., CVPR 2016): find and read the distributed files (numpy out, no TF).

Layout of the released `300W-LP.zip` (it unpacks to a `300W_LP/` folder):

    300W_LP/
      AFW/  AFW_Flip/  HELEN/  HELEN_Flip/  IBUG/  IBUG_Flip/  LFPW/  LFPW_Flip/
          <SUBSET>_<photo id>_<face>_<view>.jpg   450 x 450 RGB
          <SUBSET>_<photo id>_<face>_<view>.mat   MATLAB v5, one per image
      landmarks/AFW/  landmarks/HELEN/  landmarks/IBUG/  landmarks/LFPW/
          <same stem>_pts.mat                      only for the non-flipped folders
      Code/                                        MATLAB code (ignored)

`view` is the profiling step: 0 is the (cropped) original 300-W photo, 1, 2, ... the synthesized
larger-yaw views. The `_Flip` folders hold the mirrored images under the SAME file names, and
their `.mat` files hold labels fitted to the mirrored image (yaw and roll change sign), not a
copy of the unflipped labels.

Image `.mat` keys used (shapes as stored): `pt2d` (2, 68) the 68 landmarks x, y; `Pose_Para`
(1, 7) pitch, yaw, roll (radians), tx, ty, tz, scale; `Shape_Para` (199, 1); `Exp_Para`
(29, 1); `roi` (1, 4) when present. `landmarks/<SUBSET>/<stem>_pts.mat` keys: `pts_2d` (68, 2)
("2D" landmarks: the jaw line on the visible silhouette) and `pts_3d` (68, 2) (the image
projection of the 3D landmarks, hidden contour included).

Coordinates are treated as 0-based pixels with pixel centres at integers, like AFLW2000-3D and
the standard benchmark code; dff3d puts pixel centres at integer + 0.5, so the readers here add
0.5 to every x, y.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dff3d.datasets.aflw2000_3d import DatasetFormatError, DatasetNotFoundError, _read_mat

SUBSETS = ("AFW", "AFW_Flip", "HELEN", "HELEN_Flip", "IBUG", "IBUG_Flip", "LFPW", "LFPW_Flip")
_VIEW_RE = re.compile(r"_(\d+)$")


class W300LPItem(NamedTuple):
  """One image of 300W-LP.

  subset: folder name, e.g. "HELEN_Flip". stem: file name without extension.
  image: Path of the .jpg. mat: Path of the image's .mat.
  pts_mat: Path of landmarks/<SUBSET>/<stem>_pts.mat, or None (always None for _Flip).
  """

  subset: str
  stem: str
  image: Path
  mat: Path
  pts_mat: Path | None


def find_root(directory) -> Path:
  """The folder holding the subset folders: `directory` itself or `directory/300W_LP`."""
  directory = Path(directory)
  if not directory.is_dir():
    raise DatasetNotFoundError(f"{directory}: no such directory (expected the unpacked 300W_LP)")
  for cand in (directory, directory / "300W_LP"):
    if any((cand / s).is_dir() for s in SUBSETS):
      return cand
  raise DatasetNotFoundError(
      f"{directory}: expected the 300W-LP folders {', '.join(SUBSETS)} (each with *.jpg + "
      "*.mat) here or in a 300W_LP/ subfolder; found none")


def list_300w_lp(directory, subsets=SUBSETS, require_all_subsets: bool = True) -> list:
  """Lists the image / .mat pairs of 300W-LP.

  Args:
    directory: the unpacked `300W_LP` folder or its parent.
    subsets: which subset folders to read.
    require_all_subsets: raise when one of `subsets` is missing (else skip it).

  Returns:
    list of W300LPItem sorted by (subset, stem).

  Raises:
    DatasetNotFoundError: no 300W-LP folders, a requested subset missing, an image without
      its .mat (or the reverse), or no pairs at all; the message names what was expected where.
  """
  root = find_root(directory)
  items = []
  for subset in subsets:
    folder = root / subset
    if not folder.is_dir():
      if require_all_subsets:
        raise DatasetNotFoundError(f"{folder}: missing 300W-LP subset folder (expected "
                                   f"{subset}/ with *.jpg + *.mat)")
      continue
    images = {p.stem: p for p in folder.glob("*.jpg")}
    mats = {p.stem: p for p in folder.glob("*.mat")}
    lonely = sorted(images.keys() ^ mats.keys())
    if lonely:
      kind = ".mat" if lonely[0] in images else ".jpg"
      raise DatasetNotFoundError(
          f"{folder}: {len(lonely)} files without their pair, e.g. {lonely[0]} has no {kind}")
    pts_dir = root / "landmarks" / subset
    for stem in sorted(images):
      pts = pts_dir / f"{stem}_pts.mat"
      items.append(W300LPItem(subset, stem, images[stem], mats[stem],
                              pts if pts.is_file() else None))
  if not items:
    raise DatasetNotFoundError(f"{root}: no *.jpg + *.mat pairs in {', '.join(subsets)}")
  return items


def _array(mat, key, name, size=None, shapes=None):
  if key not in mat:
    raise DatasetFormatError(f"{name}: missing key {key!r}")
  try:
    value = np.asarray(mat[key], np.float64)
  except (TypeError, ValueError):
    raise DatasetFormatError(f"{name}: key {key!r} is not numeric") from None
  if shapes is not None and value.shape not in shapes:
    raise DatasetFormatError(
        f"{name}: key {key!r} has shape {value.shape}, expected one of {shapes}")
  if size is not None and value.size != size:
    raise DatasetFormatError(f"{name}: key {key!r} has {value.size} values, expected {size}")
  if not np.all(np.isfinite(value)):
    raise DatasetFormatError(f"{name}: key {key!r} contains non-finite values")
  return value


def _points(value):
  """(68, 2) from a stored (2, 68) or (68, 2) array."""
  return value.T if value.shape == (2, 68) else value


def view_index(stem: str) -> int:
  """The profiling view number at the end of a 300W-LP stem (0 = original), or -1."""
  m = _VIEW_RE.search(stem)
  return int(m.group(1)) if m else -1


def load_300w_lp(item: W300LPItem) -> dict:
  """Reads the labels of one 300W-LP image.

  Returns:
    dict of numpy arrays (x, y in dff3d pixels: stored value + 0.5):
      "landmarks_68": (68, 2) float32, the image .mat's pt2d.
      "pose": (7,) float32, Pose_Para (pitch, yaw, roll radians, tx, ty, tz, scale).
      "yaw_deg": () float32, degrees(Pose_Para[1]).
      "shape_para": (199,) float32; "exp_para": (29,) float32.
      "roi": (4,) float32 (zeros when the file has no roi).
      "pts_2d", "pts_3d": (68, 2) float32 from landmarks/..._pts.mat (zeros when absent),
      "has_pts": () bool, whether they were read.
      "view": () int32, view_index(stem).

  Raises:
    DatasetNotFoundError / DatasetFormatError naming the file.
  """
  mat = _read_mat(item.mat)
  name = f"{item.subset}/{item.mat.name}"
  pt2d = _points(_array(mat, "pt2d", name, shapes=((2, 68), (68, 2))))
  pose = _array(mat, "Pose_Para", name, size=7).reshape(7)
  out = {
      "landmarks_68": (pt2d + 0.5).astype(np.float32),
      "pose": pose.astype(np.float32),
      "yaw_deg": np.float32(np.degrees(pose[1])),
      "shape_para": _array(mat, "Shape_Para", name, size=199).reshape(199).astype(np.float32),
      "exp_para": _array(mat, "Exp_Para", name, size=29).reshape(29).astype(np.float32),
      "roi": (_array(mat, "roi", name, size=4).reshape(4).astype(np.float32)
              if "roi" in mat else np.zeros(4, np.float32)),
      "pts_2d": np.zeros((68, 2), np.float32),
      "pts_3d": np.zeros((68, 2), np.float32),
      "has_pts": np.bool_(item.pts_mat is not None),
      "view": np.int32(view_index(item.stem)),
  }
  if item.pts_mat is not None:
    pmat = _read_mat(item.pts_mat)
    pname = f"landmarks/{item.subset}/{item.pts_mat.name}"
    for key in ("pts_2d", "pts_3d"):
      pts = _points(_array(pmat, key, pname, shapes=((68, 2), (2, 68))))
      out[key] = (pts + 0.5).astype(np.float32)
  return out
