"""Training loop: it learns, and a killed run resumes with the losses of an uninterrupted one."""

import json
import os

import numpy as np
import pytest

from dff3d import train
from experiments import configs


def tiny_config():
  # 32 px crops, a very narrow ResNet, 4 batches per epoch, no DFF (keeps the test fast).
  return configs.get_config("cpu").replace(
      image_size=32, width=0.125, batch_size=4, synthetic_train=16, synthetic_val=8,
      use_dff=False, log_every_steps=1, eval_every_steps=0, decay_epoch=1, num_epochs=3,
      land_error_start_epoch=1)


@pytest.fixture(scope="module")
def sources():
  return (train.synthetic_pool(16, 40, seed=0, chunk=16),
          train.synthetic_pool(8, 40, seed=1, chunk=8))


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_resume_continues_with_the_same_losses(tmp_path, sources):
  cfg = tiny_config()
  # 6 steps straight through (crossing the epoch boundary after step 4, where L_land_error
  # switches on and the learning rate decays)...
  train.train_and_evaluate(cfg, str(tmp_path / "a"), max_steps=6, sources_override=sources,
                           verbose=False)
  # ... against 3 steps, a stop mid-epoch, and a resumed run to step 6.
  train.train_and_evaluate(cfg, str(tmp_path / "b"), max_steps=3, sources_override=sources,
                           verbose=False)
  train.train_and_evaluate(cfg, str(tmp_path / "b"), max_steps=6, sources_override=sources,
                           verbose=False)
  a = {r["step"]: r for r in read_metrics(tmp_path / "a") if "loss" in r}
  b = {r["step"]: r for r in read_metrics(tmp_path / "b") if "loss" in r}
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in range(1, 7):
    for key in ("loss", "land", "land_error", "photo", "reg"):
      np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, err_msg=f"{key}@{step}")
  assert a[5]["land_error"] > 0 and a[4]["land_error"] == 0  # from the second epoch on
  assert a[5]["lr"] == pytest.approx(cfg.decayed_learning_rate)
  for r in a.values():
    assert {"step", "epoch", "loss", "land", "photo", "reg", "lr"} <= set(r)
  finals = [r for r in read_metrics(tmp_path / "a") if r.get("final")]
  assert finals and 0 < finals[-1]["val_nme"] < 1


def test_config_json_roundtrip():
  cfg = configs.get_config("paper")
  assert train.config_from_json(train.config_to_json(cfg)) == cfg
  with pytest.raises(ValueError, match="unknown config"):
    configs.get_config("nope")
