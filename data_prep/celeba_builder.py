"""TFDS builder `dff3d_celeb_a`: CelebA aligned images with 68 weak landmarks.

Manual directory (the published CelebA layout plus the labeller's output):

    img_align_celeba/*.jpg          (or Img/img_align_celeba/)
    list_eval_partition.txt         (or Eval/list_eval_partition.txt): "000001.jpg 0", 0/1/2 =
                                    train / validation / test
    landmarks_68.txt                written by `python -m data_prep.label_landmarks`
    landmarks_68_failures.txt       images the labeller could not label (skipped here, counted)

Splits train / validation / test. Every image of the partition file must exist and have a line
in landmarks_68.txt or landmarks_68_failures.txt; images in the failures file are skipped and
their number is stored in the dataset metadata (`skipped_unlabelled`, per split) and logged.
Extra features: none (CelebA has no pose: yaw_deg is NaN).
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from data_prep import common
from dff3d.datasets import celeba
from dff3d.datasets.aflw2000_3d import DatasetNotFoundError


class Dff3dCelebA(common.ManualDirBuilder):
  """CelebA aligned faces with 68 landmarks from data_prep.label_landmarks."""

  name = "dff3d_celeb_a"
  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = "CelebA img_align_celeba with dlib 68-point weak landmarks (dff3d pixels)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "the CelebA root with img_align_celeba/, list_eval_partition.txt and the labeller's "
      "landmarks_68.txt (python -m data_prep.label_landmarks)")

  def _features(self):
    return common.common_features()

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    image_dir, partition_file = celeba.find_layout(root)
    partition = celeba.read_eval_partition(partition_file)
    present = set(os.listdir(image_dir))
    missing = sorted(n for n in partition if n not in present)
    if missing:
      raise DatasetNotFoundError(
          f"{image_dir}: {len(missing)} images listed in {partition_file.name} are missing, "
          f"e.g. {missing[0]}")
    landmarks = celeba.read_landmarks_file(root / celeba.LANDMARKS_FILE)
    failures = celeba.read_failures_file(root / celeba.FAILURES_FILE)
    unknown = sorted(n for n in partition if n not in landmarks and n not in failures)
    if unknown:
      raise DatasetNotFoundError(
          f"{root / celeba.LANDMARKS_FILE}: {len(unknown)} images of {partition_file.name} have "
          f"no landmarks and no failure line, e.g. {unknown[0]} (run data_prep.label_landmarks "
          "on the image folder)")
    by_split = {s: [] for s in celeba.SPLITS.values()}
    skipped = {s: 0 for s in celeba.SPLITS.values()}
    for name in sorted(partition):
      split = partition[name]
      if name in landmarks:
        by_split[split].append(name)
      else:
        skipped[split] += 1
    self.info.metadata["skipped_unlabelled"] = skipped
    for split, count in skipped.items():
      if count:
        logging.warning("dff3d_celeb_a: skipping %d %s images the labeller could not label "
                        "(see %s)", count, split, celeba.FAILURES_FILE)
    return {split: self._generate_examples(image_dir, names, landmarks)
            for split, names in by_split.items() if names}

  def _generate_examples(self, image_dir, names, landmarks):
    for name in names:
      data, _ = common.image_bytes(image_dir / name)
      yield name, {
          "image": data,
          "image_name": name,
          "landmarks_68": landmarks[name],
          "landmarks_visible": np.ones(68, bool),
          "yaw_deg": np.float32(np.nan),
      }
