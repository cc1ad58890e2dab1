"""The ONNX-side variants of compress: int8 static (QDQ) and dynamic quantisation, and fp16."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from torchship.components.export.stage import INPUT_NAME

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
CALIBRATION_BATCH = 32
# Histogram bins for entropy calibration. quantize_static keeps ONNX Runtime's default of 128,
# as many as its quantised bins, which leaves the KL search one candidate: the min-max range.
ENTROPY_BINS = 512
ENTROPY_QUANTIZED_BINS = 128


class TrainingSampleReader(CalibrationDataReader):
    """Feeds ONNX Runtime's calibrator a seeded sample of training rows, a batch at a time."""

    def __init__(self, x: np.ndarray, rows: int, batch_size: int, seed: int) -> None:
        chosen = np.random.default_rng(seed).choice(len(x), size=min(rows, len(x)), replace=False)
        self.sample = x[np.sort(chosen)]
        self.batches = iter(
            [{INPUT_NAME: self.sample[i:i + batch_size]}
             for i in range(0, len(self.sample), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def prepare_for_quantisation(fp32_onnx: Path, prepared: Path) -> Path:
    """Shape inference and graph fusion first, as ONNX Runtime recommends for quantisation: the
    quantiser then sees fused Gemm/Conv nodes and known shapes."""
    quant_pre_process(str(fp32_onnx), str(prepared))
    return prepared


def quantize_int8_static(
    prepared: Path, target: Path, calibration_x: np.ndarray, method: str, rows: int, seed: int,
    percentile: float = 99.999, reduce_range: bool = False,
) -> dict[str, Any]:
    """int8 post-training static quantisation: QDQ, per-channel int8 weights, uint8 activations.

    QDQ is portable (any runtime can run the Q/DQ pairs) and ONNX Runtime's CPU provider fuses
    each Q/DQ-wrapped Gemm into one integer QGemm. Activations are uint8 (U8S8), the pair the
    x86 integer kernels run fastest, with or without VNNI. `reduce_range` stores weights in
    7 bits, which avoids the int16 saturation of the pre-VNNI AVX2 kernel at a little accuracy.
    """
    reader = TrainingSampleReader(calibration_x, rows, CALIBRATION_BATCH, seed)
    extra_options = {"CalibPercentile": percentile} if method == "percentile" else {}
    with tempfile.TemporaryDirectory() as work:
        cache = None
        if method == "entropy":
            cache = Path(work) / "ranges.json"
            _entropy_ranges(prepared, reader, Path(work), cache)
        quantize_static(
            str(prepared), str(target), None if cache else reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CALIBRATION_METHODS[method],
            extra_options=extra_options,
            calibration_cache_path=cache,
        )
    os.chmod(target, 0o644)
    settings: dict[str, Any] = {
        "quant_format": "QDQ", "per_channel": True, "weight_type": "int8",
        "activation_type": "uint8", "reduce_range": reduce_range,
        "calibration_method": method, "calibration_rows": len(reader.sample),
        "calibration_split": "train",
    }
    if method == "percentile":
        settings["calibration_percentile"] = percentile
    if method == "entropy":
        settings["entropy_bins"] = ENTROPY_BINS
        settings["entropy_quantized_bins"] = ENTROPY_QUANTIZED_BINS
    return settings


def _entropy_ranges(
    prepared: Path, reader: CalibrationDataReader, work: Path, cache: Path
) -> None:
    """KL-divergence (entropy) ranges over ENTROPY_BINS histogram bins, written where
    quantize_static reads a calibration cache."""
    calibrator = create_calibrator(
        prepared, None, augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
    )
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


def quantize_int8_dynamic(prepared: Path, target: Path) -> dict[str, Any]:
    """int8 dynamic quantisation: int8 weights stored, activation ranges computed per batch at
    run time (no calibration data; costs a little per call)."""
    quantize_dynamic(str(prepared), str(target), per_channel=True, weight_type=QuantType.QInt8)
    os.chmod(target, 0o644)
    return {"quant_format": "QOperator (dynamic)", "per_channel": True, "weight_type": "int8",
            "activation_type": "uint8, range per batch at run time"}


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
