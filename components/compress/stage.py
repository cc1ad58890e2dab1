"""compress_model: pruned, quantised and distilled variants of the trained model.

Variants (each `variants_dir/<name>/variant.json` plus `model.pt` or `model.onnx`):

| name | how | file |
|---|---|---|
| `fp32` | the trained model as it is: the baseline every other variant is measured against | model.pt |
| `pruned` | global magnitude pruning on an iterative schedule, fine-tuned after each step | model.pt |
| `structured` | whole neurons / channels removed (torch-pruning), fine-tuned after each step | model.pt |
| `distilled` | a smaller student trained on the fp32 model's soft targets at a temperature | model.pt |
| `int8` | ONNX Runtime static quantisation (QDQ, per-channel), calibrated on training rows | model.onnx |
| `int8_dynamic` | ONNX Runtime dynamic quantisation (int8 weights, activations per batch) | model.onnx |
| `fp16` | float16 weights and arithmetic with FP32 input/output, for GPU serving | model.onnx |
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from torchship.components.compress.variants.int8 import (
    CALIBRATION_METHODS,
    convert_fp16,
    prepare_for_quantisation,
    quantize_int8_dynamic,
    quantize_int8_static,
)
from torchship.components.data.stage import load_split
from torchship.components.errors import UserInputError
from torchship.components.export.stage import (
    INPUT_NAME,
    OUTPUT_NAME,
    VARIANT_ORDER,
    export_onnx,
    make_staging_dir,
    publish_dir,
)
from torchship.components.models import (
    BUILTIN_MODELS,
    build_model,
    check_model_output,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
)

# Layers whose weights magnitude pruning removes and sparsity is measured over.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_VARIANTS = VARIANT_ORDER
TORCH_VARIANTS = ("fp32", "pruned", "structured", "distilled")
ONNX_VARIANTS = ("int8", "int8_dynamic", "fp16")
# Fine-tuning reuses the training run's settings when the checkpoint records them.
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 1e-3
# Structured pruning keeps layer widths a multiple of this, which the SIMD GEMM kernels like.
STRUCTURED_ROUND_TO = 8
# A distilled student is the teacher's kind of model, narrower; a user's own model gets an mlp.
DEFAULT_STUDENT_OPTIONS = {"mlp": {"hidden": 256}, "cnn": {"channels": 4}}


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
    variants: Sequence[str] | None = None,
    prune_steps: int = 3,
    structured_ratio: float = 0.5,
    calibration_method: str = "minmax",
    calibration_rows: int = 512,
    calibration_percentile: float = 99.999,
    reduce_range: bool = False,
    student_model: str | None = None,
    student_hidden: int | None = None,
    student_options: dict[str, Any] | None = None,
    distill_temperature: float = 4.0,
    distill_alpha: float = 0.7,
    distill_epochs: int = 15,
    torch_threads: int | None = 1,
) -> list[dict[str, Any]]:
    """Write `variants_dir/<name>/{variant.json, model.pt|model.onnx}`; return the variant dicts.

    `variants` names the variants to make (default: all of DEFAULT_VARIANTS; `fp32`, the
    baseline, always comes along); `quantize=False` drops the int8 and fp16 ones.
    Pruning, unstructured and structured alike, runs `prune_steps` steps towards its target
    (`target_sparsity` of the weights; `structured_ratio` of each hidden layer's neurons or
    channels) and fine-tunes `finetune_epochs` after each. The student (`student_model`, default
    the teacher's built-in kind or `mlp`, with `student_options` or `student_hidden`) learns for
    `distill_epochs` from the fp32 model's logits softened at `distill_temperature`, weighted
    `distill_alpha` against the labels. Fine-tuning and distillation run on `torch_threads`
    threads (None: PyTorch's default): these models are small, and on a shared machine extra
    threads spin against other work (two threads were seen 5x slower than one under load).
    """
    wanted = _check_options(
        variants, quantize, target_sparsity, finetune_epochs, prune_steps, structured_ratio,
        calibration_method, calibration_rows, calibration_percentile, distill_temperature,
        distill_alpha, distill_epochs,
    )
    fp32, checkpoint = load_checkpoint(model_path)
    splits = {name: load_split(path) for name, path in
              (("train", train_path), ("val", val_path), ("test", test_path))}
    trained_with = checkpoint.get("extra", {})
    spec = {key: checkpoint[key] for key in ("model_name", "n_features", "n_classes")}
    training = {
        "batch_size": int(trained_with.get("batch_size", DEFAULT_BATCH_SIZE)),
        "learning_rate": float(trained_with.get("learning_rate", DEFAULT_LEARNING_RATE)),
        "seed": seed,
    }

    if "structured" in wanted:
        _torch_pruning()  # a missing library fails here, before any work
    student_spec = None
    if "distilled" in wanted:
        # Built once here so a bad student spec fails before any work, not after pruning.
        student_spec = _student_spec(spec["model_name"], student_model, student_hidden,
                                     student_options)
        check_model_output(build_model(student_spec[0], spec["n_features"], spec["n_classes"],
                                       student_spec[1]),
                           spec["n_features"], spec["n_classes"], name=student_spec[0])
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    staging = make_staging_dir(variants_dir)
    try:
        rows = [_save_torch_variant(staging, "fp32", fp32, spec, splits, source=None,
                                    kind="baseline")]
        progress(_summary(rows[-1]))

        if "pruned" in wanted:
            if not _prunable_weights(fp32):
                progress("pruned: skipped, the model has no Linear or Conv layers to prune")
            else:
                pruned = iterative_magnitude_pruning(
                    fp32, splits["train"], target_sparsity, prune_steps, finetune_epochs,
                    training)
                rows.append(_save_torch_variant(
                    staging, "pruned", pruned, spec, splits, source="fp32",
                    kind="unstructured_pruning",
                    settings={"method": "global magnitude (L1), iterative",
                              "target_sparsity": target_sparsity, "prune_steps": prune_steps,
                              "schedule": "cubic (Zhu & Gupta 2017)",
                              "finetune_epochs": finetune_epochs},
                ))
                progress(_summary(rows[-1]))

        if "structured" in wanted:
            structured = structured_pruning(
                fp32, splits["train"], spec["n_features"], structured_ratio, prune_steps,
                finetune_epochs, training)
            rows.append(_save_torch_variant(
                staging, "structured", structured, spec, splits, source="fp32",
                kind="structured_pruning", resized=True,
                settings={"method": "torch-pruning, L2 magnitude of each neuron / channel",
                          "structured_ratio": structured_ratio, "prune_steps": prune_steps,
                          "round_to": STRUCTURED_ROUND_TO, "finetune_epochs": finetune_epochs,
                          "widths": layer_widths(structured)},
            ))
            progress(_summary(rows[-1]))

        if student_spec is not None:
            name, options = student_spec
            student = distill(
                fp32, splits["train"], name, options, spec["n_features"], spec["n_classes"],
                distill_temperature, distill_alpha, distill_epochs, training)
            rows.append(_save_torch_variant(
                staging, "distilled", student, {**spec, "model_name": name}, splits,
                source="fp32", kind="distillation", model_options=options,
                settings={"student_model": name, "student_options": options,
                          "temperature": distill_temperature, "alpha": distill_alpha,
                          "epochs": distill_epochs,
                          "teacher_parameters": rows[0]["n_parameters"]},
            ))
            progress(_summary(rows[-1]))

        onnx_wanted = [name for name in ONNX_VARIANTS if name in wanted]
        if onnx_wanted:
            with tempfile.TemporaryDirectory() as work:
                exported = export_onnx(fp32, spec["n_features"], Path(work) / "fp32.onnx")
                prepared = prepare_for_quantisation(exported, Path(work) / "prepared.onnx")
                for name in onnx_wanted:
                    target = staging / name / "model.onnx"
                    target.parent.mkdir(parents=True)
                    if name == "int8":
                        settings = quantize_int8_static(
                            prepared, target, splits["train"]["x"], calibration_method,
                            calibration_rows, seed, calibration_percentile, reduce_range)
                        kind, precision = "static_quantisation", "int8"
                    elif name == "int8_dynamic":
                        settings = quantize_int8_dynamic(prepared, target)
                        kind, precision = "dynamic_quantisation", "int8"
                    else:
                        settings = convert_fp16(exported, target)
                        kind, precision = "half_precision", "fp16"
                    rows.append(_save_onnx_variant(target, name, rows[0], splits, kind,
                                                   precision, settings))
                    progress(_summary(rows[-1]))
        publish_dir(staging, variants_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return rows


def _check_options(
    variants: Sequence[str] | None, quantize: bool, target_sparsity: float,
    finetune_epochs: int, prune_steps: int, structured_ratio: float, calibration_method: str,
    calibration_rows: int, calibration_percentile: float, distill_temperature: float,
    distill_alpha: float, distill_epochs: int,
) -> list[str]:
    """Every user-settable option checked before any work; returns the variants to make."""
    requested = list(DEFAULT_VARIANTS if variants is None else variants)
    unknown = [name for name in requested if name not in DEFAULT_VARIANTS]
    if unknown:
        raise UserInputError(
            f"--variants names unknown variants {', '.join(map(repr, unknown))}; pass some of "
            f"{', '.join(DEFAULT_VARIANTS)}"
        )
    if not quantize:
        requested = [name for name in requested if name not in ONNX_VARIANTS]
    if not 0 <= target_sparsity < 1:
        raise UserInputError(
            f"--target-sparsity must be in [0, 1), got {target_sparsity!r}; pass e.g. 0.8"
        )
    if not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise UserInputError(
            f"--finetune-epochs must be a whole number >= 0, got {finetune_epochs!r}; pass e.g. 2"
        )
    for value, flag, example in ((prune_steps, "--prune-steps", 3),
                                 (calibration_rows, "--calibration-rows", 512),
                                 (distill_epochs, "--distill-epochs", 15)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserInputError(
                f"{flag} must be a whole number >= 1, got {value!r}; pass e.g. {example}"
            )
    if not 0 < structured_ratio < 1:
        raise UserInputError(
            f"--structured-ratio (the fraction of neurons removed) must be in (0, 1), got "
            f"{structured_ratio!r}; pass e.g. 0.5"
        )
    if calibration_method not in CALIBRATION_METHODS:
        raise UserInputError(
            f"--calibration-method {calibration_method!r} is unknown; pass one of "
            f"{', '.join(CALIBRATION_METHODS)}"
        )
    if not 50 < calibration_percentile <= 100:
        raise UserInputError(
            f"--calibration-percentile must be in (50, 100], got {calibration_percentile!r}; "
            "pass e.g. 99.999"
        )
    if not distill_temperature > 0:
        raise UserInputError(
            f"--distill-temperature must be positive, got {distill_temperature!r}; pass e.g. 4"
        )
    if not 0 <= distill_alpha <= 1:
        raise UserInputError(
            f"--distill-alpha (the weight of the soft targets) must be in [0, 1], got "
            f"{distill_alpha!r}; pass e.g. 0.7"
        )
    return requested


def _prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the Linear/Conv weights (all parameters if there are none)."""
    tensors = [m.weight for m, _ in _prunable_weights(model)] or list(model.parameters())
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t == 0).sum()) for t in tensors)
    return zeros / total if total else 0.0


