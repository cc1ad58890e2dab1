"""Choosing among measured serving settings by the gate's objective, and showing the candidates
(text, Markdown, KFP metrics). The search that measures them is `stage`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torchship.components.contracts import ServingSettings
from torchship.components.files import write_text
from torchship.components.report.tables import cell, markdown_table, text_table

__all__ = ["DEFAULT_SETTINGS", "MARGIN_PCT", "choose_settings", "format_candidate_table",
           "serving_metrics", "serving_objective", "write_candidate_table"]

# The settings searched, with the defaults every deploy starts from.
DEFAULT_SETTINGS = ServingSettings().tuned()
# A candidate must beat a simpler one by more than this (or the windows' spread) to be chosen.
MARGIN_PCT = 5.0
_LATENCY_OBJECTIVE = re.compile(r"latency|latency_b\d+_ms")


def serving_objective(optimise: str, latency_budget_p99_ms: float | None) -> str:
    """``throughput`` (highest req/s, within the budget when there is one) or ``latency``
    (lowest p99), from the gate's parameters."""
    if latency_budget_p99_ms:
        return "throughput"
    return "latency" if _LATENCY_OBJECTIVE.fullmatch(optimise) else "throughput"


def choose_settings(candidates: list[dict[str, Any]], objective: dict[str, Any]) -> dict[str, Any]:
    """``{"chosen", "settings", "reason", "band_pct"}`` for measured ``candidates`` (simplest
    first) under ``objective`` (as in the record): the simplest qualifying candidate that the
    best one does not beat by more than the band; the default settings when none qualifies."""
    level = f"c{objective['target_concurrency']}"
    key = "throughput_rps" if objective["metric"] == "throughput" else "p99_ms"
    qualifying = sorted((c for c in candidates if c["qualifies"]), key=lambda c: c["simplicity"])
    if not qualifying:
        reasons = "; ".join(f"{c['model']}: {c['why_not']}" for c in candidates)
        return {"chosen": None, "settings": dict(DEFAULT_SETTINGS), "band_pct": None, "reason": (
            f"no candidate qualifies ({reasons}); keeping the default settings "
            f"({describe(DEFAULT_SETTINGS)}) under which the gate passed the model")}

    def value(candidate: dict[str, Any]) -> float:
        return float(candidate["levels"][level][key])

    def spread(candidate: dict[str, Any]) -> float:
        return float(candidate["levels"][level]["spread_pct"].get(key) or 0.0)

    def gain_pct(better: dict[str, Any], than: dict[str, Any]) -> float:
        """How much ``better`` beats ``than`` on the metric, in % of ``than``'s value."""
        change = value(better) - value(than) if key == "throughput_rps" else (
            value(than) - value(better))
        return change / value(than) * 100.0 if value(than) > 0 else float("inf")

    def band(candidate: dict[str, Any]) -> float:
        return max(float(objective["margin_pct"]), spread(best), spread(candidate))

    pick = max if key == "throughput_rps" else min
    best = pick(qualifying, key=value)  # ties go to the simpler, the first in the list
    candidate = next(c for c in qualifying if gain_pct(best, c) <= band(c))  # best ends it
    unit = "req/s" if key == "throughput_rps" else "ms p99"
    shown = f"{value(best):.1f} {unit}" if key == "throughput_rps" else f"{value(best):.2f} {unit}"
    at = f"at concurrency {objective['target_concurrency']}"
    word = "highest throughput" if key == "throughput_rps" else "lowest p99"
    within = (f" within the p99 budget of {objective['latency_budget_p99_ms']:g} ms"
              if objective.get("latency_budget_p99_ms") else "")
    of = f"of the {len(qualifying)} of {len(candidates)} candidates that qualify{within}"
    if candidate is best:
        simplest = qualifying[0]
        reason = f"{best['model']} has the {word} ({shown} {at}) {of}"
        if simplest is not best:
            reason += (f", {gain_pct(best, simplest):.1f}% better than the simplest "
                       f"({simplest['model']}), beyond the {band(simplest):.1f}% band")
    else:
        reason = (f"{candidate['model']} kept as the simpler setting: the best, {best['model']} "
                  f"({shown} {at}), is only {gain_pct(best, candidate):.1f}% better, within the "
                  f"{band(candidate):.1f}% band (margin {objective['margin_pct']:g}% or the "
                  "windows' spread)")
    return {"chosen": candidate["model"], "settings": dict(candidate["settings"]),
            "band_pct": band(candidate), "reason": reason}



def format_candidate_table(record: dict[str, Any], markdown: bool = False) -> str:
    """One row per candidate: settings, p99 and throughput per level, whether it qualifies; the
    chosen one marked, the reason below (Markdown: with a title)."""
    levels = [f"c{c}" for c in record["concurrency"]]
    header = ["candidate", "instances", "delay us"]
    for level in levels:
        header += [f"p50 ms {level}", f"p99 ms {level}", f"req/s {level}"]
    header.append("qualifies")
    body = []
    for candidate in record["candidates"]:
        mark = " (chosen)" if candidate["model"] == record["chosen"] else ""
        line = [candidate["model"] + mark,
                str(candidate["settings"]["instance_count"]),
                str(candidate["settings"]["max_queue_delay_us"])]
        for level in levels:
            measured = candidate["levels"][level]
            unstable = "" if measured["stable"] else "*"
            line += [cell(measured["p50_ms"], "{:.2f}"),
                     cell(measured["p99_ms"], "{:.2f}") + unstable,
                     cell(measured["throughput_rps"], "{:.0f}")]
        line.append("yes" if candidate["qualifies"] else f"no: {candidate['why_not']}")
        body.append(line)
    left = (0, len(header) - 1)
    if not markdown:
        return "\n".join(text_table(header, body, left))
    chosen = f"chosen: {describe(record['settings'])}: {record['reason']}"
    return "\n".join(["# Serving search", "", objective_text(record["objective"]), "",
                      *markdown_table(header, body, left), "", chosen]) + "\n"


def write_candidate_table(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """The candidate table as Markdown, for the KFP artifact the pipeline UIs render."""
    return write_text(path, format_candidate_table(record, markdown=True))


def serving_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The chosen settings and, when measured, their p99 and throughput per level, for KFP."""
    metrics = {f"serving_{name}": float(value) for name, value in record["settings"].items()}
    metrics["serving_candidates"] = float(len(record["candidates"]))
    chosen = next((c for c in record["candidates"] if c["model"] == record["chosen"]), None)
    for level, measured in (chosen["levels"] if chosen else {}).items():
        metrics[f"serving_p99_ms_{level}"] = float(measured["p99_ms"])
        metrics[f"serving_throughput_rps_{level}"] = float(measured["throughput_rps"])
    return metrics


def describe(settings: dict[str, int]) -> str:
    return ", ".join(f"{name} {value}" for name, value in settings.items())


def objective_text(objective: dict[str, Any]) -> str:
    at = f"at concurrency {objective['target_concurrency']}"
    if objective.get("latency_budget_p99_ms"):
        return f"highest throughput {at} with p99 within {objective['latency_budget_p99_ms']:g} ms"
    if objective["metric"] == "latency":
        return f"lowest p99 {at} (optimise '{objective['optimise']}')"
    return (f"highest throughput {at} (optimise '{objective['optimise']}' is the same for every "
            "setting)")

