"""What the stages agree on, written once: the tensor contract (each model input and output: name,
dtype, shape with named dynamic axes), artifact file names, how a limit that is not set is
spelled, the concurrency the gate and the serving search judge at, and Triton's serving settings
with their defaults."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torchship.components.errors import UserInputError

__all__ = [
    "BACKENDS",
    "BASELINE",
    "CHOICE_JSON",
    "HF_PREFIX",
    "INPUT_NAME",
    "INSTANCE_KINDS",
    "MODEL_ONNX",
    "MODEL_PT",
    "NOT_SET",
    "OUTPUT_NAME",
    "REFERENCE_SERVING",
    "REFERENCE_STATISTICS",
    "SKIPPED_JSON",
    "SPLITS",
    "TARGET_CONCURRENCY",
    "VARIANTS_JSON",
    "VARIANT_JSON",
    "ServingSettings",
    "TensorContract",
    "TensorSpec",
    "limit",
]

# The dataset splits prepare_data writes, in order.
SPLITS = ("train", "val", "test")

# `hf:DIR`: a Hugging Face model directory as the model, whose tokenizer is text's default one.
HF_PREFIX = "hf:"

# A table's one input and every classifier's output: [batch, n_features] floats in, logits
# [batch, n_classes] out. Other data names its own inputs (an image's `input` [batch, C, H, W];
# text's `input_ids` and `attention_mask` [batch, sequence]).
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# The named dynamic axis every tensor starts with.
BATCH = "batch"

# The variant every other one is measured against: the trained model as it is. Always made.
BASELINE = "fp32"

# Files inside the artifacts: a variant is `<name>/variant.json` with `model.pt` or `model.onnx`;
# export and the gate's chosen model list their rows in `variants.json`, the gate's choice
# (reason and whole table) is `choice.json`.
MODEL_PT = "model.pt"
MODEL_ONNX = "model.onnx"
VARIANT_JSON = "variant.json"
VARIANTS_JSON = "variants.json"
CHOICE_JSON = "choice.json"
# The retraining reference a deploying run keeps (components/deploy/reference.py): the training
# statistics of what serves now, and its serving record, read by the gate and the trigger.
REFERENCE_STATISTICS, REFERENCE_SERVING = "statistics.json", "serving.json"
# The variants asked for that do not apply to the model ({"name", "reason"} each), beside
# variants.json in compress's and export's artifacts.
SKIPPED_JSON = "skipped.json"

# How Triton runs a model of a repository. `python`: the Python backend runs model.onnx with ONNX
# Runtime (the bundled local tritonserver has no other); `onnxruntime`: Triton's onnxruntime_onnx
# platform (the production Triton container on Vertex AI and KServe).
BACKENDS = ("python", "onnxruntime")
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")

# Pipeline parameters cannot be None, so a limit that is not set (a p99 budget, a size cap) is 0
# there; inside the stages it is None. `limit` turns the one into the other at the boundary.
NOT_SET = 0

# The concurrency at which the gate applies the p99 budget and the serving search chooses.
TARGET_CONCURRENCY = 4


def local_instance_kind() -> str:
    """KIND_GPU where this process sees a CUDA GPU and its ONNX Runtime has the CUDA execution
    provider (onnxruntime-gpu, in the CUDA image), else KIND_CPU."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "KIND_CPU"
    import torch

    return "KIND_GPU" if torch.cuda.is_available() else "KIND_CPU"


def limit(value: float | None) -> float | None:
    """A pipeline parameter's limit as the stages take it: None when it is NOT_SET (or None)."""
    return None if value is None or value == NOT_SET else float(value)


