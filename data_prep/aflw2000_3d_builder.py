"""TFDS builder `dff3d_aflw2000_3d`: the AFLW2000-3D benchmark (2000 images, 68 landmarks).

Manual directory: the unpacked `AFLW2000/` folder (or its parent) holding `imageNNNNN.jpg` +
`imageNNNNN.mat`; read with dff3d.datasets.aflw2000_3d (key table there). Every image needs
its .mat and every .mat its image.

Split: test. Features beyond the common ones (data_prep/common.py):
  landmarks_68      pt3d_68 x, y + 0.5 (0-based centres-at-integers -> dff3d pixels)
  pt3d_68           (68, 3) float32: x, y + 0.5, z as stored (pixel units)
  pose              (3,) float32 pitch, yaw, roll radians; yaw_deg = degrees(yaw)
  pt2d_21           (21, 2) the AFLW landmarks + 0.5 (zeros where missing); pt2d_21_visible (21,)
  roi               (4,) as stored
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from data_prep import common
from dff3d.datasets import aflw2000_3d
from dff3d.datasets.aflw2000_3d import DatasetNotFoundError


def find_aflw2000_dir(root: Path) -> Path:
  """`root` or `root/AFLW2000`, whichever holds imageNNNNN.jpg files."""
  for cand in (root, root / "AFLW2000"):
    if cand.is_dir() and any(cand.glob("image[0-9][0-9][0-9][0-9][0-9].jpg")):
      return cand
  return root


class Dff3dAflw20003d(common.ManualDirBuilder):
  """AFLW2000-3D with 68 3D landmarks and pose."""

  name = "dff3d_aflw2000_3d"
  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = "AFLW2000-3D (Zhu et al. 2016); landmarks in dff3d pixels."
  MANUAL_DOWNLOAD_INSTRUCTIONS = "the unpacked AFLW2000 folder (imageNNNNN.jpg + imageNNNNN.mat)"

  def _features(self):
    f = common.common_features()
    f.update({
        "pt3d_68": tfds.features.Tensor(shape=(68, 3), dtype=np.float32),
        "pose": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        "pt2d_21": tfds.features.Tensor(shape=(21, 2), dtype=np.float32),
        "pt2d_21_visible": tfds.features.Tensor(shape=(21,), dtype=np.bool_),
        "roi": tfds.features.Tensor(shape=(4,), dtype=np.float32),
    })
    return f

  def _split_generators(self, dl_manager):
    directory = find_aflw2000_dir(self._manual_root(dl_manager))
    listing = aflw2000_3d.list_aflw2000_3d(directory)
    lonely = listing.images_without_mat + listing.mats_without_image
    if lonely:
      raise DatasetNotFoundError(
          f"{directory}: {len(lonely)} imageNNNNN files without their .jpg/.mat pair, e.g. "
          f"{lonely[0].name}")
    return {"test": self._generate_examples(listing.pairs)}

  def _generate_examples(self, pairs):
    for image_path, mat_path in pairs:
      labels = aflw2000_3d.load_aflw2000_3d_mat(mat_path)
      data, _ = common.image_bytes(image_path)
      pt3d = labels["landmarks_3d"].copy()
      pt3d[:, :2] += 0.5
      if labels["pt2d"] is None:  # irregular pt2d (e.g. (2, 23) in image01198): no AFLW points
        vis, pt2d = np.zeros(21, bool), np.zeros((21, 2), np.float32)
      else:
        vis = labels["pt2d_visible"]
        pt2d = np.where(vis[:, None], labels["pt2d"] + 0.5, 0.0).astype(np.float32)
      yield image_path.stem, {
          "image": data,
          "image_name": image_path.name,
          "landmarks_68": pt3d[:, :2],
          "landmarks_visible": np.ones(68, bool),
          "yaw_deg": labels["yaw_deg"],
          "pt3d_68": pt3d,
          "pose": labels["pose"],
          "pt2d_21": pt2d,
          "pt2d_21_visible": vis,
          "roi": labels["roi"] if labels["roi"] is not None else np.zeros(4, np.float32),
      }
