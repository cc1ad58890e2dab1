"""compress_model: fp32, magnitude-pruned and int8-quantised variants of the trained model."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from torchship.components.data import load_split
from torchship.components.errors import UserInputError
from torchship.components.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    export_onnx,
    make_staging_dir,
    publish_dir,
)
from torchship.components.models import count_parameters, load_checkpoint, save_checkpoint

# Layers whose weights magnitude pruning removes and sparsity is measured over.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CALIBRATION_ROWS = 256
CALIBRATION_BATCH = 32
# Fine-tuning reuses the training run's settings when the checkpoint records them.
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 1e-3


def compress_model(
    model_path: str,
    train_path: str,
    val_path: str,
    test_path: str,
    variants_dir: str,
    target_sparsity: float = 0.8,
    finetune_epochs: int = 2,
    quantize: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Write `variants_dir/<name>/{variant.json, model.pt|model.onnx}`; return the variant dicts."""
    if not 0 <= target_sparsity < 1:
        raise UserInputError(
            f"--target-sparsity must be in [0, 1), got {target_sparsity!r}; pass e.g. 0.8"
        )
    if not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise UserInputError(
            f"--finetune-epochs must be a whole number >= 0, got {finetune_epochs!r}; pass e.g. 2"
        )
    fp32, checkpoint = load_checkpoint(model_path)
    splits = {name: load_split(path) for name, path in
              (("train", train_path), ("val", val_path), ("test", test_path))}
    trained_with = checkpoint.get("extra", {})
    spec = {key: checkpoint[key] for key in ("model_name", "n_features", "n_classes")}

    staging = make_staging_dir(variants_dir)
    try:
        variants = [_save_torch_variant(staging, "fp32", fp32, spec, splits, source=None)]
        progress(_summary(variants[-1]))

        pruned = _pruned_copy(fp32, target_sparsity)
        if pruned is None:
            progress("pruned: skipped, the model has no Linear or Conv layers to prune")
        else:
            if finetune_epochs:
                _finetune(
                    pruned, splits["train"], finetune_epochs,
                    batch_size=int(trained_with.get("batch_size", DEFAULT_BATCH_SIZE)),
                    learning_rate=float(trained_with.get("learning_rate", DEFAULT_LEARNING_RATE)),
                    seed=seed,
                )
            # Fold weight_orig * weight_mask into a plain `weight` so the checkpoint is an
            # ordinary state dict that build_model's module loads.
            for module, _ in _prunable_weights(pruned):
                prune.remove(module, "weight")
            variants.append(_save_torch_variant(
                staging, "pruned", pruned, spec, splits, source="fp32",
                settings={"target_sparsity": target_sparsity, "finetune_epochs": finetune_epochs},
            ))
            progress(_summary(variants[-1]))

        if quantize:
            variants.append(_save_int8_variant(staging, fp32, variants[0], splits, seed))
            progress(_summary(variants[-1]))
        publish_dir(staging, variants_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return variants


def _prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the Linear/Conv weights (all parameters if there are none)."""
    tensors = [m.weight for m, _ in _prunable_weights(model)] or list(model.parameters())
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t == 0).sum()) for t in tensors)
    return zeros / total if total else 0.0


def _pruned_copy(model: nn.Module, target_sparsity: float) -> nn.Module | None:
    """A copy with the smallest-magnitude `target_sparsity` of all prunable weights masked."""
    pruned = copy.deepcopy(model)
    targets = _prunable_weights(pruned)
    if not targets:
        return None
    # Global, not per layer: layers with many redundant weights give up more of them.
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=target_sparsity)
    return pruned


def _finetune(
    model: nn.Module, train: dict[str, np.ndarray], epochs: int, batch_size: int,
    learning_rate: float, seed: int,
) -> None:
    """Recover accuracy after pruning; the pruning masks stay on, so pruned weights stay zero."""
    torch.manual_seed(seed)
    dataset = TensorDataset(torch.from_numpy(train["x"]), torch.from_numpy(train["y"]))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
    model.eval()


def _torch_accuracy(model: nn.Module, split: dict[str, np.ndarray]) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(split["x"])).argmax(dim=1).numpy()
    return float(np.mean(predicted == split["y"]))


def _save_torch_variant(
    staging: Path, name: str, model: nn.Module, spec: dict[str, Any],
    splits: dict[str, dict[str, np.ndarray]], source: str | None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    path = staging / name / "model.pt"
    save_checkpoint(path, model, spec["model_name"], spec["n_features"], spec["n_classes"],
                    extra={"variant": name, **(settings or {})})
    n_parameters, nonzero = count_parameters(model)
    variant = {
        "name": name,
        "format": "torch",
        "source": source,
        "file": path.name,
        **spec,
        "test_accuracy": _torch_accuracy(model, splits["test"]),
        "val_accuracy": _torch_accuracy(model, splits["val"]),
        "size_bytes": path.stat().st_size,
        "sparsity": weight_sparsity(model),
        "n_parameters": n_parameters,
        "nonzero_parameters": nonzero,
        "settings": settings or {},
    }
    _write_variant_json(staging / name, variant)
    return variant


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


def _save_int8_variant(
    staging: Path, fp32: nn.Module, fp32_variant: dict[str, Any],
    splits: dict[str, dict[str, np.ndarray]], seed: int,
) -> dict[str, Any]:
    """Static int8 quantisation (QDQ, per-channel weights) of the fp32 model's ONNX export."""
    path = staging / "int8" / "model.onnx"
    path.parent.mkdir(parents=True)
    calibration = TrainingSampleReader(splits["train"]["x"], CALIBRATION_ROWS, CALIBRATION_BATCH,
                                       seed)
    with tempfile.TemporaryDirectory() as work:
        exported = export_onnx(fp32, fp32_variant["n_features"], Path(work) / "fp32.onnx")
        # Shape inference and graph fusion first, as ONNX Runtime recommends for static
        # quantisation: the quantiser then sees fused Gemm/Conv nodes and known shapes.
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(exported), str(prepared))
        quantize_static(
            str(prepared), str(path), calibration,
            quant_format=QuantFormat.QDQ,  # portable: any runtime can run Q/DQ pairs
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8,
        )
    path.chmod(0o644)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def accuracy(split: dict[str, np.ndarray]) -> float:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: split["x"]})
        return float(np.mean(logits.argmax(axis=1) == split["y"]))

    settings = {
        "quant_format": "QDQ", "per_channel": True, "weight_type": "int8",
        "activation_type": "int8", "calibration_rows": len(calibration.sample),
    }
    variant = {
        "name": "int8",
        "format": "onnx",
        "source": "fp32",
        "file": path.name,
        **{key: fp32_variant[key] for key in ("model_name", "n_features", "n_classes")},
        "test_accuracy": accuracy(splits["test"]),
        "val_accuracy": accuracy(splits["val"]),
        "size_bytes": path.stat().st_size,
        # Quantisation changes how each parameter is stored, not how many there are; these
        # describe the fp32 source (rounding may zero a few more weights).
        "sparsity": fp32_variant["sparsity"],
        "n_parameters": fp32_variant["n_parameters"],
        "nonzero_parameters": fp32_variant["nonzero_parameters"],
        "settings": settings,
    }
    _write_variant_json(path.parent, variant)
    return variant


def _write_variant_json(directory: Path, variant: dict[str, Any]) -> None:
    # Plain write: the whole staging directory is published at once, so no per-file rename.
    (directory / "variant.json").write_text(json.dumps(variant, indent=2))


def _summary(variant: dict[str, Any]) -> str:
    return (
        f"{variant['name']}: test_acc {variant['test_accuracy']:.3f} "
        f"size {variant['size_bytes'] / 1024:.0f} KiB sparsity {variant['sparsity']:.2f}"
    )