def sparsity_schedule(target: float, steps: int) -> list[float]:
    """Cumulative sparsity after each step, cubic as in Zhu & Gupta (2017): big steps while
    many weights are redundant, small ones near the target."""
    return [target * (1 - (1 - step / steps) ** 3) for step in range(1, steps + 1)]


def iterative_magnitude_pruning(
    model: nn.Module, train: dict[str, np.ndarray], target_sparsity: float, steps: int,
    finetune_epochs: int, training: dict[str, Any],
) -> nn.Module:
    """A copy with the smallest-magnitude `target_sparsity` of all prunable weights zeroed:
    prune, fine-tune, repeat, on the schedule of sparsity_schedule."""
    pruned = copy.deepcopy(model)
    targets = _prunable_weights(pruned)
    reached = 0.0
    for goal in sparsity_schedule(target_sparsity, steps):
        # Global, not per layer: layers with many redundant weights give up more of them. The
        # amount is a fraction of the weights still unpruned, hence the rescaling.
        amount = (goal - reached) / (1 - reached)
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        reached = goal
        # The masks stay on while fine-tuning, so pruned weights stay zero.
        _fit(pruned, train, finetune_epochs, nn.CrossEntropyLoss(), **training)
    # Fold weight_orig * weight_mask into a plain `weight` so the checkpoint is an ordinary
    # state dict that build_model's module loads.
    for module, name in targets:
        if prune.is_pruned(module):
            prune.remove(module, name)
    return pruned


