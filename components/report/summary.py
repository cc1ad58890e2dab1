"""The run summary: one row per variant joining accuracy, size and parity with latency on Triton.

``build_summary`` joins ``onnx_dir/variants.json`` (export, and the compress stage's measures when
present) with a benchmark result; ``format_table`` prints it, ``format_markdown`` renders it for
the KFP ``Markdown`` artifact, ``write_summary`` writes both, and ``html_report.write_html_report``
the self-contained HTML report. A summary may carry a gate record (``summary["gate"]``) and a
regression record (``summary["regression"]``); both are shown when present.

Summary JSON, schema ``torchship.summary/v1`` (extended, never renamed): ``concurrency``,
``batch_size``, ``batch_sizes``, ``protocol``, ``rows`` and ``benchmark`` (the benchmark result as
is). Each row: ``variant``, ``test_accuracy``, ``onnx_size_bytes``, ``parity_max_abs_diff``,
``parity_passed``, ``parity_top1_agreement`` (when export recorded them), the compress stage's
measures when present (``OPTIONAL_VARIANT_KEYS``), and per level ``<metric>_c<c>`` for the first
batch size (``<metric>_c<c>_b<b>`` for others), metric in ``LEVEL_KEYS``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torchship.components.contracts import SKIPPED_JSON
from torchship.components.files import read_json, write_json, write_text
from torchship.components.report.explain import (
    candidate_rows,
    chosen_line,
    constraint_lines,
    environment_rows,
    objective_line,
)
from torchship.components.report.tables import cell, markdown_table, text_table

SUMMARY_SCHEMA = "torchship.summary/v1"
LEVEL_KEYS = ("p50_ms", "p95_ms", "p99_ms", "throughput_rps", "errors", "stable")
# Measures the compress stage may add to variants.json rows, in the order the table shows them.
OPTIONAL_VARIANT_KEYS = (
    "kind", "precision", "sparsity", "n_parameters", "acc_drop_pt", "compressed_size_bytes",
    "size_ratio", "fp32_top1_agreement",
)
_LATENCY_KEY = re.compile(r"^latency_b(\d+)_ms$")


def build_summary(onnx_dir: str, measured: dict[str, Any]) -> dict[str, Any]:
    """Join `onnx_dir/variants.json` with a benchmark result, one row per variant."""
    variants = json.loads((Path(onnx_dir) / "variants.json").read_text())
    results = measured.get("results", [])
    levels = sorted({int(r["concurrency"]) for r in results})
    batch_sizes = list(measured.get("batch_sizes") or [measured.get("batch_size", 1)])
    primary = int(batch_sizes[0]) if batch_sizes else 1
    rows = []
    for variant in variants:
        parity = variant.get("parity") or {}
        row: dict[str, Any] = {
            "variant": variant["name"],
            "test_accuracy": variant.get("test_accuracy"),
            "onnx_size_bytes": variant.get("onnx_size_bytes"),
            "parity_max_abs_diff": parity.get("max_abs_diff"),
        }
        if "passed" in parity:
            row["parity_passed"] = bool(parity["passed"])
        if "top1_agreement" in parity:
            row["parity_top1_agreement"] = parity["top1_agreement"]
        for key in OPTIONAL_VARIANT_KEYS:
            if variant.get(key) is not None:
                row[key] = variant[key]
        for key in sorted((k for k in variant if _LATENCY_KEY.match(k)),
                          key=lambda k: int(_LATENCY_KEY.match(k).group(1))):
            row[key] = variant[key]
        for result in results:
            if result["model"] != variant["name"]:
                continue
            level = int(result["concurrency"])
            size = int(result.get("batch_size", primary))
            suffix = f"_c{level}" + ("" if size == primary else f"_b{size}")
            for key in LEVEL_KEYS:
                if key in result:
                    row[f"{key}{suffix}"] = result[key]
        rows.append(row)
    return {
        "schema": SUMMARY_SCHEMA,
        # Variants asked for that do not apply to this model, with the reason.
        "skipped": read_json(Path(onnx_dir) / SKIPPED_JSON) or [],
        "concurrency": levels,
        "batch_size": primary,
        "batch_sizes": batch_sizes,
        "protocol": measured.get("protocol", "grpc"),
        "rows": rows,
        "benchmark": measured,
    }


def table_columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(header, row key, format) for each column of the summary table."""
    rows = summary["rows"]
    columns = [("variant", "variant", "{}"), ("test acc", "test_accuracy", "{:.4f}"),
               ("ONNX KiB", "onnx_size_bytes", "kib")]
    optional = [
        ("acc drop pt", "acc_drop_pt", "{:+.2f}"),
        ("gzip KiB", "compressed_size_bytes", "kib"),
        ("sparsity", "sparsity", "{:.2f}"),
        ("parity max diff", "parity_max_abs_diff", "{:.1e}"),
        ("parity", "parity_passed", "passed"),
    ]
    latency_keys = sorted({k for row in rows for k in row if _LATENCY_KEY.match(k)},
                          key=lambda k: int(_LATENCY_KEY.match(k).group(1)))
    optional += [(f"ORT b{_LATENCY_KEY.match(k).group(1)} ms", k, "{:.3f}") for k in latency_keys]
    columns += [c for c in optional if any(row.get(c[1]) is not None for row in rows)]
    for level in summary["concurrency"]:
        columns += [
            (f"p50 ms c{level}", f"p50_ms_c{level}", "{:.2f}"),
            (f"p99 ms c{level}", f"p99_ms_c{level}", "p99"),
            (f"req/s c{level}", f"throughput_rps_c{level}", "{:.0f}"),
        ]
    return columns


