"""CelebA (Liu et al., ICCV 2015) aligned images plus dff3d's 68-landmark file.

Published layout (the Google Drive / Baidu release):

    img_align_celeba/000001.jpg ... 202599.jpg   178 x 218 aligned crops   (or Img/img_align_celeba/)
    list_eval_partition.txt                       lines "000001.jpg 0"      (or Eval/...)
                                                  0 train, 1 validation, 2 test

CelebA ships only 5 landmarks; the 68 landmarks come from `data_prep/label_landmarks.py`, which
writes two text files (by default next to the images' folder, in the CelebA root):

    landmarks_68.txt            "# ..." comment lines, then one line per labelled image:
                                "<file name> x0 y0 x1 y1 ... x67 y67" (136 numbers, dff3d pixels:
                                x right, y down, pixel centres at integer + 0.5)
    landmarks_68_failures.txt   "# ..." comment lines, then "<file name> <reason>" per image
                                the labeller could not label (no face found, unreadable file)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dff3d.datasets.aflw2000_3d import DatasetFormatError, DatasetNotFoundError

SPLITS = {0: "train", 1: "validation", 2: "test"}
LANDMARKS_FILE = "landmarks_68.txt"
FAILURES_FILE = "landmarks_68_failures.txt"
LANDMARKS_HEADER = ("# dff3d 68-point landmarks: '<file> x0 y0 ... x67 y67', pixels with "
                    "centres at integer + 0.5 (x right, y down)")
FAILURES_HEADER = "# images the labeller could not label: '<file> <reason>'"


def find_layout(directory) -> tuple[Path, Path]:
  """(image folder, partition file) of a CelebA root, in either published arrangement.

  Raises:
    DatasetNotFoundError naming what was expected where.
  """
  root = Path(directory)
  if not root.is_dir():
    raise DatasetNotFoundError(f"{root}: no such directory (expected the CelebA root)")
  images = next((p for p in (root / "img_align_celeba", root / "Img" / "img_align_celeba")
                 if p.is_dir()), None)
  if images is None:
    raise DatasetNotFoundError(
        f"{root}: expected the aligned images in img_align_celeba/ (or Img/img_align_celeba/)")
  partition = next((p for p in (root / "list_eval_partition.txt",
                                root / "Eval" / "list_eval_partition.txt") if p.is_file()), None)
  if partition is None:
    raise DatasetNotFoundError(
        f"{root}: expected list_eval_partition.txt (or Eval/list_eval_partition.txt)")
  return images, partition


def read_eval_partition(path) -> dict:
  """{file name: split name} from CelebA's list_eval_partition.txt."""
  path = Path(path)
  out = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
        raise DatasetFormatError(
            f"{path}: line {lineno} is {line.strip()!r}, expected '<file>.jpg 0|1|2'")
      out[parts[0]] = SPLITS[int(parts[1])]
  if not out:
    raise DatasetFormatError(f"{path}: empty partition file")
  return out


def format_landmarks_line(name: str, points) -> str:
  pts = np.asarray(points, np.float64).reshape(-1)
  if pts.size != 136 or not np.all(np.isfinite(pts)):
    raise ValueError(f"{name}: expected 68 finite (x, y) points")
  return name + " " + " ".join(f"{v:.2f}" for v in pts)


def read_landmarks_file(path) -> dict:
  """{file name: (68, 2) float32} from a landmarks_68.txt; later lines win on duplicates."""
  path = Path(path)
  if not path.is_file():
    raise DatasetNotFoundError(f"{path}: no such file (run data_prep.label_landmarks first)")
  out = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip() or line.startswith("#"):
        continue
      parts = line.split()
      if len(parts) != 137:
        raise DatasetFormatError(
            f"{path}: line {lineno} has {len(parts) - 1} numbers, expected 136 (68 x, y pairs)")
      try:
        pts = np.array(parts[1:], np.float32).reshape(68, 2)
      except ValueError:
        raise DatasetFormatError(f"{path}: line {lineno} holds a non-number") from None
      if not np.all(np.isfinite(pts)):
        raise DatasetFormatError(f"{path}: line {lineno} holds non-finite coordinates")
      out[parts[0]] = pts
  return out


def read_failures_file(path) -> dict:
  """{file name: reason} from a landmarks_68_failures.txt ({} when the file is absent)."""
  path = Path(path)
  out = {}
  if not path.is_file():
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip() or line.startswith("#"):
        continue
      name, _, reason = line.strip().partition(" ")
      out[name] = reason
  return out


def open_for_append(path, header: str):
  """Opens a labeller output file for appending, writing `header` first if it is new."""
  path = os.fspath(path)
  new = not os.path.isfile(path) or os.path.getsize(path) == 0
  f = open(path, "a", encoding="utf-8")
  if new:
    f.write(header + "\n")
  return f
