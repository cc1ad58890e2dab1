"""Benchmark stage: latency percentiles and throughput on a real Triton server, local or remote.

Two modes share one measurement core:

* ``benchmark_repository`` launches the bundled ``tritonserver`` over a model repository for the
  duration of the run, as Triton Model Analyzer's ``local`` mode does;
* ``benchmark_endpoint`` measures a running endpoint by URL: Triton over ``grpc`` or ``http``, or a
  Vertex AI endpoint through ``rawPredict`` with a KServe v2 JSON body (``vertex``).

Method, for every model, batch size and concurrency level:

1. one preflight request per model, checked against the model's metadata: a server that is down,
   refuses, times out or answers with an error fails the run at once with ``ServingError``;
2. ``concurrency`` closed-loop clients (threads in separate client processes, see
   ``client``) send real held-out rows of ``test_path``: ``warmup_s`` not recorded, then
   windows of ``window_s``;
3. from ``min_windows`` windows on, the level is *stable* when the last ``min_windows`` windows
   agree within ±``stability_pct`` % of their mean on each of ``stability_metrics``; otherwise
   windows go on, up to ``max_windows``, and the level is reported with ``stable: false``;
4. latency and throughput are pooled over those last ``min_windows`` windows (the judged ones);
   Triton's statistics API over the same period gives the server's own queue and compute time per
   request beside the client's view; the client processes' CPU time is recorded.

A request that takes longer than ``request_timeout_s`` stops the run with ``ServingError``, and
no wait in the run is longer than a window plus that timeout: never a hang.

The pieces live beside this module: ``method`` (the settings and their defaults), ``server`` (the
endpoint and the models it serves), ``requests`` (request bodies and the preflight), ``client``
and ``http_client`` (the client processes), ``stats`` (windows, stability, a level's row),
``display`` (progress), ``served`` (what served: the server's version, its binary, each model's
config as the running server reports it) and ``results`` (the result's JSON schema, CSV and KFP
metrics).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from torchship.components.benchmark.client import ClientPool
from torchship.components.benchmark.display import level_line
from torchship.components.benchmark.engine import annotate, cpu_model, engine_for, measure_level
from torchship.components.benchmark.knee import sweep_to_knee
from torchship.components.benchmark.method import Method, measurement_method
from torchship.components.benchmark.perf_analyzer import PerfAnalyzerFailed
from torchship.components.benchmark.python_level import measure_level_python
from torchship.components.benchmark.requests import preflight, rows_for
from torchship.components.benchmark.results import SCHEMA
from torchship.components.benchmark.served import (
    local_server_block,
    server_block,
    unanswered_block,
)
from torchship.components.benchmark.server import (
    Endpoint,
    Model,
    check_reachable,
    remote_endpoint,
    remote_models,
    repository_models,
    triton_client,
    vertex_models,
)
from torchship.components.contracts import OUTPUT_NAME
from torchship.components.data.splits import load_inputs
from torchship.components.errors import ServingError, UserInputError, one_line
from torchship.components.triton.server import TritonServer

__all__ = ["PROTOCOLS", "REMOTE_PROTOCOLS", "benchmark_endpoint", "benchmark_repository"]

PROTOCOLS = ("grpc", "http")  # against a local server
REMOTE_PROTOCOLS = ("grpc", "http", "vertex")
# Requests carry rows of the test split: this many at most, from row groups spread over it.
REQUEST_ROWS = 4096


# -- the measurement core -----------------------------------------------------------------------


def _plan(models: list[Model], x: dict[str, np.ndarray], method: Method) -> list[tuple]:
    """(model, its rows, its batch sizes) for each model; bad sizes or shapes fail here, before
    any server work."""
    plan = []
    for model in models:
        rows = rows_for(model, x)
        sizes = [1] if model.max_batch_size == 0 else method.batch_sizes
        for size in sizes:
            if model.max_batch_size and size > model.max_batch_size:
                raise UserInputError(
                    f"batch_size: {size} exceeds max_batch_size {model.max_batch_size} of model "
                    f"'{model.name}'"
                )
        plan.append((model, rows, sizes))
    return plan


def _sweep(endpoint: Endpoint, plan: list[tuple], method: Method,
           progress: Callable[[str], None], on_window: Callable[[dict], None] | None,
           client=None, local: bool = False, knees: list | None = None) -> list[dict]:
    for model, rows, sizes in plan:  # every model answers once before the clock starts
        for size in sizes:
            preflight(endpoint, client, model, rows, size, method.request_timeout_s)

    engine = engine_for(method, endpoint, local)
    knees = [] if knees is None else knees
    levels_total = sum(len(sizes) * len(method.concurrency) for _, _, sizes in plan)
    results: list[dict] = []
    with ExitStack() as stack:
        pool = None  # the Python client's processes, started when a level needs them
        warmed: dict[tuple[str, int], int] = {}  # (model, batch size) -> the level just measured

        def measure(model: Model, rows: dict, size: int, concurrency: int) -> dict:
            nonlocal pool
            row, why = None, engine.usable(endpoint, rows, size)
            level_no = len(results) + 1
            total = max(levels_total, level_no)
            if why is None:
                before = warmed.get((model.name, size))
                try:
                    row = measure_level(engine, endpoint, model, rows, size, concurrency,
                                        method, on_window, level_no, total,
                                        warm=f"measured at concurrency {before} just before"
                                        if before else None)
                except PerfAnalyzerFailed as exc:
                    why = f"perf_analyzer failed: {exc}"
            if row is None:
                if pool is None:
                    pool = stack.enter_context(ClientPool(method.client_processes))
                row = measure_level_python(pool, endpoint, model, rows, size, concurrency,
                                           method, on_window, level_no, total)
            warmed[model.name, size] = concurrency
            results.append(annotate(row, engine, "perf_analyzer" if why is None else "python",
                                    why))
            progress(level_line(results[-1]))
            return results[-1]

        for model, rows, sizes in plan:
            for size in sizes:
                if not method.knee:
                    for concurrency in method.concurrency:
                        measure(model, rows, size, concurrency)
                    continue
                _, knee = sweep_to_knee(
                    lambda c, m=model, r=rows, b=size: measure(m, r, b, c),
                    min(method.concurrency), method.knee_max_concurrency,
                    method.knee_min_gain_pct, method.latency_budget_p99_ms)
                knees.append({"model": model.name, "batch_size": size, **knee})
                progress(f"knee of '{model.name}' at batch size {size}: concurrency "
                         f"{knee['concurrency']} ({knee['reason']})")
    return results


def _result(mode: str, endpoint: Endpoint, method: Method, models: list[Model],
            results: list[dict], started: float, started_at: str, **extra) -> dict:
    return {
        "schema": SCHEMA,
        "mode": mode,
        "endpoint": endpoint.describe(),
        "protocol": endpoint.protocol,
        "repository": extra.get("repository"),
        "server_startup_s": extra.get("server_startup_s"),
        "server": extra.get("server"),
        "models": [m.name for m in models],
        "batch_size": method.batch_sizes[0],
        "batch_sizes": method.batch_sizes,
        "concurrency": (sorted({int(r["concurrency"]) for r in results}) if method.knee
                        else method.concurrency),
        "knee": extra.get("knee") if method.knee else None,
        "warmup_s": method.warmup_s,
        "duration_s": method.duration_s,
        "window_s": method.window_s,
        "min_windows": method.min_windows,
        "max_windows": method.max_windows,
        "stability_pct": method.stability_pct,
        "stability_metrics": list(method.stability_metrics),
        "request_timeout_s": method.request_timeout_s,
        "client_processes": method.client_processes,
        "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                 "python": platform.python_version(), "cpu_model": cpu_model()},
        "engine": method.engine,
        "clients": sorted({(r["client"]["name"], r["client"]["version"]) for r in results}),
        "started_at": started_at,
        "wall_s": time.monotonic() - started,
        "results": results,
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class _ServerExited(ServingError):
    """The local ``tritonserver`` exited mid-run; the message says how and what to do."""


def _server_exited(server: TritonServer, when: str) -> _ServerExited:
    return _ServerExited(
        f"tritonserver exited during the benchmark ({server.exit_reason()}) {when}; find out "
        "what stopped it (out of memory? killed? a crash in the model?) and run the benchmark again"
    )


# -- the two modes ------------------------------------------------------------------------------


def benchmark_repository(
    repository_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    *,
    protocol: str = "grpc",
    models: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = print,
    startup_timeout_s: float = 120.0,
    on_window: Callable[[dict], None] | None = None,
    server_args: Sequence[str] = (),
    **measurement: Any,
) -> dict:
    """Launch ``tritonserver`` over ``repository_dir`` and measure every model at every level.

    ``measurement``: how each level is measured (``method.Measurement``: concurrency,
    batch_size or batch_sizes, warmup_s, duration_s, window_s, min/max_windows, stability_pct,
    ...); a stable level takes ``duration_s`` of measured time, an unstable one up to
    ``max_windows`` windows. Returns the result described in ``results``. Raises
    ``ServingError`` when the server fails to start, exits, times out or answers no request;
    ``UserInputError`` for bad arguments.
    """
    if protocol not in PROTOCOLS:
        raise UserInputError(f"protocol: '{protocol}' is not one of {', '.join(PROTOCOLS)}")
    method = measurement_method(**measurement)
    repository_dir = Path(repository_dir)
    specs = repository_models(repository_dir, models)
    plan = _plan(specs, load_inputs(test_path, what="test_path", rows=REQUEST_ROWS), method)
    progress = progress or (lambda *_: None)
    started, started_at, knees = time.monotonic(), _now(), []

    with TritonServer(repository_dir, startup_timeout_s=startup_timeout_s,
                      extra_args=list(server_args)) as server:
        url = server.grpc_url if protocol == "grpc" else server.http_url

        def check_alive(level: str) -> None:
            if not server.is_running():
                raise _server_exited(server, f"while measuring {level}")

        endpoint = Endpoint(protocol, url, stats_url=server.http_url, stats_protocol="http",
                            check_alive=check_alive)
        progress(f"tritonserver ready in {server.startup_s:.1f} s ({endpoint.describe()})")
        served = local_server_block(server, [m.name for m in specs], method.request_timeout_s)
        client = triton_client(protocol, url, False, method.request_timeout_s)
        try:
            results = _sweep(endpoint, plan, method, progress, on_window, client, local=True,
                             knees=knees)
        except _ServerExited:
            raise
        except ServingError as exc:
            if not server.is_running():  # the failure is a symptom; the exit is the news
                stopped = f"and the run stopped on: {one_line(exc, 120)}"
                raise _server_exited(server, stopped) from exc
            raise
        finally:
            client.close()
            endpoint.close()
        startup_s = server.startup_s
    return _result("local", endpoint, method, specs, results, started, started_at, knee=knees,
                   repository=str(repository_dir), server_startup_s=startup_s, server=served)


def benchmark_endpoint(
    url: str,
    protocol: str,
    models: Sequence[str] | None,
    test_path: str | os.PathLike,
    *,
    progress: Callable[[str], None] | None = print,
    on_window: Callable[[dict], None] | None = None,
    headers: dict[str, str] | None = None,
    auth: str = "auto",
    output_names: Sequence[str] = (OUTPUT_NAME,),
    **measurement: Any,
) -> dict:
    """Measure a running endpoint by URL with the same method as ``benchmark_repository``.

    ``protocol``:

    * ``grpc``: ``url`` is ``host:port`` (or ``grpc://``, ``grpcs://`` for TLS);
    * ``http``: ``host:port`` or ``http(s)://host:port[/prefix]``;
    * ``vertex``: the full ``rawPredict`` URL of a Vertex AI endpoint serving Triton
      (``https://REGION-aiplatform.googleapis.com/v1/projects/P/locations/L/endpoints/E:rawPredict``);
      each request is a KServe v2 JSON body with ``X-Vertex-Ai-Triton-Redirect:
      v2/models/<model>/infer``. ``{model}`` in the URL is replaced by the model name. The model's
      inputs are the test split's (the tensor contract), with their shapes and types; there is
      no statistics API.

    ``models``: the names to measure (``None``: every ready model, where the server lists them).
    ``auth="auto"`` adds a Google bearer token (application default credentials) to ``vertex``
    requests over https; ``"google"`` always, ``"none"`` never. ``headers`` are sent with every
    request (never printed). Raises ``ServingError`` when the endpoint is down, answers with an
    error or times out: one line, within ``request_timeout_s`` of the failure.
    """
    if protocol not in REMOTE_PROTOCOLS:
        raise UserInputError(
            f"protocol: '{protocol}' is not one of {', '.join(REMOTE_PROTOCOLS)}"
        )
    if auth not in ("auto", "google", "none"):
        raise UserInputError(f"auth: '{auth}' is not one of auto, google, none")
    method = measurement_method(**measurement)
    x = load_inputs(test_path, what="test_path", rows=REQUEST_ROWS)
    progress = progress or (lambda *_: None)
    if isinstance(models, str):
        models = [models]
    endpoint = remote_endpoint(url, protocol, dict(headers or {}), auth)
    started, started_at, knees = time.monotonic(), _now(), []

    if protocol == "vertex":
        specs = vertex_models(models, x, output_names)
        try:
            results = _sweep(endpoint, _plan(specs, x, method), method, progress, on_window,
                             knees=knees)
        finally:
            endpoint.close()
        return _result("remote", endpoint, method, specs, results, started, started_at,
                       knee=knees, server=unanswered_block(
                           "Vertex AI rawPredict does not answer Triton's metadata API"))

    client = triton_client(protocol, endpoint.url, endpoint.tls, method.request_timeout_s,
                           endpoint.path_prefix)
    try:
        check_reachable(endpoint, client, method.request_timeout_s)
        specs = remote_models(endpoint, client, models, method.request_timeout_s)
        progress(f"{endpoint.describe()} is live; measuring {', '.join(m.name for m in specs)}")
        served = server_block(client, protocol, [m.name for m in specs],
                              headers=endpoint.headers or None, timeout_s=method.request_timeout_s)
        results = _sweep(endpoint, _plan(specs, x, method), method, progress, on_window, client,
                         knees=knees)
    finally:
        client.close()
        endpoint.close()
    return _result("remote", endpoint, method, specs, results, started, started_at, knee=knees,
                   server=served)


