"""Model specs (built-in `mlp`/`cnn` or a user's `module:factory`), plain-dict checkpoints, and a
model's ONNX graph: what train makes, compress changes and export serves."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchship.components.contracts import INPUT_NAME, OUTPUT_NAME
from torchship.components.errors import UserInputError, one_line
from torchship.components.files import atomic_file, atomic_path

BUILTIN_MODELS = ("mlp", "cnn")
CHECKPOINT_KEYS = ("model_name", "n_features", "n_classes", "state_dict")


class MLP(nn.Module):
    """A few Linear+ReLU layers over the flat feature vector."""

    def __init__(
        self, n_features: int, n_classes: int, hidden: int = 1024, depth: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class CNN(nn.Module):
    """A small conv net over the features seen as a 1 x side x side image (64 features: 8 x 8)."""

    def __init__(self, n_features: int, n_classes: int, channels: int = 16) -> None:
        super().__init__()
        side = math.isqrt(n_features)
        if side * side != n_features:
            raise UserInputError(
                f"model 'cnn' needs a square number of features to see them as an image, got "
                f"{n_features}; pass --model-name mlp or a module:factory of your own"
            )
        self.side = side
        pooled = side // 2 if side >= 2 else side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2) if side >= 2 else nn.Identity(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * pooled * pooled, 128),
            nn.ReLU(),
            nn.Linear(128, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # -1 rather than x.shape[0] keeps the exported ONNX Reshape free of shape arithmetic
        # while leaving the batch dimension dynamic.
        return self.classifier(self.features(x.reshape(-1, 1, self.side, self.side)))


def build_model(
    name: str, n_features: int, n_classes: int, options: dict[str, Any] | None = None
) -> nn.Module:
    """Build a fresh, untrained model from its spec: `mlp`, `cnn` or `module:factory`.

    `options` are keyword arguments for the model (`hidden`, `depth`, `dropout` for the mlp,
    `channels` for the cnn, anything the factory takes): a distilled student is the same kind
    of model, only narrower.
    """
    options = dict(options or {})
    if name in BUILTIN_MODELS:
        builder = MLP if name == "mlp" else CNN
        try:
            inspect.signature(builder).bind(n_features, n_classes, **options)
        except TypeError as error:
            accepted = [p for p in inspect.signature(builder).parameters
                        if p not in ("n_features", "n_classes")]
            raise UserInputError(
                f"model {name!r} does not take options {sorted(options)} ({error}); "
                f"pass only {', '.join(accepted)}"
            ) from error
        return builder(n_features, n_classes, **options)
    if isinstance(name, str) and ":" in name:
        return _build_from_factory(name, n_features, n_classes, options)
    raise UserInputError(
        f"model {name!r} is unknown; pass one of {', '.join(BUILTIN_MODELS)}, or "
        "'module:factory' for your own (called as factory(n_features=..., n_classes=...))"
    )


def _build_from_factory(
    spec: str, n_features: int, n_classes: int, options: dict[str, Any]
) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserInputError(
            f"model {spec!r} is not of the form 'module:factory'; pass e.g. 'my_models:make_net'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a user module can fail to import in any way
        raise UserInputError(
            f"model {spec!r}: module '{module_name}' could not be imported "
            f"({one_line(error, 200, with_type=True)}); make it importable (on PYTHONPATH) or pass "
            f"{' or '.join(BUILTIN_MODELS)}"
        ) from error
    factory = getattr(module, attribute, None)
    if factory is None:
        raise UserInputError(
            f"model {spec!r}: module '{module_name}' has no attribute '{attribute}'; "
            "pass the name of a function that builds the model"
        )
    if not callable(factory):
        raise UserInputError(
            f"model {spec!r}: '{attribute}' is not callable (type {type(factory).__name__}); "
            "pass a function called as factory(n_features=..., n_classes=...)"
        )
    try:
        inspect.signature(factory).bind(n_features=n_features, n_classes=n_classes, **options)
    except TypeError as error:
        extra = "".join(f", {key}=..." for key in options)
        raise UserInputError(
            f"model {spec!r}: '{attribute}' cannot be called as "
            f"{attribute}(n_features=..., n_classes=...{extra}) ({error}); change its signature"
        ) from error
    except ValueError:  # some builtins have no signature; let the call itself decide
        pass
    model = factory(n_features=n_features, n_classes=n_classes, **options)
    if not isinstance(model, nn.Module):
        raise UserInputError(
            f"model {spec!r}: '{attribute}' returned a {type(model).__name__}, not a "
            "torch.nn.Module; return the model from the factory"
        )
    return model


def check_model_output(
    model: nn.Module, n_features: int, n_classes: int, name: str = "model", batch_size: int = 3
) -> None:
    """Run a dummy batch and make sure the model maps [B, n_features] to logits [B, n_classes]."""
    was_training = model.training
    model.eval()
    batch = torch.zeros(batch_size, n_features)
    try:
        with torch.no_grad():
            output = model(batch)
    except Exception as error:  # the user's forward can fail in any way
        raise UserInputError(
            f"model '{name}' failed on a float32 batch of shape [{batch_size}, {n_features}] "
            f"({one_line(error, 200, with_type=True)}); its forward must take [batch, n_features]"
        ) from error
    finally:
        model.train(was_training)
    shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != [batch_size, n_classes]:
        raise UserInputError(
            f"model '{name}' returned {shape} for input [{batch_size}, {n_features}], expected "
            f"logits [{batch_size}, {n_classes}]; make forward return one tensor [batch, n_classes]"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (all parameters, non-zero parameters)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return total, nonzero


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    model_name: str,
    n_features: int,
    n_classes: int,
    extra: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    resized: bool = False,
) -> dict[str, Any]:
    """Write the model as a plain-data checkpoint dict, atomically; returns the dict.

    `model_options` are build_model's options (a student's width); `resized` marks a model whose
    layers were physically shrunk (structured pruning), so loading takes each layer's shape from
    the saved tensors instead of from the spec.
    """
    checkpoint: dict[str, Any] = {
        "model_name": model_name,
        "n_features": int(n_features),
        "n_classes": int(n_classes),
        # CPU copies so a checkpoint written on GPU loads anywhere with weights_only=True.
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    if extra:
        checkpoint["extra"] = extra
    if model_options:
        checkpoint["model_options"] = dict(model_options)
    if resized:
        checkpoint["resized"] = True
    with atomic_file(path) as handle:
        torch.save(checkpoint, handle)
    return checkpoint


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes, in eval mode; returns (model, checkpoint dict)."""
    if not Path(path).exists():
        raise UserInputError(
            f"checkpoint '{path}' does not exist; pass the model file that train wrote"
        )
    # weights_only: a checkpoint is plain data, so loading one can never run code.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise UserInputError(
            f"checkpoint '{path}' lacks {', '.join(missing)}; pass a checkpoint that train wrote"
        )
    model = build_model(checkpoint["model_name"], checkpoint["n_features"], checkpoint["n_classes"],
                        checkpoint.get("model_options"))
    if checkpoint.get("resized"):
        resize_to_state_dict(model, checkpoint["state_dict"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, checkpoint


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Give every parameter and buffer of `model` the shape it has in `state_dict`, in place.

    A structurally pruned model has the same modules as its spec builds, only narrower; forward
    reads the tensors, so replacing them (and the width attributes, for a truthful repr and
    re-export) rebuilds it.
    """
    for key, saved in state_dict.items():
        module_name, _, tensor_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, tensor_name, None)
        if not isinstance(current, torch.Tensor) or current.shape == saved.shape:
            continue
        if isinstance(current, nn.Parameter):
            setattr(module, tensor_name, nn.Parameter(
                torch.empty(saved.shape, dtype=current.dtype), current.requires_grad))
        else:
            module.register_buffer(tensor_name, torch.empty(saved.shape, dtype=current.dtype))
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            module.out_channels = weight.shape[0]
            module.in_channels = weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            reference = weight if weight is not None else module.running_mean
            if reference is not None:
                module.num_features = reference.shape[0]
    return model


def export_onnx(
    model: nn.Module, n_features: int, path: str | os.PathLike, opset: int = 17,
    dynamo: bool = False,
) -> Path:
    """Export `model` to ONNX at `path` (input `input` [batch, n_features], output `logits`),
    checked by `onnx.checker`, written atomically.

    The TorchScript exporter is the default: for these models it gives the same graph as the
    torch.export-based one (Gemm/Conv, dynamic batch) at native opset 17, in a tenth of a second
    instead of several. `dynamo=True` uses torch.export (which implements opset 18 and up).
    """
    import onnx

    model = model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # Batch 2, not 1: a tracer may treat a dimension of size 1 as a constant.
    example = torch.zeros(2, n_features, device=device)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        if dynamo:
            torch.onnx.export(
                model, (example,), str(tmp), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                opset_version=opset, dynamo=True, verbose=False,
            )
        else:
            torch.onnx.export(
                model, (example,), str(tmp), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )
        onnx.checker.check_model(str(tmp), full_check=True)
    return Path(path)
