"""Random-access example sources for the input pipeline.

A source is anything with `len(source)` and `source[i] -> dict` of numpy values (a list of
dicts works). Examples need an "image" ((H, W, 3) uint8 or float in [0, 1], or encoded
JPEG / PNG bytes) and landmarks under "landmarks_68" or "landmarks" ((K, 2) pixels, dff3d
convention), optionally "landmarks_visible" ((K,) bool).
"""

from __future__ import annotations

import bisect
from pathlib import Path


def open_tfds(name_or_dir, split: str, data_dir=None):
  """TFDS array_record split as a random-access source (no TensorFlow needed).

  Args:
    name_or_dir: a registered builder name such as "dff3d_celeb_a" or "dff3d_300w_lp/no_flip"
      (its data_prep module must be imported), or the path of a built dataset version folder
      (e.g. <data_dir>/dff3d_celeb_a/1.0.0), which needs no import.
    split: "train", "test", ...; data_dir: where the builds live (names only).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = Path(name_or_dir)
  if path.is_dir() and (path / "dataset_info.json").is_file():
    return tfds.builder_from_directory(str(path)).as_data_source(split=split)
  return tfds.data_source(str(name_or_dir), split=split,
                          data_dir=None if data_dir is None else str(data_dir))


class SyntheticSource:
  """Examples `generate(seed, index, size)` of dff3d.synthetic for index in [start, start+n)."""

  def __init__(self, length: int, size: int, seed: int = 0, start: int = 0, generate=None):
    if generate is None:
      from dff3d import synthetic  # pylint: disable=g-import-not-at-top
      generate = synthetic.generate
    self._generate, self._n, self._size, self._seed, self._start = (
        generate, int(length), int(size), int(seed), int(start))

  def __len__(self):
    return self._n

  def __getitem__(self, index):
    if not 0 <= index < self._n:
      raise IndexError(f"index {index} outside [0, {self._n})")
    return self._generate(self._seed, self._start + int(index), self._size)


class ConcatSource:
  """Several sources one after another (e.g. CelebA and 300W-LP, as the paper trains on)."""

  def __init__(self, *sources):
    self._sources = sources
    self._ends = []
    total = 0
    for s in sources:
      total += len(s)
      self._ends.append(total)

  def __len__(self):
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} outside [0, {len(self)})")
    k = bisect.bisect_right(self._ends, index)
    return self._sources[k][index - (self._ends[k - 1] if k else 0)]
