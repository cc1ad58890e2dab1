"""The run summary: one row per variant joining accuracy and size with latency on Triton."""

import json
import os
from pathlib import Path
from typing import Any

SUMMARY_SCHEMA = "torchship.summary/v1"


def build_summary(onnx_dir: str, measured: dict[str, Any]) -> dict[str, Any]:
    """Join `onnx_dir/variants.json` with a `benchmark_repository` result, one row per variant."""
    variants = json.loads((Path(onnx_dir) / "variants.json").read_text())
    levels = sorted({int(r["concurrency"]) for r in measured["results"]})
    rows = []
    for variant in variants:
        row: dict[str, Any] = {
            "variant": variant["name"],
            "test_accuracy": variant["test_accuracy"],
            "onnx_size_bytes": variant["onnx_size_bytes"],
            "parity_max_abs_diff": variant["parity"]["max_abs_diff"],
        }
        for result in measured["results"]:
            if result["model"] != variant["name"]:
                continue
            level = int(result["concurrency"])
            for key in ("p50_ms", "p99_ms", "throughput_rps", "errors"):
                row[f"{key}_c{level}"] = result[key]
        rows.append(row)
    return {
        "schema": SUMMARY_SCHEMA,
        "concurrency": levels,
        "batch_size": measured.get("batch_size", 1),
        "protocol": measured.get("protocol", "grpc"),
        "rows": rows,
        "benchmark": measured,
    }


def _columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(header, row key, format) for each column of the summary table."""
    columns = [("variant", "variant", "{}"), ("test acc", "test_accuracy", "{:.4f}"),
               ("ONNX KiB", "onnx_size_bytes", "kib")]
    for level in summary["concurrency"]:
        columns += [
            (f"p50 ms c{level}", f"p50_ms_c{level}", "{:.2f}"),
            (f"p99 ms c{level}", f"p99_ms_c{level}", "{:.2f}"),
            (f"req/s c{level}", f"throughput_rps_c{level}", "{:.0f}"),
        ]
    return columns


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if fmt == "kib":
        return f"{value / 1024:.1f}"
    return fmt.format(value)


def format_table(summary: dict[str, Any]) -> str:
    """The summary as an aligned plain-text table, as `torchship run` prints it."""
    columns = _columns(summary)
    cells = [[header for header, _, _ in columns]]
    cells += [[_cell(row, key, fmt) for _, key, fmt in columns] for row in summary["rows"]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join(lines)


def format_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table, for the KFP Markdown artifact the UIs render."""
    columns = _columns(summary)
    lines = [
        "# torchship run summary",
        "",
        (f"Triton over {summary['protocol']}, batch size {summary['batch_size']}, "
         f"concurrency {', '.join(map(str, summary['concurrency']))}."),
        "",
        "| " + " | ".join(header for header, _, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in columns) + " |"
              for row in summary["rows"]]
    return "\n".join(lines) + "\n"


def _write_atomic(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_summary(summary: dict[str, Any], json_path: str, markdown_path: str) -> None:
    """Write the summary as JSON (for machines) and Markdown (for the pipeline UIs)."""
    _write_atomic(json_path, json.dumps(summary, indent=2))
    _write_atomic(markdown_path, format_markdown(summary))
