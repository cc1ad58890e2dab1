"""Smoke tests for a deployed Triton model: live and ready, metadata as in the repository, answers
on held-out rows equal to ONNX Runtime run on the same ``model.onnx`` within a tolerance.

Used by every deploy target: the local server and KServe over ``tritonclient`` (gRPC and/or HTTP),
Vertex AI over ``rawPredict`` with KServe v2 JSON (``v2_request`` / ``v2_outputs``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from torchship.components.data.splits import load_inputs
from torchship.components.errors import ServingError, UserInputError
from torchship.components.triton.config import TRITON_TO_V2

__all__ = [
    "check_metadata",
    "compare_outputs",
    "load_samples",
    "model_input",
    "onnx_reference",
    "rows_count",
    "smoke_test_server",
    "v2_outputs",
    "v2_request",
]


Rows = dict[str, np.ndarray]  # every input of a model, by name


def load_samples(test_path: str | os.PathLike, n_samples: int) -> Rows:
    """The first ``n_samples`` rows of every input of a held-out split."""
    return {name: np.ascontiguousarray(array)
            for name, array in load_inputs(test_path, "test_path", max(1, int(n_samples))).items()}


def numpy_dtype(triton_type: str):
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(TRITON_TO_V2[triton_type])


def model_input(model: dict, rows: Rows) -> Rows:
    """``rows`` cast and cut to what ``model`` (a repository description) takes, every input."""
    name = model["name"]
    fitted = {}
    for tensor in model["inputs"]:
        x = rows.get(tensor["name"])
        if x is None:
            raise UserInputError(
                f"test_path: the split has no input '{tensor['name']}' (it has "
                f"{', '.join(rows)}), which model '{name}' takes; use the test split of the "
                "same data"
            )
        dims = tensor["dims"] if model["max_batch_size"] > 0 else tensor["dims"][1:]
        if len(dims) != x.ndim - 1 or any(d not in (-1, s) for d, s in zip(dims, x.shape[1:])):
            raise UserInputError(
                f"test_path: rows of shape {list(x.shape[1:])} do not fit model '{name}' input "
                f"'{tensor['name']}' dims {tensor['dims']}; use the test split of the same data"
            )
        x = x.astype(np.dtype(numpy_dtype(tensor["data_type"])), copy=False)
        if model["max_batch_size"] == 0:
            x = x[:1]  # no batching: one request of exactly the model's shape
        fitted[tensor["name"]] = np.ascontiguousarray(x)
    return fitted


def onnx_reference(onnx_path: str | os.PathLike, model: dict, rows: Rows) -> list[np.ndarray]:
    """ONNX Runtime's outputs for ``rows`` (one array per output of ``model``, in order)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output_names = [o["name"] for o in model["outputs"]]
    return session.run(output_names, {t["name"]: rows[t["name"]] for t in model["inputs"]})


def rows_count(rows: Rows) -> int:
    return len(next(iter(rows.values())))


def _expected_shape(tensor: dict, max_batch_size: int) -> list[int]:
    return ([-1] if max_batch_size > 0 else []) + list(tensor["dims"])


