"""Training / evaluation input pipeline on Grain: random access, per-epoch seeded shuffling,
face crops with augmentation, threaded prefetch, batching and per-device reshaping.

    source = sources.open_tfds("dff3d_celeb_a", "train", data_dir)   # or any sequence of dicts
    pipe = InputPipeline(source, PipelineConfig(batch_size=16))
    for batch in pipe.epoch(0): ...

Each batch is a dict:
  "image"             (B, S, S, 3) float32 in [0, 1]
  "landmarks"         (B, K, 2) float32, crop pixels (dff3d convention, K = 68 normally)
  "landmarks_visible" (B, K) float32 (1 = labelled)
  "affine"            (B, 2, 3) float32, source-image pixels -> crop pixels (the crop, rotation
                      and flip; map predictions back with camera.invert_affine)
  "landmark_set"      (B,) int32, index of the example's dff3d.landmark_sets set (example key
                      "landmark_set", a name or index; default iBUG-68); K is then always 68
                      (landmark_sets.MAX_POINTS): shorter sets are zero-padded, visibility 0
  "index"             (B,) int32, the source index (-1 on padding rows, see pad_last_batch)
  "rotation"          (B, 3, 3) float32, the head rotation label in the crop's frame (the
                      example's "rotation" (3, 3) moved by augment.transform_rotation), the
                      identity where an example has none
  "rotation_weight"   (B,) float32, 1 where the example has a rotation label, else 0
  plus config.extra_keys copied from the examples (stacked as numpy arrays).
With num_devices = n every array is reshaped to (n, B / n, ...).

Randomness: example i of epoch e is augmented with numpy's default_rng([seed, e, i]) and the
epoch's order is a Grain shuffle seeded from (seed, e), so a run is reproducible and
independent of batch size and thread count.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Iterator

import grain
import numpy as np
from PIL import Image

from dff3d import landmark_sets
from dff3d.data import augment


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Input pipeline settings.

  batch_size: examples per batch (global, before the device reshape).
  image_size: crop side S (224 for the paper's networks).
  crop_scale, crop_shift_up: see augment.face_box (scale 1.6, shift 0.1: the framing of the
    fitting and of an untrained regressor's mean face).
  augment: augment.AugmentConfig, or None for no augmentation (evaluation).
  shuffle: shuffle every epoch (seeded by seed and the epoch number).
  drop_remainder: drop the last incomplete batch; else it is emitted (and padded to
    batch_size when pad_last_batch).
  pad_last_batch: pad an incomplete last batch by repeating its last example, with index -1.
  num_devices: None keeps (B, ...); n > 0 reshapes to (n, B / n, ...); 0 uses
    jax.local_device_count().
  num_threads, prefetch: Grain ReadOptions (worker threads, examples read ahead).
  landmarks_key / visible_key: example keys to read (None: "landmarks_68" if present else
    "landmarks"; "landmarks_visible" if present else all visible). An example's optional
    "box_landmarks" (K, 2) frame its crop instead of its landmarks (see _box).
  extra_keys: further example keys to pass through (e.g. ("yaw_deg",)).
  shard_index, shard_count: this process's rows of every global batch (multi-process
    training, dff3d.distributed): batches hold batch_size / shard_count rows, rows
    shard_index * that onwards of the global batch a single process would see (so the
    processes' parts, concatenated in process order, are exactly that batch). Needs
    drop_remainder.
  """

  batch_size: int
  image_size: int = 224
  crop_scale: float = 1.6
  crop_shift_up: float = 0.1
  augment: augment.AugmentConfig | None = augment.AugmentConfig()
  shuffle: bool = True
  seed: int = 0
  drop_remainder: bool = True
  pad_last_batch: bool = False
  num_devices: int | None = None
  num_threads: int = 4
  prefetch: int = 32
  landmarks_key: str | None = None
  visible_key: str | None = None
  extra_keys: tuple = ()
  shard_index: int = 0
  shard_count: int = 1


def eval_config(batch_size: int, **kwargs) -> PipelineConfig:
  """Evaluation settings: no augmentation, source order, every example (last batch padded)."""
  kw = dict(augment=None, shuffle=False, drop_remainder=False, pad_last_batch=True)
  kw.update(kwargs)
  return PipelineConfig(batch_size=batch_size, **kw)


def decode_image(value) -> np.ndarray:
  """(H, W, 3) uint8 or float32 array from an array or encoded image bytes."""
  if isinstance(value, (bytes, bytearray)):
    with Image.open(io.BytesIO(value)) as im:
      return np.asarray(im.convert("RGB"))
  arr = np.asarray(value)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
  return arr if arr.dtype == np.uint8 else arr.astype(np.float32)


def _set_of(example):
  """The landmark set name or index of an example (iBUG-68 when it names none)."""
  value = example.get("landmark_set", 0)
  if isinstance(value, bytes):
    value = value.decode()
  return value if isinstance(value, str) else int(np.asarray(value))


def _seed(*values) -> int:
  return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


