"""Regression tracking: the candidate's p99 against the numbers stored by the previous run.

``compare_with_previous`` matches every level (model, batch size, concurrency) of a benchmark
result with the previous run's result (or summary) at a path or fsspec URI (``gs://``). The p99
change is the pooled p99 of the two runs; its 95 % confidence interval is Welch's t-interval for
the difference of the per-window p99 means (the judged windows of each level), in % of the
previous mean. A level is flagged when the p99 is worse by more than ``max_p99_regression_pct``
*and* the interval lies above zero (the slowdown is not window-to-window noise). Without a
previous run the record says ``"no baseline"``; that is not an error.

Record (schema ``torchship.regression/v1``)::

    {"schema", "status": "no baseline" | "ok" | "regression", "flagged": bool, "baseline": uri,
     "previous_started_at", "max_p99_regression_pct", "worst_change_pct", "summary": one line,
     "levels": [{"model", "batch_size", "concurrency", "p99_ms", "previous_p99_ms",
                 "change_pct", "ci95_pct": [low, high] | null, "windows", "previous_windows",
                 "flagged"}], "new_levels": ["<model> c<c> b<b>", ...]}
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from torchship.components.benchmark.stats import t_quantile_975
from torchship.components.errors import UserInputError
from torchship.components.files import read_json

__all__ = ["REGRESSION_SCHEMA", "compare_with_previous", "window_p99s"]

REGRESSION_SCHEMA = "torchship.regression/v1"
# A p99 this much worse than the previous run's (beyond the windows' noise) is flagged.
MAX_P99_REGRESSION_PCT = 10.0


def window_p99s(row: dict[str, Any]) -> list[float]:
    """The p99 of each judged window of a level (all windows when the row does not say)."""
    windows = row.get("windows") or []
    judged = set((row.get("stability") or {}).get("judged_windows") or [])
    return [float(w["p99_ms"]) for w in windows
            if w.get("p99_ms") is not None and (not judged or w["index"] in judged)]


def _welch_ci_pct(current: list[float], previous: list[float]) -> list[float] | None:
    """95 % interval of (mean(current) - mean(previous)) in % of mean(previous)."""
    if len(current) < 2 or len(previous) < 2:
        return None
    m1, m0 = float(np.mean(current)), float(np.mean(previous))
    v1, v0 = float(np.var(current, ddof=1)) / len(current), float(np.var(previous, ddof=1)) / len(
        previous)
    if m0 <= 0:
        return None
    se = math.sqrt(v1 + v0)
    if se == 0:
        diff = (m1 - m0) / m0 * 100.0
        return [diff, diff]
    df = (v1 + v0) ** 2 / (v1**2 / (len(current) - 1) + v0**2 / (len(previous) - 1))
    half = t_quantile_975(df) * se
    return [(m1 - m0 - half) / m0 * 100.0, (m1 - m0 + half) / m0 * 100.0]


def _key(row: dict[str, Any]) -> tuple[str, int, int]:
    return row["model"], int(row.get("batch_size", 1)), int(row["concurrency"])


def compare_with_previous(
    result: dict[str, Any],
    previous_uri: str | os.PathLike | None,
    max_p99_regression_pct: float = MAX_P99_REGRESSION_PCT,
) -> dict[str, Any]:
    """Compare ``result`` (a benchmark result or a run summary) with the previous run's."""
    if not max_p99_regression_pct >= 0:
        raise UserInputError(
            f"max_p99_regression_pct: {max_p99_regression_pct} must be >= 0, e.g. 10"
        )
    result = result.get("benchmark", result)
    record: dict[str, Any] = {
        "schema": REGRESSION_SCHEMA,
        "status": "no baseline",
        "flagged": False,
        "baseline": None if previous_uri is None else str(previous_uri),
        "previous_started_at": None,
        "max_p99_regression_pct": float(max_p99_regression_pct),
        "worst_change_pct": None,
        "levels": [],
        "new_levels": [],
    }
    previous = read_json(previous_uri) if previous_uri else None
    if previous is None:
        record["summary"] = (f"no previous run at {previous_uri}; nothing to compare"
                             if previous_uri else "no previous run given; nothing to compare")
        return record
    previous = previous.get("benchmark", previous)
    if "results" not in previous:
        raise UserInputError(
            f"previous_uri: {previous_uri} is not a benchmark result or run summary; pass the "
            "results JSON the previous run wrote"
        )
    record["previous_started_at"] = previous.get("started_at")
    before = {_key(row): row for row in previous["results"]}
    for row in result.get("results", []):
        key = _key(row)
        old = before.get(key)
        if old is None:
            record["new_levels"].append(f"{key[0]} c{key[2]} b{key[1]}")
            continue
        change = (float(row["p99_ms"]) / float(old["p99_ms"]) - 1.0) * 100.0
        current_windows, previous_windows = window_p99s(row), window_p99s(old)
        ci = _welch_ci_pct(current_windows, previous_windows)
        flagged = change > max_p99_regression_pct and (ci is None or ci[0] > 0)
        record["levels"].append({
            "model": key[0], "batch_size": key[1], "concurrency": key[2],
            "p99_ms": float(row["p99_ms"]), "previous_p99_ms": float(old["p99_ms"]),
            "change_pct": change, "ci95_pct": ci,
            "windows": len(current_windows), "previous_windows": len(previous_windows),
            "flagged": flagged,
        })
    levels = record["levels"]
    if not levels:
        record["status"] = "no baseline"
        record["summary"] = f"the previous run at {previous_uri} measured none of these levels"
        return record
    worst = max(levels, key=lambda lv: lv["change_pct"])
    record["worst_change_pct"] = worst["change_pct"]
    flagged = [lv for lv in levels if lv["flagged"]]
    record["flagged"] = bool(flagged)
    record["status"] = "regression" if flagged else "ok"
    if flagged:
        parts = []
        for lv in flagged:
            ci = lv["ci95_pct"]
            ci_text = f", 95 % CI {ci[0]:+.1f} to {ci[1]:+.1f} %" if ci else ""
            parts.append(f"{lv['model']} c{lv['concurrency']} b{lv['batch_size']} "
                         f"{lv['previous_p99_ms']:.2f} -> {lv['p99_ms']:.2f} ms "
                         f"({lv['change_pct']:+.1f} %{ci_text})")
        record["summary"] = (f"p99 regression beyond {max_p99_regression_pct:g} %: "
                             + "; ".join(parts))
    else:
        record["summary"] = (
            f"no p99 regression beyond {max_p99_regression_pct:g} % in {len(levels)} levels "
            f"(worst {worst['model']} c{worst['concurrency']}: {worst['change_pct']:+.1f} %)"
        )
    return record
