"""The serving side of a benchmark: the endpoint measured, its Triton clients, the models served."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from torchship.components.benchmark.transport import Target
from torchship.components.errors import ServingError, UserInputError, one_line
from torchship.components.triton.config import TRITON_TO_V2, read_model_config

__all__ = [
    "Endpoint",
    "Model",
    "ModelInput",
    "call",
    "check_reachable",
    "one_line",
    "remote_endpoint",
    "remote_models",
    "repository_models",
    "triton_client",
    "vertex_models",
]



@dataclass
class ModelInput:
    """One input of a served model."""

    name: str
    datatype: str  # KServe v2 datatype, e.g. "FP32", "INT64"
    dims: list[int]  # without the batch dimension (when batched); -1 where free


@dataclass
class Model:
    """What the client needs to know about one served model."""

    name: str
    inputs: list[ModelInput]
    max_batch_size: int  # 0: the model takes no batch dimension
    outputs: list[str]


class Endpoint:
    """One server as the measurement core sees it: where requests go, how to read its
    statistics, and whether it is still up (``check_alive(level)`` raises ``ServingError`` when
    it is gone while measuring ``level``)."""

    def __init__(self, protocol: str, url: str, *, tls: bool = False, path_prefix: str = "",
                 headers: dict[str, str] | None = None, stats_url: str | None = None,
                 stats_protocol: str | None = None,
                 check_alive: Callable[[str], None] | None = None):
        self.protocol = protocol
        self.url = url  # host:port (grpc/http) or the full URL (vertex)
        self.tls = tls
        self.path_prefix = path_prefix.rstrip("/")
        self.headers = dict(headers or {})
        self.stats_url = stats_url
        self.stats_protocol = stats_protocol
        self.check_alive = check_alive or (lambda _level: None)
        self._stats_client = None

    def describe(self) -> str:
        if self.protocol == "vertex":
            return self.url
        scheme = {"grpc": "grpc", "http": "http"}[self.protocol] + ("s" if self.tls else "")
        return f"{scheme}://{self.url}{self.path_prefix}"

    def target(self, model: Model, extra_headers: dict[str, str]) -> Target:
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
            self._stats_client = triton_client(
                self.stats_protocol, self.stats_url, self.tls, 10.0, self.path_prefix
            )
        return call(self._stats_client, self.stats_protocol, "get_inference_statistics",
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


def triton_client(protocol: str, url: str, tls: bool, timeout_s: float,
                  path_prefix: str = "") -> Any:
    """A tritonclient ``InferenceServerClient`` for ``protocol`` ("grpc" or "http")."""
    if protocol == "grpc":
        import tritonclient.grpc as module

        return module.InferenceServerClient(url, ssl=tls)
    import tritonclient.http as module

    return module.InferenceServerClient(
        url + path_prefix, connection_timeout=timeout_s, network_timeout=timeout_s, ssl=tls
    )


def call(client: Any, protocol: str, method: str, *args: Any, headers: dict | None = None,
         timeout_s: float, **kwargs: Any) -> Any:
    """Call a tritonclient method with the timeout each protocol takes; JSON for gRPC too."""
    if protocol == "grpc":
        kwargs.update(client_timeout=timeout_s)
        if method not in ("is_server_live", "is_server_ready", "infer"):
            kwargs.update(as_json=True)
    return getattr(client, method)(*args, headers=headers, **kwargs)


# KServe v2 datatype of a numpy array, for inputs known only by their test rows.
NUMPY_TO_V2 = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
               np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}


# -- the models measured -------------------------------------------------------------------------


def repository_models(repository_dir: Path, models: Sequence[str] | None) -> list[Model]:
    """The models of a local repository (``models``, or all), from their ``config.pbtxt``."""
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
        config = read_model_config(available[name])
        out.append(Model(
            name=config.name or name,
            inputs=[ModelInput(tensor.name, TRITON_TO_V2[mc.DataType.Name(tensor.data_type)],
                               [int(d) for d in tensor.dims]) for tensor in config.input],
            max_batch_size=int(config.max_batch_size),
            outputs=[o.name for o in config.output],
        ))
    return out


def remote_models(endpoint: Endpoint, client: Any, models: Sequence[str] | None,
                  timeout_s: float) -> list[Model]:
    """The models a running Triton serves (``models``, or every ready one), from its metadata."""
    protocol = endpoint.protocol
    headers = endpoint.headers or None
    if models is None:
        try:
            index = call(client, protocol, "get_model_repository_index", headers=headers,
                         timeout_s=timeout_s)
        except Exception as exc:
            raise UserInputError(
                f"models: {endpoint.describe()} does not list its models "
                f"({one_line(exc, 120)}); pass the model names to measure"
            ) from exc
        if isinstance(index, dict):
            index = index.get("models", [])
        models = sorted({m["name"] for m in index if m.get("state", "READY") == "READY"})
        if not models:
            raise ServingError(f"{endpoint.describe()} serves no ready model")
    out = []
    for name in models:
        try:
            meta = call(client, protocol, "get_model_metadata", name, headers=headers,
                        timeout_s=timeout_s)
        except Exception as exc:
            raise ServingError(
                f"model '{name}' is not served at {endpoint.describe()}: {one_line(exc)}"
            ) from exc
        inputs = meta.get("inputs", [])
        if not inputs:
            raise ServingError(f"model '{name}' at {endpoint.describe()} declares no inputs")
        shapes = [[int(d) for d in tensor.get("shape", [])] for tensor in inputs]
        try:
            config = call(client, protocol, "get_model_config", name, headers=headers,
                          timeout_s=timeout_s)
            config = config.get("config", config)
            max_batch_size = int(config.get("max_batch_size", 0))
        except Exception:  # noqa: BLE001 - a free first dimension means batched
            max_batch_size = 1 << 16 if shapes[0] and shapes[0][0] == -1 else 0
        out.append(Model(
            name=name,
            inputs=[ModelInput(tensor["name"], tensor["datatype"],
                               shape[1:] if max_batch_size > 0 else shape)
                    for tensor, shape in zip(inputs, shapes)],
            max_batch_size=max_batch_size,
            outputs=[o["name"] for o in meta.get("outputs", [])],
        ))
    return out


def vertex_models(names: Sequence[str] | None, rows: dict[str, np.ndarray],
                  output_names: Sequence[str]) -> list[Model]:
    """The models behind a Vertex AI endpoint, which cannot list them: each takes the test
    split's inputs (the tensor contract's names) with their shapes and types."""
    if not names:
        raise UserInputError(
            "models: the vertex protocol cannot list an endpoint's models; pass their names"
        )
    inputs = [ModelInput(name, NUMPY_TO_V2.get(array.dtype, "FP32"), [-1] * (array.ndim - 1))
              for name, array in rows.items()]
    return [Model(name=name, inputs=inputs, max_batch_size=1 << 16, outputs=list(output_names))
            for name in names]


def check_reachable(endpoint: Endpoint, client: Any, timeout_s: float) -> None:
    """Raise ``ServingError`` unless the server at ``endpoint`` answers that it is live."""
    try:
        live = call(client, endpoint.protocol, "is_server_live",
                    headers=endpoint.headers or None, timeout_s=timeout_s)
    except Exception as exc:
        raise ServingError(
            f"cannot reach Triton at {endpoint.describe()} within {timeout_s:g} s: "
            f"{one_line(exc)}; is the server running, and is the URL and protocol right?"
        ) from exc
    if not live:
        raise ServingError(
            f"Triton at {endpoint.describe()} answers but says it is not live (health check "
            "failed); check the server's log"
        )


# -- remote endpoints ---------------------------------------------------------------------------


def remote_endpoint(url: str, protocol: str, headers: dict[str, str], auth: str) -> Endpoint:
    """The ``Endpoint`` for a URL and protocol, with a Google token where ``auth`` asks for one."""
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
        return Endpoint("vertex", url, tls=parts.scheme == "https", headers=headers)

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
    return Endpoint(protocol, address, tls=tls, path_prefix=path_prefix, headers=headers,
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