def output_layer(model: nn.Module, n_features: int) -> nn.Module | None:
    """The Linear/Conv layer whose output is the model's output (its classes must all stay)."""
    produced: dict[int, nn.Module] = {}
    hooks = [m.register_forward_hook(lambda m, _, out: produced.__setitem__(id(out), m))
             for m in model.modules() if isinstance(m, PRUNABLE)]
    try:
        with torch.no_grad():
            logits = model.eval()(torch.zeros(2, n_features))
    finally:
        for hook in hooks:
            hook.remove()
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    return produced.get(id(logits), layers[-1] if layers else None)


def structured_pruning(
    model: nn.Module, train: dict[str, np.ndarray], n_features: int, ratio: float, steps: int,
    finetune_epochs: int, training: dict[str, Any],
) -> nn.Module:
    """A copy with `ratio` of the neurons (or channels) of every hidden layer removed.

    torch-pruning, not `prune.ln_structured`: ln_structured only masks rows, and rebuilding
    smaller layers by hand needs to know which layer consumes which output (through Flatten
    in the cnn, or a residual add in a user's model). torch-pruning traces that dependency
    graph and shrinks each group of coupled layers together, so the result is an ordinary,
    narrower model whose exported graph has smaller matrices. Neurons are ranked by the L2
    norm of their weights, as ln_structured(n=2) would rank them.
    """
    tp = _torch_pruning()
    pruned = copy.deepcopy(model).eval()
    head = output_layer(pruned, n_features)
    pruner = tp.pruner.MagnitudePruner(
        pruned, torch.zeros(2, n_features), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, iterative_steps=steps, round_to=STRUCTURED_ROUND_TO,
        ignored_layers=[head] if head is not None else [],
    )
    for _ in range(steps):
        pruner.step()
        _fit(pruned, train, finetune_epochs, nn.CrossEntropyLoss(), **training)
    return pruned.eval()


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as error:
        raise ImportError(
            "the structured variant needs torch-pruning, which is not installed; install "
            "torchship's dependencies (pip install torch-pruning==1.6.1) or leave 'structured' "
            "out of --variants"
        ) from error
    return torch_pruning


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """Each Linear/Conv layer's [out, in] width, to show what structured pruning removed."""
    return {name: list(module.weight.shape[:2]) for name, module in model.named_modules()
            if isinstance(module, PRUNABLE)}


