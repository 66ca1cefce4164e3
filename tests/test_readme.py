"""The README's examples marked `<!-- test: runs on the CPU -->` run as written (on the CPU here)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"<!-- test: runs on the CPU -->\n```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_marks_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code):
    exec(compile(code, str(README), "exec"), {})
