"""The benchmark's result document: its schema, the level lookup, KFP metrics, JSON and CSV files.

Result JSON (``write_json``), schema ``torchship.benchmark/v2``; times in ms unless named ``_us``
(microseconds) or ``_s`` (seconds)::

    schema              "torchship.benchmark/v2"
    mode                "local" (server launched over a repository) | "remote" (a URL)
    endpoint            the URL measured (credentials never appear)
    protocol            "grpc" | "http" | "vertex"
    repository          the model repository (local mode), else null
    server_startup_s    local mode: seconds until the server was ready, else null
    server              what served, as the running server answered (``served.py``), or null in
                        results written before it was recorded:
                        {"name", "version" (Triton's, e.g. "2.51.0"), "binary" (the
                         tritonserver that ran, local mode; null remote), "kind", "description"
                         (how torchship found that install, where it says), "models": {model:
                         {"backend", "platform", "max_batch_size", "instance_group": [{"count",
                         "kind"}], "dynamic_batching": null | {"max_queue_delay_microseconds",
                         "preferred_batch_size"}} | null}, "errors": [what went unanswered]}
    models              model names, in the order measured
    batch_size          the first of batch_sizes (v1 readers)
    batch_sizes         rows per request, one sweep each
    concurrency         the concurrency levels (requests in flight); with the knee sweep,
                        the levels it measured
    knee                null, or with knee=True one per model and batch size (knee.py):
                        {"model", "batch_size", "concurrency" (null: none within the budget),
                         "throughput_rps", "p99_ms", "measured": [levels], "reason"}
    warmup_s, duration_s, window_s, min_windows, max_windows, stability_pct,
    stability_metrics, request_timeout_s, client_processes    the method, as run
    host                {"cpu_count", "platform", "python", "cpu_model"} of the client machine
    engine              the engine asked for: "auto" | "perf_analyzer" | "python" (engine.py)
    clients             [[name, version], ...]: the clients that measured the levels
    started_at          ISO 8601 UTC; wall_s: seconds the whole run took
    results             one row per (model, batch_size, concurrency):
      model, batch_size, concurrency
      p50_ms, p90_ms, p95_ms, p99_ms, mean_ms, std_ms, min_ms, max_ms   over the judged windows
      throughput_rps      requests/s = requests / duration_s; throughput_sps: rows/s
      requests            successful requests in the judged windows; duration_s their length
      errors              failed requests in every measured window; error_rate over those windows
      first_error         the first failure's message, or null
      stable              true when the judged windows agree within the band
      stability           {"band_pct", "metrics", "judged_windows", "spread_pct": {metric: %}}
      windows             every measured window: {"index", "requests", "errors",
                          "throughput_rps", "p50_ms", "p99_ms", "mean_ms", "client_cpu_s"}
      p99_ci95_ms         [low, high]: 95 % t-interval of the judged windows' p99, or null
      histogram           {"edges_ms": [...], "counts": [...]}: judged-window latencies in
                          log-spaced bins (20 per decade), trimmed to the occupied range
      server              Triton's statistics over the level, or null (see server_error):
                          {"requests", "failures", "executions", "inferences", "avg_batch_size",
                           "queue_us", "compute_input_us", "compute_infer_us",
                           "compute_output_us", "request_us"} (per request, µs)
      client              {"processes", "threads", "cpu_s", "cpu_cores", "cpu_util_pct",
                           "saturated", "outside_server_us", "name", "version",
                           "cpu_s_per_request", "shares_host", "fallback"}: the load generator's
                          CPU (cores busy, % of the machine; saturated: a process above 0.9
                          cores, so the client may limit the load), the mean latency not spent in
                          the server, which client measured ("perf_analyzer" or "python") and its
                          version, its CPU seconds per request, whether it ran on the server's
                          host (null: unknown), and why perf_analyzer did not measure (or null)
      perf_analyzer       only where perf_analyzer measured: its own report of its last run
                          (µs): {"version", "runs", "warmup", "command", "client_send_us",
                          "network_server_us", "server_queue_us", "server_compute_input_us",
                          "server_compute_infer_us", "server_compute_output_us",
                          "client_recv_us", "p50_us", "p90_us", "p95_us", "p99_us", "mean_us",
                          "throughput_ips"}; warmup: null (warmup_s 0), or the warm-up
                          perf_analyzer ran before the level, its report discarded:
                          {"by": "perf_analyzer", "warmup_s", "windows",
                           "measurement_interval_ms", "requests", "wall_s", "command"}, or
                          {"skipped": why} where the model was just measured at another level

``files.write_json`` writes it, ``write_csv`` writes the rows flat, ``metrics_for_kfp`` gives the
numbers a KFP ``Metrics`` artifact takes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Any

from torchship.components.files import write_text

__all__ = ["CSV_COLUMNS", "SCHEMA", "find_level", "metrics_for_kfp", "write_csv"]

SCHEMA = "torchship.benchmark/v2"
CSV_COLUMNS = (
    "model", "batch_size", "concurrency", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms",
    "std_ms", "min_ms", "max_ms", "throughput_rps", "throughput_sps", "requests", "errors",
    "error_rate", "stable", "windows", "p99_ci95_low_ms", "p99_ci95_high_ms",
    "server_requests", "server_avg_batch_size", "server_queue_us", "server_compute_input_us",
    "server_compute_infer_us", "server_compute_output_us", "server_request_us",
    "client_processes", "client_cpu_s", "client_cpu_cores", "client_outside_server_us",
    "client_name", "client_version", "client_cpu_s_per_request", "client_shares_host",
)


def find_level(result: dict, model: str, concurrency: int,
               batch_size: int | None = None) -> dict | None:
    """The result row of ``model`` at ``concurrency`` (and ``batch_size``, default: the first)."""
    batch_size = result.get("batch_size", 1) if batch_size is None else batch_size
    for row in result.get("results", []):
        if (row["model"] == model and int(row["concurrency"]) == int(concurrency)
                and int(row.get("batch_size", 1)) == int(batch_size)):
            return row
    return None


def _metric_name(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", "_".join(str(p) for p in parts)).strip("_")


def metrics_for_kfp(result: dict) -> dict[str, float]:
    """Flat ``{name: number}`` for a KFP ``Metrics`` artifact: per model and level
    ``<model>_c<c>[_b<b>]_<metric>`` (``_b`` only when several batch sizes were swept)."""
    several = len(result.get("batch_sizes") or [result.get("batch_size", 1)]) > 1
    metrics: dict[str, float] = {}
    for row in result.get("results", []):
        level = f"c{row['concurrency']}" + (f"_b{row['batch_size']}" if several else "")
        values = {
            "p50_ms": row.get("p50_ms"), "p95_ms": row.get("p95_ms"), "p99_ms": row.get("p99_ms"),
            "mean_ms": row.get("mean_ms"), "throughput_rps": row.get("throughput_rps"),
            "errors": row.get("errors"),
            "stable": None if row.get("stable") is None else float(bool(row["stable"])),
            "server_queue_us": (row.get("server") or {}).get("queue_us"),
            "server_compute_infer_us": (row.get("server") or {}).get("compute_infer_us"),
            "client_cpu_cores": (row.get("client") or {}).get("cpu_cores"),
            "client_cpu_us_per_request": (
                None if (row.get("client") or {}).get("cpu_s_per_request") is None
                else row["client"]["cpu_s_per_request"] * 1e6),
        }
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                metrics[_metric_name(row["model"], level, key)] = float(value)
    return metrics


def _csv_row(row: dict) -> dict[str, Any]:
    server, client = row.get("server") or {}, row.get("client") or {}
    ci = row.get("p99_ci95_ms") or [None, None]
    flat = {key: row.get(key) for key in CSV_COLUMNS}
    flat.update(
        windows=len(row.get("windows") or []),
        p99_ci95_low_ms=ci[0], p99_ci95_high_ms=ci[1],
        server_requests=server.get("requests"),
        server_avg_batch_size=server.get("avg_batch_size"),
        server_queue_us=server.get("queue_us"),
        server_compute_input_us=server.get("compute_input_us"),
        server_compute_infer_us=server.get("compute_infer_us"),
        server_compute_output_us=server.get("compute_output_us"),
        server_request_us=server.get("request_us"),
        client_processes=client.get("processes"), client_cpu_s=client.get("cpu_s"),
        client_cpu_cores=client.get("cpu_cores"),
        client_outside_server_us=client.get("outside_server_us"),
        client_name=client.get("name"), client_version=client.get("version"),
        client_cpu_s_per_request=client.get("cpu_s_per_request"),
        client_shares_host=client.get("shares_host"),
    )
    return {k: ("" if v is None else v) for k, v in flat.items()}


def write_csv(result: dict, path: str | os.PathLike) -> Path:
    """One CSV row per model and level (columns ``CSV_COLUMNS``), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in result.get("results", []):
        writer.writerow(_csv_row(row))
    return write_text(path, buffer.getvalue())
