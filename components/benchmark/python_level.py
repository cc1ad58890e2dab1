"""One level measured by the benchmark's own Python client (``client.ClientPool``): windows until
they agree, Triton's statistics over the judged ones, the level's row (``stats.level_row``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from torchship.components.benchmark.client import ClientPool, WindowReport
from torchship.components.benchmark.method import Method
from torchship.components.benchmark.requests import payloads
from torchship.components.benchmark.server import Endpoint, Model
from torchship.components.benchmark.stats import judge, level_row, server_delta, window_row
from torchship.components.errors import ServingError, one_line

__all__ = ["measure_level_python"]


def measure_level_python(pool: ClientPool, endpoint: Endpoint, model: Model,
                   rows: dict[str, np.ndarray],
                   batch_size: int, concurrency: int, method: Method,
                   on_window: Callable[[dict], None] | None, level_no: int,
                   levels_total: int) -> dict:
    client_bodies, extra = [], {}
    for client in range(concurrency):
        bodies, extra = payloads(endpoint, model, rows, batch_size,
                                 offset=client * 997 * batch_size)
        client_bodies.append(bodies)
    target = endpoint.target(model, extra)
    where = f"model '{model.name}' at concurrency {concurrency}, batch size {batch_size}"
    windows: list[dict] = []
    snapshots: dict[str, Any] = {"before": None, "after": None, "error": None}

    def snapshot(key: str) -> None:
        if snapshots["error"] is not None:
            return
        try:
            snapshots[key] = endpoint.statistics(model.name)
        except Exception as exc:  # noqa: BLE001 - statistics are extra; the run goes on
            snapshots["error"] = one_line(exc, 200)

    def decide(report: WindowReport) -> bool:
        window = window_row(report, method.window_s)
        windows.append(window)
        endpoint.check_alive(where)  # a server that is gone explains timeouts and errors
        if report.timed_out:
            raise ServingError(
                f"{where}: a request timed out after {method.request_timeout_s:g} s "
                f"({report.first_error}); the server is stuck or far too slow"
            )
        if window["requests"] == 0 and report.errors:
            raise ServingError(
                f"{where}: all {report.errors} requests of window {report.index} failed; "
                f"first: {report.first_error}"
            )
        stable = None
        if len(windows) >= method.min_windows:
            ok, _ = judge(windows, method)
            if ok or report.index == method.max_windows:
                stable = ok
        if stable is not None:
            snapshot("after")
        if on_window is not None:
            on_window({
                "model": model.name, "batch_size": batch_size, "concurrency": concurrency,
                "level": level_no, "levels": levels_total, "window": report.index,
                "min_windows": method.min_windows, "max_windows": method.max_windows,
                "throughput_rps": window["throughput_rps"], "p99_ms": window["p99_ms"],
                "errors": window["errors"], "stable": stable,
            })
        return stable is not None

    reports = pool.run_level(
        target, client_bodies, warmup_s=method.warmup_s, window_s=method.window_s,
        max_windows=method.max_windows, timeout_s=method.request_timeout_s,
        on_measure_start=lambda: snapshot("before"), on_window=decide,
    )
    if not any(w["requests"] for w in windows[-method.min_windows :]):
        first = next((r.first_error for r in reports if r.first_error), None)
        raise ServingError(
            f"{where} answered no request in {len(windows)} windows of {method.window_s:g} s "
            f"({sum(w['errors'] for w in windows)} errors; first: {first})"
        )
    server = None
    if snapshots["error"] is None:
        server = server_delta(snapshots["before"], snapshots["after"], model.name)
        if server is None:
            snapshots["error"] = f"no statistics for model '{model.name}'"
    return level_row(model.name, batch_size, concurrency, min(pool.size, concurrency), windows,
                     reports, method, server, snapshots["error"])
