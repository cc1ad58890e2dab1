"""What the stages agree on, written once: artifact file and tensor names, how a limit that is not
set is spelled, the concurrency the gate and the serving search judge at, and Triton's serving
settings with their defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from torchship.components.errors import UserInputError

__all__ = [
    "BACKENDS",
    "BASELINE",
    "CHOICE_JSON",
    "INPUT_NAME",
    "INSTANCE_KINDS",
    "MODEL_ONNX",
    "MODEL_PT",
    "NOT_SET",
    "OUTPUT_NAME",
    "SPLITS",
    "TARGET_CONCURRENCY",
    "VARIANTS_JSON",
    "VARIANT_JSON",
    "ServingSettings",
    "limit",
]

# The dataset splits prepare_data writes, in order.
SPLITS = ("train", "val", "test")

# The exported graph's tensors: a flat table is one float input [batch, n_features] and one
# output of logits [batch, n_classes].
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

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
    instance_kind: str = "KIND_CPU"
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
