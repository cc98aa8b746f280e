"""Griffe extension of the documentation build (mkdocs.yml, mkdocstrings' ``extensions``): reads meancache's
docstrings as they are written and hands the Google-style parser what it understands. The docstrings stay the
source; nothing here changes the package.

* ``Example:`` (and ``Example::``) sections, the package's spelling, become ``Examples:``, so their ``>>>`` lines render as code
  rather than as an admonition of Markdown text.
* ``a, b: text`` entries of an ``Args:`` or ``Attributes:`` section (two parameters described together) become
  one entry per name with the same text, so each name is checked against the signature.
* Sphinx roles (``:func:`record```, ``:class:`~meancache.Schedule```) become inline code (``record``,
  ``Schedule``).
* reST simple tables (``====`` borders) become Markdown tables.
"""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Examples?::?\s*$")
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes):\s*$")
_MULTI = re.compile(r"^(\s+)([A-Za-z_]\w*(?:,\s*[A-Za-z_]\w*)+)(\s*(?:\([^)]*\))?:\s.*)$")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
_BORDER = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _role(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _split_entries(lines: list[str]) -> list[str]:
    out: list[str] = []
    section = None  # indentation of the current Args/Attributes header
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _SECTION.match(line)
        if header:
            section = _indent(line)
            out.append(line)
            i += 1
            continue
        if section is not None and line.strip() and _indent(line) <= section:
            section = None
        multi = _MULTI.match(line) if section is not None else None
        if multi:
            indent, names, rest = multi.groups()
            body = []
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > len(indent)):
                body.append(lines[j])
                j += 1
            while body and not body[-1].strip():
                j -= 1
                body.pop()
            for name in re.split(r",\s*", names):
                out.append(f"{indent}{name}{rest}")
                out.extend(body)
            i = j
            continue
        out.append(line)
        i += 1
    return out


def _tables(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        border = _BORDER.match(lines[i])
        if not border:
            out.append(lines[i])
            i += 1
            continue
        spans = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[i])]
        ends = [j for j in range(i + 1, len(lines)) if lines[j].strip() == lines[i].strip()]
        if len(ends) < 2:
            out.append(lines[i])
            i += 1
            continue
        header_end, table_end = ends[0], ends[-1]

        def cells(row: str) -> str:
            parts = []
            for k, (start, _) in enumerate(spans):
                stop = spans[k + 1][0] if k + 1 < len(spans) else None
                parts.append(row[start:stop].strip().replace("|", "\\|"))
            return "| " + " | ".join(parts) + " |"

        indent = border.group(1)
        header = [cells(r) for r in lines[i + 1 : header_end] if r.strip()]
        body = [cells(r) for r in lines[header_end + 1 : table_end] if r.strip() and r.strip() != lines[i].strip()]
        out.append(indent + header[0] if header else indent)
        out.append(indent + "|" + "---|" * len(spans))
        out.extend(indent + row for row in body)
        i = table_end + 1
    return out


def rewrite(text: str) -> str:
    """The docstring ``text`` as the Google-style parser and Markdown expect it (see the module docstring).

    Example:
        >>> print(rewrite("Args:\\n    a, b: two :class:`~x.Y` values,\\n        any.\\nExample:"))
        Args:
            a: two `Y` values,
                any.
            b: two `Y` values,
                any.
        Examples:
    """
    lines = [_EXAMPLE.sub(r"\1Examples:", line) for line in text.splitlines()]
    lines = _tables(_split_entries(lines))
    return _ROLE.sub(_role, "\n".join(lines))


class MeancacheDocstrings(griffe.Extension):
    """Rewrites every docstring once, before mkdocstrings parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
