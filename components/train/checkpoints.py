"""Where a training run keeps its state: one plain-data checkpoint per epoch and, if asked, every
few optimizer steps within one (the newest few kept, written durably), and the metrics file
rank 0 leaves next to the model."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from torchship.components.contracts import TensorContract
from torchship.components.errors import UserInputError
from torchship.components.files import atomic_file, write_json

if TYPE_CHECKING:
    from torch import nn

    from torchship.components.train.config import TrainConfig

__all__ = ["CHECKPOINTS_KEPT", "check_resumable", "checkpoint_data", "checkpoint_dir_for",
           "checkpoint_path", "cpu_state", "metrics_path_for", "newest_checkpoint", "path_of",
           "position_to_resume", "save_epoch_checkpoint", "write_metrics"]

CHECKPOINTS_KEPT = 2


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


def checkpoint_path(directory: Path, epoch: int, step: int | None = None) -> Path:
    """Epoch `epoch`'s checkpoint at its end or, with `step`, after that optimizer step within
    it. Names sort in training order: epoch-0002.pt, epoch-0003-step-00000040.pt, epoch-0003.pt."""
    if step is None:
        return directory / f"epoch-{epoch:04d}.pt"
    return directory / f"epoch-{epoch:04d}-step-{step:08d}.pt"


def path_of(directory: Path, checkpoint: dict[str, Any]) -> Path:
    """Where `checkpoint` is kept: a mid-epoch one (with `within_epoch`) is named after the
    epoch it is part of, one past the epochs it completed."""
    if checkpoint.get("within_epoch"):
        return checkpoint_path(directory, checkpoint["epoch"] + 1, checkpoint["step"])
    return checkpoint_path(directory, checkpoint["epoch"])


def save_epoch_checkpoint(directory: Path, checkpoint: dict[str, Any]) -> None:
    """Write one checkpoint atomically and durably (on disk before the rename makes it the
    newest), then drop all but the newest few."""
    with atomic_file(path_of(directory, checkpoint), durable=True) as handle:
        torch.save(checkpoint, handle)
    for old in sorted(directory.glob("epoch-*.pt"))[:-CHECKPOINTS_KEPT]:
        old.unlink(missing_ok=True)


def newest_checkpoint(directory: Path) -> dict[str, Any] | None:
    paths = sorted(directory.glob("epoch-*.pt")) if directory.is_dir() else []
    if not paths:
        return None
    # weights_only: a checkpoint is plain data, so loading one can never run code.
    return torch.load(paths[-1], map_location="cpu", weights_only=True)


def check_resumable(checkpoint: dict[str, Any], model_name: str, contract: TensorContract,
                    directory: Path) -> None:
    """A checkpoint of another model or data set (other inputs or classes) is refused, not
    resumed from."""
    found = (checkpoint["config"]["model_name"], checkpoint.get("contract"))
    if found != (model_name, contract.to_dict()):
        def inputs(data: dict | None) -> str:
            if not data:
                return "unknown inputs"
            spec = TensorContract.from_dict(data)
            shapes = ", ".join(f"{s.name} {list(s.shape)}" for s in spec.inputs)
            return f"{shapes} and {spec.n_classes} classes"
        raise UserInputError(
            f"checkpoint directory '{directory}' holds a run of model {found[0]!r} with "
            f"{inputs(found[1])}, not {model_name!r} with {inputs(contract.to_dict())}; pass a "
            "fresh --checkpoint-dir or delete it"
        )


def write_metrics(model_path: str | os.PathLike, metrics: dict[str, Any]) -> None:
    write_json(metrics, metrics_path_for(model_path))


def position_to_resume(checkpoint: dict[str, Any], layout: dict[str, Any], micro_steps: int,
                       epochs_left: int, directory: Path,
                       report: Callable[[str], None]) -> dict | None:
    """Where in its epoch a checkpoint was written (None: at the epoch's end, or somewhere this
    run cannot take up, which restarts that epoch), said in one progress line."""
    epoch, step = checkpoint["epoch"], checkpoint["step"]
    path = path_of(directory, checkpoint)
    within = checkpoint.get("within_epoch")
    if not within:
        report(f"resuming from epoch {epoch} (checkpoint {path}); {epochs_left} epochs left")
        return None
    changed = {key: (within["layout"].get(key), value) for key, value in layout.items()
               if within["layout"].get(key) != value}
    if changed:
        what = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        report(f"resuming epoch {epoch + 1} from its start, not from its micro-step "
               f"{within['micro_step']}: the checkpoint {path} was written with another "
               f"row order ({what}); the model keeps its {step} optimizer steps")
        return None
    first = within["positions"][0]
    report(f"resuming mid-epoch {epoch + 1} at micro-step {within['micro_step']}/{micro_steps} "
           f"(optimizer step {step}, checkpoint {path}); rank 0 reads on from window "
           f"{first['window']} at row {first['row']} of shard {first['shard']}")
    return within


def checkpoint_data(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, config: TrainConfig,
                    contract: TensorContract, world_size: int) -> dict[str, Any]:
    """What every checkpoint holds besides the loop's state: weights, optimizer, scaler, the
    run's settings and what it was trained on."""
    return {"model": cpu_state(model), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "config": asdict(config),
            "contract": contract.to_dict(), "n_classes": contract.n_classes,
            "world_size": world_size}


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # CPU copies so a checkpoint written on GPU loads anywhere with weights_only=True.
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