def _student_spec(
    teacher_name: str, student_model: str | None, student_hidden: int | None,
    student_options: dict[str, Any] | None,
) -> tuple[str, dict[str, Any]]:
    name = student_model or (teacher_name if teacher_name in BUILTIN_MODELS else "mlp")
    options = dict(DEFAULT_STUDENT_OPTIONS.get(name, {}) if student_options is None
                   else student_options)
    if student_hidden is not None:
        if not isinstance(student_hidden, int) or student_hidden < 1:
            raise UserInputError(
                f"--student-hidden must be a whole number >= 1, got {student_hidden!r}; "
                "pass e.g. 256"
            )
        options["hidden"] = student_hidden
    return name, options


def distill(
    teacher: nn.Module, train: dict[str, np.ndarray], student_model: str,
    student_options: dict[str, Any], n_features: int, n_classes: int, temperature: float,
    alpha: float, epochs: int, training: dict[str, Any],
) -> nn.Module:
    """Train a fresh `student_model` on the teacher's soft targets (Hinton et al. 2015).

    Loss: alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * cross-entropy
    with the labels; T^2 keeps the soft term's gradients on the scale of the hard one.
    """
    torch.manual_seed(training["seed"])
    student = build_model(student_model, n_features, n_classes, student_options)
    check_model_output(student, n_features, n_classes, name=student_model)
    with torch.no_grad():
        soft_targets = teacher.eval()(torch.from_numpy(train["x"]))

    def loss(model_logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor
             ) -> torch.Tensor:
        soft = F.kl_div(F.log_softmax(model_logits / temperature, dim=1),
                        F.log_softmax(teacher_logits / temperature, dim=1),
                        reduction="batchmean", log_target=True)
        return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(model_logits, y)

    _fit(student, train, epochs, loss, extra=soft_targets, **training)
    return student.eval()


