"""The concurrency sweep that finds the knee, instead of fixed levels (``knee=True``).

From the lowest of ``concurrency`` on, the level doubles until throughput stops rising (a level
that gains less than ``knee_min_gain_pct`` % over the best so far), p99 passes
``latency_budget_p99_ms``, or the next level would pass ``knee_max_concurrency``. The knee is the
level of the highest throughput within the budget; the result's ``knee`` lists one per model and
batch size with the reason the sweep stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["sweep_to_knee"]


def _within(row: dict, budget: float | None) -> bool:
    return budget is None or float(row["p99_ms"]) <= budget


def sweep_to_knee(measure: Callable[[int], dict], start: int, max_concurrency: int,
                  min_gain_pct: float, budget_p99_ms: float | None) -> tuple[list[dict], dict]:
    """Measure levels ``start``, ``2 start``, ... with ``measure(concurrency) -> row``; return
    the rows and the knee ``{"concurrency", "throughput_rps", "p99_ms", "measured", "reason"}``
    (``concurrency`` null when no level met the budget)."""
    rows: list[dict] = []
    best: dict | None = None
    concurrency = max(1, int(start))
    while True:
        row = measure(concurrency)
        rows.append(row)
        thr = float(row["throughput_rps"])
        if not _within(row, budget_p99_ms):
            reason = (f"p99 {row['p99_ms']:.2f} ms at concurrency {concurrency} passes the budget "
                      f"{budget_p99_ms:g} ms")
            break
        if best is not None and thr < float(best["throughput_rps"]) * (1 + min_gain_pct / 100):
            gain = (thr / float(best["throughput_rps"]) - 1) * 100
            reason = (f"throughput stopped rising: {thr:.0f} req/s at concurrency {concurrency}, "
                      f"{gain:+.1f}% over concurrency {best['concurrency']} (needs "
                      f"+{min_gain_pct:g}%)")
            break
        if best is None or thr > float(best["throughput_rps"]):
            best = row
        if concurrency * 2 > max_concurrency:
            reason = f"reached knee_max_concurrency {max_concurrency} still rising"
            break
        concurrency *= 2
    knee: dict[str, Any] = {"concurrency": None, "throughput_rps": None, "p99_ms": None,
                            "measured": [int(r["concurrency"]) for r in rows], "reason": reason}
    if best is not None:
        knee.update(concurrency=int(best["concurrency"]),
                    throughput_rps=float(best["throughput_rps"]), p99_ms=float(best["p99_ms"]))
    return rows, knee
