"""The one text-table formatter: aligned plain text for the terminal (bench, the recipe list in ``train --help``) and
GitHub Markdown for the reports (the experiments' summaries, ``selftest.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_table"]


def format_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], *, align: str | None = None,
                 markdown: bool = False, pad: bool = True, rule: bool = False, indent: str = "") -> str:
    """``header`` and ``rows`` (cells ``str()``-ed) as a table, one line per row.

    ``align``: one letter per column, ``l`` or ``r`` (default: the first column left, the others right, numbers).
    Plain text: columns two spaces apart, each as wide as its widest cell, trailing spaces dropped; ``rule`` puts a
    line of dashes under the header, ``indent`` opens every line. ``markdown``: a GitHub table, padded so that it
    lines up as text too, its separator row carrying the alignment; ``pad=False`` leaves the cells unpadded, so a
    row's text does not depend on the other rows (tests and readers search selftest.md for a row).
    """
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align is one letter, 'l' or 'r', for each of the {len(header)} columns, not {align!r}")
    for row in cells[1:]:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells where the header has {len(header)}: {row}")
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    if markdown:  # the separator row: '---' at least, ':' on the right for a right-aligned column
        widths = [max(3, w) if pad else 0 for w in widths]
        cells.insert(1, [("-" * (w - 1) + (":" if a == "r" else "-")) if pad else ("---:" if a == "r" else "---")
                         for w, a in zip(widths, align, strict=True)])
    lines = []
    for row in cells:
        aligned = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True)]
        lines.append("| " + " | ".join(aligned) + " |" if markdown else (indent + "  ".join(aligned)).rstrip())
    if rule and not markdown:
        lines.insert(1, indent + "-" * (len(lines[0]) - len(indent)))
    return "\n".join(lines)
