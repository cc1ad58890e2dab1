"""The search's rounds: successive halving over serving candidates on one running tritonserver.

Round 0 measures every candidate with short windows; a candidate whose windows cannot meet the
constraints even allowing for their measured spread (p99 over the budget, throughput under the
target, failed requests) is discarded there, and of the rest only the best ``1/ETA`` (at least
two) go on to the next round, whose windows are ``ETA`` times longer. The incumbent (the gate's
variant with the default settings, marked ``incumbent``) goes on to the last round whenever it
can meet the constraints, besides the best. The last round measures each finalist in
``FINAL_PASSES`` interleaved passes, ``FINAL_SHARE`` of a benchmark level in all (the pairing,
not the length, is what makes finalists comparable; measuring less pays for the passes' extra
level start-ups): each pass every finalist in turn (one level of shorter windows), the next pass
in the reverse order, so that the drift of a shared machine hits all of them alike. A
finalist's figures are the mean over the passes, its spread theirs, and each pass pairs it with
the incumbent (``choice.pass_gains_pct``). Only the last round's numbers choose. An exhaustive
sweep (``rounds=1``) is the one-round schedule of the benchmark's own levels: every candidate one
level of full windows, no passes (what measuring every candidate fully costs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torchship.components.benchmark.results import find_level
from torchship.components.benchmark.stage import benchmark_endpoint
from torchship.components.tune_serving.choice import (
    gain_pct,
    spread_of,
    spread_pct,
    value_of,
    why_not,
)

__all__ = ["ETA", "FINAL_PASSES", "FINAL_SHARE", "ROUNDS", "measure_interleaved", "run_rounds", "schedule"]

# Each round keeps a third of the candidates and measures them with windows three times longer.
ETA = 3
# At most this many rounds.
ROUNDS = 3
# The last round's interleaved passes, and the share of a benchmark level (its windows of its
# window_s) they measure each finalist for in all: 3 passes of 3 windows of 2/9 of window_s.
FINAL_PASSES = 3
FINAL_SHARE = 2 / 3


def schedule(n: int, final_window_s: float, rounds: int = ROUNDS, eta: int = ETA,
             passes: int = FINAL_PASSES, share: float = FINAL_SHARE) -> list[dict]:
    """The rounds for ``n`` candidates: ``[{"round", "window_s", "keep", "passes"}]``; a round
    is added while more than two remain; round ``r`` before the last has windows of
    ``final_window_s / eta ** (last - r)``. The last (``keep`` None) measures in ``passes``
    interleaved passes with windows of ``final_window_s * share / passes``: ``share`` of one
    level with windows of ``final_window_s`` in all. ``rounds=1``, the exhaustive sweep: one
    round of full windows, no passes."""
    sizes = [n]
    while sizes[-1] > 2 and len(sizes) < max(1, int(rounds)):
        sizes.append(max(2, math.ceil(sizes[-1] / eta)))
    last, passes = len(sizes) - 1, max(1, int(passes))
    if int(rounds) <= 1:
        passes, share = 1, 1.0
    return [{"round": r, "window_s": (final_window_s / eta ** (last - r) if r < last else
                                      final_window_s * share / passes),
             "keep": sizes[r + 1] if r < last else None, "passes": 1 if r < last else passes}
            for r in range(len(sizes))]


def run_rounds(url: str, candidates: list[dict[str, Any]], test_path: str,
               objective: dict[str, Any], plan: list[dict], *, windows: int, warmup_s: float,
               say: Callable[[str], None], **measurement: Any) -> list[dict[str, Any]]:
    """Measure ``candidates`` (records, updated in place: ``levels``, ``rounds``, ``qualifies``,
    ``why_not``, ``outcome``) on the Triton at ``url`` (gRPC) round by round; return the
    finalists, every candidate measured in the last round (one that fails the constraints there
    with ``qualifies`` False). Each level: ``windows`` windows of the round's length after a warm-up of
    ``warmup_s`` (one round: the full warm-up; several: the first round's window, the models
    being warm from Triton's own warm-up at load, and none after the first round, which warmed
    them); the last round's levels in its interleaved passes (``measure_interleaved``)."""
    target = int(objective["target_concurrency"])
    alive = list(candidates)
    for step in plan:
        final = step["keep"] is None
        # Later rounds measure models the first round warmed: no warm-up (with perf_analyzer,
        # a warm-up is a process of its own, about 0.3 s a level).
        warm = (warmup_s if len(plan) == 1 else
                min(warmup_s, plan[0]["window_s"]) if step["round"] == 0 else 0.0)
        passes = int(step.get("passes") or 1)
        say(f"serving search round {step['round'] + 1} of {len(plan)}: {len(alive)} candidates, "
            + (f"{passes} interleaved passes of " if passes > 1 else "")
            + f"{windows} windows of {step['window_s']:.2f} s at concurrency {target}")
        levels = measure_interleaved(
            url, [c["model"] for c in alive], test_path, target, passes, say=say,
            **{**measurement, "warmup_s": warm, "window_s": step["window_s"],
               "min_windows": windows, "max_windows": windows})
        for candidate in alive:
            level = levels[candidate["model"]]
            candidate["levels"][f"c{target}"] = level
            candidate["rounds"].append({"round": step["round"], "window_s": step["window_s"],
                                        "passes": passes,
                                        **{k: level[k] for k in ("p99_ms", "throughput_rps",
                                                                 "spread_pct")}})
            candidate["why_not"] = why_not(candidate, objective, allow_spread=not final)
            candidate["qualifies"] = candidate["why_not"] is None
            if not candidate["qualifies"]:
                candidate["outcome"] = (f"discarded in round {step['round'] + 1}: "
                                        f"{candidate['why_not']}")
        failed = [c for c in alive if not c["qualifies"]]
        if final:
            say(f"serving search: {len(alive) - len(failed)} finalists meet the constraints"
                + (f", {len(failed)} do not" if failed else ""))
            return alive
        alive = [c for c in alive if c["qualifies"]]
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
    # The incumbent goes on besides the best: a challenger replaces it only in the last round.
    keep += [c for c in ranked[step["keep"]:] if c.get("incumbent")]
    for position, candidate in enumerate(ranked, start=1):
        if position <= step["keep"] or candidate.get("incumbent"):
            continue
        last = ranked[step["keep"] - 1]
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


