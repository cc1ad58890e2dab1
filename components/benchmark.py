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
   ``benchmark_client``) send real held-out rows of ``test_path``: ``warmup_s`` not recorded, then
   windows of ``window_s``;
3. from ``min_windows`` windows on, the level is *stable* when the last ``min_windows`` windows
   agree within ±``stability_pct`` % of their mean on each of ``stability_metrics``; otherwise
   windows go on, up to ``max_windows``, and the level is reported with ``stable: false``;
4. latency and throughput are pooled over those last ``min_windows`` windows (the judged ones);
   Triton's statistics API over the same period gives the server's own queue and compute time per
   request beside the client's view; the client processes' CPU time is recorded.

A request that takes longer than ``request_timeout_s`` stops the run with ``ServingError``, and
no wait in the run is longer than a window plus that timeout: never a hang.

Result JSON (``write_json``), schema ``torchship.benchmark/v2``; times in ms unless named ``_us``
(microseconds) or ``_s`` (seconds)::

    schema              "torchship.benchmark/v2"
    mode                "local" (server launched over a repository) | "remote" (a URL)
    endpoint            the URL measured (credentials never appear)
    protocol            "grpc" | "http" | "vertex"
    repository          the model repository (local mode), else null
    server_startup_s    local mode: seconds until the server was ready, else null
    models              model names, in the order measured
    batch_size          the first of batch_sizes (v1 readers)
    batch_sizes         rows per request, one sweep each
    concurrency         the concurrency levels (requests in flight)
    warmup_s, duration_s, window_s, min_windows, max_windows, stability_pct,
    stability_metrics, request_timeout_s, client_processes    the method, as run
    host                {"cpu_count", "platform", "python"} of the client machine
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
                           "saturated", "outside_server_us"}: the load generator's CPU (cores
                          busy, % of the machine; saturated: a process above 0.9 cores, so the
                          client may limit the load) and the mean latency not spent in the server

``write_csv`` writes the rows flat, ``metrics_for_kfp`` gives the numbers a KFP ``Metrics``
artifact takes.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from torchship.components.benchmark_client import (
    ClientPool,
    HttpConnection,
    Target,
    WindowReport,
    http_error,
)
from torchship.components.errors import ServingError, UserInputError
from torchship.components.model_repository import load_sample

__all__ = [
    "DEFAULT_CONCURRENCY",
    "PROTOCOLS",
    "REMOTE_PROTOCOLS",
    "SCHEMA",
    "ProgressBar",
    "benchmark_endpoint",
    "benchmark_repository",
    "find_level",
    "metrics_for_kfp",
    "read_json",
    "write_csv",
    "write_json",
    "write_text_atomic",
]

SCHEMA = "torchship.benchmark/v2"
PROTOCOLS = ("grpc", "http")  # against a local server
REMOTE_PROTOCOLS = ("grpc", "http", "vertex")
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)
STABILITY_METRICS = ("throughput_rps", "p50_ms")
PAYLOADS_PER_CLIENT = 16  # distinct held-out batches each client cycles through
HISTOGRAM_BINS_PER_DECADE = 20
CLIENT_SATURATED = 0.9  # cores per client process beyond which the client limits the load
CSV_COLUMNS = (
    "model", "batch_size", "concurrency", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms",
    "std_ms", "min_ms", "max_ms", "throughput_rps", "throughput_sps", "requests", "errors",
    "error_rate", "stable", "windows", "p99_ci95_low_ms", "p99_ci95_high_ms",
    "server_requests", "server_avg_batch_size", "server_queue_us", "server_compute_input_us",
    "server_compute_infer_us", "server_compute_output_us", "server_request_us",
    "client_processes", "client_cpu_s", "client_cpu_cores", "client_outside_server_us",
)
_V2_TYPES = {  # ModelConfig DataType -> KServe v2 datatype
    "TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16", "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8", "TYPE_INT16": "INT16", "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES", "TYPE_BF16": "BF16",
}


# -- what is measured ---------------------------------------------------------------------------


@dataclass
class _Model:
    """What the client needs to know about one served model."""

    name: str
    input_name: str
    datatype: str  # KServe v2 datatype, e.g. "FP32"
    dims: list[int]  # without the batch dimension; -1 where free
    max_batch_size: int  # 0: the model takes no batch dimension
    outputs: list[str]


@dataclass
class _Method:
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


