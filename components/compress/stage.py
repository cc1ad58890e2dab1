"""compress_model: the registered variants of the trained model (see `variants/` and README.md),
each written as `variants_dir/<name>/variant.json` plus `model.pt` or `model.onnx`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from torchship.components.compress.context import Context
from torchship.components.compress.registry import Made, Variant
from torchship.components.compress.training import torch_accuracy, tuning_device, weight_sparsity
from torchship.components.compress.variants import check_request
from torchship.components.contracts import (
    BASELINE,
    MODEL_ONNX,
    MODEL_PT,
    OUTPUT_NAME,
    SKIPPED_JSON,
    SPLITS,
    VARIANT_JSON,
)
from torchship.components.data.splits import EVALUATION_ROWS, Split, load_split
from torchship.components.files import staged_dir, write_json
from torchship.components.models import (
    contract_of,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)
from torchship.components.scratch import scratch_dir
from torchship.components.train.config import default

__all__ = ["compress_model"]


def compress_model(
    model_path: str,
    train_path: str,
    val_path: str,
    test_path: str,
    variants_dir: str,
    *,
    variants: Sequence[str] | None = None,
    quantize: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    torch_threads: int | None = 1,
    **options: Any,
) -> list[dict[str, Any]]:
    """Make the variants named in `variants` (default: those registered as default; the `fp32`
    baseline always comes along) and return their records, in table order; `quantize=False`
    drops the int8 and fp16 ones. `options` are the registered variants' options (see
    `variants.options()`: target_sparsity, prune_steps, finetune_epochs, calibration_method,
    ...), each checked before any work. Fine-tuning and distillation reuse the training run's
    batch size and learning rate, and run on `torch_threads` threads (None: PyTorch's default):
    these models are small, and on a shared machine extra threads spin against other work (two
    threads were seen 5x slower than one under load). The variants directory appears whole or
    not at all.
    """
    wanted, values = check_request(variants, quantize, options)
    fp32, checkpoint = load_checkpoint(model_path)
    # A bounded sample of each split (row groups spread over it): fine-tuning, calibration and
    # accuracy do not need a large data set whole, and memory must not grow with it.
    splits = {split: load_split(path, rows=EVALUATION_ROWS)
              for split, path in zip(SPLITS, (train_path, val_path, test_path))}
    trained_with = checkpoint.get("extra", {})
    training = {
        "batch_size": int(trained_with.get("batch_size", default("batch_size"))),
        "learning_rate": float(trained_with.get("learning_rate", default("learning_rate"))),
        "seed": seed,
    }
    contract = contract_of(checkpoint)
    spec = {"model_name": checkpoint["model_name"], "n_features": contract.n_features,
            "n_classes": contract.n_classes}
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        with staged_dir(variants_dir) as staging, scratch_dir("compress") as work:
            ctx = Context(fp32=fp32, contract=contract, spec=spec,
                          model_options=checkpoint.get("model_options"),
                          splits=splits, training=training, options=values,
                          seed=seed, staging=staging, work=Path(work), progress=progress)
            for variant in wanted:  # checks that need the model, before any work
                if variant.prepare is not None:
                    variant.prepare(ctx)
            progress(f"fine-tuning on {_device_name()}")
            rows: list[dict[str, Any]] = []
            skipped: list[dict[str, str]] = []
            for variant in wanted:
                made = variant.make(ctx)
                if made.skipped:
                    progress(f"{variant.name}: not made, {made.skipped}")
                    skipped.append({"name": variant.name, "reason": made.skipped})
                    continue
                rows.append(_record(ctx, variant, made, rows[0] if rows else None))
                progress(_summary(rows[-1]))
            # The variants asked for that do not apply to this model, and why: the table says.
            write_json(skipped, staging / SKIPPED_JSON)
    finally:
        torch.set_num_threads(threads)
    return rows


def _record(ctx: Context, variant: Variant, made: Made,
            baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Save a made variant's record (and its checkpoint, for a torch variant) in the staging
    directory; the directory is published whole, so a plain write is enough per file."""
    directory = ctx.staging / variant.name
    record: dict[str, Any] = {
        "name": variant.name,
        "order": variant.order,
        "format": variant.format,
        "source": None if variant.name == BASELINE else BASELINE,
        "kind": made.kind or variant.kind,
        "precision": variant.precision,
        "parity_criterion": variant.parity,
    }
    if variant.format == "torch":
        spec = {**ctx.spec, "model_name": made.model_name or ctx.spec["model_name"]}
        path = directory / MODEL_PT
        # A variant of the trained model keeps its build options; another model has its own.
        options = made.model_options if made.model_name else (
            made.model_options or ctx.model_options)
        save_checkpoint(path, made.model, spec["model_name"], ctx.contract,
                        spec["n_classes"], extra={"variant": variant.name, **made.settings},
                        model_options=options, resized=made.resized)
        n_parameters, nonzero = count_parameters(made.model)
        record.update(file=path.name, **spec,
                      test_accuracy=torch_accuracy(made.model, ctx.splits["test"]),
                      val_accuracy=torch_accuracy(made.model, ctx.splits["val"]),
                      size_bytes=path.stat().st_size, sparsity=weight_sparsity(made.model),
                      n_parameters=n_parameters, nonzero_parameters=nonzero)
    else:
        if made.reference is not None:
            save_checkpoint(directory / MODEL_PT, made.reference, ctx.spec["model_name"],
                            ctx.contract, ctx.contract.n_classes,
                            extra={"variant": variant.name, "reference_of": MODEL_ONNX},
                            model_options=ctx.model_options)
            record["source"] = variant.name
        path = directory / MODEL_ONNX
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def accuracy(split: Split) -> float:
            (logits,) = session.run([OUTPUT_NAME], split.inputs)
            return float(np.mean(logits.argmax(axis=1) == split.y))

        assert baseline is not None  # the baseline is made first
        record.update(
            file=path.name, **ctx.spec, test_accuracy=accuracy(ctx.splits["test"]),
            val_accuracy=accuracy(ctx.splits["val"]), size_bytes=path.stat().st_size,
            # Quantisation changes how each parameter is stored, not how many there are; these
            # describe the fp32 source (rounding may zero a few more weights).
            **{key: baseline[key] for key in ("sparsity", "n_parameters", "nonzero_parameters")})
    record["contract"] = ctx.contract.to_dict()
    record["settings"] = made.settings
    write_json(record, directory / VARIANT_JSON)
    return record


def _device_name() -> str:
    device = tuning_device()
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _summary(variant: dict[str, Any]) -> str:
    return (
        f"{variant['name']}: test_acc {variant['test_accuracy']:.3f} "
        f"size {variant['size_bytes'] / 1024:.0f} KiB sparsity {variant['sparsity']:.2f} "
        f"parameters {variant['n_parameters']:,}"
    )

