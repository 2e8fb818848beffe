"""Every Python example in README.md runs as written, on both cores."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, relay_core, capsys):
    exec(compile(BLOCKS[index], "README.md[%d]" % index, "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    # Each example prints what its comments promise.
    for expected in re.findall(r"print\(.*?\)\s*#\s*(.+)", BLOCKS[index]):
        literal = expected.split(":")[0].strip()
        if literal.startswith(("[", "'")) or literal.isdigit():
            assert literal in out, (literal, out)