class _Endpoint:
    """One server as the measurement core sees it: where requests go, how to read its
    statistics, and whether it is still up."""

    def __init__(self, protocol: str, url: str, *, tls: bool = False, path_prefix: str = "",
                 headers: dict[str, str] | None = None, stats_url: str | None = None,
                 stats_protocol: str | None = None, alive: Callable[[], str | None] | None = None):
        self.protocol = protocol
        self.url = url  # host:port (grpc/http) or the full URL (vertex)
        self.tls = tls
        self.path_prefix = path_prefix.rstrip("/")
        self.headers = dict(headers or {})
        self.stats_url = stats_url
        self.stats_protocol = stats_protocol
        self.alive = alive or (lambda: None)
        self._stats_client = None

    def describe(self) -> str:
        if self.protocol == "vertex":
            return self.url
        scheme = {"grpc": "grpc", "http": "http"}[self.protocol] + ("s" if self.tls else "")
        return f"{scheme}://{self.url}{self.path_prefix}"

    def target(self, model: _Model, extra_headers: dict[str, str]) -> Target:
        headers = tuple({**self.headers, **extra_headers}.items())
        if self.protocol == "grpc":
            return Target("grpc", grpc_target=self.url, tls=self.tls, headers=headers)
        if self.protocol == "vertex":
            parts = urlsplit(self.url.replace("{model}", model.name))
            path = parts.path or "/"
            if parts.query:
                path += f"?{parts.query}"
            return Target("http", host=parts.hostname or "", port=_port_of(parts),
                          path=path, tls=parts.scheme == "https", headers=headers)
        host, port = _split_host_port(self.url, 443 if self.tls else 80)
        path = f"{self.path_prefix}/v2/models/{model.name}/infer"
        return Target("http", host=host, port=port, path=path, tls=self.tls, headers=headers)

    def statistics(self, model: str) -> dict:
        """Triton's cumulative statistics for ``model`` (all versions); raises when unavailable."""
        if self.stats_url is None:
            raise ServingError(f"the {self.protocol} protocol has no statistics API")
        if self._stats_client is None:
            self._stats_client = _triton_client(
                self.stats_protocol, self.stats_url, self.tls, 10.0, self.path_prefix
            )
        return _call(self._stats_client, self.stats_protocol, "get_inference_statistics",
                     model, headers=self.headers or None, timeout_s=10.0)

    def close(self) -> None:
        if self._stats_client is not None:
            try:
                self._stats_client.close()
            except Exception:  # noqa: BLE001, S110 - closing a client that is already gone
                pass
            self._stats_client = None


def _port_of(parts) -> int:
    try:
        port = parts.port
    except ValueError as exc:
        raise UserInputError(f"url: '{parts.geturl()}' has an invalid port ({exc})") from exc
    return port or (443 if parts.scheme == "https" else 80)