def check_metadata(model: dict, metadata: dict, where: str, version: int | None = None) -> None:
    """Served metadata (KServe v2 JSON) must name the model's tensors, types and shapes."""
    name = model["name"]
    if metadata.get("name") not in (None, name):
        raise ServingError(f"model '{name}' ({where}) answers metadata for '{metadata['name']}'")
    if version is not None and str(version) not in [str(v) for v in metadata.get("versions", [])]:
        raise ServingError(
            f"model '{name}' ({where}) serves versions {metadata.get('versions')}, not {version}"
        )
    for kind in ("inputs", "outputs"):
        served = [
            (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata.get(kind, [])
        ]
        expected = [
            (t["name"], TRITON_TO_V2[t["data_type"]], _expected_shape(t, model["max_batch_size"]))
            for t in model[kind]
        ]
        if served != expected:
            raise ServingError(
                f"model '{name}' ({where}) serves {kind} {served}, expected {expected}"
            )


def compare_outputs(
    model: dict, got: dict[str, np.ndarray], expected: list[np.ndarray], atol: float, where: str
) -> float:
    """Max |served - ONNX Runtime| over all outputs; ``ServingError`` beyond ``atol``."""
    name = model["name"]
    diff = 0.0
    for tensor, reference in zip(model["outputs"], expected):
        out = tensor["name"]
        if out not in got or got[out] is None:
            raise ServingError(f"model '{name}' ({where}) returned no output '{out}'")
        served = np.asarray(got[out])
        if served.shape != reference.shape:
            raise ServingError(
                f"model '{name}' ({where}) output '{out}' has shape {served.shape}, ONNX Runtime "
                f"gives {reference.shape}"
            )
        if served.size:
            diff = max(diff, float(np.max(np.abs(served.astype(np.float64) - reference))))
    if not diff <= atol:
        raise ServingError(
            f"model '{name}' ({where}) differs from ONNX Runtime by max |diff| {diff:.3g} > atol "
            f"{atol:g}"
        )
    return diff


def v2_request(model: dict, rows: Rows) -> dict:
    """A KServe v2 inference request (JSON) carrying ``rows`` as the model's inputs."""
    return {
        "inputs": [
            {
                "name": tensor["name"],
                "shape": list(rows[tensor["name"]].shape),
                "datatype": TRITON_TO_V2[tensor["data_type"]],
                "data": rows[tensor["name"]].reshape(-1).tolist(),
            }
            for tensor in model["inputs"]
        ],
        "outputs": [{"name": o["name"]} for o in model["outputs"]],
    }


def v2_outputs(response: dict, model: dict) -> dict[str, np.ndarray]:
    """The output tensors of a KServe v2 inference response (JSON) as arrays."""
    types = {o["name"]: numpy_dtype(o["data_type"]) for o in model["outputs"]}
    arrays = {}
    for out in response.get("outputs", []):
        dtype = types.get(out.get("name"), np.float32)
        arrays[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
    return arrays


def smoke_test_server(
    models: list[dict],
    x_all: np.ndarray,
    *,
    http_url: str,
    grpc_url: str | None = None,
    http_ssl: bool = False,
    atol: float = 1e-4,
    request_timeout_s: float = 30.0,
    headers: dict[str, str] | None = None,
    log_tail: Callable[[], str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict]:
    """Check every model at its version URL over HTTP (``http_ssl``: HTTPS) and gRPC (when
    ``grpc_url`` is given). ``headers`` go with every request.

    Each model is a repository description with ``version`` (``None``: whatever the server
    serves) and ``onnx_path`` (the file ONNX Runtime runs for the reference). Checks that the
    server is live and ready, the model version is ready, its metadata matches, and the answers on
    ``x_all`` match. Raises ``ServingError`` naming the model, version and protocol. Returns per
    model ``max_abs_diff_<protocol>``, ``ready``, ``n_samples``, ``version`` and the tensors.
    """
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    def tail() -> str:
        return f"\n{log_tail()}" if log_tail is not None else ""

    clients: dict[str, tuple] = {
        "http": (
            httpclient,
            httpclient.InferenceServerClient(
                http_url, ssl=http_ssl, connection_timeout=request_timeout_s,
                network_timeout=request_timeout_s,
            ),
        )
    }
    if grpc_url:
        clients = {"grpc": (grpcclient, grpcclient.InferenceServerClient(grpc_url)), **clients}
    results: dict[str, dict] = {}
    try:
        for protocol, (_, client) in clients.items():
            kwargs = {"client_timeout": request_timeout_s} if protocol == "grpc" else {}
            try:
                live = client.is_server_live(headers=headers, **kwargs)
                ready = client.is_server_ready(headers=headers, **kwargs)
            except Exception as exc:
                raise ServingError(f"Triton at {http_url if protocol == 'http' else grpc_url} "
                                   f"({protocol}) does not answer: {exc}{tail()}") from exc
            if not (live and ready):
                raise ServingError(
                    f"Triton ({protocol}) is not live and ready (live {live}, ready {ready}){tail()}"
                )
        for model in models:
            name = model["name"]
            version = "" if model.get("version") is None else str(model["version"])
            label = f"'{name}' version {version}" if version else f"'{name}'"
            x = model_input(model, x_all)
            n = rows_count(x)
            expected = onnx_reference(model["onnx_path"], model, x)
            chunk = model["max_batch_size"] or n
            diffs = {}
            for protocol, (module, client) in clients.items():
                kwargs = {"client_timeout": request_timeout_s} if protocol == "grpc" else {}
                shown = {"grpc": "gRPC", "http": "HTTP"}[protocol]
                where = f"version {version} over {shown}" if version else f"over {shown}"
                try:
                    ready = client.is_model_ready(name, version, headers=headers, **kwargs)
                    metadata = (
                        client.get_model_metadata(name, version, headers=headers, as_json=True,
                                                  **kwargs)
                        if protocol == "grpc"
                        else client.get_model_metadata(name, version, headers=headers)
                    )
                except Exception as exc:
                    raise ServingError(
                        f"model {label} ({shown}) is not served: {exc}{tail()}"
                    ) from exc
                if not ready:
                    raise ServingError(f"model {label} ({shown}) is not ready{tail()}")
                check_metadata(model, metadata, where, model.get("version"))
                output_names = [o["name"] for o in model["outputs"]]
                got: dict[str, list] = {out: [] for out in output_names}
                for start in range(0, n, chunk):
                    infer_inputs = []
                    for tensor in model["inputs"]:
                        part = x[tensor["name"]][start : start + chunk]
                        infer_input = module.InferInput(tensor["name"], list(part.shape),
                                                        TRITON_TO_V2[tensor["data_type"]])
                        infer_input.set_data_from_numpy(part)
                        infer_inputs.append(infer_input)
                    requested = [module.InferRequestedOutput(o) for o in output_names]
                    try:
                        result = client.infer(
                            name, infer_inputs, model_version=version, outputs=requested,
                            headers=headers, **kwargs,
                        )
                    except Exception as exc:
                        raise ServingError(
                            f"model {label}: {shown} inference failed: {exc}{tail()}"
                        ) from exc
                    for out in output_names:
                        got[out].append(result.as_numpy(out))
                merged = {out: np.concatenate(parts, axis=0) for out, parts in got.items()}
                diffs[protocol] = compare_outputs(model, merged, expected, atol, where)
            if progress is not None:
                over = " and ".join({"grpc": "gRPC", "http": "HTTP"}[p] for p in diffs)
                progress(
                    f"{name}{f' v{version}' if version else ''}: served by Triton, matches ONNX "
                    f"Runtime over {over} (max |diff| {max(diffs.values()):.2g}, {n} rows)"
                )
            results[name] = {
                **{f"max_abs_diff_{protocol}": diff for protocol, diff in diffs.items()},
                "ready": True,
                "n_samples": n,
                "version": model.get("version"),
                "inputs": model["inputs"],
                "outputs": model["outputs"],
                "max_batch_size": model["max_batch_size"],
            }
    finally:
        for _, client in clients.values():
            client.close()
    return results


def onnx_path_of(repository_dir: Path, model: dict) -> Path:
    """``<repository>/<model>/<version>/model.onnx`` for a description with ``version``."""
    return Path(repository_dir) / model["name"] / str(model["version"]) / "model.onnx"
