"""Shared test fixtures: paths to the optional real data in ../shared/data."""

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ICT_DIR = SHARED_DATA / "ict_face_model"
AFLW_SAMPLE_DIR = SHARED_DATA / "aflw2000_3d_sample"


def require(path):
  """Skip the calling test with a clear reason when optional shared data is absent."""
  if not pathlib.Path(path).exists():
    pytest.skip(f"{path} not present (the shared data folder sits beside a development "
                "checkout; fresh clones run without it)")
  return pathlib.Path(path)
