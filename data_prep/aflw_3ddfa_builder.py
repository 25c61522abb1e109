"""TFDS builder `dff3d_aflw_3ddfa`: AFLW face crops (3DDFA layout) with the 21 AFLW landmarks.

Manual directory: the folder holding AFLW_GT_crop/, AFLW_GT_crop.list, AFLW_GT_pts21.npy,
AFLW_GT_crop_roi_box.npy and AFLW_GT_crop_yaws.npy; read with dff3d.datasets.aflw_3ddfa
(layout, pixel convention and clipped boxes there).

Configs: `pts21` (default) stores the 21 AFLW points only; `pseudo68` also stores iBUG-68
pseudo labels from `AFLW_GT_pseudo68.npz` in the manual directory (or the config's
`pseudo68_file`): np.savez of names (N,) str, landmarks_68 (N, 68, 2) float32 crop pixels
and fit_error (N,) float32, rows matched to the crops by name (format in
dff3d/datasets/aflw_3ddfa.py).

Splits: train and validation, by aflw_3ddfa.split_of (a stable hash of the file name; 5 %
validation). Features, x, y in dff3d crop pixels (centres at integer + 0.5):
  image               (S, S, 3) uint8 on read, the crop's JPEG bytes as stored (S = 120)
  image_name          the crop's file name, e.g. image00002.jpg
  landmarks           (21, 2) float32, zeros where not annotated
  landmarks_visible   (21,) bool
  yaw_deg             float32 degrees
  roi_box             (4,) float32 x0, y0, x1, y1 original photo pixels, as stored
  landmark_set        "aflw21" (dff3d.landmark_sets: the pipeline pads, flips and weights the
                      21 points by it)
  box_landmarks       (68, 2) float32, the pseudo-68 points, and pseudo68_fit_error float32:
                      config pseudo68 only. The input pipeline frames each crop with the face
                      box of these 68 points (as it frames 68-point faces and AFLW2000-3D);
                      training on the pseudo-68 points as labels reads the .npz directly
                      (TrainConfig data="aflw", aflw_labels="pseudo68").
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_prep import common
from dff3d.datasets import aflw_3ddfa
from dff3d.datasets.aflw2000_3d import DatasetFormatError


@dataclasses.dataclass
class Aflw3ddfaConfig(tfds.core.BuilderConfig):
  pseudo68: bool = False
  pseudo68_file: str | None = None  # None: <manual_dir>/AFLW_GT_pseudo68.npz
  validation_fraction: float = aflw_3ddfa.VALIDATION_FRACTION


class Dff3dAflw3ddfa(common.ManualDirBuilder):
  """AFLW crops (3DDFA layout) with 21 landmarks, yaw and optional pseudo-68 labels."""

  name = "dff3d_aflw_3ddfa"
  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = "AFLW 120 px crops in the 3DDFA layout; 21 AFLW landmarks in dff3d pixels."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "the 3DDFA AFLW folder (AFLW_GT_crop/, AFLW_GT_crop.list, AFLW_GT_pts21.npy, "
      "AFLW_GT_crop_roi_box.npy, AFLW_GT_crop_yaws.npy)")
  BUILDER_CONFIGS = [
      Aflw3ddfaConfig(name="pts21", description="the 21 AFLW landmarks"),
      Aflw3ddfaConfig(name="pseudo68", description="plus AFLW_GT_pseudo68.npz labels",
                      pseudo68=True),
  ]

  def _features(self):
    common_f = common.common_features()
    f = {key: common_f[key] for key in ("image", "image_name", "yaw_deg")}
    f["landmark_set"] = tfds.features.Text()
    f.update({
        "landmarks": tfds.features.Tensor(shape=(21, 2), dtype=np.float32),
        "landmarks_visible": tfds.features.Tensor(shape=(21,), dtype=np.bool_),
        "roi_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
    })
    if self.builder_config.pseudo68:
      f.update({
          "box_landmarks": tfds.features.Tensor(shape=(68, 2), dtype=np.float32),
          "pseudo68_fit_error": tfds.features.Scalar(dtype=np.float32),
      })
    return f

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    data = aflw_3ddfa.load_aflw_3ddfa(root)
    cfg = self.builder_config
    pseudo = None
    if cfg.pseudo68:
      pseudo = aflw_3ddfa.load_pseudo68(
          cfg.pseudo68_file or root / aflw_3ddfa.PSEUDO68_FILE, data.names)
    return {split: self._generate_examples(
        data, pseudo, aflw_3ddfa.split_indices(data, split, cfg.validation_fraction))
            for split in aflw_3ddfa.SPLITS}

  def _generate_examples(self, data, pseudo, indices):
    for k in indices:
      path = data.image_paths[k]
      image, size = common.image_bytes(path)
      if size != (data.crop_size, data.crop_size):
        raise DatasetFormatError(f"{path.name}: crop is {size[1]} x {size[0]} px, expected "
                                 f"{data.crop_size} x {data.crop_size} as the first crop")
      example = {
          "image": image,
          "image_name": data.names[k],
          "landmarks": data.landmarks[k],
          "landmarks_visible": data.visible[k],
          "yaw_deg": data.yaw_deg[k],
          "roi_box": data.roi_box[k],
          "landmark_set": "aflw21",
      }
      if pseudo is not None:
        example["box_landmarks"] = pseudo[0][k]
        example["pseudo68_fit_error"] = pseudo[1][k]
      yield path.stem, example
