"""The variant table: what export measured for each variant, as aligned text, Markdown and flat
KFP metrics. The gate shows the same table with its choice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchship.components.report.tables import markdown_table, text_table

__all__ = ["TABLE_COLUMNS", "format_variant_table", "variant_metrics"]

# (header, row key, format) of each column of the variant table.
TABLE_COLUMNS = [
    ("variant", "name", "{}"),
    ("test acc", "onnx_test_accuracy", "{:.4f}"),
    ("drop pt", "acc_drop_pt", "{:+.2f}"),
    ("params", "n_parameters", "{:,}"),
    ("non-zero", "nonzero_parameters", "{:,}"),
    ("sparsity", "sparsity", "{:.2f}"),
    ("ONNX KiB", "onnx_size_bytes", "kib"),
    ("zlib KiB", "compressed_size_bytes", "kib"),
    ("size x", "size_ratio", "{:.2f}"),
    ("b1 ms", "latency_b1_ms", "{:.3f}"),
    ("b64 ms", "latency_b64_ms", "{:.3f}"),
    ("b64 x", "speedup_b64", "{:.2f}"),
    ("top-1 agree", "fp32_top1_agreement", "{:.4f}"),
    ("max abs diff", "fp32_max_abs_diff", "{:.3g}"),
]


def format_variant_table(
    rows: list[dict[str, Any]], markdown: bool = False,
    extra: tuple[str, Callable[[dict[str, Any]], str]] | None = None,
    marked: Callable[[dict[str, Any]], bool] | None = None,
) -> str:
    """The variant table as aligned plain text (or Markdown), one column per measure any row has.
    ``extra`` adds a last column (its header, and its text per row); ``marked`` rows get a ``*``
    after their name."""
    columns = [column for column in TABLE_COLUMNS
               if any(row.get(column[1]) is not None for row in rows)]
    header = [title for title, _, _ in columns]
    cells = []
    for row in rows:
        line = [_cell(row.get(key), fmt) for _, key, fmt in columns]
        if marked is not None and marked(row):
            line[0] += " *"
        if extra is not None:
            line.append(extra[1](row))
        cells.append(line)
    left = {0}
    if extra is not None:
        header.append(extra[0])
        left.add(len(header) - 1)
    render = markdown_table if markdown else text_table
    return "\n".join(render(header, cells, left))


def variant_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The variant table as flat `<variant>_<metric>` numbers, for a KFP Metrics artifact."""
    metrics: dict[str, float] = {}
    for row in rows:
        for _, key, _ in TABLE_COLUMNS[1:]:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{row['name']}_{key}"] = float(value)
    return metrics


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "kib":
        return f"{value / 1024:.1f}"
    return fmt.format(value)
