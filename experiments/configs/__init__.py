"""Experiment configurations: each module has get_config() -> dff3d.train.TrainConfig."""

import importlib


def get_config(name: str):
  """The TrainConfig of experiments/configs/<name>.py."""
  try:
    module = importlib.import_module(f"experiments.configs.{name}")
  except ModuleNotFoundError:
    raise ValueError(f"unknown config {name!r} (experiments/configs/{name}.py not found)") from None
  return module.get_config()
