"""train_model: one DDP training loop that runs unchanged on one process, N processes or N nodes."""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from torchship.components.data.stage import load_split
from torchship.components.errors import UserInputError
from torchship.components.train.launch import Launch, resolve_launch, wait_for_master
from torchship.components.models import (
    build_model,
    check_model_output,
    count_parameters,
    save_checkpoint,
)

# Lines of launcher output kept for the error message when a worker fails.
OUTPUT_TAIL_LINES = 60
# The first line of a worker's exception, as torch.distributed.run passes it on ("[rank1]: ...").
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]: )?([\w.]+\.)?\w*(Error|Exception|Interrupt): ")
# Workers tag their progress lines so the launcher can pick them out of torch.distributed.run's.
PROGRESS_PREFIX = "torchship.train: "
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
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
CHECKPOINTS_KEPT = 2


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does; every worker gets the same, and every checkpoint records it."""

    train_path: str
    val_path: str
    model_path: str
    checkpoint_dir: str
    model_name: str = "mlp"
    epochs: int = 10
    batch_size: int = 64  # per worker and micro-step
    learning_rate: float = 1e-3
    seed: int = 0
    gradient_accumulation_steps: int = 1
    warmup_fraction: float = 0.05
    early_stopping_patience: int = 0  # epochs without a better val loss; 0: never stop early
    precision: str = "auto"
    timeout_s: float = 600.0


def metrics_path_for(model_path: str | os.PathLike) -> Path:
    """The training metrics JSON that rank 0 writes next to the checkpoint."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".metrics.json")


def checkpoint_dir_for(
    model_path: str | os.PathLike, checkpoint_dir: str | None = None, env=os.environ
) -> Path:
    """Where the per-epoch checkpoints go: the argument, Vertex AI's AIP_CHECKPOINT_DIR, or
    `<model_path>.checkpoints` next to the stage's model output."""
    if checkpoint_dir:
        return Path(checkpoint_dir)
    vertex_dir = env.get("AIP_CHECKPOINT_DIR", "")
    if vertex_dir.startswith("gs://"):
        # Vertex AI mounts Cloud Storage with FUSE at /gcs: gs://bucket/path is /gcs/bucket/path.
        return Path("/gcs") / vertex_dir.removeprefix("gs://")
    if vertex_dir:
        return Path(vertex_dir)
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".checkpoints")


