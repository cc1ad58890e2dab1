"""The training loop: one readable loop that every rank runs, unchanged on one process, N processes
or N nodes. Rank 0 also reports, checkpoints and saves."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from torchship.components.contracts import TensorContract
from torchship.components.data.splits import load_split
from torchship.components.models import (
    build_model,
    count_parameters,
    example_inputs,
    save_checkpoint,
)
from torchship.components.train.checkpoints import (
    check_resumable,
    checkpoint_path,
    newest_checkpoint,
    save_epoch_checkpoint,
    write_metrics,
)
from torchship.components.train.config import TrainConfig
from torchship.components.train.launch import Launch

__all__ = ["GPU_HOURS_KEY", "MIN_LEARNING_RATE_RATIO", "learning_rate_at", "train"]

# The cosine decay ends at this fraction of the peak learning rate.
MIN_LEARNING_RATE_RATIO = 0.1
# The training job's size in GPU time: dense bf16 peak of a named GPU at a stated utilisation.
GPU_NAME = "H100 SXM"
GPU_PEAK_FLOPS = 989e12
GPU_UTILISATION = 0.40
GPU_HOURS_KEY = "gpu_hours_h100_bf16_at_40pct"
GPU_HOURS_ASSUMPTION = (
    f"NVIDIA {GPU_NAME}, bf16 dense peak {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s, "
    f"{GPU_UTILISATION:.0%} utilisation"
)


def train(
    launch: Launch, device: torch.device, config: TrainConfig, progress: Callable[[str], None]
) -> dict[str, Any]:
    """The training loop. Every rank runs it; rank 0 also reports, checkpoints and saves."""
    rank, world_size = launch.rank or 0, launch.world_size
    is_main = rank == 0
    report = progress if is_main else (lambda _line: None)
    checkpoint_dir = Path(config.checkpoint_dir)

    train, val = load_split(config.train_path), load_split(config.val_path)
    contract, n_classes = train.contract, train.contract.n_classes
    # Every input of the contract, in its order: the model is called as model(*inputs).
    train_x = [torch.from_numpy(array) for array in train.inputs.values()]
    val_x = [torch.from_numpy(array) for array in val.inputs.values()]
    train_y, val_y = torch.from_numpy(train.y), torch.from_numpy(val.y)

    torch.manual_seed(config.seed)  # the same initial weights on every rank and in every run
    model = build_model(config.model_name, contract, n_classes, config.model_options).to(device)
    # The fused kernel: several times faster than the per-tensor loop on CPU and GPU, and every
    # rank repeats the optimizer step, so it does not shrink as workers are added.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, fused=True)
    precision, autocast_dtype, scaler = _mixed_precision(config.precision, device)
    if precision == "fp16" and device.type == "cpu":
        report("fp16 on CPU: autocast and loss scaling work, but most CPUs have no fp16 units "
               "and run it slower than fp32; fp16 is meant for GPUs")
    loss_fn = nn.CrossEntropyLoss()

    # Each rank takes its own shard of a permutation that set_epoch changes every epoch; with a
    # fixed seed, the global order (and so each global batch) is the same at any world size.
    sampler = DistributedSampler(TensorDataset(*train_x, train_y), num_replicas=world_size,
                                 rank=rank, shuffle=True, seed=config.seed)
    micro_steps = math.ceil(len(sampler) / config.batch_size)
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(micro_steps / accumulation)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_fraction * total_steps)

    # What a checkpoint carries; resuming is loading it.
    state: dict[str, Any] = {
        "epoch": 0, "step": 0, "history": [], "best_val_loss": math.inf, "best_epoch": 0,
        "epochs_without_improvement": 0, "stopped_early": False, "best_model": None,
    }
    checkpoint = newest_checkpoint(checkpoint_dir) if is_main else None
    shared = [checkpoint]
    dist.broadcast_object_list(shared, src=0)  # only node 0 needs to see the directory
    checkpoint = shared[0]
    resumed_from = 0
    if checkpoint is not None:
        check_resumable(checkpoint, config.model_name, contract, checkpoint_dir)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = {key: checkpoint[key] for key in state}
        resumed_from = state["epoch"]
        left = 0 if state["stopped_early"] else max(0, config.epochs - resumed_from)
        report(f"resuming from epoch {resumed_from} (checkpoint "
               f"{checkpoint_path(checkpoint_dir, resumed_from)}); {left} epochs left")

    flops_per_sample = _flops_per_sample(model, contract, train.inputs, config.batch_size,
                                         device)
    ddp_model = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )

    for epoch in range(state["epoch"], config.epochs):
        if state["stopped_early"]:
            break
        sampler.set_epoch(epoch)
        # Dropout draws from a stream fixed by (seed, epoch, rank): a resumed run trains each
        # epoch exactly as an uninterrupted one would.
        torch.manual_seed(int(np.random.SeedSequence([config.seed, epoch, rank])
                              .generate_state(1)[0]))
        ddp_model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no GPU sync to log
        batches = torch.tensor(list(sampler)).split(config.batch_size)
        for micro_step, batch in enumerate(batches):
            group_start = micro_step - micro_step % accumulation
            group_size = min(accumulation, len(batches) - group_start)
            last_micro_step = micro_step == group_start + group_size - 1
            x = [tensor[batch].to(device, non_blocking=True) for tensor in train_x]
            y = train_y[batch].to(device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-step of an accumulation group.
            with nullcontext() if last_micro_step else ddp_model.no_sync():
                with torch.autocast(device.type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    loss = loss_fn(ddp_model(*x), y)
                scaler.scale(loss / group_size).backward()
            loss_sum += loss.detach().double() * len(y)
            if last_micro_step:
                learning_rate = learning_rate_at(
                    state["step"], total_steps, config.learning_rate, warmup_steps
                )
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
        # One job-wide loss and sample count for the epoch, summed over the ranks.
        totals = torch.stack([loss_sum, loss_sum.new_tensor(len(sampler))])
        dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        epoch_samples = int(totals[1])
        train_loss = float(totals[0]) / epoch_samples

        val_loss, val_accuracy = _evaluate(model, val_x, val_y, rank, world_size, device,
                                           autocast_dtype)
        improved = val_loss < state["best_val_loss"]
        if improved:
            state["best_val_loss"], state["best_epoch"] = val_loss, epoch + 1
            state["epochs_without_improvement"] = 0
            if config.early_stopping_patience and is_main:
                state["best_model"] = _cpu_state(model)
        else:
            state["epochs_without_improvement"] += 1
        patience = config.early_stopping_patience
        state["stopped_early"] = bool(patience) and state["epochs_without_improvement"] >= patience
        state["epoch"] = epoch + 1
        state["history"].append({
            "epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
            "val_accuracy": val_accuracy, "learning_rate": optimizer.param_groups[0]["lr"],
            "samples": epoch_samples, "seconds": seconds,
            "samples_per_second": epoch_samples / seconds,
        })
        report(
            f"epoch {epoch + 1}/{config.epochs} loss {train_loss:.3f} "
            f"val_acc {val_accuracy:.3f} {epoch_samples / seconds:.0f} samples/s"
        )
        if is_main:
            save_epoch_checkpoint(checkpoint_dir, {
                **state, "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "config": asdict(config),
                "contract": contract.to_dict(), "n_classes": n_classes, "world_size": world_size,
            })
        if state["stopped_early"]:
            report(f"early stop: val loss has not improved for {patience} epochs "
                   f"(best {state['best_val_loss']:.4f} at epoch {state['best_epoch']})")

    metrics: dict[str, Any] | None = None
    if is_main:
        history = state["history"]
        # With early stopping the model kept is the best epoch's; otherwise the last epoch's.
        kept = history[state["best_epoch"] - 1] if state["best_model"] else history[-1]
        if state["best_model"]:
            model.load_state_dict(state["best_model"])
        samples = sum(entry["samples"] for entry in history)
        training_flops = flops_per_sample * samples
        n_parameters, _ = count_parameters(model)
        metrics = {
            "val_accuracy": kept["val_accuracy"],
            "val_loss": kept["val_loss"],
            "samples_per_second": samples / sum(entry["seconds"] for entry in history),
            "epochs": config.epochs,
            "epochs_trained": len(history),
            "resumed_from_epoch": resumed_from,
            "stopped_early": state["stopped_early"],
            "best_epoch": state["best_epoch"],
            "best_val_loss": state["best_val_loss"],
            "world_size": world_size,
            "nnodes": launch.nnodes,
            "backend": launch.backend,
            "final_train_loss": history[-1]["train_loss"],
            "model_name": config.model_name,
            "n_parameters": n_parameters,
            "global_batch_size": config.batch_size * world_size * accumulation,
            "optimizer_steps": state["step"],
            "precision": precision,
            # fp16's final loss scale: one that collapsed towards 1 means gradients kept
            # overflowing. None where no scaling is needed (fp32, bf16).
            "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
            "flops_per_sample": flops_per_sample,
            "training_flops": training_flops,
            GPU_HOURS_KEY: training_flops / (GPU_PEAK_FLOPS * GPU_UTILISATION) / 3600,
            "gpu_hours_assumption": GPU_HOURS_ASSUMPTION,
            "history": history,
        }
        report(
            f"training size: {flops_per_sample:.3g} FLOP per sample (forward + backward) x "
            f"{samples:,} samples = {training_flops:.3g} FLOP = "
            f"{metrics[GPU_HOURS_KEY]:.3g} GPU-hours ({GPU_HOURS_ASSUMPTION})"
        )
        save_checkpoint(
            config.model_path, model, config.model_name, contract, n_classes,
            extra={"metrics": metrics, "batch_size": config.batch_size,
                   "learning_rate": config.learning_rate, "seed": config.seed},
            model_options=config.model_options,
        )
    # Every rank returns rank 0's metrics, so callers need not care which rank they are.
    shared = [metrics]
    dist.broadcast_object_list(shared, src=0)
    metrics = shared[0]
    assert metrics is not None
    if launch.local_rank == 0:  # each node's launcher reads the metrics from its own disk
        write_metrics(config.model_path, metrics)
    return metrics


def learning_rate_at(step: int, total_steps: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up to `peak` over `warmup_steps`, then cosine decay to a tenth of it."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * done))
    return peak * (MIN_LEARNING_RATE_RATIO + (1 - MIN_LEARNING_RATE_RATIO) * cosine)


def _mixed_precision(
    precision: str, device: torch.device
) -> tuple[str, torch.dtype | None, torch.amp.GradScaler]:
    """The precision actually used, its autocast dtype (None: fp32) and a gradient scaler."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return precision, dtype, scaler


