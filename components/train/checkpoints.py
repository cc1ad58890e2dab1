"""Where a training run keeps its state: one plain-data checkpoint per epoch (the newest few kept,
written durably), and the metrics file rank 0 leaves next to the model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from torchship.components.contracts import TensorContract
from torchship.components.errors import UserInputError
from torchship.components.files import atomic_file, write_json

__all__ = ["CHECKPOINTS_KEPT", "check_resumable", "checkpoint_dir_for", "checkpoint_path",
           "metrics_path_for", "newest_checkpoint", "save_epoch_checkpoint", "write_metrics"]

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


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"epoch-{epoch:04d}.pt"


def save_epoch_checkpoint(directory: Path, checkpoint: dict[str, Any]) -> None:
    """Write one epoch's checkpoint atomically and durably (on disk before the rename makes it
    the newest), then drop all but the newest few."""
    with atomic_file(checkpoint_path(directory, checkpoint["epoch"]), durable=True) as handle:
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
