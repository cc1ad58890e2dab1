"""How far the benchmark's numbers are from a direct perf_analyzer run on the same server.

``agreement`` measures each protocol and concurrency level in rounds, each round a pair taken
back to back, in alternating order (so load from other programs falls on both sides alike): one
benchmark level (``benchmark_endpoint``, whatever engine it picks) and one direct
``perf_analyzer`` run (3 windows, random input data as it sends by default; its own per-window
report, and every request's timestamps from ``--profile-export-file``). Each side's
figures pool its rounds: throughput is the median window's (a burst of load from elsewhere
spoils one window, not the median of many), p50 and p99 are percentiles of every request's
latency over all its rounds (a p99 of thousands of requests, where one window's p99 is the 6th
slowest of a few hundred and moves by 20% between windows on a shared machine).
``disagreement_pct`` is ``|benchmark / perf_analyzer - 1|`` in %; the largest over every figure
is the headline (goal: at most 10). ``self_disagreement_pct`` is perf_analyzer against itself,
the same figures of its odd rounds against its even rounds: how far apart two measurements of
one server by one tool fall on this machine, now. ``noise_pct`` is twice the standard error of
the difference between the two sides' pooled figures, from each side's round-to-round spread: a
disagreement within it is not shown to be a difference between the tools (a level keeps adding
rounds while a figure is beyond 10%, up to its limits, which narrows it).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from torchship.components.benchmark import perf_analyzer as pa
from torchship.components.benchmark.stage import benchmark_endpoint
from torchship.components.errors import UserInputError

__all__ = ["FIGURES", "agreement", "direct_run", "noise_pct"]

FIGURES = ("throughput_rps", "p50_ms", "p99_ms")


def direct_run(binary: Path, protocol: str, url: str, model: str, concurrency: int,
               window_s: float, timeout_s: float = 120.0) -> dict[str, Any]:
    """One plain perf_analyzer run: each window's throughput and p99 as it prints them, and
    every request's latency (ms) of those windows from its profile export."""
    with tempfile.TemporaryDirectory(prefix="torchship-pa-direct-") as tmp:
        export = Path(tmp) / "export.json"
        command = [str(binary), "-m", model, "-u", url, "-i", protocol,
                   "--concurrency-range", str(concurrency),
                   "--measurement-interval", str(round(window_s * 1000)),
                   "-s", "100000", "--max-trials", str(pa.STABLE_WINDOWS),
                   "--percentile", "99", "-v", "--profile-export-file", str(export)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env=pa.environment(), check=False)
        if done.returncode != 0 or not export.is_file():
            raise pa.PerfAnalyzerFailed(f"perf_analyzer exited with {done.returncode}: "
                                        f"{pa.last_line(done.stderr + chr(10) + done.stdout)}")
        windows, _, _ = pa.export_windows(export)
    passes = re.findall(r"Pass \[\d+\] throughput: ([0-9.]+) infer/sec\. p99 latency: (\d+) usec",
                        done.stdout)
    return {"windows": [{"throughput_rps": float(t), "p99_ms": float(p) / 1e3}
                        for t, p in passes[-pa.STABLE_WINDOWS:]],
            "latencies_ms": np.concatenate(windows[-pa.STABLE_WINDOWS:]).tolist()
            if windows else []}


def _figures(runs: list[dict], windows: list[dict]) -> dict[str, float]:
    """One side's figures: the median window's throughput; p50 and p99 of every request of
    ``runs`` pooled (each run's ``latencies_ms``)."""
    latencies = np.concatenate([np.asarray(run["latencies_ms"], dtype=np.float64)
                                for run in runs])
    p50, p99 = (float(v) for v in np.percentile(latencies, [50, 99]))
    return {"throughput_rps": statistics.median(w["throughput_rps"] for w in windows),
            "p50_ms": p50, "p99_ms": p99}


