"""Shared test fixtures: paths to the optional real data in ../shared/data."""

import importlib.util
import math
import os
import pathlib
import shutil
import tempfile

import numpy as np
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


# Files that take minutes (measured, `--durations`), longest first: collected first, they start
# first on the xdist workers, so that the workers finish together instead of one idling while
# the other runs the last long file alone.
SLOW_FILES = ("test_dff_paths.py", "test_rasterizer.py", "test_train_multiprocess.py",
              "test_train.py", "test_reconstruct.py", "test_real_training.py",
              "test_dff_real_pairs.py", "test_train_multidevice.py", "test_fitting.py",
              "test_imagewise.py", "test_render.py", "test_evaluate.py", "test_dff_training.py",
              "test_synthetic.py", "test_readme.py", "test_models.py")


def pytest_configure(config):
  """Settings of every JAX process of the run, made in the controller (the xdist workers and
  the processes that tests start inherit its environment; a worker does nothing here)."""
  if "PYTEST_XDIST_WORKER" in os.environ:
    return
  _fast_compiles()
  _compilation_cache(config)


def _fast_compiles():
  """XLA's backend optimisations off for the whole run (JAX_DISABLE_MOST_OPTIMIZATIONS=1
  unless the caller set it): compilations dominate the suite, and without the optimisation
  passes they take much less time for the same semantics. Measured here (2 cores): the full
  suite 35:46 -> 20:57 (with the cache below), test_train alone 310 -> 249 s. What the suite
  does not exercise is XLA's optimised code; the benchmarks and the job run that."""
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def _compilation_cache(config):
  """One persistent XLA compilation cache for the whole run, shared by the xdist workers and the
  processes the tests start (CLI runs, training subprocesses): a program compiled once, by
  any of them, is read from disk by the others and again after `release_compiled_code` has
  dropped it. The cache lives in a fresh temporary folder removed at the end, so every run
  (CI's included) starts cold and measures its own compilations. A finite size makes JAX lock
  the folder (filelock) around each read and write, which concurrent workers need. A cache the
  caller configured (JAX_COMPILATION_CACHE_DIR) is used as it is."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or importlib.util.find_spec("filelock") is None:
    return
  folder = tempfile.mkdtemp(prefix="dff3d-xla-cache-")
  config.dff3d_xla_cache = folder
  os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"


def pytest_unconfigure(config):
  folder = getattr(config, "dff3d_xla_cache", None)
  if folder:
    shutil.rmtree(folder, ignore_errors=True)
    del os.environ["JAX_COMPILATION_CACHE_DIR"]


def pytest_collection_modifyitems(items):
  """Slow files first (SLOW_FILES order), the rest as collected; tests within a file keep
  their order (the sort is stable)."""
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="module", autouse=True)
def release_compiled_code():
  """Drops JAX's compilation caches after every test module. XLA:CPU keeps each compiled
  executable's code in its own memory mappings (about three per code section) and Linux caps
  a process at vm.max_map_count mappings (65,530 by default): the whole suite in one process
  compiled past that and XLA aborted mid-compile (exit 134). Clearing per module keeps the
  count at what one module needs."""
  yield
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()


def np_rotation(angles):
  """Float64 reference of camera.rotation_matrix: R = Rz(roll) Ry(yaw) Rx(pitch) from
  (pitch, yaw, roll) radians."""
  p, y, r = (float(a) for a in angles)
  rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
  ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
  rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
  return rz @ ry @ rx
