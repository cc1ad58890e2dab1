"""The training loop: one readable loop that every rank runs, unchanged on one process, N processes
or N nodes. Rank 0 also reports, checkpoints and saves."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
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
    checkpoint_data,
    cpu_state,
    newest_checkpoint,
    position_to_resume,
    save_epoch_checkpoint,
    write_metrics,
)
from torchship.components.train.config import TrainConfig
from torchship.components.train.launch import Launch
from torchship.components.train.stream import TrainStream, open_split, range_batches, rank_range

__all__ = ["GPU_HOURS_KEY", "MIN_LEARNING_RATE_RATIO", "learning_rate_at", "train"]

# The cosine decay ends at this fraction of the peak learning rate.
MIN_LEARNING_RATE_RATIO = 0.1
# The training job's size in GPU time: dense bf16 peak of a named GPU at a stated utilisation.
GPU_NAME = "H100 SXM"
GPU_PEAK_FLOPS = 989e12
GPU_UTILISATION = 0.40
# An epoch's row-key digest is the sum of the keys of the rows it trained on, modulo this.
DIGEST_MODULUS = 2**64
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

    # The splits are streamed: a rank reads only the row groups of its own rows.
    train_index = open_split(config.train_path, "train_path")
    val_index = open_split(config.val_path, "val_path")
    contract, n_classes = train_index.contract, train_index.contract.n_classes
    # Every input of the contract, in its order: the model is called as model(*inputs).
    input_names = contract.input_names
    stream = TrainStream(train_index, world_size, config.batch_size, config.seed,
                         config.shuffle_buffer)

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

    # Every rank runs the same number of micro-batches an epoch (see `stream`).
    micro_steps = stream.micro_steps
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(micro_steps / accumulation)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = round(config.warmup_fraction * total_steps)
    # What fixes the rows of each micro-step: a mid-epoch position holds only for the same.
    layout = {"world_size": world_size, "batch_size": config.batch_size, "seed": config.seed,
              "shuffle_buffer": config.shuffle_buffer, "rows": stream.n_rows}

    # What a checkpoint carries; resuming is loading it.
    state: dict[str, Any] = {
        "epoch": 0, "step": 0, "history": [], "best_val_loss": math.inf, "best_epoch": 0,
        "epochs_without_improvement": 0, "stopped_early": False, "best_model": None,
    }
    checkpoint = newest_checkpoint(checkpoint_dir) if is_main else None
    shared = [checkpoint]
    dist.broadcast_object_list(shared, src=0)  # only node 0 needs to see the directory
    checkpoint = shared[0]
    resumed_from, within = 0, None
    if checkpoint is not None:
        check_resumable(checkpoint, config.model_name, contract, checkpoint_dir)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = {key: checkpoint[key] for key in state}
        resumed_from = state["epoch"]
        left = 0 if state["stopped_early"] else max(0, config.epochs - resumed_from)
        within = position_to_resume(checkpoint, layout, micro_steps, left, checkpoint_dir,
                                     report)

    flops_sample = load_split(config.train_path, "train_path", rows=config.batch_size).inputs
    flops_per_sample = _flops_per_sample(model, contract, flops_sample, config.batch_size,
                                         device)
    del flops_sample
    ddp_model = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )

    start = within["micro_step"] if within else 0
    for epoch in range(state["epoch"], config.epochs):
        if state["stopped_early"]:
            break
        ddp_model.train()
        started = time.perf_counter()
        # Rank 0 carries the job's totals for the part of a resumed epoch already trained.
        carried = within if within and is_main else {}
        earlier_seconds = float(within["seconds"]) if within else 0.0
        loss_sum = torch.tensor(float(carried.get("loss_sum", 0.0)), dtype=torch.float64,
                                device=device)  # a device tensor: no GPU sync to log
        rows = int(carried.get("rows", 0))
        digest = int(carried.get("row_key_digest", "0"), 16)
        for micro_step, batch in enumerate(stream.batches(epoch, rank, start), start):
            group_start = micro_step - micro_step % accumulation
            group_size = min(accumulation, micro_steps - group_start)
            last_micro_step = micro_step == group_start + group_size - 1
            if micro_step == group_start:
                _seed_dropout(config.seed, epoch, rank, micro_step)
            x = [torch.from_numpy(batch[name]).to(device, non_blocking=True)
                 for name in input_names]
            y = torch.from_numpy(batch["y"]).to(device, non_blocking=True)
            rows += len(y)
            digest = (digest + int(batch["row_key"].sum(dtype=np.uint64))) % DIGEST_MODULUS
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
                every = config.checkpoint_every_steps
                if every and state["step"] % every == 0 and micro_step + 1 < micro_steps:
                    # Every rank takes part: the totals so far are summed over the job.
                    done = _job_totals(loss_sum, rows, digest)
                    if is_main:
                        positions = [stream.position(epoch, r, micro_step + 1)
                                     for r in range(world_size)]
                        seconds = earlier_seconds + time.perf_counter() - started
                        save_epoch_checkpoint(checkpoint_dir, {
                            **state, **checkpoint_data(model, optimizer, scaler, config,
                                                        contract, world_size),
                            "within_epoch": {
                                "micro_step": micro_step + 1, "micro_steps": micro_steps,
                                "loss_sum": done[0], "rows": done[1],
                                "row_key_digest": f"{done[2]:016x}", "seconds": seconds,
                                "layout": layout, "positions": positions}})
        # One job-wide loss, row count and row-key digest for the epoch, summed over the ranks.
        loss_total, epoch_samples, digest = _job_totals(loss_sum, rows, digest)
        seconds = earlier_seconds + time.perf_counter() - started
        train_loss = loss_total / epoch_samples
        start, within = 0, None

        val_loss, val_accuracy = _evaluate(model, val_index, rank, world_size, device,
                                           autocast_dtype)
        improved = val_loss < state["best_val_loss"]
        if improved:
            state["best_val_loss"], state["best_epoch"] = val_loss, epoch + 1
            state["epochs_without_improvement"] = 0
            if config.early_stopping_patience and is_main:
                state["best_model"] = cpu_state(model)
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
            # Which rows the epoch trained on: their count and the sum of their keys mod 2**64.
            "rows_seen": epoch_samples, "row_key_digest": f"{digest:016x}",
        })
        report(
            f"epoch {epoch + 1}/{config.epochs} loss {train_loss:.3f} "
            f"val_acc {val_accuracy:.3f} {epoch_samples / seconds:.0f} samples/s"
        )
        if is_main:
            save_epoch_checkpoint(checkpoint_dir, {
                **state, **checkpoint_data(model, optimizer, scaler, config, contract,
                                            world_size)})
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
    model: nn.Module, index: Any, rank: int, world_size: int, device: torch.device,
    autocast_dtype: torch.dtype | None, chunk: int = 4096,
) -> tuple[float, float]:
    """Validation loss and accuracy: each rank scores its contiguous range of the val rows,
    streamed in batches, then all sum."""
    model.eval()
    n_rows = sum(piece.rows for piece in index.pieces())
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, rows
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype,
                                         enabled=autocast_dtype is not None):
        for batch in range_batches(index, *rank_range(n_rows, rank, world_size), chunk):
            inputs = [torch.from_numpy(batch[name]).to(device)
                      for name in index.contract.input_names]
            labels = torch.from_numpy(batch["y"]).to(device)
            logits = model(*inputs).float()
            totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            totals[1] += (logits.argmax(dim=1) == labels).sum()
            totals[2] += len(labels)
    dist.all_reduce(totals)
    rows = max(1.0, float(totals[2]))
    return float(totals[0]) / rows, float(totals[1]) / rows


def _job_totals(loss_sum: torch.Tensor, rows: int, digest: int) -> tuple[float, int, int]:
    """The loss sum, row count and row-key digest summed over every rank. The digest travels as
    two 32-bit halves, each summed exactly in float64 (exact below 2**53: 2**21 ranks)."""
    totals = torch.stack([loss_sum, *(loss_sum.new_tensor(float(value)) for value in
                                      (rows, digest & 0xFFFFFFFF, digest >> 32))])
    dist.all_reduce(totals)
    low, high = int(totals[2]), int(totals[3])
    return float(totals[0]), int(totals[1]), (low + (high << 32)) % DIGEST_MODULUS


def _seed_dropout(seed: int, epoch: int, rank: int, micro_step: int) -> None:
    """Dropout draws from a stream fixed by (seed, epoch, rank, the optimizer step's first
    micro-step): a run resumed at any step trains exactly as an uninterrupted one would, and
    how often checkpoints are written changes nothing."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank, micro_step])
                          .generate_state(1)[0]))
