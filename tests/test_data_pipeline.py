"""Input pipeline (dff3d.data.pipeline): batching, seeded shuffling, devices, TFDS sources."""

import io

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dff3d import landmarks as landmarks_lib
from dff3d.data import (AugmentConfig, ConcatSource, InputPipeline, NO_AUGMENT, PipelineConfig,
                        SyntheticSource, eval_config, open_tfds)
from tests.test_data_augment import blob_image, centroid


def make_source(n=10, seed=0):
  """Images with a red dot on landmark 30 and a green dot on landmark 36."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = 70 + i, 80
    pts = (np.array([w / 2, h / 2]) + rng.uniform(-15, 15, (68, 2))).astype(np.float32)
    img = blob_image(h, w, pts[[30, 36]], sigma=1.5, amplitude=0.6)
    if i % 2:  # mix uint8 arrays and float arrays
      img = (img * 255 + 0.5).astype(np.uint8)
    out.append({"image": img, "landmarks_68": pts, "landmarks_visible": np.ones(68, bool),
                "yaw_deg": np.float32(i)})
  return out


def test_batches_shapes_and_dtypes():
  cfg = PipelineConfig(batch_size=4, image_size=32, extra_keys=("yaw_deg",))
  pipe = InputPipeline(make_source(10), cfg)
  batches = list(pipe.epoch(0))
  assert len(pipe) == 2 and len(batches) == 2
  b = batches[0]
  assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
  assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert b["landmarks"].shape == (4, 68, 2) and b["landmarks"].dtype == np.float32
  assert b["landmarks_visible"].shape == (4, 68) and b["landmarks_visible"].dtype == np.float32
  assert b["index"].dtype == np.int32 and b["affine"].shape == (4, 2, 3)
  np.testing.assert_array_equal(b["yaw_deg"], b["index"].astype(np.float32))


def test_landmarks_follow_the_image_through_augmentation():
  cfg = PipelineConfig(batch_size=10, image_size=48, drop_remainder=False,
                       augment=AugmentConfig(colour_range=(0.9, 1.1)))
  batch = next(InputPipeline(make_source(10), cfg).epoch(3))
  flips = 0
  for img, lm in zip(batch["image"], batch["landmarks"]):
    np.testing.assert_allclose(centroid(img[..., 0]), lm[30], atol=0.15)
    green = centroid(img[..., 1])
    flipped = np.linalg.norm(green - lm[45]) < np.linalg.norm(green - lm[36])
    flips += flipped
    np.testing.assert_allclose(green, lm[45] if flipped else lm[36], atol=0.15)
  assert 0 < flips < 10  # flip probability 0.5 over 10 examples


def test_shuffle_is_seeded_per_epoch_and_covers_everything():
  src = make_source(12)
  cfg = PipelineConfig(batch_size=3, image_size=16, augment=NO_AUGMENT, seed=7)
  order = lambda p, e: np.concatenate([b["index"] for b in p.epoch(e)]).tolist()
  pipe = InputPipeline(src, cfg)
  e0, e1 = order(pipe, 0), order(pipe, 1)
  assert sorted(e0) == list(range(12)) and sorted(e1) == list(range(12))
  assert e0 != e1
  assert order(InputPipeline(src, cfg), 0) == e0  # reproducible
  other_seed = InputPipeline(src, PipelineConfig(batch_size=3, image_size=16, seed=8))
  assert order(other_seed, 0) != e0
  unshuffled = InputPipeline(src, PipelineConfig(batch_size=3, image_size=16, shuffle=False))
  assert order(unshuffled, 0) == list(range(12))


def test_augmentation_independent_of_batch_size_and_threads():
  src = make_source(6)
  a = InputPipeline(src, PipelineConfig(batch_size=6, image_size=24, num_threads=1))
  b = InputPipeline(src, PipelineConfig(batch_size=2, image_size=24, num_threads=3))
  ba = next(a.epoch(2))
  rows = {int(i): lm for bb in b.epoch(2) for i, lm in zip(bb["index"], bb["landmarks"])}
  for i, lm in zip(ba["index"], ba["landmarks"]):
    np.testing.assert_allclose(rows[int(i)], lm, atol=1e-6)


def test_device_reshape_and_eval_padding():
  src = make_source(5)
  pipe = InputPipeline(src, PipelineConfig(batch_size=4, image_size=16, num_devices=2))
  (b,) = list(pipe.epoch(0))
  assert b["image"].shape == (2, 2, 16, 16, 3) and b["landmarks"].shape == (2, 2, 68, 2)
  assert b["index"].shape == (2, 2)
  ev = InputPipeline(src, eval_config(4, image_size=16, num_devices=2))
  batches = list(ev.epoch(0))
  assert len(ev) == 2 and len(batches) == 2
  idx = np.concatenate([x["index"].reshape(-1) for x in batches]).tolist()
  assert idx == [0, 1, 2, 3, 4, -1, -1, -1]
  with pytest.raises(ValueError, match="not divisible by 3 devices"):
    InputPipeline(src, PipelineConfig(batch_size=4, num_devices=3))
  one = InputPipeline(src, PipelineConfig(batch_size=4, image_size=16, num_devices=0))
  assert next(one.epoch(0))["image"].ndim == 5


def test_eval_config_is_deterministic_and_unaugmented():
  src = make_source(3)
  ev = InputPipeline(src, eval_config(3, image_size=32))
  b = next(ev.epoch(0))
  from dff3d.data import augment
  for i in range(3):
    _, pts, _ = augment.crop_to_landmarks(np.asarray(src[i]["image"]), src[i]["landmarks_68"], 32)
    np.testing.assert_allclose(b["landmarks"][i], pts, atol=1e-4)


def test_sources_bytes_synthetic_and_concat():
  def fake(seed, index, size):
    r = np.random.default_rng([seed, index])
    return {"image": r.uniform(size=(size, size, 3)).astype(np.float32),
            "landmarks": r.uniform(size * 0.3, size * 0.7, (68, 2)).astype(np.float32),
            "landmarks_visible": np.ones(68, bool)}
  syn = SyntheticSource(4, 40, seed=1, generate=fake)
  enc = io.BytesIO()
  Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(enc, format="PNG")
  coded = [{"image": enc.getvalue(),
            "landmarks_68": np.random.default_rng(0).uniform(10, 20, (68, 2)),
            "landmarks_visible": np.ones(68, bool)}]
  both = ConcatSource(syn, coded)
  assert len(both) == 5
  np.testing.assert_array_equal(both[4]["landmarks_68"], coded[0]["landmarks_68"])
  np.testing.assert_array_equal(both[2]["image"], fake(1, 2, 40)["image"])
  with pytest.raises(IndexError):
    both[5]
  (b,) = list(InputPipeline(both, PipelineConfig(batch_size=5, image_size=16)).epoch(0))
  assert b["image"].shape == (5, 16, 16, 3)


def test_pipeline_on_a_tfds_build(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  del tfds
  from data_prep import common
  from data_prep.aflw2000_3d_builder import Dff3dAflw20003d
  rng = np.random.default_rng(0)
  raw = tmp_path / "AFLW2000"
  raw.mkdir()
  for k in range(1, 4):
    pts = 30 + rng.uniform(-12, 12, (68, 2))
    img = blob_image(60, 60, [pts[30] + 0.5], sigma=1.5, channel=0)  # stored 0-based: +0.5
    Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(raw / f"image{k:05d}.png",
                                                              format="PNG")
    (raw / f"image{k:05d}.png").rename(raw / f"image{k:05d}.jpg")  # lossless for the check
    scipy.io.savemat(raw / f"image{k:05d}.mat", {
        "pt3d_68": np.concatenate([pts.T, np.zeros((1, 68))]),
        "Pose_Para": np.array([[0, 0.1 * k, 0, 0, 0, 0, 1]]), "pt2d": np.zeros((2, 21)),
        "roi": np.zeros((1, 4))})
  builder = common.build(Dff3dAflw20003d, raw, tmp_path / "data")
  src = open_tfds(builder.data_dir, "test")  # by folder: no builder import needed
  assert len(src) == 3
  pipe = InputPipeline(src, eval_config(2, image_size=40, extra_keys=("yaw_deg", "pt3d_68")))
  batches = list(pipe.epoch(0))
  b = batches[0]
  assert b["pt3d_68"].shape == (2, 68, 3)
  for img, lm in zip(b["image"], b["landmarks"]):
    np.testing.assert_allclose(centroid(img[..., 0]), lm[30], atol=0.15)
  # disable_shuffling keeps the file order: index i is image{i+1:05d}
  np.testing.assert_allclose(np.degrees(0.1 * (b["index"] + 1)), b["yaw_deg"], rtol=1e-5)
  assert landmarks_lib.NUM_LANDMARKS == b["landmarks"].shape[1]


def test_process_shards_concatenate_to_the_global_batches():
  """Multi-process training: each process's rows, concatenated in process order, are exactly
  the global batch one process would read (same examples, same augmentation), also when
  resuming mid-epoch."""
  src = make_source(11)
  cfg = PipelineConfig(batch_size=4, image_size=16, seed=3)
  whole = list(InputPipeline(src, cfg).epoch(1))
  parts = [list(InputPipeline(src, PipelineConfig(batch_size=4, image_size=16, seed=3,
                                                   shard_index=i, shard_count=2)).epoch(1))
           for i in range(2)]
  assert len(whole) == len(parts[0]) == len(parts[1]) == 2
  for k, batch in enumerate(whole):
    assert parts[0][k]["image"].shape[0] == 2
    for key in ("index", "image", "landmarks"):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])
  resumed = next(InputPipeline(src, PipelineConfig(batch_size=4, image_size=16, seed=3,
                                                    shard_index=1, shard_count=2))
                 .epoch(1, start_batch=1))
  np.testing.assert_array_equal(resumed["index"], whole[1]["index"][2:])
  with pytest.raises(ValueError, match="drop_remainder"):
    InputPipeline(src, PipelineConfig(batch_size=4, shard_count=2, drop_remainder=False))
  with pytest.raises(ValueError, match="divisible"):
    InputPipeline(src, PipelineConfig(batch_size=5, shard_count=2))
