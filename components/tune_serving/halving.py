"""The search's rounds: successive halving over serving candidates on one running tritonserver.

Round 0 measures every candidate with short windows; a candidate whose windows cannot meet the
constraints even allowing for their measured spread (p99 over the budget, throughput under the
target, failed requests) is discarded there, and of the rest only the best ``1/ETA`` (at least
two, and any within the windows' spread of the last one kept) go on to the next round, whose
windows are ``ETA`` times longer. The last round measures the finalists with the full windows the
benchmark stage would use, and only its numbers choose. An exhaustive sweep is the one-round
schedule: every candidate with full windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torchship.components.benchmark.results import find_level
from torchship.components.benchmark.stage import benchmark_endpoint
from torchship.components.tune_serving.choice import gain_pct, spread_of, value_of, why_not

__all__ = ["ETA", "ROUNDS", "run_rounds", "schedule"]

# Each round keeps a third of the candidates and measures them with windows three times longer.
ETA = 3
# At most this many rounds (the last at full length).
ROUNDS = 3


def schedule(n: int, final_window_s: float, rounds: int = ROUNDS, eta: int = ETA) -> list[dict]:
    """The rounds for ``n`` candidates: ``[{"round", "window_s", "keep"}]``, the last at
    ``final_window_s`` with ``keep`` None; a round is added while more than two remain."""
    sizes = [n]
    while sizes[-1] > 2 and len(sizes) < max(1, int(rounds)):
        sizes.append(max(2, math.ceil(sizes[-1] / eta)))
    last = len(sizes) - 1
    return [{"round": r, "window_s": final_window_s / eta ** (last - r),
             "keep": sizes[r + 1] if r < last else None} for r in range(len(sizes))]


def run_rounds(url: str, candidates: list[dict[str, Any]], test_path: str,
               objective: dict[str, Any], plan: list[dict], *, windows: int, warmup_s: float,
               say: Callable[[str], None], **measurement: Any) -> list[dict[str, Any]]:
    """Measure ``candidates`` (records, updated in place: ``levels``, ``rounds``, ``qualifies``,
    ``why_not``, ``outcome``) on the Triton at ``url`` (gRPC) round by round; return the
    finalists. Each level: ``windows`` windows of the round's length after a warm-up of
    ``warmup_s`` (one round: the full warm-up; several: the first round's window, the models
    being warm from Triton's own warm-up at load and the first round)."""
    target = int(objective["target_concurrency"])
    alive = list(candidates)
    for step in plan:
        final = step["keep"] is None
        warm = warmup_s if len(plan) == 1 else min(warmup_s, plan[0]["window_s"])
        say(f"serving search round {step['round'] + 1} of {len(plan)}: {len(alive)} candidates, "
            f"{windows} windows of {step['window_s']:.2f} s at concurrency {target}")
        measured = benchmark_endpoint(
            url, "grpc", [c["model"] for c in alive], test_path, progress=say,
            **{**measurement, "concurrency": [target], "warmup_s": warm,
               "window_s": step["window_s"], "min_windows": windows, "max_windows": windows})
        for candidate in alive:
            level = _level_summary(find_level(measured, candidate["model"], target))
            candidate["levels"][f"c{target}"] = level
            candidate["rounds"].append({"round": step["round"], "window_s": step["window_s"],
                                        **{k: level[k] for k in ("p99_ms", "throughput_rps",
                                                                 "spread_pct")}})
            candidate["why_not"] = why_not(candidate, objective, allow_spread=not final)
            candidate["qualifies"] = candidate["why_not"] is None
            if not candidate["qualifies"]:
                candidate["outcome"] = (f"discarded in round {step['round'] + 1}: "
                                        f"{candidate['why_not']}")
        failed = [c for c in alive if not c["qualifies"]]
        alive = [c for c in alive if c["qualifies"]]
        if final:
            candidate_count = len(alive)
            say(f"serving search: {candidate_count} finalists meet the constraints"
                + (f", {len(failed)} do not" if failed else ""))
            return alive
        alive = _keep_best(alive, step, objective)
        say(f"serving search round {step['round'] + 1}: {len(failed)} discarded (cannot meet "
            f"the constraints), {len(alive)} kept for round {step['round'] + 2}")
    return alive


def _keep_best(alive: list[dict[str, Any]], step: dict, objective: dict[str, Any],
               ) -> list[dict[str, Any]]:
    """The best ``step['keep']`` of ``alive`` on the objective; the rest get their outcome,
    which says when the windows could not tell one from the last kept (at this length the
    halving keeps the ranking it measured, as successive halving does)."""
    ranked = sorted(alive, key=lambda c: (value_of(c, objective) * (
        1 if objective["metric"] == "latency" else -1), c["simplicity"]))
    keep = ranked[:step["keep"]]
    for position, candidate in enumerate(ranked[step["keep"]:], start=step["keep"] + 1):
        last = keep[-1]
        band = max(spread_of(last, objective), spread_of(candidate, objective))
        behind = gain_pct(last, candidate, objective)
        why = (f"beyond the windows' spread of {band:.0f}%" if behind > band else
               f"within the windows' spread of {band:.0f}%, but a round keeps the best "
               f"{step['keep']}")
        candidate["qualifies"] = False
        candidate["outcome"] = (
            f"dropped after round {step['round'] + 1}: {position} of {len(ranked)}; the last "
            f"kept ({last['model']}) is {behind:.0f}% better, {why}")
        candidate["why_not"] = candidate["outcome"]
    return sorted(keep, key=lambda c: c["simplicity"])


def _level_summary(row: dict[str, Any]) -> dict[str, Any]:
    server = row.get("server") or {}
    return {**{key: row[key] for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps",
                                         "errors", "stable", "duration_s")},
            "spread_pct": row["stability"]["spread_pct"],
            "server_queue_us": server.get("queue_us"),
            "server_compute_infer_us": server.get("compute_infer_us")}
