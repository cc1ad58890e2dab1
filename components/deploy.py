"""Deploy stage: ONNX files -> a Triton model repository -> a live, checked local endpoint.

``build_model_repository`` writes ``<repo>/<variant>/config.pbtxt`` (built from Triton's own
``ModelConfig`` protobuf, as shipped in ``tritonclient``) and ``<repo>/<variant>/1/model.onnx``.
``target="triton"`` is the production form (``platform: "onnxruntime_onnx"``); ``target="local"``
serves the same ``model.onnx`` through the Python backend (``model.py`` running ONNX Runtime),
since the ``tritonserver`` inside the nvidia-pytriton wheel has no ONNX Runtime backend.

``deploy_local`` builds the local repository, starts the bundled ``tritonserver`` on it and checks
every model over gRPC and HTTP against ONNX Runtime run directly on the same file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from torchship.components.errors import ServingError, UserInputError

__all__ = ["ONNX_TO_TRITON", "TARGETS", "build_model_repository", "deploy_local"]

TARGETS = ("local", "triton")
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")

# onnx.TensorProto element type name -> Triton ModelConfig DataType name.
ONNX_TO_TRITON = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "BOOL": "TYPE_BOOL",
    "STRING": "TYPE_STRING",
}


def _onnx_io(model_path: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Graph inputs/outputs as ``{"name", "data_type", "shape"}`` (-1 for a symbolic dim) and the
    external-data files the model refers to."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise UserInputError(
            f"onnx_dir: {model_path} is not a readable ONNX model ({exc}); re-run the export stage"
        ) from exc
    graph = model.graph
    initializers = {init.name for init in graph.initializer}

    def describe(value) -> dict:
        tensor_type = value.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        if elem not in ONNX_TO_TRITON:
            raise UserInputError(
                f"onnx_dir: {model_path} tensor '{value.name}' has type {elem}, which Triton "
                "cannot serve; export it with a supported type"
            )
        if not tensor_type.HasField("shape"):
            raise UserInputError(
                f"onnx_dir: {model_path} tensor '{value.name}' has no shape; export with shapes"
            )
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        return {"name": value.name, "data_type": ONNX_TO_TRITON[elem], "shape": shape}

    inputs = [describe(v) for v in graph.input if v.name not in initializers]
    outputs = [describe(v) for v in graph.output]
    external = sorted(
        {
            entry.value
            for init in graph.initializer
            if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data
            if entry.key == "location"
        }
    )
    return inputs, outputs, external


def _model_config(
    name: str,
    inputs: list[dict],
    outputs: list[dict],
    target: str,
    max_batch_size: int,
    max_queue_delay_us: int,
    preferred_batch_sizes: tuple[int, ...] | None,
    instance_count: int,
):
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    if target == "triton":
        config.platform = "onnxruntime_onnx"
    else:
        config.backend = "python"

    def dims(tensor: dict) -> list[int]:
        shape = tensor["shape"]
        if max_batch_size > 0:
            if not shape or shape[0] > 0:
                raise UserInputError(
                    f"onnx_dir: model '{name}' tensor '{tensor['name']}' has shape {shape} without "
                    "a dynamic first (batch) dimension; export with dynamic_axes={0: 'batch'} or "
                    "use max_batch_size=0"
                )
            shape = shape[1:]
        return shape or [1]

    for tensor in inputs:
        config.input.add(
            name=tensor["name"], data_type=mc.DataType.Value(tensor["data_type"]), dims=dims(tensor)
        )
    for tensor in outputs:
        config.output.add(
            name=tensor["name"], data_type=mc.DataType.Value(tensor["data_type"]), dims=dims(tensor)
        )
    if max_batch_size > 0:
        config.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
        for size in preferred_batch_sizes or ():
            if 0 < size <= max_batch_size:
                config.dynamic_batching.preferred_batch_size.append(int(size))
    config.instance_group.add(count=int(instance_count), kind=mc.ModelInstanceGroup.KIND_CPU)
    return config


def _swap_into_place(built: Path, destination: Path) -> None:
    """Rename ``built`` to ``destination``, replacing a previous directory there."""
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}-{time.time_ns()}")
        destination.rename(old)
        try:
            built.rename(destination)
        except BaseException:
            old.rename(destination)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        built.rename(destination)


def build_model_repository(
    onnx_dir: str | os.PathLike,
    repository_dir: str | os.PathLike,
    target: str = "local",
    max_batch_size: int = 64,
    *,
    max_queue_delay_us: int = 100,
    preferred_batch_sizes: tuple[int, ...] | None = None,
    instance_count: int = 1,
) -> list[dict]:
    """Write a Triton model repository for every ``onnx_dir/<variant>/model.onnx``.

    Each model gets ``config.pbtxt`` (a ``ModelConfig`` proto in text format) and ``1/model.onnx``;
    ``target="local"`` adds ``1/model.py`` (Python backend running ONNX Runtime). The repository is
    built in a temporary directory beside ``repository_dir`` and renamed into place. Returns one
    dict per model: ``name``, ``inputs``, ``outputs`` (each ``name``, ``data_type``, ``dims``),
    ``max_batch_size``, ``target``.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    if target not in TARGETS:
        raise UserInputError(f"target: '{target}' is not one of {', '.join(TARGETS)}")
    if int(max_batch_size) < 0:
        raise UserInputError(f"max_batch_size: {max_batch_size} is negative; use 0 or more")
    max_batch_size = int(max_batch_size)
    onnx_dir = Path(onnx_dir)
    repository_dir = Path(repository_dir)
    if not onnx_dir.is_dir():
        raise UserInputError(f"onnx_dir: {onnx_dir} is not a directory; run the export stage first")
    variants = sorted(p.parent for p in onnx_dir.glob("*/model.onnx") if p.is_file())
    if not variants:
        raise UserInputError(
            f"onnx_dir: no <variant>/model.onnx under {onnx_dir}; run the export stage first"
        )
    if target == "local" and not PYTHON_MODEL_SOURCE.is_file():
        raise ServingError(f"the Python-backend model source {PYTHON_MODEL_SOURCE} is missing")

    repository_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{repository_dir.name}.tmp-", dir=repository_dir.parent)
    )
    models = []
    try:
        for variant_dir in variants:
            name = variant_dir.name
            source = variant_dir / "model.onnx"
            inputs, outputs, external = _onnx_io(source)
            config = _model_config(
                name,
                inputs,
                outputs,
                target,
                max_batch_size,
                max_queue_delay_us,
                preferred_batch_sizes,
                instance_count,
            )
            text = text_format.MessageToString(config)
            parsed = text_format.Parse(text, mc.ModelConfig())
            if parsed != config:  # pragma: no cover - a protobuf bug, not a user error
                raise ServingError(f"config.pbtxt for '{name}' does not parse back to itself")

            model_dir = staging / name
            version_dir = model_dir / "1"
            version_dir.mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(text)
            shutil.copy2(source, version_dir / "model.onnx")
            for location in external:
                target_file = version_dir / location
                target_file.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(variant_dir / location, target_file)
            if target == "local":
                shutil.copy2(PYTHON_MODEL_SOURCE, version_dir / "model.py")

            models.append(
                {
                    "name": name,
                    "inputs": [
                        {
                            "name": t.name,
                            "data_type": mc.DataType.Name(t.data_type),
                            "dims": list(t.dims),
                        }
                        for t in parsed.input
                    ],
                    "outputs": [
                        {
                            "name": t.name,
                            "data_type": mc.DataType.Name(t.data_type),
                            "dims": list(t.dims),
                        }
                        for t in parsed.output
                    ],
                    "max_batch_size": parsed.max_batch_size,
                    "target": target,
                }
            )
        _swap_into_place(staging, repository_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return models


# -- deploy_local ---------------------------------------------------------------------------------


_TRITON_TO_V2 = {  # ModelConfig DataType -> KServe v2 datatype string used by the clients
    "TYPE_FP32": "FP32",
    "TYPE_FP16": "FP16",
    "TYPE_BF16": "BF16",
    "TYPE_FP64": "FP64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_BOOL": "BOOL",
    "TYPE_STRING": "BYTES",
}


def _expected_shape(tensor: dict, max_batch_size: int) -> list[int]:
    return ([-1] if max_batch_size > 0 else []) + list(tensor["dims"])


def _check_metadata(model: dict, metadata: dict, protocol: str) -> None:
    name = model["name"]
    for kind in ("inputs", "outputs"):
        served = [
            (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in metadata.get(kind, [])
        ]
        expected = [
            (t["name"], _TRITON_TO_V2[t["data_type"]], _expected_shape(t, model["max_batch_size"]))
            for t in model[kind]
        ]
        if served != expected:
            raise ServingError(
                f"model '{name}' ({protocol}) serves {kind} {served}, expected {expected}"
            )


def _load_x(test_path: Path, n_samples: int) -> np.ndarray:
    if not test_path.is_file():
        raise UserInputError(f"test_path: {test_path} does not exist; run prepare_data first")
    with np.load(test_path, allow_pickle=False) as data:
        if "x" not in data:
            raise UserInputError(f"test_path: {test_path} has no 'x' array; run prepare_data")
        x = np.asarray(data["x"])
    if x.ndim < 2 or len(x) == 0:
        raise UserInputError(f"test_path: 'x' in {test_path} has shape {x.shape}; expected [N, F]")
    return np.ascontiguousarray(x[: max(1, int(n_samples))])


def deploy_local(
    onnx_dir: str | os.PathLike,
    repository_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    n_samples: int = 32,
    atol: float = 1e-4,
    *,
    max_batch_size: int = 64,
    startup_timeout_s: float = 120.0,
    request_timeout_s: float = 30.0,
    progress: Callable[[str], None] = print,
) -> dict:
    """Build the local repository, serve it on the bundled ``tritonserver`` and smoke-test it.

    Each model gets ``n_samples`` held-out rows of ``test_path`` over gRPC and over HTTP; the answers
    must match ONNX Runtime run directly on the same ``model.onnx`` within ``atol``, and the served
    metadata must match the repository. Raises ``ServingError`` on any mismatch. Returns
    ``{"models": {name: {"max_abs_diff_grpc", "max_abs_diff_http", "ready", ...}}, ...}``.
    """
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from torchship.components.triton import TritonServer

    repository_dir = Path(repository_dir)
    x_all = _load_x(Path(test_path), n_samples)
    models = build_model_repository(onnx_dir, repository_dir, "local", max_batch_size)

    results: dict[str, dict] = {}
    with TritonServer(repository_dir, startup_timeout_s=startup_timeout_s) as server:
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        http = httpclient.InferenceServerClient(
            server.http_url, connection_timeout=request_timeout_s, network_timeout=request_timeout_s
        )
        try:
            for model in models:
                name = model["name"]
                if len(model["inputs"]) != 1:
                    raise UserInputError(
                        f"onnx_dir: model '{name}' has {len(model['inputs'])} inputs; the smoke "
                        "test feeds one feature matrix, export a single 'input'"
                    )
                tensor = model["inputs"][0]
                dims = tensor["dims"] if model["max_batch_size"] > 0 else tensor["dims"][1:]
                if len(dims) != x_all.ndim - 1 or any(
                    d not in (-1, s) for d, s in zip(dims, x_all.shape[1:])
                ):
                    raise UserInputError(
                        f"test_path: rows of shape {list(x_all.shape[1:])} do not fit model "
                        f"'{name}' input dims {tensor['dims']}; use the test split of the same data"
                    )
                dtype = np.dtype(_numpy_dtype(tensor["data_type"]))
                x = x_all.astype(dtype, copy=False)
                if model["max_batch_size"] == 0:
                    x = x[:1]  # no batching: one request of exactly the model's shape

                ready_grpc = grpc.is_model_ready(name, client_timeout=request_timeout_s)
                ready_http = http.is_model_ready(name)
                if not (ready_grpc and ready_http):
                    raise ServingError(
                        f"model '{name}' is not ready (gRPC {ready_grpc}, HTTP {ready_http}):\n"
                        f"{server.log_tail()}"
                    )
                _check_metadata(
                    model,
                    grpc.get_model_metadata(name, as_json=True, client_timeout=request_timeout_s),
                    "gRPC",
                )
                _check_metadata(model, http.get_model_metadata(name), "HTTP")

                session = ort.InferenceSession(
                    str(repository_dir / name / "1" / "model.onnx"),
                    providers=["CPUExecutionProvider"],
                )
                output_names = [o["name"] for o in model["outputs"]]
                expected = session.run(output_names, {tensor["name"]: x})

                chunk = model["max_batch_size"] or len(x)
                diffs = {}
                for protocol, client, module in (
                    ("grpc", grpc, grpcclient),
                    ("http", http, httpclient),
                ):
                    got = [[] for _ in output_names]
                    for start in range(0, len(x), chunk):
                        part = x[start : start + chunk]
                        infer_input = module.InferInput(
                            tensor["name"], list(part.shape), _TRITON_TO_V2[tensor["data_type"]]
                        )
                        infer_input.set_data_from_numpy(part)
                        requested = [module.InferRequestedOutput(o) for o in output_names]
                        try:
                            if protocol == "grpc":
                                result = client.infer(
                                    name,
                                    [infer_input],
                                    outputs=requested,
                                    client_timeout=request_timeout_s,
                                )
                            else:
                                result = client.infer(name, [infer_input], outputs=requested)
                        except Exception as exc:
                            raise ServingError(
                                f"model '{name}': {protocol} inference failed: {exc}\n"
                                f"{server.log_tail()}"
                            ) from exc
                        for k, out in enumerate(output_names):
                            got[k].append(result.as_numpy(out))
                    diff = 0.0
                    for k, out in enumerate(output_names):
                        served = np.concatenate(got[k], axis=0)
                        if served.shape != expected[k].shape:
                            raise ServingError(
                                f"model '{name}' ({protocol}) output '{out}' has shape "
                                f"{served.shape}, ONNX Runtime gives {expected[k].shape}"
                            )
                        diff = max(
                            diff, float(np.max(np.abs(served.astype(np.float64) - expected[k])))
                        )
                    if not diff <= atol:
                        raise ServingError(
                            f"model '{name}' over {protocol} differs from ONNX Runtime by "
                            f"max |diff| {diff:.3g} > atol {atol:g}"
                        )
                    diffs[protocol] = diff
                progress(f"{name}: served by Triton, matches ONNX Runtime over gRPC and HTTP "
                         f"(max |diff| {max(diffs.values()):.2g}, {len(x)} rows)")
                results[name] = {
                    "max_abs_diff_grpc": diffs["grpc"],
                    "max_abs_diff_http": diffs["http"],
                    "ready": True,
                    "n_samples": len(x),
                    "inputs": model["inputs"],
                    "outputs": model["outputs"],
                    "max_batch_size": model["max_batch_size"],
                }
        finally:
            grpc.close()
            http.close()
        startup_s = server.startup_s
    return {
        "models": results,
        "repository": str(repository_dir),
        "target": "local",
        "n_samples": len(x_all),
        "atol": float(atol),
        "server_startup_s": startup_s,
        "passed": True,
    }


def _numpy_dtype(triton_type: str):
    from tritonclient.utils import triton_to_np_dtype

    return triton_to_np_dtype(_TRITON_TO_V2[triton_type])
