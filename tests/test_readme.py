"""Every Python block of README.md runs, in order, in one namespace, as a reader would paste them.

A block may end a line with `# -> VALUE`: the expression before it must evaluate to VALUE.
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """`(first line number, source)` of every ```python block."""
    blocks, lines = [], text.splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            blocks.append((start + 1, "\n".join(lines[start:number - 1])))
            start = None
    return blocks


def _with_checks(source: str) -> str:
    """Turns `expression  # -> value` lines into assertions."""
    checked = []
    for line in source.splitlines():
        match = re.match(r"^(\s*)(.+?)\s+# -> (.+)$", line)
        if match:
            indent, expression, expected = match.groups()
            line = f"{indent}assert ({expression}) == ({expected}), ({expression})"
        checked.append(line)
    return "\n".join(checked)


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text())) >= 3


@pytest.mark.slow
def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes stays in the test's folder
    namespace: dict = {"__name__": "__readme__"}
    for line, source in python_blocks(README.read_text()):
        code = compile(_with_checks(source), f"README.md:{line}", "exec")
        exec(code, namespace)  # noqa: S102 - the README's own examples
