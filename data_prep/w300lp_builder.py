"""TFDS builder `dff3d_300w_lp`: 300W-LP (61,225 profiled faces and their mirrors).

Manual directory: the unpacked `300W_LP/` folder or its parent (layout in
dff3d/datasets/w300lp.py): AFW, AFW_Flip, HELEN, HELEN_Flip, IBUG, IBUG_Flip, LFPW, LFPW_Flip,
each with `*.jpg` + `*.mat`, and `landmarks/<SUBSET>/<stem>_pts.mat` for the unflipped folders.

Configs: `all` (default, the 8 folders, 122,450 images) and `no_flip` (the 4 unflipped folders,
61,225 images; with CelebA's 202,599 this gives the paper's "about 250k" training images, and
the input pipeline's random flip covers mirroring).

Split: train. Features beyond the common ones (data_prep/common.py), x, y in dff3d pixels:
  landmarks_68   the image .mat's pt2d + 0.5
  subset         folder name (text); view: int32 profiling step (0 = original photo)
  pose           (7,) Pose_Para: pitch, yaw, roll (radians), tx, ty, tz, scale
  shape_para (199,), exp_para (29,), roi (4,)
  pts_2d, pts_3d (68, 2) from landmarks/..._pts.mat + 0.5; has_pts: False (zeros) for _Flip
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_prep import common
from dff3d.datasets import w300lp


@dataclasses.dataclass
class W300LPConfig(tfds.core.BuilderConfig):
  subsets: tuple = w300lp.SUBSETS


class Dff3d300wLp(common.ManualDirBuilder):
  """300W-LP images with 68 landmarks, pose and 3DMM parameters."""

  name = "dff3d_300w_lp"
  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = "300W-LP (Zhu et al. 2016) with 68 landmarks in dff3d pixels."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "the unpacked 300W_LP folder (AFW, AFW_Flip, HELEN, HELEN_Flip, IBUG, IBUG_Flip, LFPW, "
      "LFPW_Flip with *.jpg + *.mat, and landmarks/)")
  BUILDER_CONFIGS = [
      W300LPConfig(name="all", description="all 8 folders", subsets=w300lp.SUBSETS),
      W300LPConfig(name="no_flip", description="the 4 unflipped folders",
                   subsets=tuple(s for s in w300lp.SUBSETS if not s.endswith("_Flip"))),
  ]

  def _features(self):
    f = common.common_features()
    f.update({
        "subset": tfds.features.Text(),
        "view": tfds.features.Scalar(dtype=np.int32),
        "pose": tfds.features.Tensor(shape=(7,), dtype=np.float32),
        "shape_para": tfds.features.Tensor(shape=(199,), dtype=np.float32),
        "exp_para": tfds.features.Tensor(shape=(29,), dtype=np.float32),
        "roi": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "pts_2d": tfds.features.Tensor(shape=(68, 2), dtype=np.float32),
        "pts_3d": tfds.features.Tensor(shape=(68, 2), dtype=np.float32),
        "has_pts": tfds.features.Scalar(dtype=np.bool_),
    })
    return f

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    items = w300lp.list_300w_lp(root, subsets=self.builder_config.subsets)
    return {"train": self._generate_examples(items)}

  def _generate_examples(self, items):
    for item in items:
      labels = w300lp.load_300w_lp(item)
      data, _ = common.image_bytes(item.image)
      key = f"{item.subset}/{item.stem}"
      yield key, {
          "image": data,
          "image_name": f"{key}.jpg",
          "landmarks_68": labels["landmarks_68"],
          "landmarks_visible": np.ones(68, bool),
          "yaw_deg": labels["yaw_deg"],
          "subset": item.subset,
          "view": labels["view"],
          "pose": labels["pose"],
          "shape_para": labels["shape_para"],
          "exp_para": labels["exp_para"],
          "roi": labels["roi"],
          "pts_2d": labels["pts_2d"],
          "pts_3d": labels["pts_3d"],
          "has_pts": labels["has_pts"],
      }
