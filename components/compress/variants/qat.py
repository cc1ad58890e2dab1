"""Quantisation-aware training: the fp32 model fine-tuned with int8 fake quantisation (weights
per channel, symmetric; activations entering every Conv/Linear per tensor, uint8 with running
min/max), then quantised to the same QDQ ONNX form as static int8. Its row sits beside `int8`
(post-training), so the table shows what fine-tuning under quantisation noise buys back."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchship.components.compress.context import Context, pre_process
from torchship.components.compress.registry import Made, Variant, option, register, whole_at_least
from torchship.components.compress.training import PRUNABLE, fit, prunable_weights
from torchship.components.compress.variants.int8 import quantize_int8_static
from torchship.components.models import export_onnx

# Activation ranges follow the batches with this momentum, as PyTorch's moving-average observer.
RANGE_MOMENTUM = 0.01
# QAT fine-tunes at this fraction of the training run's learning rate.
LEARNING_RATE_SCALE = 0.1

QAT_EPOCHS = option("qat_epochs", 3, whole_at_least(1), "pass e.g. 3",
                    "epochs of fine-tuning with fake quantisation")


class FakeQuantWeight(nn.Module):
    """A weight as int8 sees it: per output channel, symmetric, scale max|w| / 127. The
    rounding passes gradients straight through (PyTorch's fake-quantise op)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        flat = weight.detach().abs().reshape(weight.shape[0], -1).amax(dim=1)
        scale = (flat / 127.0).clamp(min=1e-8).float()
        zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -128, 127)


class FakeQuantActivation:
    """A forward pre-hook: the layer's input as uint8 sees it, per tensor, over the running
    min/max of the batches seen in training."""

    def __init__(self) -> None:
        self.low: float | None = None
        self.high: float | None = None

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple:
        x = args[0]
        if module.training:
            low, high = float(x.detach().min()), float(x.detach().max())
            if self.low is None:
                self.low, self.high = low, high
            else:
                self.low += RANGE_MOMENTUM * (low - self.low)
                self.high += RANGE_MOMENTUM * (high - self.high)
        if self.low is None:
            return args
        low, high = min(self.low, 0.0), max(self.high, 0.0)  # zero must be exact
        scale = max((high - low) / 255.0, 1e-8)
        zero = round(-low / scale)
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255), *args[1:])


def quantisation_aware(model: nn.Module, train, epochs: int, training: dict[str, Any]) -> nn.Module:
    """A copy of `model` fine-tuned `epochs` under fake quantisation; its float weights are
    what the int8 export rounds."""
    tuned = copy.deepcopy(model)
    hooks = []
    for module in tuned.modules():
        if isinstance(module, PRUNABLE):
            parametrize.register_parametrization(module, "weight", FakeQuantWeight())
            hooks.append(module.register_forward_pre_hook(FakeQuantActivation()))
    settings = {**training, "learning_rate": training["learning_rate"] * LEARNING_RATE_SCALE}
    try:
        fit(tuned, train, epochs, nn.CrossEntropyLoss(), **settings)
    finally:
        for hook in hooks:
            hook.remove()
        for module in tuned.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return tuned.eval()


def make(ctx: Context) -> Made:
    if not prunable_weights(ctx.fp32):
        return Made(skipped="the model has no Conv or Linear layer to quantise")
    if any(spec.integer for spec in ctx.contract.inputs):
        return Made(skipped="fake-quant fine-tuning is for CNNs and tables; a transformer's int8 "
                            "is dynamic (the int8 variant)")
    epochs = ctx.options["qat_epochs"]
    tuned = quantisation_aware(ctx.fp32, ctx.splits["train"], epochs, ctx.training)
    graph = export_onnx(tuned, ctx.contract, ctx.work / "qat.onnx",
                        rows=ctx.splits["train"].inputs)
    prepared = pre_process(graph, ctx.work / "qat_prepared.onnx", ctx.work)
    settings = quantize_int8_static(
        prepared, ctx.onnx_target("qat"), ctx.splits["train"].inputs, "minmax",
        ctx.options["calibration_rows"], ctx.seed)
    return Made(reference=tuned, settings={**settings, "qat_epochs": epochs,
                          "fake_quant": "weights int8 per channel (symmetric), inputs of every "
                                        "Conv/Linear uint8 per tensor (running min/max)",
                          "learning_rate_scale": LEARNING_RATE_SCALE})


# Not made by default: fine-tuning costs as much as training a few epochs.
VARIANT = register(Variant(
    name="qat", order=45, kind="quantisation_aware_training", format="onnx", make=make,
    precision="int8", parity="top1_agreement", default=False,
    options=(QAT_EPOCHS.name, "calibration_rows"),
    description="fake-quant fine-tuning in PyTorch, exported to the static int8 QDQ form",
))
