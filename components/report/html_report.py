"""The self-contained HTML report: plots embedded as base64 PNG, no link, script or stylesheet
fetched from anywhere, so the Vertex AI and Kubeflow UIs (and a browser offline) show it whole.

``write_html_report(summary, path)`` renders a run summary (``report.summary.build_summary``), with its
gate and regression records when the summary carries them or they are passed:

* first, what a reader needs to trust the choice (``explain``): the gate verdict, the objective,
  the constraints, the chosen variant and its serving settings, each other variant with the
  constraint it failed or the margin it lost by (the chosen row highlighted), and the
  environment (CPU, Triton, backend, serving settings, the load client and what it cost);
* the gate's checks (passed, FAILED or not checked, with why), and the chosen variant's
  confusion matrix on the test split;
* the variant table (accuracy, size, parity, latency per level; unstable levels marked);
* throughput against p99 latency per variant, one point per concurrency level;
* the latency histogram of each variant at one level (the gate's target concurrency, else the
  highest measured);
* the client's time beside Triton's own queue and compute time per level.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

from torchship.components.files import write_text
from torchship.components.report.explain import (
    candidate_rows,
    chosen_line,
    constraint_lines,
    environment_rows,
    objective_line,
)
from torchship.components.report.summary import (
    check_status,
    gate_line,
    method_line,
    not_made_lines,
    server_client_rows,
    table_cell,
    table_columns,
    unstable_levels,
)
from torchship.components.report.tables import PAGE_STYLE, escape

__all__ = ["render_html_report", "write_html_report"]

_STYLE = PAGE_STYLE + """
th:first-child, td:first-child { text-align: left; }
.pass { color: #1a7f37; font-weight: 600; } .fail { color: #cf222e; font-weight: 600; }
.skip { color: #9a6700; font-weight: 600; }
table.why td:last-child, table.text td { text-align: left; }
img { max-width: 100%; border: 1px solid #d0d7de; margin: 8px 0; }
"""
_esc = escape


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _series(summary: dict[str, Any]) -> dict[tuple[str, int], list[dict]]:
    """Benchmark rows by (model, batch size), ordered by concurrency."""
    series: dict[tuple[str, int], list[dict]] = {}
    for row in summary.get("benchmark", {}).get("results", []):
        series.setdefault((row["model"], int(row.get("batch_size", 1))), []).append(row)
    for rows in series.values():
        rows.sort(key=lambda r: int(r["concurrency"]))
    return series


def throughput_p99_plot(summary: dict[str, Any]) -> str | None:
    """Throughput (x) against p99 latency (y), a line per variant, a point per level."""
    series = _series(summary)
    if not series:
        return None
    plt = _figure()
    several_sizes = len({size for _, size in series}) > 1
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for (model, size), rows in series.items():
        label = f"{model} b{size}" if several_sizes else model
        x = [r["throughput_rps"] for r in rows]
        y = [r["p99_ms"] for r in rows]
        (line,) = ax.plot(x, y, marker="o", label=label)
        for r in rows:
            if r.get("stable") is False:  # hollow ring: the level did not settle
                ax.plot(r["throughput_rps"], r["p99_ms"], marker="o", markersize=13,
                        markerfacecolor="none", markeredgecolor=line.get_color())
            ax.annotate(f"c{r['concurrency']}", (r["throughput_rps"], r["p99_ms"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
    budget = (summary.get("gate") or {}).get("settings", {}).get("latency_budget_p99_ms")
    if budget:
        ax.axhline(budget, color="#cf222e", linestyle="--", linewidth=1,
                   label=f"p99 budget {budget:g} ms")
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title("Throughput against p99 latency (one point per concurrency; ring: unstable)")
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    uri = _png(fig)
    plt.close(fig)
    return uri


def histogram_concurrency(summary: dict[str, Any]) -> int | None:
    """The level the histogram shows: the gate's target concurrency when measured, else the
    highest measured."""
    levels = summary.get("concurrency") or []
    target = (summary.get("gate") or {}).get("settings", {}).get("target_concurrency")
    if target in levels:
        return int(target)
    return max(levels) if levels else None


def latency_histogram_plot(summary: dict[str, Any]) -> str | None:
    """Latency distribution of each variant at one level (log-spaced bins, as measured)."""
    level = histogram_concurrency(summary)
    primary = summary.get("batch_size", 1)
    rows = [r for r in summary.get("benchmark", {}).get("results", [])
            if int(r["concurrency"]) == level and int(r.get("batch_size", 1)) == primary
            and (r.get("histogram") or {}).get("counts")]
    if not rows:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in rows:
        edges, counts = r["histogram"]["edges_ms"], r["histogram"]["counts"]
        total = float(sum(counts)) or 1.0
        ax.stairs([c / total for c in counts], edges, label=f"{r['model']} (p99 "
                  f"{r['p99_ms']:.2f} ms)", linewidth=1.5)
        ax.axvline(r["p99_ms"], linestyle=":", linewidth=1, color=ax.lines[-1].get_color()
                   if ax.lines else None)
    ax.set_xscale("log")
    plain = _ticker().FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Latency histogram at concurrency {level}, batch size {primary}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    uri = _png(fig)
    plt.close(fig)
    return uri


def time_split_plot(summary: dict[str, Any]) -> str | None:
    """Per level: Triton's queue and compute time beside the rest of the client's latency."""
    rows = [r for r in summary.get("benchmark", {}).get("results", [])
            if (r.get("server") or {}).get("request_us") is not None]
    if not rows:
        return None
    plt = _figure()
    labels, queue, compute, rest = [], [], [], []
    for r in rows:
        server = r["server"]
        labels.append(f"{r['model']} c{r['concurrency']}"
                      + (f" b{r['batch_size']}" if len(summary.get("batch_sizes") or []) > 1
                         else ""))
        q = (server.get("queue_us") or 0.0) / 1e3
        c = sum((server.get(k) or 0.0) for k in ("compute_input_us", "compute_infer_us",
                                                  "compute_output_us")) / 1e3
        queue.append(q)
        compute.append(c)
        rest.append(max(0.0, r["mean_ms"] - q - c))
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.2))
    y = list(range(len(rows)))
    ax.barh(y, queue, label="server queue")
    ax.barh(y, compute, left=queue, label="server compute")
    ax.barh(y, rest, left=[a + b for a, b in zip(queue, compute)],
            label="outside the server (network, frontend, client)")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean time per request (ms)")
    ax.set_title("Where a request's time goes (client mean latency, Triton statistics)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)
    uri = _png(fig)
    plt.close(fig)
    return uri


def _table(header: list[str], body: list[list[str]], classes: list[list[str]] | None = None,
           marked: int | None = None, kind: str = "") -> str:
    """A table; ``marked`` is the index of a row to highlight (the chosen one); ``kind`` its
    class (``why``: the last column is text, ``text``: every column is)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    lines = []
    for i, line in enumerate(body):
        cells = []
        for j, cell in enumerate(line):
            cls = classes[i][j] if classes else ""
            cells.append(f"<td class=\"{cls}\">{_esc(cell)}</td>" if cls
                         else f"<td>{_esc(cell)}</td>")
        lines.append(("<tr class=\"chosen\">" if i == marked else "<tr>") + "".join(cells)
                     + "</tr>")
    return (f"<table class=\"{kind}\">" if kind else "<table>") + \
        f"<tr>{head}</tr>{''.join(lines)}</table>"


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}"


def _first_screen(summary: dict[str, Any]) -> list[str]:
    """The verdict, objective, constraints, choice, candidates and environment."""
    parts = []
    gate = summary.get("gate")
    if gate:
        verdict = "pass" if gate.get("passed") else "fail"
        parts.append(f"<p class=\"{verdict}\">{_esc(gate_line(gate))}</p>")
        parts.append(f"<p>{_esc(objective_line(gate))}</p><p>Constraints:</p><ul>"
                     + "".join(f"<li>{_esc(line)}</li>" for line in constraint_lines(gate))
                     + f"</ul><p><b>{_esc(chosen_line(gate, summary.get('benchmark', {})))}"
                       "</b></p>")
        header, body, chosen = candidate_rows(summary)
        if body:
            parts.append("<h2>Candidates</h2>" + _table(header, body, marked=chosen,
                                                        kind="why"))
    rows = environment_rows(summary)
    parts.append("<h2>Environment</h2>" + _table(["", ""], [list(row) for row in rows],
                                                 kind="text"))
    return parts


def render_html_report(summary: dict[str, Any], gate: dict[str, Any] | None = None,
                       regression: dict[str, Any] | None = None,
                       title: str = "torchship run report") -> str:
    """The report as one HTML document (see the module docstring)."""
    summary = dict(summary)
    if gate is not None:
        summary["gate"] = gate
    if regression is not None:
        summary["regression"] = regression
    bench = summary.get("benchmark", {})
    parts = [f"<h1>{_esc(title)}</h1>", *_first_screen(summary),
             f"<p class=\"note\">{_esc(method_line(summary))}"]
    if bench.get("endpoint"):
        parts.append(f" Endpoint: {_esc(bench['endpoint'])} ({_esc(bench.get('mode', ''))}).")
    if bench.get("started_at"):
        parts.append(f" Started {_esc(bench['started_at'])}.")
    parts.append("</p>")

    gate = summary.get("gate")
    if gate:
        body, classes = [], []
        for check in gate.get("checks", []):
            status = check_status(check)
            body.append([check.get("variant", ""), check["name"], status,
                         _number(check.get("value")), _number(check.get("threshold")),
                         check.get("detail", "")])
            classes.append(["", "", {"passed": "pass", "FAILED": "fail"}.get(status, "skip"),
                            "", "", ""])
        parts.append("<h2>Gate checks</h2>")
        parts.append(_table(["variant", "check", "status", "value", "threshold", "detail"],
                            body, classes, kind="why"))
        matrix = gate.get("confusion_matrix")
        if matrix:
            parts.append(f"<h2>Confusion matrix</h2><p class=\"note\">'{_esc(gate['variant'])}' "
                         f"on the test split (accuracy {matrix['accuracy']:.4f}): rows are the "
                         "true class, columns the predicted one.</p>")
            parts.append(_table([""] + matrix["categories"],
                                [[name, *map(str, counts)] for name, counts in
                                 zip(matrix["categories"], matrix["matrix"], strict=True)]))

    columns = table_columns(summary)
    parts.append("<h2>Variants</h2>")
    parts.append(_table([h for h, _, _ in columns],
                        [[table_cell(row, key, fmt) for _, key, fmt in columns]
                         for row in summary.get("rows", [])]))
    unstable = unstable_levels(summary)
    if unstable:
        parts.append(f"<p class=\"note\">* unstable (windows disagree beyond the band): "
                     f"{_esc(', '.join(unstable))}</p>")
    for line in not_made_lines(summary):
        parts.append(f"<p class=\"note\">{_esc(line)}</p>")

    for heading, uri in (
        ("Throughput against p99 latency", throughput_p99_plot(summary)),
        ("Latency histogram", latency_histogram_plot(summary)),
        ("Client and server time", time_split_plot(summary)),
    ):
        if uri:
            parts.append(f"<h2>{_esc(heading)}</h2><img alt=\"{_esc(heading)}\" src=\"{uri}\">")

    header, body = server_client_rows(summary)
    if body:
        parts.append(_table(header, body))

    regression = summary.get("regression")
    if regression:
        parts.append("<h2>Against the previous run</h2>")
        parts.append(f"<p class=\"{'fail' if regression.get('flagged') else 'note'}\">"
                     f"{_esc(regression.get('summary', ''))}</p>")
        levels = regression.get("levels") or []
        if levels:
            parts.append(_table(
                ["model", "b", "c", "previous p99 ms", "p99 ms", "change %", "95 % CI %",
                 "flagged"],
                [[lv["model"], str(lv["batch_size"]), str(lv["concurrency"]),
                  f"{lv['previous_p99_ms']:.2f}", f"{lv['p99_ms']:.2f}",
                  f"{lv['change_pct']:+.1f}",
                  "-" if not lv.get("ci95_pct") else
                  f"{lv['ci95_pct'][0]:+.1f} to {lv['ci95_pct'][1]:+.1f}",
                  "YES" if lv["flagged"] else "no"] for lv in levels],
            ))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_html_report(summary: dict[str, Any], path: str | os.PathLike,
                      gate: dict[str, Any] | None = None,
                      regression: dict[str, Any] | None = None) -> Path:
    """Write the self-contained HTML report to ``path`` (the file a KFP ``HTML`` artifact is)."""
    return write_text(path, render_html_report(summary, gate, regression))
