"""The statistics of a benchmark: the method, each window's numbers, stability, a level's row."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from torchship.components.benchmark.client import WindowReport
from torchship.components.benchmark.method import Method

__all__ = ["judge", "level_row", "server_delta", "spread_pct", "t_quantile_975", "window_row"]

HISTOGRAM_BINS_PER_DECADE = 20
CLIENT_SATURATED = 0.9  # cores per client process beyond which the client limits the load


_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: float) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (two-sided 95 %)."""
    if df < 1:
        return math.inf
    if df <= len(_T975):
        return _T975[math.floor(df) - 1]  # rounding df down is the conservative side
    return 1.960 + (2.042 - 1.960) * 30.0 / df  # ~ exact beyond 30 (2.021 at 40, 2.000 at 60)


def _percentiles(latencies_ms: np.ndarray) -> dict[str, float]:
    p50, p90, p95, p99 = (float(v) for v in np.percentile(latencies_ms, [50, 90, 95, 99]))
    return {"p50_ms": p50, "p90_ms": p90, "p95_ms": p95, "p99_ms": p99}


def window_row(report: WindowReport, window_s: float) -> dict[str, Any]:
    """One measured window's numbers, as the result's ``windows`` lists them."""
    lat = report.latencies_ms
    row: dict[str, Any] = {
        "index": report.index,
        "requests": int(lat.size),
        "errors": int(report.errors),
        "throughput_rps": lat.size / window_s,
        "p50_ms": None,
        "p99_ms": None,
        "mean_ms": None,
        "client_cpu_s": float(report.cpu_s),
    }
    if lat.size:
        p50, p99 = np.percentile(lat, [50, 99])
        row.update(p50_ms=float(p50), p99_ms=float(p99), mean_ms=float(lat.mean()))
    return row


def spread_pct(values: list[float | None]) -> float:
    """Largest distance from the mean, in % of the mean (inf when a value is missing)."""
    if not values or any(v is None for v in values):
        return math.inf
    mean = float(np.mean(values))
    if mean <= 0:
        return math.inf
    return float(max(abs(v - mean) for v in values) / mean * 100.0)


def judge(windows: list[dict], method: Method) -> tuple[bool, dict[str, float]]:
    """Whether the last ``min_windows`` windows agree within the band, and each metric's spread."""
    judged = windows[-method.min_windows :]
    spreads = {m: spread_pct([w[m] for w in judged])
               for m in ("throughput_rps", "p50_ms", "p99_ms", "mean_ms")}
    stable = len(judged) >= method.min_windows and all(
        spreads[m] <= method.stability_pct for m in method.stability_metrics
    )
    return stable, spreads


def _histogram(latencies_ms: np.ndarray) -> dict[str, list]:
    """Latencies in log-spaced bins (``HISTOGRAM_BINS_PER_DECADE`` per decade), trimmed."""
    if latencies_ms.size == 0:
        return {"edges_ms": [], "counts": []}
    steps = np.floor(np.log10(np.maximum(latencies_ms, 1e-6)) * HISTOGRAM_BINS_PER_DECADE)
    steps = steps.astype(np.int64)
    low, high = int(steps.min()), int(steps.max())
    counts = np.bincount(steps - low, minlength=high - low + 1)
    edges = 10.0 ** (np.arange(low, high + 2) / HISTOGRAM_BINS_PER_DECADE)
    return {"edges_ms": [float(f"{e:.6g}") for e in edges], "counts": counts.tolist()}


def _server_totals(stats: dict, model: str) -> dict[str, int] | None:
    entries = [e for e in stats.get("model_stats", []) if e.get("name") == model]
    if not entries:
        return None
    totals: dict[str, int] = {"execution_count": 0, "inference_count": 0}
    for entry in entries:
        totals["execution_count"] += int(entry.get("execution_count", 0) or 0)
        totals["inference_count"] += int(entry.get("inference_count", 0) or 0)
        for key, value in (entry.get("inference_stats") or {}).items():
            totals[f"{key}_count"] = totals.get(f"{key}_count", 0) + int(value.get("count", 0) or 0)
            totals[f"{key}_ns"] = totals.get(f"{key}_ns", 0) + int(value.get("ns", 0) or 0)
    return totals


