"""Which client measures a level, and a level measured by perf_analyzer as a result row.

``engine`` (a ``Measurement`` setting): ``auto`` (the default) measures with NVIDIA's
perf_analyzer where it is found (see ``perf_analyzer``) and the endpoint is Triton over plain
gRPC or HTTP without extra headers, else with the Python client (``client``); ``perf_analyzer``
insists on it; ``python`` always uses the Python client. A level perf_analyzer cannot measure (a
request that fails, a server that does not answer) is measured again by the Python client, which
counts errors and timeouts, and the row says why (``client.fallback``).

Every row names its client (``client.name``, ``client.version``) and what the client cost
(``client.cpu_s_per_request``, ``client.cpu_cores``) and whether it shares the host with the
server (``client.shares_host``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from torchship.components.benchmark import perf_analyzer as pa
from torchship.components.benchmark.client import WindowReport
from torchship.components.benchmark.method import Method
from torchship.components.benchmark.server import Endpoint, Model
from torchship.components.benchmark.stats import judge, level_row, server_delta, window_row
from torchship.components.errors import ServingError, UserInputError, one_line

__all__ = ["ENGINES", "Engine", "annotate", "cpu_model", "engine_for", "measure_level"]

ENGINES = ("auto", "perf_analyzer", "python")
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
# perf_analyzer's CSV columns (µs) kept in a row's ``perf_analyzer`` breakdown.
_CSV_KEYS = {
    "Client Send": "client_send_us", "Network+Server Send/Recv": "network_server_us",
    "Server Queue": "server_queue_us", "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us", "Client Recv": "client_recv_us",
    "p50 latency": "p50_us", "p90 latency": "p90_us", "p95 latency": "p95_us",
    "p99 latency": "p99_us", "Avg latency": "mean_us", "Inferences/Second": "throughput_ips",
}


@dataclasses.dataclass
class Engine:
    """The client a sweep measures with: perf_analyzer's binary, or None for the Python client."""

    binary: Path | None
    version: str | None
    shares_host: bool | None
    note: str | None  # why perf_analyzer is not used, where it is not

    def usable(self, endpoint: Endpoint, rows: dict[str, np.ndarray],
               batch_size: int) -> str | None:
        """None when perf_analyzer can measure this level, else why not."""
        if self.binary is None:
            return self.note
        if endpoint.protocol not in ("grpc", "http") or endpoint.tls or endpoint.headers \
                or endpoint.path_prefix:
            return "perf_analyzer measures plain Triton gRPC/HTTP without extra headers here"
        if pa.exported_values(rows, batch_size) > pa.MAX_EXPORTED_VALUES:
            return (f"requests of more than {pa.MAX_EXPORTED_VALUES} values are measured by the "
                    "Python client (perf_analyzer's per-request export would be too large)")
        return None


def _shares_host(endpoint: Endpoint, local: bool) -> bool | None:
    if local:
        return True
    if endpoint.protocol == "vertex":
        return False
    host = urlsplit(f"//{endpoint.url}").hostname or ""
    return True if host in _LOCAL_HOSTS else None


def engine_for(method: Method, endpoint: Endpoint, local: bool) -> Engine:
    """The engine ``method.engine`` asks for; ``UserInputError`` when it asks for perf_analyzer
    and there is none."""
    shares = _shares_host(endpoint, local)
    if method.engine == "python":
        return Engine(None, None, shares, "engine 'python' asked for")
    binary = pa.find_perf_analyzer()
    if binary is None:
        if method.engine == "perf_analyzer":
            raise UserInputError(
                "engine: perf_analyzer was not found ($PERF_ANALYZER, PATH, "
                f"{pa.venv_home() / 'bin'}); run `make install` or set PERF_ANALYZER, or use "
                "engine 'auto'")
        return Engine(None, None, shares, "perf_analyzer not found; `make install` puts it in "
                                          "the venv")
    return Engine(binary, pa.version_of(binary), shares, None)


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _python_version() -> str:
    try:
        return metadata.version("torchship")
    except metadata.PackageNotFoundError:
        return "unknown"


def annotate(row: dict, engine: Engine, name: str, fallback: str | None) -> dict:
    """Add which client measured ``row`` and what it cost (fields added, none renamed)."""
    client = row["client"]
    requests = sum(w["requests"] for w in row["windows"][-len(row["stability"]["judged_windows"]):])
    client.update(
        name=name,
        version=engine.version if name == "perf_analyzer" else _python_version(),
        cpu_s_per_request=client["cpu_s"] / requests if requests else None,
        shares_host=engine.shares_host,
        fallback=fallback,
    )
    return row