def train_model(
    train_path: str,
    val_path: str,
    model_path: str,
    model_name: str = "mlp",
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    num_workers: int = 2,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    checkpoint_dir: str | None = None,
    gradient_accumulation_steps: int = 1,
    warmup_fraction: float = 0.05,
    early_stopping_patience: int = 0,
    precision: str = "auto",
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Train `model_name` on the train split with DDP; write the model; return its metrics.

    Where this process sits is read from the launcher's environment (see `resolve_launch`):
    a worker (torchrun, PyTorchJob pod) trains in place; otherwise this process starts the
    node's workers with torch.distributed.run - `num_workers` of them on one machine, or as one
    node of a TrainJob / Vertex AI job. `batch_size` is per worker and micro-step; the global
    batch is batch_size x workers x gradient_accumulation_steps. A checkpoint is written after
    every epoch, and a re-run resumes from the newest one. Every step that waits on another
    process gives up after `timeout_s` seconds.
    """
    for value, flag in ((epochs, "--epochs"), (batch_size, "--batch-size"),
                        (num_workers, "--num-workers"),
                        (gradient_accumulation_steps, "--gradient-accumulation-steps")):
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"{flag} must be a positive integer, got {value!r}; pass e.g. 2")
    if not learning_rate > 0:
        raise UserInputError(
            f"--learning-rate must be positive, got {learning_rate!r}; pass e.g. 1e-3"
        )
    if not 0 <= warmup_fraction < 1:
        raise UserInputError(
            f"--warmup-fraction must be in [0, 1), got {warmup_fraction!r}; pass e.g. 0.05"
        )
    if not isinstance(early_stopping_patience, int) or early_stopping_patience < 0:
        raise UserInputError(
            f"--early-stopping-patience must be an integer >= 0 (0: off), got "
            f"{early_stopping_patience!r}"
        )
    if not timeout_s > 0:
        raise UserInputError(f"--timeout-s must be positive, got {timeout_s!r}; pass e.g. 600")
    cuda_devices = torch.cuda.device_count()
    if precision not in PRECISIONS:
        raise UserInputError(
            f"--precision {precision!r} is unknown; pass one of {', '.join(PRECISIONS)}"
        )
    for path in (train_path, val_path):
        if not Path(path).exists():
            raise UserInputError(
                f"dataset split '{path}' does not exist; pass a split written by prepare_data"
            )
    # Build and probe the model here, before any worker starts, so a bad spec fails in seconds.
    n_features, n_classes = _split_shape(train_path)
    probe = build_model(model_name, n_features, n_classes)
    check_model_output(probe, n_features, n_classes, name=model_name)

    config = TrainConfig(
        train_path=str(train_path), val_path=str(val_path), model_path=str(model_path),
        checkpoint_dir=str(checkpoint_dir_for(model_path, checkpoint_dir)),
        model_name=model_name, epochs=epochs, batch_size=batch_size,
        learning_rate=float(learning_rate), seed=seed,
        gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_fraction=float(warmup_fraction), early_stopping_patience=early_stopping_patience,
        precision=precision, timeout_s=float(timeout_s),
    )
    launch = resolve_launch(os.environ, num_workers=num_workers, cuda_devices=cuda_devices)
    if launch.is_worker:
        return _train_worker(launch, config, progress)
    if launch.node_rank > 0:
        assert launch.master_addr is not None and launch.master_port is not None
        wait_for_master(launch.master_addr, launch.master_port, config.timeout_s)
    return _launch_workers(launch, config, progress)


def _split_shape(path: str) -> tuple[int, int]:
    with np.load(path, allow_pickle=False) as split:
        return int(split["x"].shape[1]), len(split["class_names"])


def _launch_workers(
    launch: Launch, config: TrainConfig, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Run this node's workers under torch.distributed.run; return the metrics they wrote."""
    metrics_path = metrics_path_for(config.model_path)
    metrics_path.unlink(missing_ok=True)  # never return the metrics of an earlier run
    command = [sys.executable, "-m", "torch.distributed.run",
               "--nproc-per-node", str(launch.nproc_per_node)]
    if launch.nnodes == 1:
        # One machine: the launcher runs its own rendezvous on a free port.
        command.append("--standalone")
    else:
        command += [
            "--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank),
            "--master-addr", str(launch.master_addr), "--master-port", str(launch.master_port),
            "--rdzv-conf", f"timeout={math.ceil(config.timeout_s)}",
        ]
    command += ["-m", "torchship.components.train"]
    for key, value in asdict(config).items():
        command += [f"--{key.replace('_', '-')}", str(value)]

    # PET_* were read into the command line; left in place, torch.distributed.run would read
    # them too (an elastic rendezvous endpoint, say) and could disagree.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PET_")}
    env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive as they are printed
    env.setdefault("OMP_NUM_THREADS", "1")  # the launcher would set it anyway, with a warning
    # A module:factory that imports here must import in the workers too.
    extra_paths = [p for p in sys.path if p and Path(p).is_dir() and not _in_prefix(p)]
    env["PYTHONPATH"] = os.pathsep.join(
        [*extra_paths, *filter(None, [os.environ.get("PYTHONPATH")])]
    )

    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    user_error = first_error = None
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as launcher:
        assert launcher.stdout is not None
        for line in launcher.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith(PROGRESS_PREFIX):
                progress(line[len(PROGRESS_PREFIX):])
            elif line.startswith("error: ") and user_error is None:
                user_error = line[len("error: "):]
            elif EXCEPTION_LINE.match(line) and first_error is None:
                first_error = line  # the root cause: peers of a dead worker fail after it
        returncode = launcher.wait()
    if returncode != 0:
        if user_error:  # a worker found a mistake of the user's: say it as the worker did
            raise UserInputError(user_error)
        raise RuntimeError(
            f"training workers failed (torch.distributed.run exited {returncode}); "
            f"first error: {first_error or 'none printed'}; last output:\n" + "\n".join(tail)
        )
    return json.loads(metrics_path.read_text())


def _in_prefix(path: str) -> bool:
    # The interpreter's own paths (stdlib, site-packages) are found by the workers anyway;
    # putting them on PYTHONPATH would reorder them ahead of the stdlib.
    resolved = Path(path).resolve()
    prefixes = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    return any(resolved == p or p in resolved.parents for p in prefixes)


def _train_worker(
    launch: Launch, config: TrainConfig, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Join the process group as the worker `launch` describes, train, and leave it."""
    device = torch.device(launch.device or "cpu")
    if device.type == "cpu":
        # Several workers share the machine's cores: one thread each avoids oversubscription,
        # unless OMP_NUM_THREADS gives more (a pod that is one worker with several cores).
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    else:
        torch.cuda.set_device(device)
    if launch.launcher == "torchrun":
        _exit_with_parent()
    elif launch.rank:
        assert launch.master_addr is not None and launch.master_port is not None
        wait_for_master(launch.master_addr, launch.master_port, config.timeout_s)
    # The timeout bounds every collective too: a peer that died or hangs ends this worker.
    dist.init_process_group(
        backend=launch.backend, rank=launch.rank, world_size=launch.world_size,
        timeout=timedelta(seconds=config.timeout_s),
    )
    try:
        return _train(launch, device, config, progress)
    finally:
        dist.destroy_process_group()


def _train(
    launch: Launch, device: torch.device, config: TrainConfig, progress: Callable[[str], None]
) -> dict[str, Any]:
    """The training loop. Every rank runs it; rank 0 also reports, checkpoints and saves."""
    rank, world_size = launch.rank or 0, launch.world_size
    is_main = rank == 0
    report = progress if is_main else (lambda _line: None)
    checkpoint_dir = Path(config.checkpoint_dir)

    train, val = load_split(config.train_path), load_split(config.val_path)
    n_features, n_classes = train["x"].shape[1], len(train["class_names"])
    train_x, train_y = torch.from_numpy(train["x"]), torch.from_numpy(train["y"])
    val_x, val_y = torch.from_numpy(val["x"]), torch.from_numpy(val["y"])

    torch.manual_seed(config.seed)  # the same initial weights on every rank and in every run
    model = build_model(config.model_name, n_features, n_classes).to(device)
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
    sampler = DistributedSampler(TensorDataset(train_x, train_y), num_replicas=world_size,
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
    checkpoint = _newest_checkpoint(checkpoint_dir) if is_main else None
    shared = [checkpoint]
    dist.broadcast_object_list(shared, src=0)  # only node 0 needs to see the directory
    checkpoint = shared[0]
    resumed_from = 0
    if checkpoint is not None:
        _check_resumable(checkpoint, config, n_features, n_classes, checkpoint_dir)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = {key: checkpoint[key] for key in state}
        resumed_from = state["epoch"]
        left = 0 if state["stopped_early"] else max(0, config.epochs - resumed_from)
        report(f"resuming from epoch {resumed_from} (checkpoint "
               f"{_checkpoint_path(checkpoint_dir, resumed_from)}); {left} epochs left")

    flops_per_sample = _flops_per_sample(model, n_features, config.batch_size, device)
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
            x = train_x[batch].to(device, non_blocking=True)
            y = train_y[batch].to(device, non_blocking=True)
            # Gradients are all-reduced only on the last micro-step of an accumulation group.
            with nullcontext() if last_micro_step else ddp_model.no_sync():
                with torch.autocast(device.type, dtype=autocast_dtype,
                                    enabled=autocast_dtype is not None):
                    loss = loss_fn(ddp_model(x), y)
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
            _save_checkpoint(checkpoint_dir, {
                **state, "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "config": asdict(config),
                "n_features": n_features, "n_classes": n_classes, "world_size": world_size,
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
            config.model_path, model, config.model_name, n_features, n_classes,
            extra={"metrics": metrics, "batch_size": config.batch_size,
                   "learning_rate": config.learning_rate, "seed": config.seed},
        )
    # Every rank returns rank 0's metrics, so callers need not care which rank they are.
    shared = [metrics]
    dist.broadcast_object_list(shared, src=0)
    metrics = shared[0]
    assert metrics is not None
    if launch.local_rank == 0:  # each node's launcher reads the metrics from its own disk
        _write_json(metrics_path_for(config.model_path), metrics)
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
    model: nn.Module, n_features: int, batch_size: int, device: torch.device
) -> float:
    """Floating-point operations of one forward and backward pass, per sample."""
    batch = torch.zeros(batch_size, n_features, device=device)
    with FlopCounterMode(display=False) as counter:
        model(batch).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def _evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world_size: int,
    device: torch.device, autocast_dtype: torch.dtype | None, chunk: int = 4096,
) -> tuple[float, float]:
    """Validation loss and accuracy: each rank scores every world_size-th row, then all sum."""
    model.eval()
    x, y = x[rank::world_size], y[rank::world_size]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, rows
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype,
                                         enabled=autocast_dtype is not None):
        for start in range(0, len(y), chunk):
            inputs = x[start:start + chunk].to(device)
            labels = y[start:start + chunk].to(device)
            logits = model(inputs).float()
            totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            totals[1] += (logits.argmax(dim=1) == labels).sum()
            totals[2] += len(labels)
    dist.all_reduce(totals)
    rows = max(1.0, float(totals[2]))
    return float(totals[0]) / rows, float(totals[1]) / rows


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # CPU copies so a checkpoint written on GPU loads anywhere with weights_only=True.
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def _checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.pt"


def _save_checkpoint(directory: Path, checkpoint: dict[str, Any]) -> None:
    """Write one epoch's checkpoint atomically, then drop all but the newest few."""
    directory.mkdir(parents=True, exist_ok=True)
    target = _checkpoint_path(directory, checkpoint["epoch"])
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it the newest
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in sorted(directory.glob("epoch-*.pt"))[:-CHECKPOINTS_KEPT]:
        old.unlink(missing_ok=True)


def _newest_checkpoint(directory: Path) -> dict[str, Any] | None:
    paths = sorted(directory.glob("epoch-*.pt")) if directory.is_dir() else []
    if not paths:
        return None
    # weights_only: a checkpoint is plain data, so loading one can never run code.
    return torch.load(paths[-1], map_location="cpu", weights_only=True)


def _check_resumable(
    checkpoint: dict[str, Any], config: TrainConfig, n_features: int, n_classes: int,
    directory: Path,
) -> None:
    found = (checkpoint["config"]["model_name"], checkpoint["n_features"],
             checkpoint["n_classes"])
    if found != (config.model_name, n_features, n_classes):
        raise UserInputError(
            f"checkpoint directory '{directory}' holds a run of model {found[0]!r} with "
            f"{found[1]} features and {found[2]} classes, not {config.model_name!r} with "
            f"{n_features} and {n_classes}; pass a fresh --checkpoint-dir or delete it"
        )


def _exit_with_parent() -> None:
    """End this worker if its torch.distributed.run agent dies (killed pod, SIGKILL).

    The agent starts workers in their own sessions, so a signal to the agent's process group
    does not reach them; without this an orphaned worker would train on, and write checkpoints
    beside the run that replaces it.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m torchship.components.train.loop` (workers and job pods)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-path", required=True)
    parser.add_argument("--val-path", required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-name", default="mlp")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker and micro-step")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-workers", type=int, default=2,
                        help="workers per node when the launcher does not say (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="default: $AIP_CHECKPOINT_DIR, else MODEL_PATH.checkpoints")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--early-stopping-patience", type=int, default=0,
                        help="epochs without a better val loss before stopping; 0: off")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="how long to wait for the master and for any peer")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m torchship.components.train.loop`: run by torch.distributed.run, or in a job pod."""
    args = build_parser().parse_args(argv)
    try:
        train_model(**vars(args),
                    progress=lambda line: print(PROGRESS_PREFIX + line, flush=True))
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A worker of torch.distributed.run is done once train_model returns: its files are
        # written and closed. Skip the interpreter's teardown of torch, which takes seconds once
        # torch.optim has loaded torch._dynamo, and the whole job waits for its slowest worker.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
