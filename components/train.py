"""train_model: DistributedDataParallel training, launched like torchrun or joined as a worker."""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from torchship.components.data import load_split
from torchship.components.errors import UserInputError
from torchship.components.models import (
    build_model,
    check_model_output,
    count_parameters,
    save_checkpoint,
)

# Lines of launcher output kept for the error message when a worker fails.
OUTPUT_TAIL_LINES = 60


@dataclass(frozen=True)
class DistributedContext:
    """Where this worker sits in the job, as the launcher described it."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistributedContext:
    """Rank, world size and device from the launcher's environment (torchrun, PyTorchJob, ...)."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    return DistributedContext(rank, local_rank, world_size, device, backend)


def metrics_path_for(model_path: str | os.PathLike) -> Path:
    """The training metrics JSON that rank 0 writes next to the checkpoint."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".metrics.json")


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
) -> dict[str, Any]:
    """Train `model_name` on the train split with DDP; write the checkpoint; return its metrics.

    Inside a launched job (RANK and WORLD_SIZE set) this process trains as that worker;
    otherwise it launches `num_workers` local workers with torch.distributed.run.
    """
    for value, flag in ((epochs, "--epochs"), (batch_size, "--batch-size"),
                        (num_workers, "--num-workers")):
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"{flag} must be a positive integer, got {value!r}; pass e.g. 2")
    if not learning_rate > 0:
        raise UserInputError(
            f"--learning-rate must be positive, got {learning_rate!r}; pass e.g. 1e-3"
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

    options = {
        "train_path": str(train_path), "val_path": str(val_path), "model_path": str(model_path),
        "model_name": model_name, "epochs": epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "seed": seed,
    }
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _train_worker(progress=progress, **options)
    return _launch_workers(num_workers, options, progress)


def _split_shape(path: str) -> tuple[int, int]:
    with np.load(path, allow_pickle=False) as split:
        return int(split["x"].shape[1]), len(split["class_names"])


def _launch_workers(
    num_workers: int, options: dict[str, Any], progress: Callable[[str], None]
) -> dict[str, Any]:
    """Run the workers under torch.distributed.run and return the metrics rank 0 wrote."""
    metrics_path = metrics_path_for(options["model_path"])
    metrics_path.unlink(missing_ok=True)  # never return the metrics of an earlier run
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(num_workers),
        "--standalone",  # single node: the launcher runs its own rendezvous on a free port
        "-m", "torchship.components.train",
    ]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # progress lines arrive as they are printed
    env.setdefault("OMP_NUM_THREADS", "1")  # the launcher would set it anyway, with a warning
    # A module:factory that imports here must import in the workers too.
    extra_paths = [p for p in sys.path if p and Path(p).is_dir() and not _in_prefix(p)]
    env["PYTHONPATH"] = os.pathsep.join(
        [*extra_paths, *filter(None, [os.environ.get("PYTHONPATH")])]
    )

    tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as launcher:
        assert launcher.stdout is not None
        for line in launcher.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith("epoch "):
                progress(line)
        returncode = launcher.wait()
    if returncode != 0:
        raise RuntimeError(
            f"training workers failed (torch.distributed.run exited {returncode}); "
            "last output:\n" + "\n".join(tail)
        )
    return json.loads(metrics_path.read_text())


def _in_prefix(path: str) -> bool:
    # The interpreter's own paths (stdlib, site-packages) are found by the workers anyway;
    # putting them on PYTHONPATH would reorder them ahead of the stdlib.
    resolved = Path(path).resolve()
    prefixes = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    return any(resolved == p or p in resolved.parents for p in prefixes)


def _train_worker(
    train_path: str,
    val_path: str,
    model_path: str,
    model_name: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """One DDP worker: train, let rank 0 evaluate and save, and return the same metrics on all."""
    ctx = distributed_context()
    if ctx.device.type == "cpu":
        # Several workers share the machine's cores; one thread each avoids oversubscription.
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend=ctx.backend)
    try:
        torch.manual_seed(seed)
        train = load_split(train_path)
        val = load_split(val_path)
        n_features, n_classes = train["x"].shape[1], len(train["class_names"])
        model = build_model(model_name, n_features, n_classes).to(ctx.device)
        # Same initial weights on every rank (DDP also broadcasts rank 0's), but each rank its
        # own dropout stream.
        torch.manual_seed(seed + ctx.rank)
        ddp_model = DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
        dataset = TensorDataset(torch.from_numpy(train["x"]), torch.from_numpy(train["y"]))
        # Each rank sees its own shard; set_epoch reshuffles the shards every epoch.
        sampler = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
        )
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        optimizer = torch.optim.Adam(ddp_model.parameters(), lr=learning_rate)
        loss_fn = nn.CrossEntropyLoss()
        val_x = torch.from_numpy(val["x"]).to(ctx.device)
        val_y = torch.from_numpy(val["y"]).to(ctx.device)

        train_seconds = 0.0
        samples_seen = 0
        epoch_loss = float("nan")
        val_accuracy = float("nan")
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            ddp_model.train()
            started = time.perf_counter()
            # Kept on the device so the loop never waits for a GPU sync just to log.
            loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
            samples = 0
            for x, y in loader:
                x, y = x.to(ctx.device), y.to(ctx.device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(ddp_model(x), y)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach().double() * len(y)
                samples += len(y)
            # Sum the loss and sample counts of all ranks for one job-wide number per epoch.
            totals = torch.stack([loss_sum, loss_sum.new_tensor(samples)])
            dist.all_reduce(totals)
            seconds = time.perf_counter() - started
            train_seconds += seconds
            epoch_samples = int(totals[1])
            samples_seen += epoch_samples
            epoch_loss = float(totals[0]) / epoch_samples
            if ctx.is_main:
                val_accuracy = _accuracy(model, val_x, val_y)
                progress(
                    f"epoch {epoch + 1}/{epochs} loss {epoch_loss:.3f} "
                    f"val_acc {val_accuracy:.3f} {epoch_samples / seconds:.0f} samples/s"
                )

        metrics: dict[str, Any] | None = None
        if ctx.is_main:
            n_parameters, _ = count_parameters(model)
            metrics = {
                "val_accuracy": val_accuracy,
                "samples_per_second": samples_seen / train_seconds,
                "epochs": epochs,
                "world_size": ctx.world_size,
                "final_train_loss": epoch_loss,
                "model_name": model_name,
                "n_parameters": n_parameters,
            }
            save_checkpoint(
                model_path, model, model_name, n_features, n_classes,
                extra={"metrics": metrics, "batch_size": batch_size,
                       "learning_rate": learning_rate, "seed": seed},
            )
            _write_json(metrics_path_for(model_path), metrics)
        # Every rank returns rank 0's metrics, so callers need not care which rank they are.
        shared = [metrics]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]
    finally:
        dist.destroy_process_group()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: `python -m torchship.components.train`, run by torch.distributed.run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-path", required=True)
    parser.add_argument("--val-path", required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-name", default="mlp")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--num-workers", type=int, default=2,
                        help="local workers to launch when not already inside a launched job")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        train_model(
            args.train_path, args.val_path, args.model_path, model_name=args.model_name,
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
            num_workers=args.num_workers, seed=args.seed,
            progress=lambda line: print(line, flush=True),
        )
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
