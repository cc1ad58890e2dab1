"""int8 dynamic quantisation with ONNX Runtime: int8 weights stored, activation ranges computed
per batch at run time (no calibration data; costs a little per call)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from onnxruntime.quantization import QuantType, quantize_dynamic

from torchship.components.compress.context import Context
from torchship.components.compress.registry import Made, Variant, register


def quantize_int8_dynamic(prepared: Path, target: Path) -> dict[str, Any]:
    """int8 dynamic quantisation: int8 weights stored, activation ranges computed per batch at
    run time (no calibration data; costs a little per call)."""
    quantize_dynamic(str(prepared), str(target), per_channel=True, weight_type=QuantType.QInt8)
    os.chmod(target, 0o644)
    return {"quant_format": "QOperator (dynamic)", "per_channel": True, "weight_type": "int8",
            "activation_type": "uint8, range per batch at run time"}


def make(ctx: Context) -> Made:
    target = ctx.onnx_target("int8_dynamic")
    return Made(settings=quantize_int8_dynamic(ctx.prepared_onnx(), target))


# Not made by default: a comparison point for int8, asked for with --variants.
VARIANT = register(Variant(
    name="int8_dynamic", order=50, kind="dynamic_quantisation", format="onnx", make=make,
    precision="int8", parity="top1_agreement", default=False,
    description="ONNX Runtime dynamic quantisation (int8 weights, activations per batch)",
))
