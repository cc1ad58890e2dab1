"""Tables as people read them: aligned plain text for the terminal, Markdown for the pipeline UIs.
The variant table, the run summary and the serving search's candidates all render through here."""

from __future__ import annotations

import html
import re
from collections.abc import Collection, Sequence
from typing import Any

__all__ = ["PAGE_STYLE", "cell", "escape", "markdown_table", "text_table"]

# What every HTML page here starts its style sheet with (the gate's report, the search's).
PAGE_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #1f2328; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }
th { background: #f6f8fa; } tr.chosen td { background: #dafbe1; font-weight: 600; }
.note { color: #57606a; font-size: 13px; }
"""


def escape(value: Any) -> str:
    """Text for an HTML page; a URL's scheme is dropped so the page holds no link to anywhere."""
    return html.escape(re.sub(r"\b[a-z][a-z0-9+.-]*://", "", str(value)))


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]],
               left: Collection[int] = (0,)) -> list[str]:
    """Aligned lines: the columns in ``left`` flush left (names, reasons), the others flush
    right (numbers), two spaces between; no trailing blanks."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    return ["  ".join(text.ljust(width) if i in left else text.rjust(width)
                      for i, (text, width) in enumerate(zip(line, widths))).rstrip()
            for line in [header, *rows]]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   left: Collection[int] = (0,)) -> list[str]:
    """A Markdown table, aligned as ``text_table`` aligns its columns; a ``|`` in a cell is
    escaped."""
    rule = "|" + "|".join(":---" if i in left else "---:" for i in range(len(header))) + "|"
    return ["| " + " | ".join(header) + " |", rule,
            *("| " + " | ".join(text.replace("|", "\\|") for text in line) + " |"
              for line in rows)]


def cell(value: Any, spec: str = "{:.1f}") -> str:
    """A number formatted with ``spec``; ``-`` for a value that is missing; other values as text."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return spec.format(value)
