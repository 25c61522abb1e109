"""The README's library example runs as written."""

import re

from tests.conftest import REPO


def test_readme_library_example_runs():
  text = (REPO / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  exec(compile(blocks[0], "README.md", "exec"), {})
