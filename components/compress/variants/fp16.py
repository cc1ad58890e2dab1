"""Half precision: fp16 weights and arithmetic with float32 input and output, for GPU serving."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from torchship.components.compress.context import Context
from torchship.components.compress.registry import Made, Variant, register


def convert_fp16(fp32_onnx: Path, target: Path) -> dict[str, Any]:
    """fp16 weights and arithmetic, for GPU serving (tensor cores); the graph keeps FP32 input
    and output (Cast nodes inside), so Triton's config and clients stay as they are. On CPU
    ONNX Runtime computes fp16 slowly or casts back: its CPU latency is measured, not a goal."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(onnx.load(str(fp32_onnx)), keep_io_types=True))
    # The converter appends the input Casts at the end of the node list; ONNX wants nodes in
    # topological order.
    model.topological_sort()
    onnx.save(model.model, str(target))
    os.chmod(target, 0o644)
    return {"precision": "fp16", "keep_io_types": True, "io_type": "float32",
            "intended_for": "GPU serving"}


def make(ctx: Context) -> Made:
    return Made(settings=convert_fp16(ctx.fp32_onnx(), ctx.onnx_target("fp16")))


# Not made by default: for GPU serving (tensor cores); on CPU its latency is measured, not a goal.
VARIANT = register(Variant(
    name="fp16", order=60, kind="half_precision", format="onnx", make=make, precision="fp16",
    parity="top1_agreement", default=False,
    description="float16 weights and arithmetic with FP32 input/output, for GPU serving",
))
