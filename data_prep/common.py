"""What the dff3d TFDS builders share: TF-free array_record builds from a manual directory.

tensorflow-datasets 4.9 builds and reads `array_record` datasets without TensorFlow as long
as (a) `_info` returns a plain `tfds.core.DatasetInfo` (the `dataset_info_from_configs` helper
looks for metadata files beside the builder's package, which these builders do not ship) and
(b) images reach `tfds.features.Image` as encoded bytes (encoding a numpy image calls
`tf.image.encode_*`). Decoding on read uses PIL. `tfds.data_source` / `as_data_source` then
gives random access, with no TensorFlow anywhere.

Every example of a real-data builder holds at least:
  image              (H, W, 3) uint8 on read (stored as the source file's JPEG bytes)
  image_name         the file name relative to the dataset root
  landmarks_68       (68, 2) float32, dff3d pixels (x right, y down, centres at integer + 0.5)
  landmarks_visible  (68,) bool, True where a label exists
  yaw_deg            float32 degrees, NaN where the dataset has no pose
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path

from etils import epath

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils

from dff3d.datasets.aflw2000_3d import DatasetNotFoundError
from dff3d.io import ImageFileError

FILE_FORMAT = "array_record"


def common_features() -> dict:
  """Feature specs every real-data builder emits."""
  return {
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "image_name": tfds.features.Text(),
      "landmarks_68": tfds.features.Tensor(shape=(68, 2), dtype=np.float32),
      "landmarks_visible": tfds.features.Tensor(shape=(68,), dtype=np.bool_),
      "yaw_deg": tfds.features.Scalar(dtype=np.float32),
  }


def image_bytes(path) -> tuple[bytes, tuple[int, int]]:
  """(encoded bytes, (height, width)) of an image file, ready for tfds.features.Image.

  RGB JPEG / PNG files pass through byte for byte; other modes (greyscale, CMYK, palette) are
  converted to RGB and re-encoded as JPEG quality 95 so that every stored image decodes to
  (H, W, 3). Raises ImageFileError naming the file when it cannot be decoded.
  """
  path = Path(path)
  try:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      size = (im.height, im.width)
      if im.mode == "RGB" and im.format in ("JPEG", "PNG"):
        return data, size
      out = io.BytesIO()
      im.convert("RGB").save(out, format="JPEG", quality=95)
      return out.getvalue(), size
  except OSError as e:
    raise ImageFileError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def encode_png(image) -> bytes:
  """PNG bytes of an (H, W, 3) float image in [0, 1] (rounded to 8 bits) or uint8 image."""
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    arr = np.clip(np.asarray(arr, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(arr).save(out, format="PNG")
  return out.getvalue()


class ManualDirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder that reads a manual directory and writes array_record."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "See the builder's module docstring for the expected layout."
  DESCRIPTION = ""

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    # TFDS 4.9.10's own lookup touches `importlib_resources.abc`, a backport it only requires
    # (and that is only installed) on Python < 3.9; the builder's file is all it needs.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _features(self) -> dict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(self._features()),
        metadata=tfds.core.MetadataDict(),
        # Records keep the generation order (sorted file names / generator indices): index i
        # of a split is stable across rebuilds; the input pipeline does the shuffling.
        disable_shuffling=True)

  def _manual_root(self, dl_manager) -> Path:
    """The manual directory, or a one-line DatasetNotFoundError."""
    # dl_manager.manual_dir raises a multi-line AssertionError when missing / empty; TFDS
    # defaults an unset manual_dir to <data_dir>/downloads/manual.
    path = getattr(dl_manager, "_manual_dir", None)
    if not path:
      raise DatasetNotFoundError(
          f"{self.name}: no manual directory given (pass manual_dir: "
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS})")
    path = Path(path)
    if not path.is_dir():
      raise DatasetNotFoundError(f"{path}: no such directory ({self.name} manual directory: "
                                 f"expected {self.MANUAL_DOWNLOAD_INSTRUCTIONS})")
    return path


def build(builder_cls, manual_dir, data_dir, config=None, quiet: bool = True):
  """Builds `builder_cls` from `manual_dir` into `data_dir` (array_record) and returns it.

  Read the result with `tfds.data_source(builder.name, data_dir=data_dir)` (the builder's
  module must be imported) or `tfds.builder_from_directory(builder.data_dir)`.
  """
  if quiet:
    tfds.disable_progress_bar()
  builder = builder_cls(data_dir=str(data_dir), config=config)
  download_config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else str(manual_dir))
  builder.download_and_prepare(download_config=download_config)
  return builder