def measure_interleaved(url: str, models: list[str], test_path: str, concurrency: int,
                        passes: int, *, say: Callable[[str], None], **measurement: Any,
                        ) -> dict[str, dict[str, Any]]:
    """Each of ``models`` on the Triton at ``url`` (gRPC) at ``concurrency``, in ``passes``
    passes: each pass one level of each model (``measurement``: the benchmark's method), in
    turn, the next pass in the reverse order (A B C, C B A, ...), so that a drift of the machine
    over the passes hits each alike. Returns each model's level: p50, p95, p99 and throughput the
    mean over the passes, ``spread_pct`` the passes' spread (one pass: its windows'), the passes
    themselves under ``passes``. Later passes do not warm up (the models are warm)."""
    runs: dict[str, list[dict[str, Any]]] = {model: [] for model in models}
    for number in range(max(1, int(passes))):
        order = list(models) if number % 2 == 0 else list(reversed(models))
        settings = {**measurement, "concurrency": [concurrency]}
        if number:
            settings["warmup_s"] = 0.0
        measured = benchmark_endpoint(url, "grpc", order, test_path, progress=say, **settings)
        for model in order:
            runs[model].append(_level_summary(find_level(measured, model, concurrency)))
    return {model: _over_passes(levels) for model, levels in runs.items()}


def _over_passes(levels: list[dict[str, Any]]) -> dict[str, Any]:
    if len(levels) == 1:
        return {**levels[0], "passes": [_pass(levels[0])]}

    def mean(key: str) -> float | None:
        values = [level[key] for level in levels if level.get(key) is not None]
        return sum(values) / len(values) if values else None

    figures = ("p50_ms", "p95_ms", "p99_ms", "throughput_rps")
    return {**{key: mean(key) for key in figures},
            "errors": sum(level["errors"] for level in levels),
            "stable": all(level["stable"] for level in levels),
            "duration_s": sum(level["duration_s"] for level in levels),
            "spread_pct": {key: round(spread_pct([level[key] for level in levels]), 2)
                           for key in ("p50_ms", "p99_ms", "throughput_rps")},
            "server_queue_us": mean("server_queue_us"),
            "server_compute_infer_us": mean("server_compute_infer_us"),
            "passes": [_pass(level) for level in levels]}


def _pass(level: dict[str, Any]) -> dict[str, Any]:
    return {key: level[key] for key in ("p50_ms", "p99_ms", "throughput_rps", "errors")}


def _level_summary(row: dict[str, Any]) -> dict[str, Any]:
    server = row.get("server") or {}
    return {**{key: row[key] for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps",
                                         "errors", "stable", "duration_s")},
            "spread_pct": row["stability"]["spread_pct"],
            "server_queue_us": server.get("queue_us"),
            "server_compute_infer_us": server.get("compute_infer_us")}
