"""AFLW-LFPA (Jourabloo & Liu, CVPR 2016) test set: 1299 AFLW images with 34 landmarks.

The exact layout of the authors' release could not be established (no public copy or loader
was found), so dff3d reads a documented simple layout that a converter from any release can
produce; one flat folder:

    NAME.jpg (or .png)      the test image
    NAME.mat                MATLAB file, key "pts": (34, 2) or (2, 34) x, y;
                            optional "visible": 34 values, nonzero = visible (default: all);
                            optional "yaw": yaw in degrees (default: NaN)
    or NAME.txt             34 lines "x y" or "x y v" (v: 1 visible, 0 not)

Coordinates are 0-based pixels with pixel centres at integers (as AFLW2000-3D); the reader adds
0.5 to put them in dff3d's convention (pixel centres at integer + 0.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from dff3d.datasets.aflw2000_3d import DatasetFormatError, DatasetNotFoundError, _read_mat

NUM_POINTS = 34
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class LfpaItem(NamedTuple):
  stem: str
  image: Path
  annotation: Path


def list_aflw_lfpa(directory) -> list:
  """Pairs (image, .mat or .txt annotation) of the simple layout, sorted by stem.

  Raises:
    DatasetNotFoundError: no directory, no pair, or an image without annotation (or the
      reverse); the message says what was expected where.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise DatasetNotFoundError(f"{directory}: no such directory (expected AFLW-LFPA images)")
  images, notes = {}, {}
  for p in directory.iterdir():
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
      images[p.stem] = p
    elif suffix in (".mat", ".txt"):
      if p.stem in notes:
        raise DatasetFormatError(f"{directory}: {p.stem} has both a .mat and a .txt annotation")
      notes[p.stem] = p
  lonely = sorted(images.keys() ^ notes.keys())
  if lonely:
    what = "a NAME.mat / NAME.txt annotation" if lonely[0] in images else "an image"
    raise DatasetNotFoundError(
        f"{directory}: {len(lonely)} files without their pair, e.g. {lonely[0]} has no {what}")
  if not images:
    raise DatasetNotFoundError(
        f"{directory}: expected NAME.jpg + NAME.mat (key 'pts', 34 x 2) or NAME.txt "
        "(34 lines 'x y [v]') pairs, found none")
  return [LfpaItem(s, images[s], notes[s]) for s in sorted(images)]


def load_aflw_lfpa(item: LfpaItem) -> dict:
  """Labels of one image.

  Returns:
    "landmarks_34": (34, 2) float32 dff3d pixels (stored + 0.5);
    "landmarks_34_visible": (34,) bool; "yaw_deg": () float32 (NaN when not given).
  """
  path = item.annotation
  yaw = np.nan
  if path.suffix.lower() == ".mat":
    mat = _read_mat(path)
    if "pts" not in mat:
      raise DatasetFormatError(f"{path.name}: missing key 'pts' (34 x 2 landmarks)")
    pts = np.asarray(mat["pts"], np.float64)
    if pts.shape == (2, NUM_POINTS):
      pts = pts.T
    vis = np.asarray(mat["visible"]).reshape(-1) != 0 if "visible" in mat else None
    if "yaw" in mat:
      yaw = float(np.asarray(mat["yaw"], np.float64).reshape(-1)[0])
  else:
    try:
      rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError:
      raise DatasetFormatError(f"{path.name}: expected 34 lines 'x y' or 'x y v'") from None
    if rows.shape[1] not in (2, 3):
      raise DatasetFormatError(f"{path.name}: expected 34 lines 'x y' or 'x y v'")
    pts = rows[:, :2]
    vis = rows[:, 2] != 0 if rows.shape[1] == 3 else None
  if pts.shape != (NUM_POINTS, 2):
    raise DatasetFormatError(f"{path.name}: landmarks have shape {pts.shape}, expected (34, 2)")
  if vis is None:
    vis = np.ones(NUM_POINTS, bool)
  if vis.shape != (NUM_POINTS,):
    raise DatasetFormatError(f"{path.name}: visibility has {vis.size} values, expected 34")
  if not np.all(np.isfinite(pts)):
    raise DatasetFormatError(f"{path.name}: non-finite landmark coordinates")
  return {"landmarks_34": (pts + 0.5).astype(np.float32),
          "landmarks_34_visible": vis.astype(bool), "yaw_deg": np.float32(yaw)}
