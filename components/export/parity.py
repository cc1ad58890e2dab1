"""Parity of an exported model with its PyTorch source: the logits themselves, or (where the
numbers move by design: quantised, half precision) the top-1 decision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from torchship.components.errors import ParityError

__all__ = ["BATCH_SIZES_CHECKED", "check_parity"]

# Batch sizes every exported model must accept: 1 and an odd size the example never used.
BATCH_SIZES_CHECKED = (1, 7)


def check_parity(
    name: str,
    onnx_path: Path,
    reference: nn.Module,
    reference_name: str,
    rows: dict[str, np.ndarray],
    criterion: str,
    atol: float,
    min_top1_agreement: float,
) -> dict[str, Any]:
    """Compare ONNX Runtime's outputs with PyTorch's on `rows` (every input of the contract,
    by name) by `criterion`: `max_abs_diff` over every output within `atol`, or the first
    output's (the logits') `top1_agreement` at least `min_top1_agreement`; raise ParityError
    beyond it."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    batch_dim = session.get_inputs()[0].shape[0]
    n = len(next(iter(rows.values())))
    for batch_size in BATCH_SIZES_CHECKED:
        try:
            outputs = session.run(output_names, {k: v[:batch_size] for k, v in rows.items()})
        except Exception as error:  # ORT raises its own exception types for shape errors
            raise ParityError(
                f"variant '{name}': the ONNX model fails at batch size {batch_size} "
                f"({' '.join(str(error).split())[:200]}); keep the batch dimension free in forward"
            ) from error
        if any(out.shape[0] != min(batch_size, n) for out in outputs):
            raise ParityError(
                f"variant '{name}': the ONNX model returns {outputs[0].shape[0]} rows for a "
                f"batch of {batch_size}; keep the batch dimension free in forward"
            )

    onnx_outputs = session.run(output_names, rows)
    with torch.no_grad():
        answer = reference.eval()(*(torch.from_numpy(rows[k]) for k in rows))
    torch_outputs = [t.numpy() for t in (answer if isinstance(answer, (tuple, list)) else [answer])]
    if len(torch_outputs) != len(onnx_outputs):
        raise ParityError(
            f"variant '{name}': PyTorch gives {len(torch_outputs)} outputs, the ONNX model "
            f"{len(onnx_outputs)} ({', '.join(output_names)}); export every output"
        )
    onnx_logits, torch_logits = onnx_outputs[0], torch_outputs[0]
    max_abs_diff = max(float(np.max(np.abs(o - t))) for o, t in zip(onnx_outputs, torch_outputs))
    top1_agreement = float(np.mean(onnx_logits.argmax(axis=1) == torch_logits.argmax(axis=1)))
    # Quantised logits move by design; what must hold is the decision. Float exports must
    # reproduce the logits themselves.
    decision = criterion == "top1_agreement"
    passed = (top1_agreement >= min_top1_agreement) if decision else (max_abs_diff <= atol)
    parity = {
        "reference": reference_name,
        "rows": n,
        "outputs": output_names,
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
            f"variant '{name}' disagrees with PyTorch '{reference_name}' on {n} test rows: "
            f"{measured}, required {required}; fix the export or loosen the tolerance"
        )
    return parity
