"""Plain-dict checkpoints: the model's spec (name, options, tensor contract) and its weights,
written atomically and loaded with ``weights_only=True`` (loading one can never run code)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchship.components.contracts import TensorContract
from torchship.components.errors import UserInputError
from torchship.components.files import atomic_file
from torchship.components.models.specs import Inputs, as_contract, build_model

__all__ = ["CHECKPOINT_KEYS", "contract_of", "load_checkpoint", "resize_to_state_dict", "save_checkpoint"]

CHECKPOINT_KEYS = ("model_name", "n_classes", "state_dict")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    model_name: str,
    inputs: Inputs,
    n_classes: int,
    extra: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    resized: bool = False,
) -> dict[str, Any]:
    """Write the model as a plain-data checkpoint dict, atomically; returns the dict. `inputs`
    is the tensor contract (or a number of table features).

    `model_options` are build_model's options (a student's width); `resized` marks a model whose
    layers were physically shrunk (structured pruning), so loading takes each layer's shape from
    the saved tensors instead of from the spec.
    """
    contract = as_contract(inputs, n_classes)
    checkpoint: dict[str, Any] = {
        "model_name": model_name,
        "contract": contract.to_dict(),
        "n_features": contract.n_features,  # None where the inputs are not one flat row
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
    model = build_model(checkpoint["model_name"], contract_of(checkpoint),
                        checkpoint["n_classes"], checkpoint.get("model_options"))
    if checkpoint.get("resized"):
        resize_to_state_dict(model, checkpoint["state_dict"])
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, checkpoint


def contract_of(checkpoint: dict[str, Any]) -> TensorContract:
    """The tensor contract a checkpoint was trained for (a table's, for one from before it)."""
    if "contract" in checkpoint:
        return TensorContract.from_dict(checkpoint["contract"])
    return TensorContract.table(checkpoint["n_features"], checkpoint["n_classes"])


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
