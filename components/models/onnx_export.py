"""A model's ONNX graph: named as its tensor contract, with the contract's dynamic axes, traced on
real samples, checked by ``onnx.checker``, written atomically."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchship.components.files import atomic_path
from torchship.components.models.specs import Inputs, as_contract, example_inputs

__all__ = ["export_onnx"]


def export_onnx(
    model: nn.Module, inputs: Inputs, path: str | os.PathLike, opset: int = 17,
    dynamo: bool = False, rows: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Export `model` to ONNX at `path`: its inputs and outputs named and shaped as the tensor
    contract `inputs` says (a number of table features: `input` [batch, n] in, `logits` out),
    the contract's named axes dynamic, traced on two of `rows` (real samples) where given.

    The TorchScript exporter is the default: for these models it gives the same graph as the
    torch.export-based one (Gemm/Conv, dynamic batch) at native opset 17, in a tenth of a second
    instead of several. `dynamo=True` uses torch.export (which implements opset 18 and up).
    """
    import onnx

    model = model.eval()
    contract = as_contract(inputs, 0) if isinstance(inputs, int) else inputs
    if isinstance(inputs, int):  # the output's size is the model's own: read it off a call
        with torch.no_grad():
            n_classes = model(*example_inputs(contract, 1)).shape[-1]
        contract = as_contract(inputs, n_classes)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # Batch 2, not 1: a tracer may treat a dimension of size 1 as a constant.
    example = example_inputs(contract, 2, rows, device)
    input_names, output_names = contract.input_names, contract.output_names
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        if dynamo:
            shapes = tuple({axis: torch.export.Dim(f"{spec.name}_{name}", min=1)
                            for axis, name in spec.dynamic_axes.items()}
                           for spec in contract.inputs)
            torch.onnx.export(
                model, example, str(tmp), input_names=input_names, output_names=output_names,
                dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False,
            )
        else:
            torch.onnx.export(
                model, example, str(tmp), input_names=input_names, output_names=output_names,
                dynamic_axes={spec.name: spec.dynamic_axes
                              for spec in (*contract.inputs, *contract.outputs)},
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )
        onnx.checker.check_model(str(tmp), full_check=True)
    return Path(path)
