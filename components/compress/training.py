"""What the PyTorch variants share: the layers pruning works on, weight sparsity, fine-tuning with
Adam on a cosine schedule, and the fine-tuning options pruned and structured both read."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchship.components.compress.registry import option, whole_at_least
from torchship.components.data.splits import Split

__all__ = ["FINETUNE_EPOCHS", "PRUNABLE", "PRUNE_STEPS", "fit", "logits_of",
           "prunable_weights", "torch_accuracy", "tuning_device", "weight_sparsity"]

# Layers whose weights magnitude pruning removes and sparsity is measured over.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

FINETUNE_EPOCHS = option(
    "finetune_epochs", 2, whole_at_least(0), "pass e.g. 2",
    "epochs of fine-tuning after each pruning step")
PRUNE_STEPS = option(
    "prune_steps", 3, whole_at_least(1), "pass e.g. 3",
    "pruning steps towards the target, each followed by fine-tuning")


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the Linear/Conv weights (all parameters if there are none)."""
    tensors = [m.weight for m, _ in prunable_weights(model)] or list(model.parameters())
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t == 0).sum()) for t in tensors)
    return zeros / total if total else 0.0



def tuning_device() -> torch.device:
    """Where fine-tuning and the logits run: the first GPU where this task has one (the compress
    task compiled with `--compress-gpus`, in the GPU image), else the CPU. Models go back to the
    CPU afterwards: pruning, quantisation and export work there."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def fit(
    model: nn.Module, train: Split, epochs: int,
    loss_fn: Callable[..., torch.Tensor], batch_size: int, learning_rate: float, seed: int,
    extra: torch.Tensor | None = None,
) -> None:
    """Train `model` in place with Adam on every input of `train`, the learning rate decayed to 0
    along a cosine over the `epochs` (a recovering model settles instead of ending on a full-size
    step); `extra` (per-row tensors) is passed on to `loss_fn` after the logits and the labels.
    Runs on `tuning_device()`; the model is on the CPU again when this returns."""
    if not epochs:
        return
    device = tuning_device()
    torch.manual_seed(seed)
    inputs = [torch.from_numpy(array) for array in train.inputs.values()]
    tensors = [*inputs, torch.from_numpy(train.y)]
    if extra is not None:
        tensors.append(extra)
    loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    n = len(inputs)
    for _ in range(epochs):
        for batch in loader:
            batch = [t.to(device, non_blocking=True) for t in batch]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(*batch[:n]), batch[n], *batch[n + 1:]).backward()
            optimizer.step()
            schedule.step()
    model.to("cpu").eval()


def logits_of(model: nn.Module, split: Split, chunk: int = 1024) -> torch.Tensor:
    """The model's logits on every row of `split`, in chunks, computed on `tuning_device()` and
    returned on the CPU (the model stays where it was)."""
    device = tuning_device()
    home = next(model.parameters(), torch.empty(0)).device
    model.to(device).eval()
    inputs = [torch.from_numpy(array) for array in split.inputs.values()]
    try:
        with torch.no_grad():
            return torch.cat([model(*(t[i:i + chunk].to(device) for t in inputs)).cpu()
                              for i in range(0, len(split), chunk)])
    finally:
        model.to(home)


def torch_accuracy(model: nn.Module, split: Split) -> float:
    predicted = logits_of(model, split).argmax(dim=1).numpy()
    return float(np.mean(predicted == split.y))
