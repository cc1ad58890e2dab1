"""Parity of an exported model with its PyTorch source: the logits themselves, or (where the
numbers move by design: quantised, half precision) the top-1 decision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from torchship.components.contracts import INPUT_NAME, OUTPUT_NAME
from torchship.components.errors import ParityError

__all__ = ["BATCH_SIZES_CHECKED", "check_parity"]

# Batch sizes every exported model must accept: 1 and an odd size the example never used.
BATCH_SIZES_CHECKED = (1, 7)


def check_parity(
    name: str,
    onnx_path: Path,
    reference: nn.Module,
    reference_name: str,
    x: np.ndarray,
    criterion: str,
    atol: float,
    min_top1_agreement: float,
) -> dict[str, Any]:
    """Compare ONNX Runtime's logits with PyTorch's on `x` by `criterion` (`max_abs_diff` within
    `atol`, or `top1_agreement` at least `min_top1_agreement`); raise ParityError beyond it."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    for batch_size in BATCH_SIZES_CHECKED:
        try:
            (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x[:batch_size]})
        except Exception as error:  # ORT raises its own exception types for shape errors
            raise ParityError(
                f"variant '{name}': the ONNX model fails at batch size {batch_size} "
                f"({' '.join(str(error).split())[:200]}); keep the batch dimension free in forward"
            ) from error
        if logits.shape[0] != batch_size:
            raise ParityError(
                f"variant '{name}': the ONNX model returns {logits.shape[0]} rows for a batch of "
                f"{batch_size}; keep the batch dimension free in forward"
            )

    (onnx_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    with torch.no_grad():
        torch_logits = reference.eval()(torch.from_numpy(x)).numpy()
    max_abs_diff = float(np.max(np.abs(onnx_logits - torch_logits)))
    top1_agreement = float(np.mean(onnx_logits.argmax(axis=1) == torch_logits.argmax(axis=1)))
    # Quantised logits move by design; what must hold is the decision. Float exports must
    # reproduce the logits themselves.
    decision = criterion == "top1_agreement"
    passed = (top1_agreement >= min_top1_agreement) if decision else (max_abs_diff <= atol)
    parity = {
        "reference": reference_name,
        "rows": len(x),
        "max_abs_diff": max_abs_diff,
        "top1_agreement": top1_agreement,
        "criterion": criterion,
        "atol": atol,
        "min_top1_agreement": min_top1_agreement,
        "batch_sizes_checked": list(BATCH_SIZES_CHECKED),
        "dynamic_batch": isinstance(batch_dim, str) or batch_dim is None,
        "passed": passed,
    }
    if not passed:
        measured, required = (
            (f"top-1 agreement {top1_agreement:.4f}", f"at least {min_top1_agreement}")
            if decision else (f"max abs logit difference {max_abs_diff:.3g}", f"at most {atol}")
        )
        raise ParityError(
            f"variant '{name}' disagrees with PyTorch '{reference_name}' on {len(x)} test rows: "
            f"{measured}, required {required}; fix the export or loosen the tolerance"
        )
    return parity
