"""The documentation site (issue 21): every ``python`` block of docs/ runs as written and prints what its comments
say, every public name has an API reference entry, and every file the site includes from elsewhere (README
sections, bench/RESULTS.md, ARCHITECTURE.md) is there. `make docs` builds the site itself (mkdocs --strict)."""

from __future__ import annotations

import doctest
import importlib.util
import pathlib
import re

import pytest

import meancache

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
#: a ```python block, and whether the line before it (blank lines aside) is a ``<!-- no-test ... -->`` marker
FENCE = re.compile(r"(?P<before>[^\n]*)\n(?:[ \t]*\n)*```python\n(?P<code>.*?)```", re.S)
NO_TEST = re.compile(r"^\s*<!--\s*no-test\b.*-->\s*$")


def _blocks():
    out = []
    for page in PAGES:
        text = "\n" + page.read_text(encoding="utf-8")
        for i, m in enumerate(FENCE.finditer(text)):
            out.append((page.relative_to(ROOT).as_posix(), i, m.group("code"), bool(NO_TEST.match(m.group("before")))))
    return out


BLOCKS = _blocks()
RUN = [(page, i, code) for page, i, code, skip in BLOCKS if not skip]


def _lines(out: str) -> list[str]:
    return out.strip().splitlines()


#: unique text of a block -> check of what it printed (the numbers its comments state)
CHECKS = {
    "psnr(fast, full)": lambda out: _lines(out)[0] == "10"
    and re.fullmatch(r"\d+\.\d dB against the full run", _lines(out)[1]),
    "stats.calls_saved": lambda out: _lines(out) == ["10 20", "C.C.CC......C......C.....C...C"],
    "flow.calls)": lambda out: _lines(out) == ["10"],
    "budget=12, sigmas=sigmas)": lambda out: _lines(out) == ["12"],
    "MeanCacheConfig(budget=4": lambda out: _lines(out) == ["0"],
    "s.pattern()[0]": lambda out: _lines(out)[:2]
    == ["13 CCCC.C...C.....C......C......C......C......C...C.C", "('CC..C....C', '--22-LLLL-')"]
    and _lines(out)[2].startswith("{'digits-joint': [25, 17, 10, 8, 6], 'digits': [25, 17, 10],"),
    "Schedule.default(10, 50).pattern()": lambda out: _lines(out)
    == ["('C.C..C.C...C.......C.......C.......C.......C.....C', '-L-LL-L-LLL-LLLLLLL-LLLLLLL-LLLLLLL-LLLLLLL-LLLLL-')"],
    'rec.save("flow-20.pt")': lambda out: _lines(out)[0] == "[6, 10]"
    # the last step computed, or left to an open tail
    and re.fullmatch(r"\('C[C.]{19}', '-[-0-9lqcLQC]{19}'\)", _lines(out)[1]),
    "digits-16-B6.json": lambda out: _lines(out) == ["6"],
    "refine=200": lambda out: re.fullmatch(r"8 \S.* (True|False)", _lines(out)[0]),
    'mode="online")': lambda out: _lines(out) == ["True True"],
    "OnlinePlan(12, 50)": lambda out: re.fullmatch(r"True C[C.]{48}C", _lines(out)[0]),
    "ops.skip_step": lambda out: _lines(out)[-1] == "torch.Size([4, 8])",
}


def test_the_docs_have_runnable_examples_and_few_skipped_ones():
    assert len(RUN) >= 12
    skipped = [(page, i) for page, i, _, skip in BLOCKS if skip]
    assert 1 <= len(skipped) <= 3, skipped


@pytest.mark.parametrize("marker", sorted(CHECKS))
def test_every_check_has_exactly_one_block(marker):
    assert sum(marker in code for _, _, code in RUN) == 1, marker


@pytest.mark.parametrize("page,index,code", RUN, ids=[f"{page}:{i}" for page, i, _ in RUN])
def test_docs_example_runs(page, index, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(ROOT / page), "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    for marker, check in CHECKS.items():
        if marker in code:
            assert check(printed), f"{page} block {index} printed:\n{printed}"


def _reference_entries() -> dict[str, list[str] | None]:
    """``::: identifier`` entries of the API reference pages, with their ``members:`` list when one is given."""
    entries: dict[str, list[str] | None] = {}
    for page in sorted((DOCS / "reference").glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^::: ([\w.]+)\s*$", line)
            if not m:
                continue
            members = None
            j = i + 1
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                if lines[j].strip() == "members:":
                    members = []
                elif members is not None and re.match(r"^\s+- (\w+)\s*$", lines[j]):
                    members.append(lines[j].split("-", 1)[1].strip())
                elif members is not None and lines[j].strip():
                    break
                j += 1
            entries[m.group(1)] = members
    return entries


def test_every_public_name_has_an_api_reference_entry():
    entries = _reference_entries()
    missing = []
    for name in meancache.__all__:
        if f"meancache.{name}" in entries:
            continue
        # or inside a module entry that renders it: the module it is defined in, listing it (or all its public names)
        home = getattr(getattr(meancache, name), "__module__", None)
        listed = entries.get(home, False)
        if listed is False or (listed is not None and name not in listed):
            missing.append(name)
    assert not missing, f"no API reference entry (docs/reference/*.md) for: {missing}"


def test_every_api_reference_entry_is_a_real_object():
    for ident in _reference_entries():
        module, _, attr = ident.rpartition(".")
        try:
            obj = importlib.import_module(ident)
        except ImportError:
            obj = getattr(importlib.import_module(module), attr, None)
        assert obj is not None, ident


def test_every_included_file_and_section_exists():
    """The site includes README sections, bench/RESULTS.md and ARCHITECTURE.md (pymdownx.snippets): a README edit
    that drops a section marker must fail here, not only in `make docs`."""
    found = 0
    for page in PAGES:
        for path, section in re.findall(r'^--8<-- "([^":]+)(?::(\w+))?"\s*$', page.read_text(encoding="utf-8"), re.M):
            found += 1
            target = ROOT / path
            assert target.is_file(), f"{page.name} includes {path}, which does not exist"
            if section:
                text = target.read_text(encoding="utf-8")
                for edge in ("start", "end"):
                    assert f"--8<-- [{edge}:{section}]" in text, f"{path} lacks the [{edge}:{section}] marker"
    assert found >= 4


def test_every_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        assert page.relative_to(DOCS).as_posix() in config, f"{page} is not in mkdocs.yml's nav"


def _extension():
    pytest.importorskip("griffe")  # the docs extra (make docs installs it)
    spec = importlib.util.spec_from_file_location("_griffe_docstrings", DOCS / "_griffe_docstrings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_rewrite_for_the_site():
    ext = _extension()
    assert doctest.testmod(ext).failed == 0
    text = ext.rewrite(
        "Sum.\n\nArgs:\n    a, b: two numbers,\n        any.\n    c: one.\n\nExample:\n    >>> 1 + 1\n    2\n"
    )
    assert "    a: two numbers,\n        any.\n    b: two numbers,\n        any.\n    c: one." in text
    assert "Examples:\n    >>> 1 + 1" in text and "Example:" not in text
    assert ext.rewrite("See :func:`~meancache.calibrate` and :class:`Recording`.") == "See `calibrate` and `Recording`."
    table = ext.rewrite("  ====  ====\n  a     b\n  ====  ====\n  1     2\n  ====  ====")
    assert table.splitlines() == ["  | a | b |", "  |---|---|", "  | 1 | 2 |"]
