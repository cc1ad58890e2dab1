"""What a training run does: one dataclass, the only home of the training defaults. The train
stage, its worker command line and the pipeline's parameters all read them from here."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchship.components.errors import UserInputError

__all__ = ["PRECISIONS", "TrainConfig", "build_parser", "default"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """A training run; every worker gets the same, and every checkpoint records it."""

    train_path: str
    val_path: str
    model_path: str
    # Per-epoch checkpoints (None: $AIP_CHECKPOINT_DIR, else MODEL_PATH.checkpoints).
    checkpoint_dir: str | None = None
    model_name: str = "mlp"
    # The model's build options (a resnet's width and blocks, an mlp's hidden size); JSON on the
    # worker command line.
    model_options: dict[str, Any] | None = None
    epochs: int = 10
    batch_size: int = 64  # per worker and micro-step
    learning_rate: float = 1e-3
    # Workers per node where the launcher does not say (CPU); one per GPU otherwise.
    num_workers: int = 2
    seed: int = 0
    gradient_accumulation_steps: int = 1
    warmup_fraction: float = 0.05
    early_stopping_patience: int = 0  # epochs without a better val loss; 0: never stop early
    precision: str = "auto"
    # Rows shuffled together within a rank's stream (a window of consecutive row groups, at most
    # 1 GiB): wide enough that a batch mixes many row groups (32 rows or more each), small
    # enough to hold in memory.
    shuffle_buffer: int = 16384
    # A checkpoint every this many optimizer steps within an epoch, to resume from mid-epoch;
    # 0: only at epoch ends (enough when an epoch takes minutes, and each one costs a write).
    checkpoint_every_steps: int = 0
    timeout_s: float = 600.0  # how long to wait for the master and for any peer

    def check(self, name_of: Callable[[str], str] | None = None) -> None:
        """Every setting checked before any work; ``UserInputError`` names the setting as
        ``name_of(field)`` does (default: the worker's flag, ``--learning-rate``)."""
        name_of = name_of or flag
        for name in ("epochs", "batch_size", "num_workers", "gradient_accumulation_steps",
                     "shuffle_buffer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"{name_of(name)} must be a positive integer, got {value!r}; "
                                     "pass e.g. 2")
        if not self.learning_rate > 0:
            raise UserInputError(f"{name_of('learning_rate')} must be positive, got "
                                 f"{self.learning_rate!r}; pass e.g. 1e-3")
        if not 0 <= self.warmup_fraction < 1:
            raise UserInputError(f"{name_of('warmup_fraction')} must be in [0, 1), got "
                                 f"{self.warmup_fraction!r}; pass e.g. 0.05")
        patience = self.early_stopping_patience
        if not isinstance(patience, int) or patience < 0:
            raise UserInputError(f"{name_of('early_stopping_patience')} must be an integer >= 0 "
                                 f"(0: off), got {patience!r}")
        every = self.checkpoint_every_steps
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise UserInputError(f"{name_of('checkpoint_every_steps')} must be an integer >= 0 "
                                 f"(0: only at epoch ends), got {every!r}; pass e.g. 500")
        if not self.timeout_s > 0:
            raise UserInputError(f"{name_of('timeout_s')} must be positive, got "
                                 f"{self.timeout_s!r}; pass e.g. 600")
        if self.model_options is not None and not isinstance(self.model_options, dict):
            raise UserInputError(f"{name_of('model_options')} {self.model_options!r} is not a "
                                 'JSON object; pass e.g. \'{"width": 32}\'')
        if self.precision not in PRECISIONS:
            raise UserInputError(f"{name_of('precision')} {self.precision!r} is unknown; pass one "
                                 f"of {', '.join(PRECISIONS)}")

    @classmethod
    def of(cls, train_path: str, val_path: str, model_path: str,
           options: dict[str, Any]) -> TrainConfig:
        """A config from keyword options; an unknown one is a ``UserInputError`` naming it."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UserInputError(f"training options {', '.join(unknown)} are unknown; use any of "
                                 f"{', '.join(sorted(known - {'train_path', 'val_path', 'model_path'}))}")
        config = cls(str(train_path), str(val_path), str(model_path), **options)
        config.check()
        return config


def default(name: str) -> Any:
    """The default of one training setting (what the pipeline's parameter defaults to)."""
    return next(field.default for field in dataclasses.fields(TrainConfig) if field.name == name)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m torchship.components.train`` (workers and job pods): one
    flag per ``TrainConfig`` field, with its default."""
    parser = argparse.ArgumentParser(
        description="One DDP training worker, or one node of a training job.")
    for field in dataclasses.fields(TrainConfig):
        if field.default is dataclasses.MISSING:
            parser.add_argument(flag(field.name), required=True)
        elif field.name == "precision":
            parser.add_argument(flag(field.name), choices=PRECISIONS, default=field.default)
        elif field.name == "model_options":
            parser.add_argument(flag(field.name), type=_json_object, default=None)
        elif field.default is None:
            parser.add_argument(flag(field.name), default=None)
        else:
            parser.add_argument(flag(field.name), type=type(field.default), default=field.default)
    return parser


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def command_value(value: Any) -> str:
    """A setting as the worker command line takes it (JSON for the model options)."""
    return json.dumps(value) if isinstance(value, dict) else str(value)