def server_delta(before: dict | None, after: dict | None, model: str) -> dict[str, Any] | None:
    """Triton's statistics for ``model`` between two snapshots, per request; ``None`` without."""
    a = _server_totals(before or {}, model)
    b = _server_totals(after or {}, model)
    if a is None or b is None:
        return None

    def d(key: str) -> int:
        return b.get(key, 0) - a.get(key, 0)

    def per_request_us(key: str) -> float | None:
        count = d(f"{key}_count")
        return d(f"{key}_ns") / count / 1e3 if count > 0 else None

    executions, inferences = d("execution_count"), d("inference_count")
    return {
        "requests": d("success_count"),
        "failures": d("fail_count"),
        "executions": executions,
        "inferences": inferences,
        "avg_batch_size": inferences / executions if executions > 0 else None,
        "queue_us": per_request_us("queue"),
        "compute_input_us": per_request_us("compute_input"),
        "compute_infer_us": per_request_us("compute_infer"),
        "compute_output_us": per_request_us("compute_output"),
        "request_us": per_request_us("success"),
    }


def level_row(model: str, batch_size: int, concurrency: int, processes: int,
              windows: list[dict], reports: list[WindowReport], method: Method,
              server: dict | None, server_error: str | None) -> dict[str, Any]:
    """The result row of one level, pooled over its judged windows (schema in
    ``results``)."""
    stable, spreads = judge(windows, method)
    judged = reports[-method.min_windows :]
    judged_rows = windows[-method.min_windows :]
    lat = np.concatenate([r.latencies_ms for r in judged]) if judged else np.empty(0)
    duration = len(judged) * method.window_s
    all_ok = sum(w["requests"] for w in windows)
    errors = sum(w["errors"] for w in windows)
    first_error = next((r.first_error for r in reports if r.first_error), None)
    cpu_s = sum(r.cpu_s for r in judged)
    cpu_cores = cpu_s / duration if duration else 0.0
    row: dict[str, Any] = {
        "model": model,
        "concurrency": int(concurrency),
        "batch_size": int(batch_size),
        **_percentiles(lat),
        "mean_ms": float(lat.mean()),
        "std_ms": float(lat.std()),
        "min_ms": float(lat.min()),
        "max_ms": float(lat.max()),
        "throughput_rps": lat.size / duration,
        "throughput_sps": lat.size * batch_size / duration,
        "requests": int(lat.size),
        "errors": int(errors),
        "error_rate": errors / (all_ok + errors) if all_ok + errors else 0.0,
        "first_error": first_error,
        "duration_s": float(duration),
        "stable": bool(stable),
        "stability": {
            "band_pct": method.stability_pct,
            "metrics": list(method.stability_metrics),
            "judged_windows": [w["index"] for w in judged_rows],
            "spread_pct": {k: (None if math.isinf(v) else round(v, 2)) for k, v in spreads.items()},
        },
        "windows": windows,
        "p99_ci95_ms": None,
        "histogram": _histogram(lat),
        **({"latencies_ms": lat.tolist()} if method.keep_latencies else {}),
        "server": server,
        "server_error": server_error,
        "client": {
            "processes": int(processes),
            "threads": int(concurrency),
            "cpu_s": float(cpu_s),
            "cpu_cores": float(cpu_cores),
            "cpu_util_pct": float(cpu_cores / (os.cpu_count() or 1) * 100.0),
            # A client process near one busy core is the bottleneck, not the server.
            "saturated": bool(cpu_cores / max(1, min(processes, concurrency)) > CLIENT_SATURATED),
            "outside_server_us": None,
        },
    }
    p99s = [w["p99_ms"] for w in judged_rows if w["p99_ms"] is not None]
    if len(p99s) >= 2:
        mean = float(np.mean(p99s))
        half = t_quantile_975(len(p99s) - 1) * float(np.std(p99s, ddof=1)) / math.sqrt(len(p99s))
        row["p99_ci95_ms"] = [max(0.0, mean - half), mean + half]
    if server and server.get("request_us") is not None:
        row["client"]["outside_server_us"] = row["mean_ms"] * 1e3 - server["request_us"]
    return row


