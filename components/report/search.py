"""The serving search's own HTML report, self-contained (the plot inline as SVG, nothing fetched):
objective and constraints, the choice and why, whether the search could tell the best apart and
the choice from the default, the Pareto front of throughput against p99 (each point marked by the
round it was last measured in; the front among the last round's only), and every candidate with
why it lost.

``write_search_report(record, path)`` renders a ``torchship.serving-search`` record (see
``tune_serving.stage``); it reads only the record.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from torchship.components.files import write_text
from torchship.components.report.tables import PAGE_STYLE, escape

__all__ = ["render_search_report", "round_label", "write_search_report"]

_STYLE = PAGE_STYLE + """
td.l, th.l { text-align: left; }
.warn { color: #9a6700; font-weight: 600; }
svg { max-width: 100%; height: auto; }
"""
_esc = escape


def _objective(record: dict[str, Any]) -> list[str]:
    objective = record["objective"]
    at = f"at concurrency {objective['target_concurrency']}"
    lines = [("lowest p99 " if objective["metric"] == "latency" else
              "highest throughput per core (one core per instance) ") + at
             + f" (optimise '{objective['optimise']}')"]
    if objective.get("latency_budget_p99_ms"):
        lines.append(f"constraint: p99 &le; {objective['latency_budget_p99_ms']:g} ms {at}")
    if objective.get("throughput_target_rps"):
        lines.append(f"constraint: throughput &ge; {objective['throughput_target_rps']:g} req/s")
    lines.append(f"a candidate beats another only by more than {objective['margin_pct']:g}% or "
                 "the windows' measured spread, whichever is larger")
    return lines


def _level(candidate: dict[str, Any], record: dict[str, Any]) -> dict[str, Any] | None:
    return candidate["levels"].get(f"c{record['objective']['target_concurrency']}")


def _last_round(candidate: dict[str, Any]) -> int | None:
    rounds = candidate.get("rounds") or []
    return rounds[-1]["round"] if rounds else None


def round_label(step: dict[str, Any]) -> str:
    """How a round measured, for the legend: ``round 2: windows of 0.33 s``."""
    passes = int(step.get("passes") or 1)
    return (f"round {step['round'] + 1}: windows of {step['window_s']:.2f} s"
            + (f", {passes} interleaved passes" if passes > 1 else ""))


def _plot(record: dict[str, Any]) -> str:
    """Throughput against p99 of every measured candidate at its latest measurement, colour by
    variant, marker by the round (an earlier round's shorter windows are fainter), the Pareto
    front of the last round joined, the chosen one ringed and the budget drawn; inline SVG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    front = record.get("pareto_front") or []
    steps = {step["round"]: step for step in record.get("schedule") or []}
    last = max(steps, default=None)
    markers = ("x", "^", "D", "v", "P")
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    try:
        colours: dict[str, str] = {}
        points: dict[tuple[str, int | None], list[tuple[float, float]]] = {}
        for candidate in record["candidates"]:
            level = _level(candidate, record)
            if level and not level["errors"]:
                colours.setdefault(candidate["variant"], f"C{len(colours) % 10}")
                points.setdefault((candidate["variant"], _last_round(candidate)), []).append(
                    (level["p99_ms"], level["throughput_rps"]))
        for (variant, measured_in), xy in points.items():
            final = measured_in == last
            ax.scatter(*zip(*xy), s=34 if final else 24, color=colours[variant],
                       marker="o" if final else markers[(measured_in or 0) % len(markers)],
                       alpha=0.9 if final else 0.35)
        handles = [Line2D([], [], color=c, marker="o", linestyle="", label=v)
                   for v, c in colours.items()]
        handles += [Line2D([], [], color="#57606a", linestyle="", label=round_label(step),
                           marker="o" if r == last else markers[r % len(markers)],
                           alpha=0.9 if r == last else 0.35)
                    for r, step in sorted(steps.items())
                    if any(key[1] == r for key in points)]
        levels = {c["model"]: _level(c, record) for c in record["candidates"]}
        line = [(levels[m]["p99_ms"], levels[m]["throughput_rps"]) for m in front if levels.get(m)]
        if line:
            handles += ax.plot(*zip(*line), color="#1f2328", linewidth=1, marker="s",
                               markersize=9, markerfacecolor="none",
                               label="Pareto front (last round)")
        chosen = levels.get(record.get("chosen") or "")
        if chosen:
            handles.append(ax.scatter([chosen["p99_ms"]], [chosen["throughput_rps"]], s=180,
                                      facecolors="none", edgecolors="#cf222e", linewidths=2,
                                      label="chosen"))
        budget = record["objective"].get("latency_budget_p99_ms")
        if budget:
            handles.append(ax.axvline(budget, color="#cf222e", linestyle="--", linewidth=1,
                                      label="p99 budget"))
        ax.set_xlabel(f"p99 latency (ms) at concurrency "
                      f"{record['objective']['target_concurrency']}")
        ax.set_ylabel("throughput (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=7)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    finally:
        plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def _versus_default(record: dict[str, Any]) -> str | None:
    """A line on the choice against the incumbent (None: no incumbent in the grid)."""
    incumbent = record.get("incumbent")
    if not incumbent:
        return None
    versus = record.get("versus_default")
    if record.get("chosen") == incumbent:
        told = ("no finalist was shown better than it" + (
            f": the best, {versus['candidate']}, by {versus['gain_pct']:.1f}% against a "
            f"{versus['band_pct']:.1f}% band" if versus else ""))
        return f"<p>the default ({_esc(incumbent)}) is kept: {_esc(told)}.</p>"
    if versus:
        gains = ", ".join(f"{g:+.1f}%" for g in versus.get("pass_gains_pct") or [])
        return (f"<p>against the default ({_esc(incumbent)}): {_esc(versus['candidate'])} beats "
                f"it by {versus['gain_pct']:.1f}%, beyond the {versus['band_pct']:.1f}% band "
                f"(per interleaved pass: {_esc(gains or 'not paired')}).</p>")
    return (f'<p class="note">the default ({_esc(incumbent)}) did not reach the last round: '
            "it could not meet the constraints.</p>")


def _table(record: dict[str, Any]) -> str:
    target = record["objective"]["target_concurrency"]
    front = set(record.get("pareto_front") or [])
    header = ["candidate", "variant", "instances", "delay us", "max batch", "rounds",
              f"p50 ms c{target}", f"p99 ms c{target}", "spread %", f"req/s c{target}",
              "req/s per core", "Pareto", "outcome"]
    rows = []
    for candidate in record["candidates"]:
        level = _level(candidate, record)
        settings = candidate["settings"]
        numbers = (["-"] * 5 if level is None else [
            f"{level['p50_ms']:.2f}", f"{level['p99_ms']:.2f}",
            f"{max((level['spread_pct'] or {}).values(), default=0) or 0:.0f}",
            f"{level['throughput_rps']:.0f}",
            f"{level['throughput_rps'] / settings['instance_count']:.0f}"])
        cells = [candidate["model"], candidate["variant"], settings["instance_count"],
                 settings["max_queue_delay_us"], settings["max_batch_size"],
                 len(candidate.get("rounds") or []), *numbers,
                 "yes" if candidate["model"] in front else "",
                 candidate.get("outcome") or candidate.get("why_not") or ""]
        mark = ' class="chosen"' if candidate["model"] == record.get("chosen") else ""
        rows.append(f"<tr{mark}>" + "".join(
            f'<td{" class=l" if i in (0, 1, len(cells) - 1) else ""}>{_esc(c)}</td>'
            for i, c in enumerate(cells)) + "</tr>")
    head = "".join(f'<th{" class=l" if i in (0, 1, len(header) - 1) else ""}>{_esc(h)}</th>'
                   for i, h in enumerate(header))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_search_report(record: dict[str, Any]) -> str:
    """The report as one HTML page."""
    settings = ", ".join(f"{k} {v}" for k, v in record["settings"].items())
    parts = [f"<h1>Serving search: {_esc(record['variant'])} with {_esc(settings)}</h1>",
             "<h2>Objective and constraints</h2><ul>"
             + "".join(f"<li>{line}</li>" for line in _objective(record)) + "</ul>",
             (f"<p><b>chosen:</b> {_esc(record.get('chosen') or 'none (default settings kept)')}"
             f": {_esc(record['reason'])}</p>")]
    versus = _versus_default(record)
    if versus:
        parts.append(versus)
    if record.get("tied"):
        kept = ("the default is kept" if record.get("chosen") == record.get("incumbent") else
                "the simplest is chosen")
        parts.append(f'<p class="warn">The search could not tell apart {len(record["tied"])} '
                     f"candidates ({_esc(', '.join(record['tied']))}): their differences are "
                     f"within the measured spread; {kept}.</p>")
    method = record.get("method") or {}
    searched = record.get("searched") or {}
    parts.append(
        f'<p class="note">searched: variants {_esc(", ".join(record.get("variants") or []))} '
        f"({_esc(record.get('variants_from', ''))}) x "
        + " x ".join(f"{_esc(k)} {_esc(v)}" for k, v in searched.items() if k != "variant")
        + f"; {len(record['candidates'])} candidates on one tritonserver (started in "
        f"{record.get('server_startup_s') or 0:.1f} s), {method.get('rounds', 0)} rounds of "
        f"successive halving, {method.get('windows', 0)} windows per level ("
        + _esc("; ".join(round_label(step) for step in record.get("schedule") or []))
        + f"); search wall time {record.get('wall_s') or 0:.1f} s</p>")
    if record["candidates"]:
        parts += ["<h2>Throughput against p99 (Pareto front)</h2>", _plot(record),
                  ('<p class="note">each candidate at its latest measurement, marked by its '
                   "round: an earlier round's windows are shorter, so its points (faint) are "
                   "noisier and not comparable with the last round's. The Pareto front is among "
                   "the candidates measured in the last round only: no other of them has both a "
                   "lower p99 and a higher throughput.</p>"),
                  "<h2>Candidates</h2>", _table(record)]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Serving search</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>\n")


def write_search_report(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report to ``path``, whole or not at all."""
    return write_text(path, render_search_report(record))