def table_cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if fmt == "kib":
        return f"{value / 1024:.1f}"
    if fmt == "passed":
        return "yes" if value else "NO"
    if fmt == "p99":  # an unstable level is marked, never silently averaged in
        level = key.removeprefix("p99_ms_")
        return f"{value:.2f}" + ("*" if row.get(f"stable_{level}") is False else "")
    return fmt.format(value)


def unstable_levels(summary: dict[str, Any]) -> list[str]:
    return [
        f"{row['model']} c{row['concurrency']} b{row.get('batch_size', 1)}"
        for row in summary.get("benchmark", {}).get("results", []) if row.get("stable") is False
    ]


def format_table(summary: dict[str, Any]) -> str:
    """The summary as an aligned plain-text table, as `torchship run` prints it."""
    columns = table_columns(summary)
    lines = text_table([header for header, _, _ in columns],
                       [[table_cell(row, key, fmt) for _, key, fmt in columns]
                        for row in summary["rows"]])
    unstable = unstable_levels(summary)
    if unstable:
        lines.append(f"* unstable (windows disagree beyond the band): {', '.join(unstable)}")
    lines += not_made_lines(summary)
    if summary.get("gate"):
        lines.append(gate_line(summary["gate"]))
    return "\n".join(lines)


def not_made_lines(summary: dict[str, Any]) -> list[str]:
    """A line per variant asked for that does not apply to this model, and why."""
    return [f"not made: {item['name']}: {item['reason']}" for item in summary.get("skipped", [])]


def check_status(check: dict[str, Any]) -> str:
    """``passed``, ``FAILED`` or ``not checked`` (a record from before ``status`` was kept has
    only ``passed``)."""
    status = check.get("status") or ("passed" if check.get("passed") else "failed")
    return "FAILED" if status == "failed" else status


def gate_line(gate: dict[str, Any]) -> str:
    """One line for a gate record: the verdict and its reason."""
    return f"gate: {'PASSED' if gate.get('passed') else 'FAILED'}: {gate.get('reason', '')}"


def method_line(summary: dict[str, Any]) -> str:
    bench = summary.get("benchmark", {})
    sizes = summary.get("batch_sizes") or [summary["batch_size"]]
    text = (f"Triton over {summary['protocol']}, batch size {', '.join(map(str, sizes))}, "
            f"concurrency {', '.join(map(str, summary['concurrency']))}.")
    if bench.get("window_s"):
        text += (f" Warm-up {bench['warmup_s']:g} s, windows of {bench['window_s']:.3g} s; a level "
                 f"is stable when its last {bench['min_windows']} windows agree within "
                 f"±{bench['stability_pct']:g} % ({', '.join(bench['stability_metrics'])}), "
                 f"else it runs up to {bench['max_windows']} windows and is marked unstable.")
    return text