def _fit(
    model: nn.Module, train: dict[str, np.ndarray], epochs: int,
    loss_fn: Callable[..., torch.Tensor], batch_size: int, learning_rate: float, seed: int,
    extra: torch.Tensor | None = None,
) -> None:
    """Train `model` in place with Adam; `extra` (per-row tensors) is passed on to `loss_fn`."""
    if not epochs:
        return
    torch.manual_seed(seed)
    tensors = [torch.from_numpy(train["x"]), torch.from_numpy(train["y"])]
    if extra is not None:
        tensors.append(extra)
    loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=learning_rate)
    model.train()
    for _ in range(epochs):
        for x, y, *rest in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y, *rest).backward()
            optimizer.step()
    model.eval()


def _torch_accuracy(model: nn.Module, split: dict[str, np.ndarray]) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(split["x"])).argmax(dim=1).numpy()
    return float(np.mean(predicted == split["y"]))


def _save_torch_variant(
    staging: Path, name: str, model: nn.Module, spec: dict[str, Any],
    splits: dict[str, dict[str, np.ndarray]], source: str | None, kind: str,
    settings: dict[str, Any] | None = None, model_options: dict[str, Any] | None = None,
    resized: bool = False,
) -> dict[str, Any]:
    path = staging / name / "model.pt"
    save_checkpoint(path, model, spec["model_name"], spec["n_features"], spec["n_classes"],
                    extra={"variant": name, **(settings or {})}, model_options=model_options,
                    resized=resized)
    n_parameters, nonzero = count_parameters(model)
    variant = {
        "name": name,
        "format": "torch",
        "source": source,
        "kind": kind,
        "precision": "fp32",
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


def _save_onnx_variant(
    path: Path, name: str, fp32_variant: dict[str, Any],
    splits: dict[str, dict[str, np.ndarray]], kind: str, precision: str,
    settings: dict[str, Any],
) -> dict[str, Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def accuracy(split: dict[str, np.ndarray]) -> float:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: split["x"]})
        return float(np.mean(logits.argmax(axis=1) == split["y"]))

    variant = {
        "name": name,
        "format": "onnx",
        "source": "fp32",
        "kind": kind,
        "precision": precision,
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
        f"size {variant['size_bytes'] / 1024:.0f} KiB sparsity {variant['sparsity']:.2f} "
        f"parameters {variant['n_parameters']:,}"
    )
