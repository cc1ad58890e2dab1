"""What every variant is made from: the trained fp32 model and its spec, the splits, the training
settings to fine-tune with, the options, and the fp32 ONNX graph (exported once, on first use)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from torchship.components.contracts import MODEL_ONNX, TensorContract
from torchship.components.data.splits import Split
from torchship.components.models import export_onnx

__all__ = ["Context", "pre_process"]


@dataclass
class Context:
    fp32: nn.Module
    contract: TensorContract  # what the model takes and gives
    spec: dict[str, Any]  # model_name, n_features (None unless one flat input), n_classes
    model_options: dict[str, Any] | None  # the trained model's build options (its width)
    splits: dict[str, Split]  # train, val, test
    # Fine-tuning and distillation reuse the training run's batch size and learning rate.
    training: dict[str, Any]  # batch_size, learning_rate, seed
    options: dict[str, Any]  # every registered option's value
    seed: int
    staging: Path  # the variants directory being built
    work: Path  # scratch space, removed after the stage
    progress: Callable[[str], None]
    _graphs: dict[str, Path] = field(default_factory=dict)

    def onnx_target(self, name: str) -> Path:
        """Where an ONNX variant writes its model."""
        target = self.staging / name / MODEL_ONNX
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def fp32_onnx(self) -> Path:
        """The fp32 model as an ONNX graph, which the ONNX variants start from."""
        if "fp32" not in self._graphs:
            self._graphs["fp32"] = export_onnx(self.fp32, self.contract, self.work / "fp32.onnx",
                                               rows=self.splits["train"].inputs)
        return self._graphs["fp32"]

    def prepared_onnx(self) -> Path:
        """The fp32 graph after shape inference and fusion, as ONNX Runtime recommends before
        quantising: the quantiser then sees fused Gemm/Conv nodes and known shapes."""
        if "prepared" not in self._graphs:
            prepared = self.work / "prepared.onnx"
            # Symbolic shape inference does not finish on a transformer's graph (token inputs).
            symbolic = not any(spec.integer for spec in self.contract.inputs)
            pre_process(self.fp32_onnx(), prepared, self.work, symbolic=symbolic)
            self._graphs["prepared"] = prepared
        return self._graphs["prepared"]


def pre_process(graph: Path, prepared: Path, work: Path, symbolic: bool = True) -> Path:
    """ONNX Runtime's quant_pre_process, run inside `work`: when symbolic shape inference gives
    up it saves its half-inferred model into the current directory, which must not be the
    user's. Falls back to ONNX shape inference alone when the symbolic pass fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    graph, prepared = Path(graph).resolve(), Path(prepared).resolve()
    with contextlib.chdir(work):
        try:
            quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=not symbolic)
        except Exception:  # symbolic shapes some graphs defeat: ONNX shape inference alone
            if not symbolic:
                raise
            quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
    return prepared