def _split_host_port(address: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(f"//{address}")
    try:
        port = parts.port
    except ValueError as exc:
        raise UserInputError(f"url: '{address}' has an invalid port ({exc})") from exc
    return parts.hostname or "127.0.0.1", port or default_port


def _triton_client(protocol: str, url: str, tls: bool, timeout_s: float, path_prefix: str = ""):
    if protocol == "grpc":
        import tritonclient.grpc as module

        return module.InferenceServerClient(url, ssl=tls)
    import tritonclient.http as module

    return module.InferenceServerClient(
        url + path_prefix, connection_timeout=timeout_s, network_timeout=timeout_s, ssl=tls
    )


def _call(client, protocol: str, method: str, *args, headers=None, timeout_s: float, **kwargs):
    """Call a tritonclient method with the timeout each protocol takes; JSON for gRPC too."""
    if protocol == "grpc":
        kwargs.update(client_timeout=timeout_s)
        if method not in ("is_server_live", "is_server_ready", "infer"):
            kwargs.update(as_json=True)
    return getattr(client, method)(*args, headers=headers, **kwargs)


def _one_line(exc: BaseException | str, width: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= width else text[:width] + " ..."


# -- inputs -------------------------------------------------------------------------------------


def _repository_models(repository_dir: Path, models: Sequence[str] | None) -> list[_Model]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    if not repository_dir.is_dir():
        raise UserInputError(
            f"repository_dir: {repository_dir} is not a directory; run the deploy stage first"
        )
    available = {p.parent.name: p for p in repository_dir.glob("*/config.pbtxt")}
    if not available:
        raise UserInputError(
            f"repository_dir: no <model>/config.pbtxt under {repository_dir}; run the deploy stage"
        )
    names = sorted(available) if models is None else list(models)
    missing = [n for n in names if n not in available]
    if missing:
        raise UserInputError(
            f"models: {', '.join(missing)} not in {repository_dir} (it has "
            f"{', '.join(sorted(available))})"
        )
    out = []
    for name in names:
        try:
            config = text_format.Parse(available[name].read_text(), mc.ModelConfig())
        except Exception as exc:
            raise UserInputError(
                f"repository_dir: {available[name]} is not a valid Triton ModelConfig "
                f"({_one_line(exc)}); rebuild the repository with the deploy stage"
            ) from exc
        if len(config.input) != 1:
            raise UserInputError(
                f"repository_dir: model '{name}' has {len(config.input)} inputs; the benchmark "
                "feeds one feature matrix"
            )
        tensor = config.input[0]
        out.append(_Model(
            name=config.name or name,
            input_name=tensor.name,
            datatype=_V2_TYPES[mc.DataType.Name(tensor.data_type)],
            dims=[int(d) for d in tensor.dims],
            max_batch_size=int(config.max_batch_size),
            outputs=[o.name for o in config.output],
        ))
    return out


def _remote_models(endpoint: _Endpoint, client, models: Sequence[str] | None,
                   timeout_s: float) -> list[_Model]:
    protocol = endpoint.protocol
    headers = endpoint.headers or None
    if models is None:
        try:
            index = _call(client, protocol, "get_model_repository_index", headers=headers,
                          timeout_s=timeout_s)
        except Exception as exc:
            raise UserInputError(
                f"models: {endpoint.describe()} does not list its models "
                f"({_one_line(exc, 120)}); pass the model names to measure"
            ) from exc
        if isinstance(index, dict):
            index = index.get("models", [])
        models = sorted({m["name"] for m in index if m.get("state", "READY") == "READY"})
        if not models:
            raise ServingError(f"{endpoint.describe()} serves no ready model")
    out = []
    for name in models:
        try:
            meta = _call(client, protocol, "get_model_metadata", name, headers=headers,
                         timeout_s=timeout_s)
        except Exception as exc:
            raise ServingError(
                f"model '{name}' is not served at {endpoint.describe()}: {_one_line(exc)}"
            ) from exc
        inputs = meta.get("inputs", [])
        if len(inputs) != 1:
            raise UserInputError(
                f"models: '{name}' at {endpoint.describe()} has {len(inputs)} inputs; the "
                "benchmark feeds one feature matrix"
            )
        shape = [int(d) for d in inputs[0].get("shape", [])]
        try:
            config = _call(client, protocol, "get_model_config", name, headers=headers,
                           timeout_s=timeout_s)
            config = config.get("config", config)
            max_batch_size = int(config.get("max_batch_size", 0))
        except Exception:  # noqa: BLE001 - a free first dimension means batched
            max_batch_size = 1 << 16 if shape and shape[0] == -1 else 0
        out.append(_Model(
            name=name,
            input_name=inputs[0]["name"],
            datatype=inputs[0]["datatype"],
            dims=shape[1:] if max_batch_size > 0 else shape,
            max_batch_size=max_batch_size,
            outputs=[o["name"] for o in meta.get("outputs", [])],
        ))
    return out


def _rows_for(model: _Model, x: np.ndarray) -> np.ndarray:
    from tritonclient.utils import triton_to_np_dtype

    dims = model.dims if model.max_batch_size > 0 else model.dims[1:]
    if len(dims) != x.ndim - 1 or any(d not in (-1, s) for d, s in zip(dims, x.shape[1:])):
        raise UserInputError(
            f"test_path: rows of shape {list(x.shape[1:])} do not fit model '{model.name}' input "
            f"'{model.input_name}' {model.dims}; use the test split of the same data"
        )
    dtype = triton_to_np_dtype(model.datatype)
    return np.ascontiguousarray(x.astype(dtype, copy=False))


def _batch(rows: np.ndarray, batch_size: int, offset: int, model: _Model) -> np.ndarray:
    idx = (offset + np.arange(batch_size)) % len(rows)
    batch = rows[idx]
    return batch[0] if model.max_batch_size == 0 else np.ascontiguousarray(batch)


def _payloads(endpoint: _Endpoint, model: _Model, rows: np.ndarray, batch_size: int,
              offset: int) -> tuple[list[bytes], dict[str, str]]:
    """Request bodies for one client (real rows from ``offset`` on) and their extra headers."""
    batches = [
        _batch(rows, batch_size, offset + k * batch_size, model)
        for k in range(PAYLOADS_PER_CLIENT)
    ]
    if endpoint.protocol == "grpc":
        from tritonclient.grpc import service_pb2

        bodies = []
        for batch in batches:
            request = service_pb2.ModelInferRequest(model_name=model.name)
            tensor = request.inputs.add(name=model.input_name, datatype=model.datatype)
            tensor.shape.extend(batch.shape)
            request.raw_input_contents.append(batch.tobytes())
            for name in model.outputs:
                request.outputs.add(name=name)
            bodies.append(request.SerializeToString())
        return bodies, {}

    import tritonclient.http as httpclient

    binary = endpoint.protocol == "http"
    bodies, header_sizes = [], set()
    for batch in batches:
        tensor = httpclient.InferInput(model.input_name, list(batch.shape), model.datatype)
        tensor.set_data_from_numpy(batch, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in model.outputs]
        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            [tensor], outputs=outputs
        )
        bodies.append(body if isinstance(body, bytes) else body.encode())
        header_sizes.add(json_size)
    if binary:
        (json_size,) = header_sizes  # same shapes and names: the same JSON header length
        return bodies, {"Content-Type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(json_size)}
    return bodies, {"Content-Type": "application/json",
                    "X-Vertex-Ai-Triton-Redirect": f"v2/models/{model.name}/infer"}


# -- preflight ----------------------------------------------------------------------------------


def _preflight(endpoint: _Endpoint, client, model: _Model, rows: np.ndarray, batch_size: int,
               timeout_s: float) -> None:
    """One real request, its answer checked: a broken endpoint fails here, within the timeout."""
    batch = _batch(rows, batch_size, 0, model)
    expected_rows = batch_size if model.max_batch_size > 0 else None
    where = f"model '{model.name}' at {endpoint.describe()}"
    if endpoint.protocol == "vertex":
        bodies, extra = _payloads(endpoint, model, rows, batch_size, 0)
        target = endpoint.target(model, extra)
        connection = HttpConnection(target, timeout_s)
        try:
            status, body = connection.post(connection.message(bodies[0]))
        except TimeoutError as exc:
            raise ServingError(f"{where}: the request timed out after {timeout_s:g} s") from exc
        except OSError as exc:
            raise ServingError(f"{where}: cannot reach the endpoint ({_one_line(exc)})") from exc
        finally:
            connection.close()
        if status != 200:
            raise ServingError(f"{where} answers {http_error(status, body)}")
        try:
            outputs = json.loads(body).get("outputs")
        except (ValueError, AttributeError):
            outputs = None
        if not outputs:
            raise ServingError(f"{where}: the answer has no KServe v2 'outputs': {body[:200]!r}")
        if expected_rows and int(outputs[0].get("shape", [0])[0]) != expected_rows:
            raise ServingError(
                f"{where}: {outputs[0].get('shape')} rows answered for {expected_rows} sent"
            )
        return

    if endpoint.protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    tensor = module.InferInput(model.input_name, list(batch.shape), model.datatype)
    tensor.set_data_from_numpy(batch)
    requested = [module.InferRequestedOutput(o) for o in model.outputs]
    try:
        result = _call(client, endpoint.protocol, "infer", model.name, [tensor], outputs=requested,
                       headers=endpoint.headers or None, timeout_s=timeout_s)
    except Exception as exc:
        text = _one_line(exc)
        if "deadline" in text.lower() or "timed out" in text.lower() or "timeout" in text.lower():
            raise ServingError(
                f"{where}: the request timed out after {timeout_s:g} s ({text}); the server is "
                "stuck or far too slow"
            ) from exc
        raise ServingError(f"{where}: inference failed: {text}") from exc
    for name in model.outputs:
        out = result.as_numpy(name)
        if out is None or (expected_rows and out.shape[0] != expected_rows):
            raise ServingError(
                f"{where}: output '{name}' has shape {None if out is None else out.shape} for a "
                f"batch of {batch_size}"
            )


def _check_reachable(endpoint: _Endpoint, client, timeout_s: float) -> None:
    try:
        live = _call(client, endpoint.protocol, "is_server_live",
                     headers=endpoint.headers or None, timeout_s=timeout_s)
    except Exception as exc:
        raise ServingError(
            f"cannot reach Triton at {endpoint.describe()} within {timeout_s:g} s: "
            f"{_one_line(exc)}; is the server running, and is the URL and protocol right?"
        ) from exc
    if not live:
        raise ServingError(
            f"Triton at {endpoint.describe()} answers but says it is not live (health check "
            "failed); check the server's log"
        )


# -- statistics ---------------------------------------------------------------------------------


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


def _window_row(report: WindowReport, window_s: float) -> dict[str, Any]:
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


def _spread_pct(values: list[float | None]) -> float:
    """Largest distance from the mean, in % of the mean (inf when a value is missing)."""
    if not values or any(v is None for v in values):
        return math.inf
    mean = float(np.mean(values))
    if mean <= 0:
        return math.inf
    return float(max(abs(v - mean) for v in values) / mean * 100.0)


def _judge(windows: list[dict], method: _Method) -> tuple[bool, dict[str, float]]:
    judged = windows[-method.min_windows :]
    spreads = {m: _spread_pct([w[m] for w in judged])
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


def _server_delta(before: dict | None, after: dict | None, model: str) -> dict[str, Any] | None:
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


def _level_row(model: _Model, batch_size: int, concurrency: int, processes: int,
               windows: list[dict], reports: list[WindowReport], method: _Method,
               server: dict | None, server_error: str | None) -> dict[str, Any]:
    stable, spreads = _judge(windows, method)
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
        "model": model.name,
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


# -- the measurement core -----------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on a terminal stream, fed the per-window events of a run::

        benchmark_repository(..., on_window=ProgressBar())
    """

    def __init__(self, stream=None, width: int = 24):
        self.stream = stream if stream is not None else sys.stderr
        self.width = width

    def __call__(self, event: dict[str, Any]) -> None:
        done = (event["level"] - 1 + event["window"] / event["max_windows"]) / event["levels"]
        if event.get("stable") is not None:  # the level is over
            done = event["level"] / event["levels"]
        filled = round(done * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        p99 = event.get("p99_ms")
        text = (f"\r[{bar}] level {event['level']}/{event['levels']} {event['model']} "
                f"b={event['batch_size']} c={event['concurrency']} window {event['window']}: "
                f"{event['throughput_rps']:.0f} req/s p99 "
                f"{'-' if p99 is None else f'{p99:.2f}'} ms ")
        self.stream.write(text)
        if event["level"] == event["levels"] and event.get("stable") is not None:
            self.stream.write("\n")
        self.stream.flush()


def _clients_for(concurrency: int, requested: int | None) -> int:
    if requested is not None:
        return max(1, int(requested))
    # One process keeps ~10k requests/s in flight; more only split big levels across cores.
    return max(1, min(os.cpu_count() or 1, math.ceil(concurrency / 16)))


def _method(concurrency, batch_size, batch_sizes, warmup_s, duration_s, window_s, min_windows,
            max_windows, stability_pct, stability_metrics, request_timeout_s,
            client_processes) -> _Method:
    levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    if not levels or any(int(c) < 1 for c in levels):
        raise UserInputError(f"concurrency: {concurrency} must be positive integers, e.g. (1, 4)")
    sizes = [batch_size] if batch_sizes is None else list(batch_sizes)
    if not sizes or any(int(b) < 1 for b in sizes):
        raise UserInputError(f"batch_sizes: {sizes} must be positive integers, e.g. (1, 8)")
    if duration_s <= 0 or warmup_s < 0:
        raise UserInputError("duration_s must be > 0 and warmup_s >= 0")
    if int(min_windows) < 1 or int(max_windows) < int(min_windows):
        raise UserInputError(
            f"min_windows {min_windows} / max_windows {max_windows}: need 1 <= min <= max"
        )
    window = float(window_s) if window_s else float(duration_s) / int(min_windows)
    if window <= 0:
        raise UserInputError(f"window_s: {window_s} must be > 0")
    unknown = [m for m in stability_metrics if m not in ("throughput_rps", "p50_ms", "p99_ms",
                                                          "mean_ms")]
    if unknown or not stability_metrics:
        raise UserInputError(
            f"stability_metrics: {list(stability_metrics)}; choose from throughput_rps, p50_ms, "
            "p99_ms, mean_ms"
        )
    if not stability_pct > 0:
        raise UserInputError(f"stability_pct: {stability_pct} must be > 0, e.g. 15")
    if not request_timeout_s > 0:
        raise UserInputError(f"request_timeout_s: {request_timeout_s} must be > 0")
    levels = [int(c) for c in levels]
    return _Method(
        concurrency=levels,
        batch_sizes=[int(b) for b in sizes],
        warmup_s=float(warmup_s),
        duration_s=window * int(min_windows),
        window_s=window,
        min_windows=int(min_windows),
        max_windows=int(max_windows),
        stability_pct=float(stability_pct),
        stability_metrics=tuple(stability_metrics),
        request_timeout_s=float(request_timeout_s),
        client_processes=_clients_for(max(levels), client_processes),
    )


def _plan(models: list[_Model], x: np.ndarray, method: _Method) -> list[tuple]:
    """(model, its rows, its batch sizes) for each model; bad sizes or shapes fail here, before
    any server work."""
    plan = []
    for model in models:
        rows = _rows_for(model, x)
        sizes = [1] if model.max_batch_size == 0 else method.batch_sizes
        for size in sizes:
            if model.max_batch_size and size > model.max_batch_size:
                raise UserInputError(
                    f"batch_size: {size} exceeds max_batch_size {model.max_batch_size} of model "
                    f"'{model.name}'"
                )
        plan.append((model, rows, sizes))
    return plan


def _sweep(endpoint: _Endpoint, plan: list[tuple], method: _Method,
           progress: Callable[[str], None], on_window: Callable[[dict], None] | None,
           client=None) -> list[dict]:
    for model, rows, sizes in plan:  # every model answers once before the clock starts
        for size in sizes:
            _preflight(endpoint, client, model, rows, size, method.request_timeout_s)

    levels_total = sum(len(sizes) * len(method.concurrency) for _, _, sizes in plan)
    results = []
    with ClientPool(method.client_processes) as pool:
        level_no = 0
        for model, rows, sizes in plan:
            for size in sizes:
                for concurrency in method.concurrency:
                    level_no += 1
                    row = _measure_level(
                        pool, endpoint, model, rows, size, concurrency, method, on_window,
                        level_no, levels_total,
                    )
                    results.append(row)
                    progress(_level_line(row))
    return results


def _level_line(row: dict) -> str:
    server = row.get("server") or {}
    queue, infer = server.get("queue_us"), server.get("compute_infer_us")
    spreads = [row["stability"]["spread_pct"].get(m) for m in row["stability"]["metrics"]]
    spread = max((v for v in spreads if v is not None), default=float("nan"))
    stable = (f"stable ±{spread:.0f}%" if row["stable"]
              else f"UNSTABLE ±{spread:.0f}% after {len(row['windows'])} windows")
    text = (
        f"{row['model']:>10} b={row['batch_size']:<3} c={row['concurrency']:<3} "
        f"p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
        f"{row['throughput_rps']:8.1f} req/s  {stable}"
    )
    if queue is not None and infer is not None:
        text += f"  server queue {queue:.0f} us compute {infer:.0f} us"
    text += (f"  client {row['client']['cpu_cores']:.2f} cores"
             f"{' (SATURATED: add client_processes)' if row['client']['saturated'] else ''}"
             f"  ({row['requests']} requests, {row['errors']} errors)")
    return text


def _measure_level(pool: ClientPool, endpoint: _Endpoint, model: _Model, rows: np.ndarray,
                   batch_size: int, concurrency: int, method: _Method,
                   on_window: Callable[[dict], None] | None, level_no: int,
                   levels_total: int) -> dict:
    payloads, extra = [], {}
    for client in range(concurrency):
        bodies, extra = _payloads(endpoint, model, rows, batch_size,
                                  offset=client * 997 * batch_size)
        payloads.append(bodies)
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
            snapshots["error"] = _one_line(exc, 200)

    def decide(report: WindowReport) -> bool:
        window = _window_row(report, method.window_s)
        windows.append(window)
        if report.timed_out:
            raise ServingError(
                f"{where}: a request timed out after {method.request_timeout_s:g} s "
                f"({report.first_error}); the server is stuck or far too slow"
            )
        problem = endpoint.alive()
        if problem:
            raise ServingError(f"{where}: {problem}")
        if window["requests"] == 0 and report.errors:
            raise ServingError(
                f"{where}: all {report.errors} requests of window {report.index} failed; "
                f"first: {report.first_error}"
            )
        stable = None
        if len(windows) >= method.min_windows:
            ok, _ = _judge(windows, method)
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
        target, payloads, warmup_s=method.warmup_s, window_s=method.window_s,
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
        server = _server_delta(snapshots["before"], snapshots["after"], model.name)
        if server is None:
            snapshots["error"] = f"no statistics for model '{model.name}'"
    return _level_row(model, batch_size, concurrency, min(pool.size, concurrency), windows,
                      reports, method, server, snapshots["error"])


def _result(mode: str, endpoint: _Endpoint, method: _Method, models: list[_Model],
            results: list[dict], started: float, started_at: str, **extra) -> dict:
    return {
        "schema": SCHEMA,
        "mode": mode,
        "endpoint": endpoint.describe(),
        "protocol": endpoint.protocol,
        "repository": extra.get("repository"),
        "server_startup_s": extra.get("server_startup_s"),
        "models": [m.name for m in models],
        "batch_size": method.batch_sizes[0],
        "batch_sizes": method.batch_sizes,
        "concurrency": method.concurrency,
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
                 "python": platform.python_version()},
        "started_at": started_at,
        "wall_s": time.monotonic() - started,
        "results": results,
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- the two modes ------------------------------------------------------------------------------


def benchmark_repository(
    repository_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    concurrency: int | Sequence[int] = DEFAULT_CONCURRENCY,
    batch_size: int = 1,
    warmup_s: float = 1.0,
    duration_s: float = 3.0,
    protocol: str = "grpc",
    models: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = print,
    *,
    request_timeout_s: float = 10.0,
    startup_timeout_s: float = 120.0,
    batch_sizes: Sequence[int] | None = None,
    window_s: float | None = None,
    min_windows: int = 3,
    max_windows: int = 10,
    stability_pct: float = 15.0,
    stability_metrics: Sequence[str] = STABILITY_METRICS,
    client_processes: int | None = None,
    on_window: Callable[[dict], None] | None = None,
    server_args: Sequence[str] = (),
) -> dict:
    """Launch ``tritonserver`` over ``repository_dir`` and measure every model at every level.

    ``duration_s`` is the measured time a stable level takes: ``min_windows`` windows of
    ``window_s`` (default ``duration_s / min_windows``); an unstable one runs up to
    ``max_windows`` windows. ``batch_sizes`` (default ``[batch_size]``) sweeps rows per request.
    Returns the result described in this module's docstring. Raises ``ServingError`` when the
    server fails to start, exits, times out or answers no request; ``UserInputError`` for bad
    arguments.
    """
    from torchship.components.triton import TritonServer

    if protocol not in PROTOCOLS:
        raise UserInputError(f"protocol: '{protocol}' is not one of {', '.join(PROTOCOLS)}")
    method = _method(concurrency, batch_size, batch_sizes, warmup_s, duration_s, window_s,
                     min_windows, max_windows, stability_pct, stability_metrics,
                     request_timeout_s, client_processes)
    repository_dir = Path(repository_dir)
    specs = _repository_models(repository_dir, models)
    plan = _plan(specs, load_sample(test_path, what="test_path"), method)
    progress = progress or (lambda *_: None)
    started, started_at = time.monotonic(), _now()

    with TritonServer(repository_dir, startup_timeout_s=startup_timeout_s,
                      extra_args=list(server_args)) as server:
        url = server.grpc_url if protocol == "grpc" else server.http_url

        def alive() -> str | None:
            if server.is_running():
                return None
            return f"tritonserver exited during the benchmark:\n{server.log_tail(20)}"

        endpoint = _Endpoint(protocol, url, stats_url=server.http_url, stats_protocol="http",
                             alive=alive)
        progress(f"tritonserver ready in {server.startup_s:.1f} s ({endpoint.describe()})")
        client = _triton_client(protocol, url, False, request_timeout_s)
        try:
            results = _sweep(endpoint, plan, method, progress, on_window, client)
        except ServingError as exc:
            if not server.is_running():
                raise ServingError(
                    f"tritonserver exited during the benchmark ({_one_line(exc, 200)}):\n"
                    f"{server.log_tail(20)}"
                ) from exc
            raise
        finally:
            client.close()
            endpoint.close()
        startup_s = server.startup_s
    return _result("local", endpoint, method, specs, results, started, started_at,
                   repository=str(repository_dir), server_startup_s=startup_s)


def benchmark_endpoint(
    url: str,
    protocol: str,
    models: Sequence[str] | None,
    test_path: str | os.PathLike,
    concurrency: int | Sequence[int] = DEFAULT_CONCURRENCY,
    batch_size: int = 1,
    warmup_s: float = 1.0,
    duration_s: float = 3.0,
    progress: Callable[[str], None] | None = print,
    *,
    request_timeout_s: float = 10.0,
    batch_sizes: Sequence[int] | None = None,
    window_s: float | None = None,
    min_windows: int = 3,
    max_windows: int = 10,
    stability_pct: float = 15.0,
    stability_metrics: Sequence[str] = STABILITY_METRICS,
    client_processes: int | None = None,
    on_window: Callable[[dict], None] | None = None,
    headers: dict[str, str] | None = None,
    auth: str = "auto",
    input_name: str = "input",
    output_names: Sequence[str] = ("logits",),
) -> dict:
    """Measure a running endpoint by URL with the same method as ``benchmark_repository``.

    ``protocol``:

    * ``grpc``: ``url`` is ``host:port`` (or ``grpc://``, ``grpcs://`` for TLS);
    * ``http``: ``host:port`` or ``http(s)://host:port[/prefix]``;
    * ``vertex``: the full ``rawPredict`` URL of a Vertex AI endpoint serving Triton
      (``https://REGION-aiplatform.googleapis.com/v1/projects/P/locations/L/endpoints/E:rawPredict``);
      each request is a KServe v2 JSON body with ``X-Vertex-Ai-Triton-Redirect:
      v2/models/<model>/infer``. ``{model}`` in the URL is replaced by the model name. The model's
      input is ``input_name`` with the test rows' shape and type; there is no statistics API.

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
    method = _method(concurrency, batch_size, batch_sizes, warmup_s, duration_s, window_s,
                     min_windows, max_windows, stability_pct, stability_metrics,
                     request_timeout_s, client_processes)
    x = load_sample(test_path, what="test_path")
    progress = progress or (lambda *_: None)
    if isinstance(models, str):
        models = [models]
    endpoint = _remote_endpoint(url, protocol, dict(headers or {}), auth)
    started, started_at = time.monotonic(), _now()

    if protocol == "vertex":
        if not models:
            raise UserInputError(
                "models: the vertex protocol cannot list an endpoint's models; pass their names"
            )
        dtype = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
                 np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}.get(x.dtype, "FP32")
        specs = [
            _Model(name=name, input_name=input_name, datatype=dtype, dims=[-1] * (x.ndim - 1),
                   max_batch_size=1 << 16, outputs=list(output_names))
            for name in models
        ]
        try:
            results = _sweep(endpoint, _plan(specs, x, method), method, progress, on_window)
        finally:
            endpoint.close()
        return _result("remote", endpoint, method, specs, results, started, started_at)

    client = _triton_client(protocol, endpoint.url, endpoint.tls, request_timeout_s,
                            endpoint.path_prefix)
    try:
        _check_reachable(endpoint, client, request_timeout_s)
        specs = _remote_models(endpoint, client, models, request_timeout_s)
        progress(f"{endpoint.describe()} is live; measuring {', '.join(m.name for m in specs)}")
        results = _sweep(endpoint, _plan(specs, x, method), method, progress, on_window, client)
    finally:
        client.close()
        endpoint.close()
    return _result("remote", endpoint, method, specs, results, started, started_at)


def _remote_endpoint(url: str, protocol: str, headers: dict[str, str], auth: str) -> _Endpoint:
    if not url or not isinstance(url, str):
        raise UserInputError(f"url: {url!r} is empty; pass host:port or a full URL")
    if protocol == "vertex":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserInputError(
                f"url: '{url}' is not an http(s) URL; pass the endpoint's rawPredict URL"
            )
        _port_of(parts)
        wants_token = auth == "google" or (auth == "auto" and parts.scheme == "https")
        if wants_token and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = f"Bearer {_google_token()}"
        return _Endpoint("vertex", url, tls=parts.scheme == "https", headers=headers)

    scheme, _, rest = url.partition("://") if "://" in url else ("", "", url)
    tls = scheme in ("https", "grpcs")
    allowed = ("grpc", "grpcs") if protocol == "grpc" else ("http", "https")
    if scheme and scheme not in allowed:
        raise UserInputError(
            f"url: '{url}' does not fit protocol '{protocol}'; use {' or '.join(allowed)}://"
        )
    address, _, prefix = rest.partition("/")
    if not address:
        raise UserInputError(f"url: '{url}' has no host; pass host:port")
    _split_host_port(address, 443 if tls else 80)
    if protocol == "grpc" and prefix:
        raise UserInputError(f"url: a gRPC address takes no path ('{url}'); pass host:port")
    if auth == "google":
        headers.setdefault("Authorization", f"Bearer {_google_token()}")
    path_prefix = f"/{prefix}" if prefix else ""
    return _Endpoint(protocol, address, tls=tls, path_prefix=path_prefix, headers=headers,
                     stats_url=address, stats_protocol=protocol)


def _google_token() -> str:
    """An access token from Google application default credentials (never printed)."""
    try:
        import google.auth
        import google.auth.transport.requests
    except ImportError as exc:  # pragma: no cover - google-auth comes with aiplatform
        raise UserInputError("auth: google-auth is not installed; pass auth='none'") from exc
    try:
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
        credentials.refresh(google.auth.transport.requests.Request())
    except Exception as exc:  # noqa: BLE001 - no credentials, offline, ...
        raise UserInputError(
            f"auth: no Google credentials for the https endpoint ({type(exc).__name__}); run "
            "'gcloud auth application-default login', or pass auth='none'"
        ) from None
    return credentials.token


# -- results ------------------------------------------------------------------------------------


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
    )
    return {k: ("" if v is None else v) for k, v in flat.items()}


def write_csv(result: dict, path: str | os.PathLike) -> Path:
    """One CSV row per model and level (columns ``CSV_COLUMNS``), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in result.get("results", []):
        writer.writerow(_csv_row(row))
    return write_text_atomic(Path(path), buffer.getvalue())


def write_json(result: dict, path: str | os.PathLike) -> Path | str:
    """Write ``result`` as JSON to a path (atomically: temporary file, then rename) or to an fsspec
    URI such as ``gs://bucket/torchship/benchmark.json`` (object stores write whole objects)."""
    text = json.dumps(result, indent=2, default=_json_default) + "\n"
    if "://" in str(path):
        import fsspec

        with fsspec.open(str(path), "w") as handle:
            handle.write(text)
        return str(path)
    return write_text_atomic(Path(path), text)


def read_json(uri: str | os.PathLike) -> dict | None:
    """A JSON document from a path or an fsspec URI (``gs://`` included); ``None`` when absent."""
    uri = str(uri)
    if "://" not in uri:
        path = Path(uri)
        return json.loads(path.read_text()) if path.is_file() else None
    import fsspec

    try:
        with fsspec.open(uri, "r") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
