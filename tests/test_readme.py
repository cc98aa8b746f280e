"""Every Python example in the README runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    # the comments after print(...) calls state what the example shows; check the numbers that are stated
    if "flow.calls" in code:
        assert printed.strip().splitlines()[0] == "10"
    if "s.pattern()" in code:
        assert printed.splitlines()[0] == "13 CCCC.C...C.....C......C......C......C......C...C.C"
    if "load_pipeline" in code:
        assert printed.strip().splitlines()[-1] == "10"
    if "model.meancache.stats" in code:
        assert "model calls: 10 made, 40 saved of 50" in printed