def _flops_per_sample(
    model: nn.Module, contract: TensorContract, rows: dict[str, np.ndarray], batch_size: int,
    device: torch.device,
) -> float:
    """Floating-point operations of one forward and backward pass, per sample, on a batch of
    real training rows (a sequence model's cost depends on the real lengths)."""
    batch = example_inputs(contract, batch_size, rows, device)
    with FlopCounterMode(display=False) as counter:
        model(*batch).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def _evaluate(
    model: nn.Module, x: list[torch.Tensor], y: torch.Tensor, rank: int, world_size: int,
    device: torch.device, autocast_dtype: torch.dtype | None, chunk: int = 4096,
) -> tuple[float, float]:
    """Validation loss and accuracy: each rank scores every world_size-th row, then all sum."""
    model.eval()
    x, y = [tensor[rank::world_size] for tensor in x], y[rank::world_size]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, rows
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype,
                                         enabled=autocast_dtype is not None):
        for start in range(0, len(y), chunk):
            inputs = [tensor[start:start + chunk].to(device) for tensor in x]
            labels = y[start:start + chunk].to(device)
            logits = model(*inputs).float()
            totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            totals[1] += (logits.argmax(dim=1) == labels).sum()
            totals[2] += len(labels)
    dist.all_reduce(totals)
    rows = max(1.0, float(totals[2]))
    return float(totals[0]) / rows, float(totals[1]) / rows




def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # CPU copies so a checkpoint written on GPU loads anywhere with weights_only=True.
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}