def measure_level(engine: Engine, endpoint: Endpoint, model: Model,
                  rows: dict[str, np.ndarray], batch_size: int, concurrency: int,
                  method: Method, on_window: Callable[[dict], None] | None, level_no: int,
                  levels_total: int, warm: str | None = None) -> dict:
    """One level measured by perf_analyzer, as the row ``stats.level_row`` makes. ``warm``: why
    the server needs no warm-up for it (the model was just measured at another level; each
    perf_analyzer run opens its own connections, so a warm-up run would warm only the server).
    Raises ``pa.PerfAnalyzerFailed`` when perf_analyzer could not measure it, ``ServingError``
    when a request outlived the timeout or the server is gone."""
    where = f"model '{model.name}' at concurrency {concurrency}, batch size {batch_size}"
    metrics = method.stability_metrics
    percentile = 50 if "p50_ms" in metrics else 99 if "p99_ms" in metrics else None
    warmup = {"skipped": warm} if warm and method.warmup_s > 0 else None
    if method.warmup_s > 0 and not warm:  # before the statistics snapshot: not in its figures
        warmup = pa.warm_up(
            engine.binary, protocol=endpoint.protocol, url=endpoint.url, model=model.name,
            batched=model.max_batch_size > 0, rows=rows, batch_size=batch_size,
            concurrency=concurrency, warmup_s=method.warmup_s,
            request_timeout_s=method.request_timeout_s)
        endpoint.check_alive(where)
    snapshot_error, before = None, None
    try:
        before = endpoint.statistics(model.name)
    except Exception as exc:  # noqa: BLE001 - statistics are extra; the run goes on
        snapshot_error = one_line(exc, 200)
    reports, windows, runs = [], [], []
    stable = False
    while len(reports) < method.max_windows and not stable:
        run = pa.measure(
            engine.binary, protocol=endpoint.protocol, url=endpoint.url, model=model.name,
            batched=model.max_batch_size > 0, rows=rows, batch_size=batch_size,
            concurrency=concurrency, window_s=method.window_s, percentile=percentile,
            request_timeout_s=method.request_timeout_s)
        runs.append(run)
        endpoint.check_alive(where)
        if run.slowest_ms > method.request_timeout_s * 1e3:
            raise ServingError(
                f"{where}: a request timed out after {method.request_timeout_s:g} s (it took "
                f"{run.slowest_ms / 1e3:.2f} s under perf_analyzer); the server is stuck or far "
                "too slow")
        cores = run.cpu_s / run.wall_s if run.wall_s > 0 else 0.0
        new = list(zip(run.windows, run.lengths_s))[: method.max_windows - len(reports)]
        for lat, length in new:
            report = WindowReport(len(reports) + 1, lat, 0, None, cores * length, False)
            reports.append(report)
            windows.append(window_row(report, length))
        if len(reports) >= method.min_windows:
            stable = judge(windows, method)[0]
        done = stable or len(reports) >= method.max_windows
        for report, window in zip(reports[-len(new):], windows[-len(new):]):
            if on_window is not None:
                last = done and report.index == len(reports)
                on_window({
                    "model": model.name, "batch_size": batch_size, "concurrency": concurrency,
                    "level": level_no, "levels": levels_total, "window": report.index,
                    "min_windows": method.min_windows, "max_windows": method.max_windows,
                    "throughput_rps": window["throughput_rps"], "p99_ms": window["p99_ms"],
                    "errors": 0, "stable": stable if last else None,
                })
            endpoint.check_alive(where)
    if not any(w["requests"] for w in windows[-method.min_windows:]):
        raise pa.PerfAnalyzerFailed(f"perf_analyzer measured no request of {where}")
    server = None
    if snapshot_error is None:
        try:
            server = server_delta(before, endpoint.statistics(model.name), model.name)
        except Exception as exc:  # noqa: BLE001
            snapshot_error = one_line(exc, 200)
        if server is None and snapshot_error is None:
            snapshot_error = f"no statistics for model '{model.name}'"
    judged_lengths = [w["requests"] / w["throughput_rps"] for w in windows[-method.min_windows:]
                      if w["throughput_rps"]]
    judged = dataclasses.replace(method, window_s=float(np.mean(judged_lengths)))
    row = level_row(model.name, batch_size, concurrency, 1, windows, reports, judged, server,
                    snapshot_error)
    last = runs[-1]
    row["client"]["wall_s"] = float(sum(run.wall_s for run in runs))
    # perf_analyzer runs a thread per request in flight: saturated near every core it can use.
    usable = min(os.cpu_count() or 1, concurrency)
    row["client"]["saturated"] = bool(row["client"]["cpu_cores"] / usable > 0.9)
    row["perf_analyzer"] = {  # its own report of the last run's 3 windows (µs)
        "version": engine.version, "runs": len(runs), "warmup": warmup,
        "command": " ".join([os.path.basename(last.command[0])] + last.command[1:]),
        **{key: last.csv.get(column) for column, key in _CSV_KEYS.items()},
    }
    return row
