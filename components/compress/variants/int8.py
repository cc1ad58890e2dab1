"""int8 post-training static quantisation (QDQ, per-channel int8 weights, uint8 activations) with
ONNX Runtime, calibrated on a seeded sample of training rows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

from torchship.components.compress.context import Context
from torchship.components.compress.registry import (
    Made,
    Variant,
    one_of,
    option,
    register,
    whole_at_least,
    within,
)
from torchship.components.compress.variants.int8_dynamic import quantize_int8_dynamic
from torchship.components.scratch import scratch_dir

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
    """Feeds ONNX Runtime's calibrator a seeded sample of training rows of every input, a batch
    at a time (integer inputs such as token ids are fed as they are: only float tensors are
    quantised)."""

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, batch_size: int,
                 seed: int) -> None:
        n = len(next(iter(inputs.values())))
        chosen = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
        self.sample = {name: array[chosen] for name, array in inputs.items()}
        self.rows = len(chosen)
        self.batches = iter(
            [{name: array[i:i + batch_size] for name, array in self.sample.items()}
             for i in range(0, self.rows, batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_int8_static(
    prepared: Path, target: Path, calibration: dict[str, np.ndarray], method: str, rows: int,
    seed: int,
    percentile: float = 99.999, reduce_range: bool = False,
) -> dict[str, Any]:
    """int8 post-training static quantisation: QDQ, per-channel int8 weights, uint8 activations.

    QDQ is portable (any runtime can run the Q/DQ pairs) and ONNX Runtime's CPU provider fuses
    each Q/DQ-wrapped Gemm into one integer QGemm. Activations are uint8 (U8S8), the pair the
    x86 integer kernels run fastest, with or without VNNI. `reduce_range` stores weights in
    7 bits, which avoids the int16 saturation of the pre-VNNI AVX2 kernel at a little accuracy.
    """
    reader = TrainingSampleReader(calibration, rows, CALIBRATION_BATCH, seed)
    extra_options = {"CalibPercentile": percentile} if method == "percentile" else {}
    with scratch_dir("int8") as work:
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
        "calibration_method": method, "calibration_rows": reader.rows,
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


OPTIONS = (
    option("calibration_method", "minmax", one_of(tuple(CALIBRATION_METHODS)),
           f"pass one of {', '.join(CALIBRATION_METHODS)}",
           "how activation ranges are calibrated"),
    option("calibration_rows", 512, whole_at_least(1), "pass e.g. 512",
           "training rows the calibration sees"),
    option("calibration_percentile", 99.999, within(50, 100, "(]"), "pass e.g. 99.999",
           "the percentile calibration's cut-off"),
    option("reduce_range", False,
           lambda value: None if isinstance(value, bool) else "is not true or false",
           "pass true or false", "7-bit weights (avoids the pre-VNNI AVX2 kernel's saturation)"),
)


def make(ctx: Context) -> Made:
    if any(spec.integer for spec in ctx.contract.inputs):
        # Token inputs: transformers quantise well with int8 weights and activation ranges
        # found per batch, ONNX Runtime's recommended path for BERT-like models.
        settings = quantize_int8_dynamic(ctx.prepared_onnx(), ctx.onnx_target("int8"))
        return Made(kind="dynamic_quantisation", settings={
            **settings, "why": "integer inputs (token ids): dynamic int8, as ONNX Runtime "
                               "recommends for transformers"})
    settings = quantize_int8_static(
        ctx.prepared_onnx(), ctx.onnx_target("int8"), ctx.splits["train"].inputs,
        ctx.options["calibration_method"], ctx.options["calibration_rows"], ctx.seed,
        ctx.options["calibration_percentile"], ctx.options["reduce_range"])
    return Made(settings=settings)


VARIANT = register(Variant(
    name="int8", order=40, kind="static_quantisation", format="onnx", make=make,
    precision="int8", parity="top1_agreement", options=tuple(opt.name for opt in OPTIONS),
    description="ONNX Runtime static quantisation (QDQ, per-channel), calibrated on training rows",
))
