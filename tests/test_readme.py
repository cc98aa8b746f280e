"""The README (issue 21): every Python example runs as written and prints what its comments say, it fits on two
screens, its links and anchors resolve, its headline figures are the ones bench/RESULTS.md opens with, and it
names every environment variable the code reads."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
RESULTS = ROOT / "bench" / "RESULTS.md"

#: unique text of a block -> check of what it printed (the numbers its comments state)
CHECKS = {
    "load_pipeline": lambda out: out.strip().splitlines()[-1] == "10",
    "model.meancache.stats": lambda out: "model calls: 10 made, 40 saved of 50" in out,
}


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("marker", sorted(CHECKS))
def test_every_check_has_exactly_one_block(marker):
    assert sum(marker in code for code in BLOCKS) == 1, marker


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    for marker, check in CHECKS.items():
        if marker in code:
            assert check(printed), printed


def test_readme_fits_on_two_screens():
    assert len(TEXT.splitlines()) <= 150


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub (and the site, configured alike in mkdocs.yml) gives the headings of ``markdown``:
    lower case, punctuation but ``-`` and ``_`` dropped, each space a ``-``; a repeated one gets ``-1``, ``-2``."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6} (.+?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_readme_links_and_anchors_resolve():
    links = re.findall(r"\]\(([^)\s]+)\)", TEXT)
    assert links
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.exists(), f"README links to {link}: no such file"
        if anchor:
            assert anchor in github_anchors(target.read_text(encoding="utf-8")), f"README links to {link}: no anchor"


def _table(text: str, heading: str) -> list[str]:
    """The rows of the first table after ``heading``."""
    section = text[text.index(heading):]
    rows = re.findall(r"^\|.*\|\s*$", section[: section.index("\n## ", 1) if "\n## " in section[1:] else None], re.M)
    return [r for r in rows[2:]]


def _figures(rows: list[str]) -> list[str]:
    body = " ".join(re.sub(r"\]\([^)]*\)", "]", r) for r in rows)
    return re.findall(r"\d+\.\d+", body)


def test_headline_figures_are_the_results_summary():
    """The README's headline table states figures of bench/RESULTS.md's summary table and no other: the two
    cannot drift apart unnoticed."""
    ours = _figures(_table(TEXT, "## Headline measurements"))
    assert len(ours) >= 9
    summary = _figures(_table(RESULTS.read_text(encoding="utf-8"), "## Summary"))
    missing = [f for f in ours if f not in summary]
    assert not missing, f"README headline figures not in bench/RESULTS.md's summary table: {missing}"
    assert "not measured" in " ".join(_table(TEXT, "## Headline measurements"))


#: variables the scripts read that every POSIX tool reads too
STANDARD = {"TMPDIR"}


def _variables_read() -> set[str]:
    names: set[str] = set()
    py = [*ROOT.glob("meancache/**/*.py"), ROOT / "setup.py", ROOT / "conftest.py", *ROOT.glob("tools/**/*.py")]
    for f in py:
        text = f.read_text(encoding="utf-8")
        names |= set(re.findall(r"environ(?:\.get|\.setdefault|\.pop)?[(\[]\s*[\"']([A-Z][A-Z0-9_]*)[\"']", text))
        names |= set(re.findall(r"getenv\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']", text))
        names |= set(re.findall(r"_env_flag\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']", text))
    for f in ROOT.glob("tools/**/*.sh"):
        names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-?=]", f.read_text(encoding="utf-8")))
    names |= set(re.findall(r"^([A-Z][A-Z0-9_]*) \?=", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    return names - STANDARD


def test_every_environment_variable_is_in_the_readme():
    section = TEXT[TEXT.index("## Environment variables"):]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]*)`", section))
    read = _variables_read()
    assert {"MEANCACHE_BACKEND", "TORCH_CUDA_ARCH_LIST", "PYTHON"} <= read
    assert not read - named, f"environment variables read by the code but not in the README: {sorted(read - named)}"