def _shard_rows(ds, batch_size: int, local: int, index: int):
  """Rows index * local ... (index + 1) * local - 1 of each full batch of `ds` (a MapDataset
  of example indices), in order."""
  full = len(ds) // batch_size
  rows = grain.MapDataset.range(full * local)
  return rows.map(lambda j: ds[(j // local) * batch_size + index * local + j % local])


class InputPipeline:
  """Batches of augmented face crops from a random-access source (see module docstring)."""

  def __init__(self, source, config: PipelineConfig):
    if config.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    self.source = source
    self.config = config
    n = config.num_devices
    if n == 0:
      import jax  # pylint: disable=g-import-not-at-top
      n = jax.local_device_count()
    if config.shard_count > 1 and (config.batch_size % config.shard_count
                                   or not config.drop_remainder or config.pad_last_batch):
      raise ValueError(f"sharding batches of {config.batch_size} over {config.shard_count} "
                       "processes needs a divisible batch size and drop_remainder")
    if not 0 <= config.shard_index < config.shard_count:
      raise ValueError(f"shard_index {config.shard_index} not in [0, {config.shard_count})")
    self.local_batch_size = config.batch_size // config.shard_count
    if n is not None and self.local_batch_size % n:
      raise ValueError(f"batch_size {self.local_batch_size} is not divisible by {n} devices")
    self.num_devices = n

  def __len__(self) -> int:
    """Batches per epoch."""
    n, b = len(self.source), self.config.batch_size
    return n // b if self.config.drop_remainder else -(-n // b)

  def example(self, index: int, epoch: int = 0) -> dict:
    """One processed example (what a batch row holds), for inspection and tests."""
    cfg = self.config
    ex = self.source[int(index)]
    lkey = cfg.landmarks_key or ("landmarks_68" if "landmarks_68" in ex else "landmarks")
    vkey = cfg.visible_key or "landmarks_visible"
    pts = np.asarray(ex[lkey], np.float32)
    vis = np.asarray(ex[vkey], bool) if vkey in ex else np.ones(len(pts), bool)
    lset = landmark_sets.get(_set_of(ex))
    if len(pts) != len(lset):
      raise ValueError(f"example {index}: {len(pts)} landmarks for the {len(lset)}-point set "
                       f"{lset.name!r}")
    rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, int(epoch), int(index)])
    out = augment.augmented_crop(
        decode_image(ex["image"]), pts, vis, rng, cfg.image_size,
        cfg.augment if cfg.augment is not None else augment.NO_AUGMENT,
        cfg.crop_scale, cfg.crop_shift_up, flip_permutation=lset.flip_permutation,
        box=self._box(ex))
    out["landmarks"], out["landmarks_visible"] = landmark_sets.pad(
        out["landmarks"], out["landmarks_visible"])
    out["landmark_set"] = np.int32(landmark_sets.INDEX[lset.name])
    out["index"] = np.int32(index)
    has_rotation = "rotation" in ex
    out["rotation"] = (augment.transform_rotation(ex["rotation"], out["affine"]) if has_rotation
                       else np.eye(3, dtype=np.float32))
    out["rotation_weight"] = np.float32(has_rotation)
    for key in cfg.extra_keys:
      out[key] = np.asarray(ex[key])
    return out

  def _box(self, ex):
    """The crop box from an example's "box_landmarks" (K, 2) when it has them (points that
    frame the face like 68-point labels, e.g. AFLW-21 examples' pseudo-68 fit), else None
    (the box of its visible landmarks)."""
    if "box_landmarks" not in ex:
      return None
    cfg = self.config
    return augment.face_box(np.asarray(ex["box_landmarks"], np.float32), None, cfg.crop_scale,
                            cfg.crop_shift_up)

  def _batch(self, rows):
    b = self.config.batch_size
    if len(rows) < b and self.config.pad_last_batch:
      pad = dict(rows[-1], index=np.int32(-1))
      rows = list(rows) + [pad] * (b - len(rows))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    n = self.num_devices
    if n is not None:
      if len(rows) % n:
        raise ValueError(f"a batch of {len(rows)} cannot be split over {n} devices "
                         "(set drop_remainder or pad_last_batch)")
      batch = {k: v.reshape((n, len(rows) // n) + v.shape[1:]) for k, v in batch.items()}
    return batch

  def dataset(self, epoch: int = 0, start_batch: int = 0) -> grain.IterDataset:
    """The Grain IterDataset of one epoch's batches, from batch `start_batch` on (a resumed
    run skips what it has trained on without reading it)."""
    cfg = self.config
    ds = grain.MapDataset.range(len(self.source))
    if cfg.shuffle:
      ds = ds.shuffle(seed=_seed(cfg.seed, epoch))
    if start_batch:
      ds = ds[start_batch * cfg.batch_size:]
    if cfg.shard_count > 1:  # this process's rows of every full global batch
      ds = _shard_rows(ds, cfg.batch_size, self.local_batch_size, cfg.shard_index)
    ds = ds.map(lambda i: self.example(i, epoch))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                              prefetch_buffer_size=cfg.prefetch))
    return it.batch(self.local_batch_size, drop_remainder=cfg.drop_remainder,
                    batch_fn=self._batch)

  def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[dict]:
    """Iterates over one epoch's batches (order and augmentation fixed by seed and epoch),
    starting at batch `start_batch`."""
    return iter(self.dataset(epoch, start_batch))

  def forever(self, start_epoch: int = 0) -> Iterator[tuple]:
    """Yields (epoch, batch) over epochs start_epoch, start_epoch + 1, ..."""
    e = start_epoch
    while True:
      for batch in self.epoch(e):
        yield e, batch
      e += 1
