"""Structured pruning of a transformer encoder (BERT-style layers: `attention.self.query/key/
value`, `attention.output.dense`, `intermediate.dense`, `output.dense`): whole attention heads
and feed-forward neurons removed, the least important first, so every matrix really shrinks."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from torchship.components.compress.training import fit
from torchship.components.data.splits import Split
from torchship.components.models.huggingface import encoder_layers

__all__ = ["BERT_LAYOUT", "prune_transformer", "transformer_widths"]

BERT_LAYOUT = "attention.self.query/key/value, attention.output.dense, intermediate.dense, " \
              "output.dense"
# Feed-forward widths kept are a multiple of this, which the GEMM kernels like.
ROUND_TO = 8


def _bert_layout(layer: nn.Module) -> bool:
    try:
        return all(isinstance(layer.get_submodule(path), nn.Linear) for path in (
            "attention.self.query", "attention.self.key", "attention.self.value",
            "attention.output.dense", "intermediate.dense", "output.dense"))
    except AttributeError:
        return False


def _widths(layer: nn.Module) -> tuple[int, int]:
    """A layer's attention heads and feed-forward width."""
    attention = layer.attention.self
    return (attention.query.out_features // attention.attention_head_size,
            layer.intermediate.dense.out_features)


def _rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None)
    new.weight.data = linear.weight.data[keep].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[keep].clone()
    return new


def _columns(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    new.weight.data = linear.weight.data[:, keep].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new


def _prune_heads(layer: nn.Module, keep_heads: int) -> None:
    attention, output = layer.attention.self, layer.attention.output
    size = attention.attention_head_size
    heads = attention.query.out_features // size
    if keep_heads >= heads:
        return
    # A head matters as much as its value projection and its share of the output projection.
    value = attention.value.weight.detach().reshape(heads, size, -1).norm(dim=(1, 2))
    out = output.dense.weight.detach().reshape(-1, heads, size).norm(dim=(0, 2))
    kept = torch.sort(torch.topk(value * out, keep_heads).indices).values
    index = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept.tolist()])
    for name in ("query", "key", "value"):
        setattr(attention, name, _rows(getattr(attention, name), index))
    output.dense = _columns(output.dense, index)
    attention.num_attention_heads = keep_heads
    attention.all_head_size = keep_heads * size


def _prune_feed_forward(layer: nn.Module, keep: int) -> None:
    inner, outer = layer.intermediate.dense, layer.output.dense
    if keep >= inner.out_features:
        return
    importance = inner.weight.detach().norm(dim=1) * outer.weight.detach().norm(dim=0)
    kept = torch.sort(torch.topk(importance, keep).indices).values
    layer.intermediate.dense, layer.output.dense = _rows(inner, kept), _columns(outer, kept)


def prune_transformer(model: nn.Module, train: Split, ratio: float, steps: int,
                      finetune_epochs: int, training: dict[str, Any]) -> nn.Module | str:
    """A copy with `ratio` of every layer's heads and feed-forward neurons removed over `steps`
    steps, fine-tuned after each; or, for a model not of the BERT layout, why not."""
    pruned = copy.deepcopy(model).eval()
    layers = encoder_layers(getattr(pruned, "model", pruned))
    if layers is None or not all(_bert_layout(layer) for layer in layers):
        return f"structured pruning of heads knows BERT-style layers ({BERT_LAYOUT})"
    sizes = [_widths(layer) for layer in layers]
    for step in range(1, steps + 1):
        kept = 1 - ratio * step / steps
        for layer, (heads, width) in zip(layers, sizes):
            _prune_heads(layer, max(1, round(heads * kept)))
            _prune_feed_forward(layer, max(ROUND_TO, round(width * kept / ROUND_TO) * ROUND_TO))
        fit(pruned, train, finetune_epochs, nn.CrossEntropyLoss(), **training)
    return pruned.eval()


def transformer_widths(model: nn.Module) -> dict[str, list[int]]:
    """Each layer's heads and feed-forward width after pruning."""
    layers = encoder_layers(getattr(model, "model", model)) or []
    return {f"layer{i}": list(_widths(layer)) for i, layer in enumerate(layers)}