def _ms(microseconds: float | None) -> str:
    return "-" if microseconds is None else f"{microseconds / 1e3:.3f}"


def server_client_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Client view beside Triton's own statistics, per model and level."""
    header = ["model", "b", "c", "client mean ms", "server request ms", "server queue ms",
              "server compute ms", "avg batch", "client CPU cores", "stable"]
    body = []
    for row in summary.get("benchmark", {}).get("results", []):
        server, client = row.get("server") or {}, row.get("client") or {}
        compute = [server.get(k) for k in ("compute_input_us", "compute_infer_us",
                                            "compute_output_us")]
        body.append([
            row["model"], str(row.get("batch_size", 1)), str(row["concurrency"]),
            cell(row.get("mean_ms"), "{:.3f}"), _ms(server.get("request_us")),
            _ms(server.get("queue_us")), "-" if None in compute else _ms(sum(compute)),
            cell(server.get("avg_batch_size"), "{:.2f}"), cell(client.get("cpu_cores"), "{:.2f}"),
            {True: "yes", False: "NO"}.get(row.get("stable"), "-"),
        ])
    return header, body


def first_screen_markdown(summary: dict[str, Any]) -> list[str]:
    """The verdict, objective, constraints, the choice and its settings, every candidate with
    why it won or lost (the chosen row in bold), and the environment."""
    lines: list[str] = []
    gate = summary.get("gate")
    if gate:
        lines += [f"**{gate_line(gate)}**", "", objective_line(gate), "", "Constraints:", "",
                  *(f"- {line}" for line in constraint_lines(gate)), "",
                  f"**{chosen_line(gate, summary.get('benchmark') or {})}**", ""]
        header, body, chosen = candidate_rows(summary)
        if body:
            body = [[f"**{text}**" if i == chosen and text != "-" else text for text in line]
                    for i, line in enumerate(body)]
            lines += ["## Candidates", "", *markdown_table(header, body, left=(0, 6)), ""]
    rows = [list(row) for row in environment_rows(summary)]
    lines += ["## Environment", "", *markdown_table(["", ""], rows, left=(0, 1))]
    return lines


def format_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown, for the KFP Markdown artifact the UIs render."""
    columns = table_columns(summary)
    lines = ["# torchship run summary", "", *first_screen_markdown(summary), "",
             method_line(summary), ""]
    if summary.get("gate"):
        lines += ["## Gate checks", ""] + markdown_table(
            ["check", "status", "value", "threshold", "detail"],
            [[c["name"], check_status(c), cell(c.get("value"), "{:.4g}"),
              cell(c.get("threshold"), "{:.4g}"), c.get("detail", "")]
             for c in summary["gate"].get("checks", [])], left=(0, 1, 4),
        )
        lines.append("")
    lines += markdown_table(
        [header for header, _, _ in columns],
        [[table_cell(row, key, fmt) for _, key, fmt in columns] for row in summary["rows"]],
    )
    unstable = unstable_levels(summary)
    if unstable:
        lines += ["", f"\\* unstable (windows disagree beyond the band): {', '.join(unstable)}"]
    if summary.get("skipped"):
        lines += ["", *(f"- {line}" for line in not_made_lines(summary))]
    header, body = server_client_rows(summary)
    if body:
        lines += ["", "## Client and server time", ""] + markdown_table(header, body)
    regression = summary.get("regression")
    if regression:
        lines += ["", "## Against the previous run", "", regression.get("summary", "")]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], json_path: str, markdown_path: str) -> None:
    """Write the summary as JSON (for machines) and Markdown (for the pipeline UIs)."""
    write_json(summary, json_path)
    write_text(markdown_path, format_markdown(summary))
