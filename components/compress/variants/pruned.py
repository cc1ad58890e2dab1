"""Unstructured pruning: the smallest-magnitude weights of all Linear/Conv layers zeroed, globally,
on an iterative schedule, fine-tuned after each step."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from torch.nn.utils import prune

from torchship.components.compress.context import Context
from torchship.components.compress.registry import Made, Variant, option, register, within
from torchship.components.compress.training import (
    FINETUNE_EPOCHS,
    PRUNE_STEPS,
    fit,
    prunable_weights,
)
from torchship.components.data.splits import Split

TARGET_SPARSITY = option("target_sparsity", 0.8, within(0, 1, "[)"), "pass e.g. 0.8",
                         "fraction of the weights the pruned variant zeroes")


def sparsity_schedule(target: float, steps: int) -> list[float]:
    """Cumulative sparsity after each step, cubic as in Zhu & Gupta (2017): big steps while
    many weights are redundant, small ones near the target."""
    return [target * (1 - (1 - step / steps) ** 3) for step in range(1, steps + 1)]



def iterative_magnitude_pruning(
    model: nn.Module, train: Split, target_sparsity: float, steps: int,
    finetune_epochs: int, training: dict[str, Any],
) -> nn.Module:
    """A copy with the smallest-magnitude `target_sparsity` of all prunable weights zeroed:
    prune, fine-tune, repeat, on the schedule of sparsity_schedule."""
    pruned = copy.deepcopy(model)
    targets = prunable_weights(pruned)
    reached = 0.0
    for goal in sparsity_schedule(target_sparsity, steps):
        # Global, not per layer: layers with many redundant weights give up more of them. The
        # amount is a fraction of the weights still unpruned, hence the rescaling.
        amount = (goal - reached) / (1 - reached)
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
        reached = goal
        # The masks stay on while fine-tuning, so pruned weights stay zero.
        fit(pruned, train, finetune_epochs, nn.CrossEntropyLoss(), **training)
    # Fold weight_orig * weight_mask into a plain `weight` so the checkpoint is an ordinary
    # state dict that build_model's module loads.
    for module, name in targets:
        if prune.is_pruned(module):
            prune.remove(module, name)
    return pruned


def make(ctx: Context) -> Made:
    if not prunable_weights(ctx.fp32):
        return Made(skipped="the model has no Linear or Conv layers to prune")
    sparsity, steps, epochs = (ctx.options[name] for name in (
        "target_sparsity", "prune_steps", "finetune_epochs"))
    pruned = iterative_magnitude_pruning(ctx.fp32, ctx.splits["train"], sparsity, steps, epochs,
                                         ctx.training)
    return Made(model=pruned, settings={
        "method": "global magnitude (L1), iterative", "target_sparsity": sparsity,
        "prune_steps": steps, "schedule": "cubic (Zhu & Gupta 2017)", "finetune_epochs": epochs})


VARIANT = register(Variant(
    name="pruned", order=10, kind="unstructured_pruning", format="torch", make=make,
    options=(TARGET_SPARSITY.name, PRUNE_STEPS.name, FINETUNE_EPOCHS.name),
    description="global magnitude pruning on an iterative schedule, fine-tuned after each step",
))
