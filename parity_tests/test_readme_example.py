"""The README's "Verify your own port" example runs as printed, and prints what the README says it does."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    return text[start:text.index("\n## ", start + 1)]


def test_the_verify_your_own_port_example_runs_as_the_readme_says():
    section = _section("Verify your own port")
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})  # noqa: S102 - our own README
    lines = printed.getvalue().splitlines()
    # the five one-line prints, in order, then the last report (its table)
    assert lines[0] == "True"
    assert lines[1] == "conv2"
    assert "conv2: output shifted by one pixel at stride 2: Flax pads ((0, 1), (0, 1))" in lines[2]
    assert lines[3] == "True"
    assert lines[4] == "step 1: conv1.weight"
    # the README quotes the end of that report
    quoted = re.search(r"The last report ends:\n\n```\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert lines[-len(quoted):] == quoted
