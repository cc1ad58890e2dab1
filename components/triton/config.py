"""Triton's ``ModelConfig`` for an ONNX model: tensors from the graph, the proto, config.pbtxt."""

from __future__ import annotations

from pathlib import Path

from torchship.components.errors import ServingError, UserInputError, one_line
from torchship.components.triton.versions import atomic_write

__all__ = [
    "INSTANCE_KINDS",
    "ONNX_TO_TRITON",
    "TARGETS",
    "TRITON_TO_V2",
    "InvalidRepositoryError",
    "describe_config",
    "model_config",
    "onnx_io",
    "read_model_config",
    "write_config",
]

TARGETS = ("local", "triton")
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")

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
    target: str = "local",
    max_batch_size: int = 64,
    max_queue_delay_us: int = 100,
    preferred_batch_sizes: tuple[int, ...] | None = None,
    instance_count: int = 1,
    instance_kind: str = "KIND_CPU",
    versions: list[int] | tuple[int, ...] = (1,),
    warmup_files: dict[str, str] | None = None,
    tensorrt_fp16: bool = False,
):
    """A ``ModelConfig`` proto for one model.

    ``inputs``/``outputs`` come from ``onnx_io`` (shapes with the batch dimension). ``versions``
    become ``version_policy { specific { versions: [...] } }``: exactly those are served, so a
    version that is on disk but not listed (not yet checked, or retired) is never loaded.
    ``warmup_files`` maps an input name to a file under ``<model>/warmup/`` holding one real sample
    (raw, row-major); inputs without one are warmed up with zeros. ``tensorrt_fp16`` asks the
    ONNX Runtime backend for its TensorRT execution accelerator in FP16 (GPU targets only).
    """
    from tritonclient.grpc import model_config_pb2 as mc

    if target not in TARGETS:
        raise UserInputError(f"target: '{target}' is not one of {', '.join(TARGETS)}")
    if instance_kind not in INSTANCE_KINDS:
        raise UserInputError(
            f"instance_kind: '{instance_kind}' is not one of {', '.join(INSTANCE_KINDS)}"
        )
    if target == "local" and instance_kind != "KIND_CPU":
        raise UserInputError(
            f"instance_kind: the local target runs ONNX Runtime on CPU inside the Python backend; "
            f"'{instance_kind}' needs target='triton' (the Triton container with a GPU)"
        )
    if tensorrt_fp16 and (target != "triton" or instance_kind != "KIND_GPU"):
        raise UserInputError(
            "tensorrt_fp16: the TensorRT accelerator runs on GPUs only; use it with "
            "target='triton' and instance_kind='KIND_GPU'"
        )
    if int(instance_count) < 1:
        raise UserInputError(f"instance_count: {instance_count} must be 1 or more")
    if int(max_queue_delay_us) < 0:
        raise UserInputError(f"max_queue_delay_us: {max_queue_delay_us} is negative")
    if not versions or any(int(v) < 1 for v in versions):
        raise UserInputError(f"versions: {list(versions)} must be positive version numbers")

    config = mc.ModelConfig(name=name, max_batch_size=int(max_batch_size))
    if target == "triton":
        config.platform = "onnxruntime_onnx"
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
        config.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
        for size in preferred_batch_sizes or ():
            if 0 < size <= max_batch_size:
                config.dynamic_batching.preferred_batch_size.append(int(size))
    kind = getattr(mc.ModelInstanceGroup, instance_kind)
    config.instance_group.add(count=int(instance_count), kind=kind)

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

    if tensorrt_fp16:
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
    atomic_write(path, text.encode())
    return text


def describe_config(config, target: str | None = None) -> dict:
    """The plain-dict view of a ``ModelConfig`` that the stages pass around and return."""
    from tritonclient.grpc import model_config_pb2 as mc

    def tensors(items) -> list[dict]:
        return [
            {"name": t.name, "data_type": mc.DataType.Name(t.data_type), "dims": list(t.dims)}
            for t in items
        ]

    if target is None:
        target = "triton" if config.platform == "onnxruntime_onnx" else "local"
    return {
        "name": config.name,
        "inputs": tensors(config.input),
        "outputs": tensors(config.output),
        "max_batch_size": config.max_batch_size,
        "target": target,
    }
