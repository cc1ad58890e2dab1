"""Structured pruning: whole neurons and channels removed with torch-pruning, so the exported graph
has smaller matrices; fine-tuned after each step."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from torchship.components.compress.context import Context
from torchship.components.compress.heads import prune_transformer, transformer_widths
from torchship.components.compress.registry import Made, Variant, option, register, within
from torchship.components.compress.training import (
    FINETUNE_EPOCHS,
    PRUNABLE,
    PRUNE_STEPS,
    fit,
)
from torchship.components.data.splits import Split
from torchship.components.models import as_contract, example_inputs
from torchship.components.models.huggingface import HuggingFaceClassifier
from torchship.components.models.specs import Inputs

# Structured pruning keeps layer widths a multiple of this, which the SIMD GEMM kernels like.
STRUCTURED_ROUND_TO = 8
STRUCTURED_RATIO = option("structured_ratio", 0.5, within(0, 1, "()"), "pass e.g. 0.5",
                          "fraction of each hidden layer's neurons or channels removed")


def output_layer(model: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module | None:
    """The Linear/Conv layer whose output is the model's output (its classes must all stay)."""
    produced: dict[int, nn.Module] = {}
    hooks = [m.register_forward_hook(lambda m, _, out: produced.__setitem__(id(out), m))
             for m in model.modules() if isinstance(m, PRUNABLE)]
    try:
        with torch.no_grad():
            logits = model.eval()(*example)
    finally:
        for hook in hooks:
            hook.remove()
    layers = [m for m in model.modules() if isinstance(m, PRUNABLE)]
    return produced.get(id(logits), layers[-1] if layers else None)


def structured_pruning(
    model: nn.Module, train: Split | None, inputs: Inputs, ratio: float, steps: int,
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
    contract = as_contract(inputs, 0)
    example = example_inputs(contract, 2, getattr(train, "inputs", None))
    head = output_layer(pruned, example)
    pruner = tp.pruner.MagnitudePruner(
        pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, iterative_steps=steps, round_to=STRUCTURED_ROUND_TO,
        ignored_layers=[head] if head is not None else [],
    )
    for _ in range(steps):
        pruner.step()
        fit(pruned, train, finetune_epochs, nn.CrossEntropyLoss(), **training)
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


def prepare(ctx: Context) -> None:
    if not isinstance(ctx.fp32, HuggingFaceClassifier):
        _torch_pruning()  # a missing library fails here, before any work


def make(ctx: Context) -> Made:
    ratio, steps, epochs = (ctx.options[name] for name in (
        "structured_ratio", "prune_steps", "finetune_epochs"))
    if isinstance(ctx.fp32, HuggingFaceClassifier):
        pruned = prune_transformer(ctx.fp32, ctx.splits["train"], ratio, steps, epochs,
                                   ctx.training)
        if isinstance(pruned, str):
            return Made(skipped=pruned)
        return Made(model=pruned, resized=True, kind="head_and_ffn_pruning", settings={
            "method": "attention heads and feed-forward neurons by weight norm",
            "structured_ratio": ratio, "prune_steps": steps, "finetune_epochs": epochs,
            "heads_and_ffn_width": transformer_widths(pruned)})
    pruned = structured_pruning(ctx.fp32, ctx.splits["train"], ctx.contract, ratio,
                                steps, epochs, ctx.training)
    return Made(model=pruned, resized=True, settings={
        "method": "torch-pruning, L2 magnitude of each neuron / channel",
        "structured_ratio": ratio, "prune_steps": steps, "round_to": STRUCTURED_ROUND_TO,
        "finetune_epochs": epochs, "widths": layer_widths(pruned)})


VARIANT = register(Variant(
    name="structured", order=20, kind="structured_pruning", format="torch", make=make,
    prepare=prepare,
    options=(STRUCTURED_RATIO.name, PRUNE_STEPS.name, FINETUNE_EPOCHS.name),
    description="whole neurons / channels removed (torch-pruning), fine-tuned after each step",
))
