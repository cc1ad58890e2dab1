"""How a benchmark measures: the settings of every level (concurrency, batch size, warm-up,
stability windows, timeouts) with their defaults, written once. ``benchmark_repository``,
``benchmark_endpoint``, the serving search, ``torchship bench`` and the pipeline's
``benchmark_*`` parameters all take them from here."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torchship.components.errors import UserInputError

__all__ = ["DEFAULT_CONCURRENCY", "PIPELINE_CONCURRENCY", "PIPELINE_SETTINGS", "Measurement",
           "Method", "default", "measurement_method"]

# The levels `torchship bench` sweeps by default.
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
# The pipeline's sweep (parameter benchmark_concurrency): fewer levels, for the demo's time.
PIPELINE_CONCURRENCY = (1, 4)
STABILITY_METRICS = ("throughput_rps", "p50_ms")
JUDGED_METRICS = ("throughput_rps", "p50_ms", "p99_ms", "mean_ms")


@dataclass(frozen=True)
class Measurement:
    """What a caller may set, with the defaults. Each level runs ``warmup_s`` unrecorded, then
    windows of ``window_s`` (0: ``duration_s / min_windows``) until the last ``min_windows``
    agree within ±``stability_pct`` % on every ``stability_metrics``, or ``max_windows`` ran."""

    concurrency: int | Sequence[int] = DEFAULT_CONCURRENCY
    batch_size: int = 1
    batch_sizes: Sequence[int] | None = None  # a sweep of rows per request (default: batch_size)
    warmup_s: float = 1.0
    duration_s: float = 3.0
    window_s: float = 0.0
    min_windows: int = 3
    max_windows: int = 10
    stability_pct: float = 15.0
    stability_metrics: Sequence[str] = STABILITY_METRICS
    request_timeout_s: float = 10.0
    client_processes: int | None = None  # default: one per 16 requests in flight, up to the cores
    # Who measures: "auto" (perf_analyzer where present, else the Python client),
    # "perf_analyzer" or "python" (see engine.py).
    engine: str = "auto"
    # The knee sweep (knee.py): double concurrency from the lowest level until throughput gains
    # less than knee_min_gain_pct %, p99 passes latency_budget_p99_ms or knee_max_concurrency.
    knee: bool = False
    knee_max_concurrency: int = 64
    knee_min_gain_pct: float = 5.0
    latency_budget_p99_ms: float | None = None
    # Keep every judged request's latency in the level's row (``latencies_ms``), for a caller
    # that pools levels (the perf_analyzer agreement); never in a stage's record.
    keep_latencies: bool = False


# The settings the pipeline exposes, as parameters `benchmark_<name>`; the benchmark and the
# serving search take them under `<name>`.
PIPELINE_SETTINGS = ("batch_size", "duration_s", "warmup_s", "window_s", "min_windows",
                     "max_windows", "stability_pct", "engine")


def default(name: str) -> Any:
    """The default of one setting."""
    return next(f.default for f in dataclasses.fields(Measurement) if f.name == name)


@dataclass
class Method:
    """How every level is measured and judged, as validated by ``measurement_method``."""

    concurrency: list[int]
    batch_sizes: list[int]
    warmup_s: float
    duration_s: float
    window_s: float
    min_windows: int
    max_windows: int
    stability_pct: float
    stability_metrics: tuple[str, ...]
    request_timeout_s: float
    client_processes: int
    engine: str = "auto"
    knee: bool = False
    knee_max_concurrency: int = 64
    knee_min_gain_pct: float = 5.0
    latency_budget_p99_ms: float | None = None
    keep_latencies: bool = False


def _clients_for(concurrency: int, requested: int | None) -> int:
    if requested is not None:
        return max(1, int(requested))
    # One process keeps ~10k requests/s in flight; more only split big levels across cores.
    return max(1, min(os.cpu_count() or 1, math.ceil(concurrency / 16)))


def measurement_method(**settings: Any) -> Method:
    """The validated method for ``settings`` (``Measurement``'s fields, the rest defaulted);
    ``UserInputError`` names a bad or unknown one."""
    known = {field.name for field in dataclasses.fields(Measurement)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserInputError(f"benchmark settings {', '.join(unknown)} are unknown; use any of "
                             f"{', '.join(sorted(known))}")
    m = Measurement(**settings)
    levels = [m.concurrency] if isinstance(m.concurrency, int) else list(m.concurrency)
    if not levels or any(int(c) < 1 for c in levels):
        raise UserInputError(f"concurrency: {m.concurrency} must be positive integers, e.g. (1, 4)")
    sizes = [m.batch_size] if m.batch_sizes is None else list(m.batch_sizes)
    if not sizes or any(int(b) < 1 for b in sizes):
        raise UserInputError(f"batch_sizes: {sizes} must be positive integers, e.g. (1, 8)")
    if m.duration_s <= 0 or m.warmup_s < 0:
        raise UserInputError("duration_s must be > 0 and warmup_s >= 0")
    if int(m.min_windows) < 1 or int(m.max_windows) < int(m.min_windows):
        raise UserInputError(
            f"min_windows {m.min_windows} / max_windows {m.max_windows}: need 1 <= min <= max"
        )
    window = float(m.window_s) if m.window_s else float(m.duration_s) / int(m.min_windows)
    if window <= 0:
        raise UserInputError(f"window_s: {m.window_s} must be > 0")
    unknown = [metric for metric in m.stability_metrics if metric not in JUDGED_METRICS]
    if unknown or not m.stability_metrics:
        raise UserInputError(
            f"stability_metrics: {list(m.stability_metrics)}; choose from "
            f"{', '.join(JUDGED_METRICS)}"
        )
    if not m.stability_pct > 0:
        raise UserInputError(f"stability_pct: {m.stability_pct} must be > 0, e.g. 15")
    if not m.request_timeout_s > 0:
        raise UserInputError(f"request_timeout_s: {m.request_timeout_s} must be > 0")
    if m.engine not in ("auto", "perf_analyzer", "python"):
        raise UserInputError(f"engine: '{m.engine}' is not one of auto, perf_analyzer, python")
    if m.knee and not (int(m.knee_max_concurrency) >= 1 and m.knee_min_gain_pct >= 0):
        raise UserInputError(f"knee_max_concurrency {m.knee_max_concurrency} / knee_min_gain_pct "
                             f"{m.knee_min_gain_pct}: need >= 1 and >= 0, e.g. 64 and 5")
    if m.latency_budget_p99_ms is not None and not m.latency_budget_p99_ms > 0:
        raise UserInputError(f"latency_budget_p99_ms: {m.latency_budget_p99_ms} must be > 0")
    levels = [int(c) for c in levels]
    most = max(levels + ([int(m.knee_max_concurrency)] if m.knee else []))
    return Method(
        concurrency=levels,
        batch_sizes=[int(b) for b in sizes],
        warmup_s=float(m.warmup_s),
        duration_s=window * int(m.min_windows),
        window_s=window,
        min_windows=int(m.min_windows),
        max_windows=int(m.max_windows),
        stability_pct=float(m.stability_pct),
        stability_metrics=tuple(m.stability_metrics),
        request_timeout_s=float(m.request_timeout_s),
        client_processes=_clients_for(most, m.client_processes),
        engine=m.engine,
        knee=bool(m.knee),
        knee_max_concurrency=int(m.knee_max_concurrency),
        knee_min_gain_pct=float(m.knee_min_gain_pct),
        latency_budget_p99_ms=(None if m.latency_budget_p99_ms is None
                               else float(m.latency_budget_p99_ms)),
        keep_latencies=bool(m.keep_latencies),
    )