@dataclass(frozen=True)
class ServingSettings:
    """How Triton serves one model (its ``config.pbtxt``): the defaults every deploy target and
    the benchmark start from, and what the serving search tunes (``TUNED``)."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 100
    instance_count: int = 1
    # Where Triton runs an instance: on a GPU where this process has one that its ONNX Runtime can
    # use (the GPU image, compile --benchmark-gpus), else on the CPU. Deploy targets set it from
    # the serving machine.
    instance_kind: str = field(default_factory=local_instance_kind)
    preferred_batch_sizes: tuple[int, ...] = ()
    tensorrt_fp16: bool = False

    # The settings the serving search measures and chooses.
    TUNED = ("instance_count", "max_queue_delay_us")

    def __post_init__(self) -> None:
        if int(self.max_batch_size) < 0:
            raise UserInputError(
                f"max_batch_size: {self.max_batch_size} is negative; use 0 (no batching) or more")
        if int(self.instance_count) < 1:
            raise UserInputError(f"instance_count: {self.instance_count} must be 1 or more")
        if int(self.max_queue_delay_us) < 0:
            raise UserInputError(f"max_queue_delay_us: {self.max_queue_delay_us} is negative")
        if self.instance_kind not in INSTANCE_KINDS:
            raise UserInputError(
                f"instance_kind: '{self.instance_kind}' is not one of {', '.join(INSTANCE_KINDS)}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in fields(cls))

    def with_values(self, values: Mapping[str, Any] | None) -> ServingSettings:
        """These settings with ``values`` (a subset of ``names()``) put in."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.names()))
        if unknown:
            raise UserInputError(
                f"serving settings {', '.join(unknown)} are unknown; use any of "
                f"{', '.join(self.names())}")
        if "preferred_batch_sizes" in values:
            values["preferred_batch_sizes"] = tuple(values["preferred_batch_sizes"] or ())
        return replace(self, **values)

    def tuned(self) -> dict[str, int]:
        """The settings the serving search chooses, as its record lists them."""
        return {name: int(getattr(self, name)) for name in self.TUNED}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its name, numpy dtype name, and shape, whose dimensions are
    sizes or, where they vary, axis names (the first is always ``batch``)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if not self.shape or self.shape[0] != BATCH:
            raise ValueError(f"tensor {self.name!r}: shape {self.shape} must start with {BATCH!r}")

    @property
    def sample_shape(self) -> tuple[int | str, ...]:
        """The shape of one row (without the batch axis)."""
        return self.shape[1:]

    @property
    def fixed(self) -> bool:
        """Every dimension of a row has a size (no axis but batch varies)."""
        return all(isinstance(d, int) for d in self.sample_shape)

    @property
    def size(self) -> int | None:
        """Numbers in one row, where the row's shape is fixed."""
        return math.prod(self.sample_shape) if self.fixed else None  # type: ignore[arg-type]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """ONNX's ``dynamic_axes`` entry: position -> axis name."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    @property
    def integer(self) -> bool:
        return self.dtype.startswith(("int", "uint"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(data["shape"]))


@dataclass(frozen=True)
class TensorContract:
    """What a model takes and gives, carried from prepare-data to deploy: it names the ONNX
    graph's inputs and dynamic axes, Triton's config, the calibration feed, the parity check,
    the benchmark's requests and the smoke test. Inputs are passed to the model in this order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def classifier(cls, inputs: Sequence[TensorSpec], n_classes: int) -> TensorContract:
        """A classifier's contract: these inputs, and logits [batch, n_classes] out."""
        return cls(tuple(inputs), (TensorSpec(OUTPUT_NAME, "float32", (BATCH, int(n_classes))),))

    @classmethod
    def table(cls, n_features: int, n_classes: int) -> TensorContract:
        """One float input [batch, n_features]: a table, or anything flattened into one."""
        return cls.classifier([TensorSpec(INPUT_NAME, "float32", (BATCH, int(n_features)))],
                              n_classes)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    @property
    def n_classes(self) -> int:
        return int(self.outputs[0].shape[-1])

    @property
    def n_features(self) -> int | None:
        """The row size of a model with one fixed-shape input (a table, an image), else None."""
        return self.inputs[0].size if len(self.inputs) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorContract:
        return cls(tuple(TensorSpec.from_dict(s) for s in data["inputs"]),
                   tuple(TensorSpec.from_dict(s) for s in data["outputs"]))

    @classmethod
    def from_json(cls, text: str) -> TensorContract:
        return cls.from_dict(json.loads(text))
