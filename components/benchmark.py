"""Benchmark stage: latency percentiles and throughput of every model in a Triton repository.

Like Model Analyzer's ``local`` mode, ``benchmark_repository`` launches the bundled ``tritonserver``
over the repository and drives it with ``tritonclient``: for each model and concurrency level,
``concurrency`` worker threads (one client each; gRPC and HTTP calls release the GIL) keep one
request in flight each, first for ``warmup_s`` (not recorded), then for ``duration_s``. Requests carry
real rows of the test set.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from torchship.components.errors import ServingError, UserInputError

__all__ = ["PROTOCOLS", "benchmark_repository", "write_json"]

PROTOCOLS = ("grpc", "http")
_MAX_CONSECUTIVE_ERRORS = 20


def _read_config(config_path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(config_path.read_text(), mc.ModelConfig())
    except Exception as exc:
        raise UserInputError(
            f"repository_dir: {config_path} is not a valid Triton ModelConfig ({exc}); rebuild the "
            "repository with the deploy stage"
        ) from exc


def _repository_models(repository_dir: Path, models) -> list:
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
            f"models: {', '.join(missing)} not in {repository_dir} (it has {', '.join(sorted(available))})"
        )
    configs = []
    for name in names:
        config = _read_config(available[name])
        if not config.name:
            config.name = name
        configs.append(config)
    return configs


def _load_rows(test_path: Path) -> np.ndarray:
    if not test_path.is_file():
        raise UserInputError(f"test_path: {test_path} does not exist; run prepare_data first")
    with np.load(test_path, allow_pickle=False) as data:
        if "x" not in data:
            raise UserInputError(f"test_path: {test_path} has no 'x' array; run prepare_data")
        x = np.asarray(data["x"])
    if x.ndim < 2 or len(x) == 0:
        raise UserInputError(f"test_path: 'x' in {test_path} has shape {x.shape}; expected [N, F]")
    return x


def _batches(x: np.ndarray, batch_size: int, offset: int, count: int = 64) -> list[np.ndarray]:
    """``count`` batches of real rows, starting at row ``offset`` and wrapping around."""
    n = len(x)
    out = []
    for k in range(count):
        idx = (offset + k * batch_size + np.arange(batch_size)) % n
        out.append(np.ascontiguousarray(x[idx]))
    return out


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    status = getattr(exc, "status", None)
    status = status() if callable(status) else status
    text = f"{status} {exc}".lower()
    return "deadline" in text or "timed out" in text or "timeout" in text


class _Worker(threading.Thread):
    """One client keeping one request in flight until ``stop_at``; records measured latencies."""

    def __init__(self, make_client, infer, batches, start_event, measure_from, stop_at):
        super().__init__(daemon=True)
        self.make_client = make_client
        self.infer = infer
        self.batches = batches
        self.start_event = start_event
        self.measure_from = measure_from
        self.stop_at = stop_at
        self.latencies: list[float] = []
        self.last_end = 0.0
        self.errors = 0
        self.first_error: str | None = None
        self.timed_out = False

    def run(self) -> None:
        try:
            client = self.make_client()
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            self.errors += 1
            self.first_error = f"cannot create client: {exc}"
            return
        try:
            self.start_event.wait()
            measure_from, stop_at = self.measure_from[0], self.stop_at[0]
            consecutive = 0
            k = 0
            perf = time.perf_counter
            while True:
                begin = perf()
                if begin >= stop_at:
                    break
                request = self.batches[k % len(self.batches)]
                k += 1
                try:
                    self.infer(client, request)
                except Exception as exc:  # noqa: BLE001 - counted, the first one reported
                    if begin >= measure_from:
                        self.errors += 1
                    message = str(exc).strip()
                    if self.first_error is None:
                        self.first_error = message.splitlines()[0] if message else repr(exc)
                    if _is_timeout(exc):
                        self.timed_out = True  # a stuck server: stop now rather than hang
                        break
                    consecutive += 1
                    if consecutive >= _MAX_CONSECUTIVE_ERRORS:
                        break
                    continue
                end = perf()
                consecutive = 0
                if begin >= measure_from:
                    self.latencies.append(end - begin)
                    self.last_end = end
        finally:
            with contextlib.suppress(Exception):
                client.close()


def _client_factory(protocol: str, server, config, batch_size: int, timeout_s: float):
    """(make_client, infer, make_request) for one model; make_request prebuilds request objects."""
    from tritonclient.utils import np_to_triton_dtype

    if protocol == "grpc":
        import tritonclient.grpc as module

        def make_client():
            return module.InferenceServerClient(server.grpc_url)
    else:
        import tritonclient.http as module

        def make_client():
            return module.InferenceServerClient(
                server.http_url, connection_timeout=timeout_s, network_timeout=timeout_s
            )

    input_name = config.input[0].name
    output_names = [o.name for o in config.output]
    name = config.name

    def make_request(batch: np.ndarray):
        infer_input = module.InferInput(
            input_name, list(batch.shape), np_to_triton_dtype(batch.dtype)
        )
        if protocol == "grpc":
            infer_input.set_data_from_numpy(batch)
        else:
            infer_input.set_data_from_numpy(batch, binary_data=True)
        outputs = [module.InferRequestedOutput(o) for o in output_names]
        return [infer_input], outputs

    if protocol == "grpc":

        def infer(client, request):
            inputs, outputs = request
            client.infer(name, inputs, outputs=outputs, client_timeout=timeout_s)
    else:

        def infer(client, request):
            inputs, outputs = request
            client.infer(name, inputs, outputs=outputs)

    return make_client, infer, make_request


def _measure(server, config, x, protocol, concurrency, batch_size, warmup_s, duration_s, timeout_s):
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.utils import triton_to_np_dtype

    dtype_name = mc.DataType.Name(config.input[0].data_type).removeprefix("TYPE_")
    dtype = triton_to_np_dtype("BYTES" if dtype_name == "STRING" else dtype_name)
    rows = x.astype(dtype, copy=False)
    if config.max_batch_size == 0:
        batch_size = 1  # unbatched model: every request is one row of the model's shape
    make_client, infer, make_request = _client_factory(
        protocol, server, config, batch_size, timeout_s
    )

    start_event = threading.Event()
    measure_from, stop_at = [0.0], [0.0]
    workers = []
    for w in range(concurrency):
        batches = _batches(rows, batch_size, offset=w * 997 * batch_size)
        if config.max_batch_size == 0:
            batches = [b[0] for b in batches]
        requests = [make_request(b) for b in batches]
        workers.append(_Worker(make_client, infer, requests, start_event, measure_from, stop_at))
    for worker in workers:
        worker.start()
    now = time.perf_counter()
    measure_from[0] = now + warmup_s
    stop_at[0] = measure_from[0] + duration_s
    start_event.set()
    for worker in workers:
        worker.join(timeout=warmup_s + duration_s + timeout_s + 10)
    if any(w.is_alive() for w in workers):
        raise ServingError(
            f"model '{config.name}': benchmark workers did not finish (server hung?):\n"
            f"{server.log_tail(10)}"
        )

    latencies = np.array([lat for w in workers for lat in w.latencies], dtype=np.float64) * 1e3
    errors = sum(w.errors for w in workers)
    first_error = next((w.first_error for w in workers if w.first_error), None)
    if any(w.timed_out for w in workers):
        raise ServingError(
            f"model '{config.name}': a request timed out after {timeout_s:g} s at concurrency "
            f"{concurrency} ({first_error}); the server is stuck or far too slow:\n"
            f"{server.log_tail(10)}"
        )
    if not server.is_running():
        raise ServingError(
            f"tritonserver exited while benchmarking '{config.name}' at concurrency {concurrency}:"
            f"\n{server.log_tail(20)}"
        )
    if latencies.size == 0:
        raise ServingError(
            f"model '{config.name}' answered no request at concurrency {concurrency} "
            f"({errors} errors; first: {first_error})"
        )
    window = max(max(w.last_end for w in workers) - measure_from[0], duration_s)
    p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
    requests = int(latencies.size)
    return {
        "model": config.name,
        "concurrency": int(concurrency),
        "batch_size": int(batch_size),
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "mean_ms": float(latencies.mean()),
        "min_ms": float(latencies.min()),
        "max_ms": float(latencies.max()),
        "throughput_rps": requests / window,
        "throughput_sps": requests * batch_size / window,
        "requests": requests,
        "errors": int(errors),
        "first_error": first_error,
        "duration_s": float(window),
    }


def benchmark_repository(
    repository_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    concurrency=(1, 4),
    batch_size: int = 1,
    warmup_s: float = 1.0,
    duration_s: float = 3.0,
    protocol: str = "grpc",
    models=None,
    progress=print,
    *,
    request_timeout_s: float = 10.0,
    startup_timeout_s: float = 120.0,
) -> dict:
    """Launch ``tritonserver`` over ``repository_dir`` and measure every model at every level.

    Returns ``{"protocol", "batch_size", "results": [{"model", "concurrency", "p50_ms", "p95_ms",
    "p99_ms", "mean_ms", "throughput_rps", "throughput_sps", "requests", "errors", ...}]}``.
    Raises ``ServingError`` when the server fails to start, exits, or answers no request.
    """
    from torchship.components.triton import TritonServer

    if protocol not in PROTOCOLS:
        raise UserInputError(f"protocol: '{protocol}' is not one of {', '.join(PROTOCOLS)}")
    levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    if not levels or any(int(c) < 1 for c in levels):
        raise UserInputError(f"concurrency: {concurrency} must be positive integers, e.g. (1, 4)")
    if int(batch_size) < 1:
        raise UserInputError(f"batch_size: {batch_size} must be at least 1")
    if duration_s <= 0 or warmup_s < 0:
        raise UserInputError("duration_s must be > 0 and warmup_s >= 0")
    repository_dir = Path(repository_dir)
    configs = _repository_models(repository_dir, models)
    for config in configs:
        if len(config.input) != 1:
            raise UserInputError(
                f"repository_dir: model '{config.name}' has {len(config.input)} inputs; the "
                "benchmark feeds one feature matrix"
            )
        if config.max_batch_size and batch_size > config.max_batch_size:
            raise UserInputError(
                f"batch_size: {batch_size} exceeds max_batch_size {config.max_batch_size} of "
                f"model '{config.name}'"
            )
    x = _load_rows(Path(test_path))
    progress = progress or (lambda *_: None)

    results = []
    with TritonServer(repository_dir, startup_timeout_s=startup_timeout_s) as server:
        progress(
            f"tritonserver ready in {server.startup_s:.1f} s ({protocol} on {server.grpc_url if protocol == 'grpc' else server.http_url})"
        )
        for config in configs:
            for level in levels:
                row = _measure(
                    server,
                    config,
                    x,
                    protocol,
                    int(level),
                    int(batch_size),
                    float(warmup_s),
                    float(duration_s),
                    float(request_timeout_s),
                )
                results.append(row)
                progress(
                    f"{row['model']:>10} c={row['concurrency']:<3} p50 {row['p50_ms']:7.2f} ms  "
                    f"p95 {row['p95_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
                    f"{row['throughput_rps']:8.1f} req/s  ({row['requests']} requests, "
                    f"{row['errors']} errors)"
                )
        startup_s = server.startup_s
    return {
        "protocol": protocol,
        "batch_size": int(batch_size),
        "concurrency": [int(c) for c in levels],
        "warmup_s": float(warmup_s),
        "duration_s": float(duration_s),
        "repository": str(repository_dir),
        "server_startup_s": startup_s,
        "results": results,
    }


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write ``result`` as JSON to ``path`` atomically (temporary file in the same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(result, handle, indent=2, sort_keys=False, default=_json_default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
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
