r"""Builds one of dff3d's TFDS datasets (array_record, no TensorFlow needed).

  python -m data_prep.build --dataset=celeb_a --manual_dir=/data/celeba --data_dir=~/tfds
  python -m data_prep.build --dataset=300w_lp --config=no_flip --manual_dir=/data/300W_LP
  python -m data_prep.build --dataset=aflw2000_3d --manual_dir=/data/AFLW2000
  python -m data_prep.build --dataset=aflw_lfpa --manual_dir=/data/aflw_lfpa
  python -m data_prep.build --dataset=aflw_3ddfa --config=pseudo68 --manual_dir=/data/aflw_3ddfa
  python -m data_prep.build --dataset=synthetic --synthetic_size=224 --synthetic_num_train=10000

Read a build back with dff3d.data.open_tfds(<data_dir>/<name>/<config>/<version>, split) or
tfds.data_source(<name>, split=..., data_dir=...) after importing the builder module.
"""

from __future__ import annotations

import os

from absl import app, flags

from data_prep import common

DATASETS = {
    "celeb_a": ("data_prep.celeba_builder", "Dff3dCelebA"),
    "300w_lp": ("data_prep.w300lp_builder", "Dff3d300wLp"),
    "aflw2000_3d": ("data_prep.aflw2000_3d_builder", "Dff3dAflw20003d"),
    "aflw_lfpa": ("data_prep.aflw_lfpa_builder", "Dff3dAflwLfpa"),
    "aflw_3ddfa": ("data_prep.aflw_3ddfa_builder", "Dff3dAflw3ddfa"),
    "synthetic": ("data_prep.synthetic_builder", "Dff3dSynthetic"),
}

_DATASET = flags.DEFINE_enum("dataset", None, sorted(DATASETS), "Which dataset to build.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The dataset as downloaded (layout in "
                                  "the builder's docstring); not used by synthetic.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Where builds go.")
_CONFIG = flags.DEFINE_string("config", None, "Builder config name (300w_lp: all | no_flip; "
                              "aflw_3ddfa: pts21 | pseudo68).")
_SIZE = flags.DEFINE_integer("synthetic_size", 224, "Synthetic image side.")
_NUM_TRAIN = flags.DEFINE_integer("synthetic_num_train", 10000, "Synthetic train examples.")
_NUM_TEST = flags.DEFINE_integer("synthetic_num_test", 1000, "Synthetic test examples.")
_SEED = flags.DEFINE_integer("synthetic_seed", 0, "Synthetic generator seed.")


def builder_class(dataset: str):
  import importlib  # pylint: disable=g-import-not-at-top
  module, cls = DATASETS[dataset]
  return getattr(importlib.import_module(module), cls)


def build_dataset(dataset: str, manual_dir, data_dir, config=None):
  """Builds `dataset` (a DATASETS key); returns the TFDS builder (its data_dir is the build)."""
  return common.build(builder_class(dataset), manual_dir, os.path.expanduser(str(data_dir)),
                      config=config)


def main(argv):
  del argv
  if _DATASET.value is None:
    raise app.UsageError("--dataset is required")
  config = _CONFIG.value
  if _DATASET.value == "synthetic":
    from data_prep.synthetic_builder import SyntheticConfig  # pylint: disable=g-import-not-at-top
    config = SyntheticConfig(
        name=config or f"s{_SIZE.value}_n{_NUM_TRAIN.value}_seed{_SEED.value}",
        size=_SIZE.value, num_train=_NUM_TRAIN.value, num_test=_NUM_TEST.value,
        seed=_SEED.value)
  elif _MANUAL_DIR.value is None:
    raise app.UsageError(f"--manual_dir is required for {_DATASET.value}")
  try:
    builder = build_dataset(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value, config)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"built {builder.name}: {dict((k, v.num_examples) for k, v in builder.info.splits.items())}"
        f" in {builder.data_dir}")


if __name__ == "__main__":
  app.run(main)