def noise_pct(ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> dict[str, float]:
    """How far apart the two sides' pooled figures may fall by chance, in %: twice the
    standard error of their difference, from each side's round-to-round spread (each round's
    figure over its mean, over the square root of the rounds); 0 with fewer than two rounds."""
    if min(len(ours), len(theirs)) < 2:
        return dict.fromkeys(FIGURES, 0.0)

    def relative_error(side: list[dict[str, float]], figure: str) -> float:
        values = [r[figure] for r in side]
        return statistics.stdev(values) / statistics.fmean(values) / len(values) ** 0.5

    return {f: 200.0 * (relative_error(ours, f) ** 2 + relative_error(theirs, f) ** 2) ** 0.5
            for f in FIGURES}


def _self_disagreement(runs: list[dict]) -> dict[str, float]:
    """perf_analyzer against itself: each figure of its odd runs against its even runs, in %
    (0 with fewer than two runs)."""
    if len(runs) < 2:
        return dict.fromkeys(FIGURES, 0.0)
    halves = [_figures(part, [w for run in part for w in run["windows"]])
              for part in (runs[0::2], runs[1::2])]
    return {f: abs(halves[0][f] / halves[1][f] - 1.0) * 100.0 for f in FIGURES}


def _ours(url: str, protocol: str, model: str, test_path: str | Path, level: int,
          settings: dict[str, Any]) -> tuple[dict, list[dict]]:
    result = benchmark_endpoint(url, protocol, [model], test_path, concurrency=(level,),
                                progress=None, keep_latencies=True, **settings)
    (row,) = result["results"]
    judged = [w for w in row["windows"]
              if w["index"] in row["stability"]["judged_windows"] and w["p99_ms"]]
    return row, judged


def agreement(urls: dict[str, str], model: str, test_path: str | Path, *,
              levels: Sequence[int] = (1, 8), rounds: int = 3, max_rounds: int = 12,
              max_level_s: float = 20.0, window_s: float = 0.2, goal_pct: float = 10.0,
              progress: Callable[[str], None] | None = None,
              **measurement: Any) -> dict[str, Any]:
    """Compare the benchmark with direct perf_analyzer runs on the running server at ``urls``
    (``{"grpc": "host:port", "http": "host:port"}``): per protocol and level, ``rounds`` pairs
    of measurements, more (up to ``max_rounds``, and while the level has taken less than
    ``max_level_s``) while a figure is off by more than ``goal_pct`` (noise shrinks with
    rounds, a real difference does not). ``UserInputError`` when perf_analyzer is missing."""
    binary = pa.find_perf_analyzer()
    if binary is None:
        raise UserInputError("perf_analyzer is not installed; run `make install` (or python -m "
                             "torchship.components.benchmark.perf_analyzer --install) or set "
                             "PERF_ANALYZER")
    say = progress or (lambda _line: None)
    # No warm-up on either side: a direct perf_analyzer run has none, and the pairs run back to
    # back on a server already warm (the benchmark's warm-up is a perf_analyzer run of its own
    # right before its level, which the direct runs do not get).
    settings = {"warmup_s": 0.0, "window_s": window_s, "min_windows": 3, "max_windows": 3,
                **measurement}
    rows, clients = [], set()
    for protocol, url in urls.items():
        for level in levels:
            ours: list[dict] = []
            theirs: list[dict] = []
            ours_windows: list[dict] = []
            theirs_windows: list[dict] = []
            ours_rounds: list[dict] = []  # each round's own figures, for the noise band
            theirs_rounds: list[dict] = []
            level_started = time.monotonic()
            while True:
                first_ours = len(ours) % 2 == 0
                for who in ("ours", "theirs") if first_ours else ("theirs", "ours"):
                    if who == "ours":
                        row, windows = _ours(url, protocol, model, test_path, level, settings)
                        ours.append(row)
                        ours_windows += windows
                        ours_rounds.append(_figures([row], windows))
                        clients.add((row["client"]["name"], row["client"]["version"]))
                    else:
                        run = direct_run(binary, protocol, url, model, level, window_s)
                        theirs.append(run)
                        theirs_windows += run["windows"]
                        theirs_rounds.append(_figures([run], run["windows"]))
                mine, other = _figures(ours, ours_windows), _figures(theirs, theirs_windows)
                off = {f: abs(mine[f] / other[f] - 1.0) * 100.0 for f in FIGURES}
                itself = _self_disagreement(theirs)
                noise = noise_pct(ours_rounds, theirs_rounds)
                if len(ours) >= rounds and (
                        max(off.values()) <= goal_pct or len(ours) >= max_rounds
                        or time.monotonic() - level_started > max_level_s):
                    break
            entry = {
                "protocol": protocol, "concurrency": level, "rounds": len(ours),
                "benchmark": mine, "perf_analyzer": other, "disagreement_pct": off,
                "self_disagreement_pct": itself, "noise_pct": noise,
                "client_cpu_s_per_request": statistics.median(
                    r["client"]["cpu_s_per_request"] or 0.0 for r in ours),
            }
            rows.append(entry)
            say(f"{protocol} c{level} ({len(ours)} rounds): " + ", ".join(
                f"{f} {entry['benchmark'][f]:.4g} vs {entry['perf_analyzer'][f]:.4g} "
                f"({off[f]:.1f}%; perf_analyzer itself {itself[f]:.1f}%, noise "
                f"{noise[f]:.1f}%)" for f in FIGURES))
    worst = max(rows, key=lambda r: max(r["disagreement_pct"].values()))
    return {"levels": rows, "clients": sorted(clients),
            "perf_analyzer_version": pa.version_of(binary),
            "max_disagreement_pct": max(worst["disagreement_pct"].values()),
            "worst": {"protocol": worst["protocol"], "concurrency": worst["concurrency"],
                      "figure": max(worst["disagreement_pct"],
                                    key=worst["disagreement_pct"].get)}}
