"""Triton's ``ModelConfig`` for an ONNX model: tensors from the graph, the proto, config.pbtxt."""

from __future__ import annotations

from pathlib import Path

from torchship.components.contracts import BACKENDS, ServingSettings
from torchship.components.errors import ServingError, UserInputError, one_line
from torchship.components.files import write_bytes

__all__ = [
    "ONNX_TO_TRITON",
    "TRITON_TO_V2",
    "InvalidRepositoryError",
    "backend_of",
    "check_backend",
    "describe_config",
    "model_config",
    "onnx_io",
    "read_model_config",
    "write_config",
]

# How the production Triton container runs model.onnx (backend "onnxruntime").
PRODUCTION_PLATFORM = "onnxruntime_onnx"

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

# ModelConfig DataType -> KServe v2 datatype string used by the clients and the REST protocol.
TRITON_TO_V2 = {
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


class InvalidRepositoryError(UserInputError):
    """A model repository that Triton would refuse or serve wrongly; the message names the file."""


# -- ONNX graph -> tensors ------------------------------------------------------------------------


def onnx_io(model_path: Path, what: str = "onnx_dir") -> tuple[list[dict], list[dict], list[str]]:
    """Graph inputs/outputs as ``{"name", "data_type", "shape"}`` (-1 for a symbolic dim) and the
    external-data files the model refers to."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise UserInputError(
            f"{what}: {model_path} is not a readable ONNX model ({one_line(exc)}); re-run the "
            "export stage"
        ) from exc
    graph = model.graph
    initializers = {init.name for init in graph.initializer}

    def describe(value) -> dict:
        tensor_type = value.type.tensor_type
        elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        if elem not in ONNX_TO_TRITON:
            raise UserInputError(
                f"{what}: {model_path} tensor '{value.name}' has type {elem}, which Triton "
                "cannot serve; export it with a supported type"
            )
        if not tensor_type.HasField("shape"):
            raise UserInputError(
                f"{what}: {model_path} tensor '{value.name}' has no shape; export with shapes"
            )
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        return {"name": value.name, "data_type": ONNX_TO_TRITON[elem], "shape": shape}

    inputs = [describe(v) for v in graph.input if v.name not in initializers]
    outputs = [describe(v) for v in graph.output]
    if not inputs or not outputs:
        raise UserInputError(f"{what}: {model_path} has no graph inputs or outputs; re-export it")
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


# -- ModelConfig ----------------------------------------------------------------------------------


def model_config(
    name: str,
    inputs: list[dict],
    outputs: list[dict],
    *,
    backend: str = "python",
    serving: ServingSettings | None = None,
    versions: list[int] | tuple[int, ...] = (1,),
    warmup_files: dict[str, str] | None = None,
):
    """A ``ModelConfig`` proto for one model.

    ``inputs``/``outputs`` come from ``onnx_io`` (shapes with the batch dimension). ``backend``
    is one of ``contracts.BACKENDS``; ``serving`` the batching, instances and accelerator
    settings (default: ``ServingSettings()``). ``versions`` become ``version_policy { specific
    { versions: [...] } }``: exactly those are served, so a version that is on disk but not
    listed (not yet checked, or retired) is never loaded. ``warmup_files`` maps an input name to
    a file under ``<model>/warmup/`` holding one real sample (raw, row-major); inputs without one
    are warmed up with zeros. ``serving.tensorrt_fp16`` asks the ONNX Runtime backend for its
    TensorRT execution accelerator in FP16 (GPU only).
    """
    from tritonclient.grpc import model_config_pb2 as mc

    serving = serving or ServingSettings()
    check_backend(backend)
    if backend == "python" and serving.instance_kind == "KIND_GPU" and not _onnxruntime_gpu():
        raise UserInputError(
            "instance_kind: KIND_GPU with the python backend runs ONNX Runtime's CUDA provider, "
            "which this environment's onnxruntime lacks; serve on KIND_CPU, or from the GPU "
            "image (onnxruntime-gpu), or with backend='onnxruntime' (the Triton container)"
        )
    if serving.tensorrt_fp16 and (backend != "onnxruntime" or serving.instance_kind != "KIND_GPU"):
        raise UserInputError(
            "tensorrt_fp16: the TensorRT accelerator runs on GPUs only; use it with "
            "backend='onnxruntime' and instance_kind='KIND_GPU'"
        )
    if not versions or any(int(v) < 1 for v in versions):
        raise UserInputError(f"versions: {list(versions)} must be positive version numbers")
    max_batch_size = int(serving.max_batch_size)

    config = mc.ModelConfig(name=name, max_batch_size=max_batch_size)
    if backend == "onnxruntime":
        config.platform = PRODUCTION_PLATFORM
        # One ONNX Runtime thread per instance, as the python backend's model.py runs it: an
        # instance holds one core, and instance_count (what the serving search tunes) the cores.
        for parameter in ("intra_op_thread_count", "inter_op_thread_count"):
            config.parameters[parameter].string_value = "1"
    else:
        config.backend = "python"
    config.version_policy.specific.versions.extend(sorted({int(v) for v in versions}))

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
        config.dynamic_batching.max_queue_delay_microseconds = int(serving.max_queue_delay_us)
        for size in serving.preferred_batch_sizes:
            if 0 < size <= max_batch_size:
                config.dynamic_batching.preferred_batch_size.append(int(size))
    kind = getattr(mc.ModelInstanceGroup, serving.instance_kind)
    config.instance_group.add(count=int(serving.instance_count), kind=kind)

    # Warm up with a real sample when the shapes are fixed (Triton needs full dims for warmup).
    if all(d > 0 for t in config.input for d in t.dims):
        warmup = config.model_warmup.add(name="sample", batch_size=1)
        for tensor in config.input:
            entry = warmup.inputs[tensor.name]
            entry.data_type = tensor.data_type
            entry.dims.extend(tensor.dims)
            if warmup_files and tensor.name in warmup_files:
                entry.input_data_file = warmup_files[tensor.name]
            else:
                entry.zero_data = True

    if serving.tensorrt_fp16:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        accelerator.parameters["precision_mode"] = "FP16"
        accelerator.parameters["max_workspace_size_bytes"] = str(1 << 30)
    return config


def read_model_config(config_path: Path):
    """Parse ``config.pbtxt``; ``InvalidRepositoryError`` (one line) when Triton could not."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(Path(config_path).read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError, UnicodeDecodeError) as exc:
        raise InvalidRepositoryError(
            f"repository: {config_path} is not a valid Triton ModelConfig ({one_line(exc)}); fix "
            "it or rebuild the repository with the deploy stage"
        ) from exc


def write_config(config, path: Path) -> str:
    """Write ``config`` as text to ``path`` atomically (temporary name, then rename); check that
    the text parses back to the same proto first."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    text = text_format.MessageToString(config)
    if text_format.Parse(text, mc.ModelConfig()) != config:  # pragma: no cover - protobuf bug
        raise ServingError(f"config.pbtxt for '{config.name}' does not parse back to itself")
    write_bytes(path, text.encode())
    return text


def backend_of(config) -> str | None:
    """The ``contracts.BACKENDS`` name of a ``ModelConfig`` (None: neither)."""
    if config.platform == PRODUCTION_PLATFORM:
        return "onnxruntime"
    return "python" if config.backend == "python" else None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise UserInputError(f"backend: '{backend}' is not one of {', '.join(BACKENDS)}")


def describe_config(config, backend: str | None = None) -> dict:
    """The plain-dict view of a ``ModelConfig`` that the stages pass around and return."""
    from tritonclient.grpc import model_config_pb2 as mc

    def tensors(items) -> list[dict]:
        return [
            {"name": t.name, "data_type": mc.DataType.Name(t.data_type), "dims": list(t.dims)}
            for t in items
        ]

    return {
        "name": config.name,
        "inputs": tensors(config.input),
        "outputs": tensors(config.output),
        "max_batch_size": config.max_batch_size,
        "backend": backend or backend_of(config),
    }


def _onnxruntime_gpu() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
