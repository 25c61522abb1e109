"""TFDS builder `dff3d_aflw_lfpa`: the AFLW-LFPA test set (1299 images, 34 landmarks).

Manual directory: the simple layout documented in dff3d/datasets/aflw_lfpa.py (the authors'
exact release layout could not be established): NAME.jpg + NAME.mat (key "pts" 34 x 2,
optional "visible", "yaw") or NAME.txt (34 lines "x y [v]"), 0-based pixel coordinates.

Split: test. The 34 LFPA points are not a subset of the iBUG 68, so landmarks_68 is all zeros
with landmarks_visible all False; the labels are:
  landmarks_34          (34, 2) float32 dff3d pixels (stored + 0.5)
  landmarks_34_visible  (34,) bool
  yaw_deg               from the annotation's "yaw" when given, else NaN
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from data_prep import common
from dff3d.datasets import aflw_lfpa


class Dff3dAflwLfpa(common.ManualDirBuilder):
  """AFLW-LFPA test images with 34 landmarks."""

  name = "dff3d_aflw_lfpa"
  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = "AFLW-LFPA (Jourabloo & Liu 2016) test set, 34 landmarks in dff3d pixels."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "a folder of NAME.jpg + NAME.mat ('pts' 34 x 2) or NAME.txt (34 lines 'x y [v]')")

  def _features(self):
    f = common.common_features()
    f.update({
        "landmarks_34": tfds.features.Tensor(shape=(34, 2), dtype=np.float32),
        "landmarks_34_visible": tfds.features.Tensor(shape=(34,), dtype=np.bool_),
    })
    return f

  def _split_generators(self, dl_manager):
    items = aflw_lfpa.list_aflw_lfpa(self._manual_root(dl_manager))
    return {"test": self._generate_examples(items)}

  def _generate_examples(self, items):
    for item in items:
      labels = aflw_lfpa.load_aflw_lfpa(item)
      data, _ = common.image_bytes(item.image)
      yield item.stem, {
          "image": data,
          "image_name": item.image.name,
          "landmarks_68": np.zeros((68, 2), np.float32),
          "landmarks_visible": np.zeros(68, bool),
          "yaw_deg": labels["yaw_deg"],
          "landmarks_34": labels["landmarks_34"],
          "landmarks_34_visible": labels["landmarks_34_visible"],
      }
