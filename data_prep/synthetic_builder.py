"""TFDS builder `dff3d_synthetic`: rendered faces from dff3d.synthetic with dense labels.

No manual directory: every example is `generate(seed, index, size)` of the configured
generator (default `dff3d.synthetic:generate`), which returns numpy arrays
  image (S, S, 3) float32 [0, 1], landmarks (68, 2) float32, landmarks_visible (68,) bool,
  coefficients (P,) float32, vertex_id (S, S) int32 (-1 background),
  barycentric (S, S, 3) float32, mask (S, S) bool.
Split train holds indices [0, num_train), split test [num_train, num_train + num_test), all
from the same seed, so the splits never share an example and any example can be regenerated.

Stored features: image (PNG, 8 bits: the float image rounded to 1/255), landmarks_68,
landmarks_visible, coefficients, vertex_id / barycentric / mask (zlib-compressed tensors),
index (int64, the generator index).
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import tensorflow_datasets as tfds

from data_prep import common

DEFAULT_GENERATOR = "dff3d.synthetic:generate"


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  size: int = 224
  num_train: int = 10000
  num_test: int = 1000
  seed: int = 0
  generator: str = DEFAULT_GENERATOR  # "module:function"


def load_generator(spec: str):
  """The function named by "module:function"; a clear error when the module is missing."""
  module_name, _, fn_name = spec.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        f"synthetic generator {spec!r}: module {e.name!r} is not available") from None
  fn = getattr(module, fn_name or "generate", None)
  if fn is None:
    raise AttributeError(f"synthetic generator {spec!r}: no function {fn_name!r}")
  return fn


class Dff3dSynthetic(common.ManualDirBuilder):
  """Synthetic faces with landmarks, coefficients and per-pixel correspondences."""

  name = "dff3d_synthetic"
  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = "Faces rendered by dff3d.synthetic with dense ground truth."
  MANUAL_DOWNLOAD_INSTRUCTIONS = "none: examples are generated"
  BUILDER_CONFIGS = [SyntheticConfig(name="s224", description="224 px, 10k train, 1k test")]

  def _features(self):
    s = self.builder_config.size
    zlib = tfds.features.Encoding.ZLIB
    return {
        "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
        "landmarks_68": tfds.features.Tensor(shape=(68, 2), dtype=np.float32),
        "landmarks_visible": tfds.features.Tensor(shape=(68,), dtype=np.bool_),
        "coefficients": tfds.features.Tensor(shape=(None,), dtype=np.float32,
                                             encoding=tfds.features.Encoding.BYTES),
        "vertex_id": tfds.features.Tensor(shape=(s, s), dtype=np.int32, encoding=zlib),
        "barycentric": tfds.features.Tensor(shape=(s, s, 3), dtype=np.float32, encoding=zlib),
        "mask": tfds.features.Tensor(shape=(s, s), dtype=np.bool_, encoding=zlib),
        "index": tfds.features.Scalar(dtype=np.int64),
    }

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    generate = load_generator(cfg.generator)
    splits = {"train": range(0, cfg.num_train),
              "test": range(cfg.num_train, cfg.num_train + cfg.num_test)}
    return {name: self._generate_examples(generate, indices)
            for name, indices in splits.items() if len(indices)}

  def _generate_examples(self, generate, indices):
    cfg = self.builder_config
    s = cfg.size
    for index in indices:
      ex = generate(cfg.seed, index, s)
      checks = {"image": (s, s, 3), "landmarks": (68, 2), "landmarks_visible": (68,),
                "vertex_id": (s, s), "barycentric": (s, s, 3), "mask": (s, s)}
      for key, shape in checks.items():
        got = np.shape(ex.get(key))
        if got != shape:
          raise ValueError(f"synthetic generator {cfg.generator}: example {index} has {key} "
                           f"of shape {got}, expected {shape}")
      yield index, {
          "image": common.encode_png(ex["image"]),
          "landmarks_68": np.asarray(ex["landmarks"], np.float32),
          "landmarks_visible": np.asarray(ex["landmarks_visible"], bool),
          "coefficients": np.asarray(ex["coefficients"], np.float32).reshape(-1),
          "vertex_id": np.asarray(ex["vertex_id"], np.int32),
          "barycentric": np.asarray(ex["barycentric"], np.float32),
          "mask": np.asarray(ex["mask"], bool),
          "index": index,
      }
