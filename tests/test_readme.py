"""The README's library example runs as written."""

import re

from tests.conftest import REPO


def _blocks():
  return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_reconstruct_example_runs():
  """The first example: dff3d.reconstruct on the astronaut (needs the test extra's dlib and
  scikit-image)."""
  import pytest  # pylint: disable=g-import-not-at-top
  from dff3d import detect  # pylint: disable=g-import-not-at-top
  pytest.importorskip("skimage.data", reason="scikit-image (test extra) missing")
  if not detect.detector_available():
    pytest.skip("dlib / face_recognition_models (test extra) missing")
  blocks = _blocks()
  assert "dff3d.reconstruct(" in blocks[0]
  exec(compile(blocks[0], "README.md", "exec"), {})


def test_readme_library_example_runs():
  blocks = _blocks()
  assert len(blocks) >= 2, "README has no building-block example"
  exec(compile(blocks[1], "README.md", "exec"), {})
