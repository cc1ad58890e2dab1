"""train_model: the train stage. Where this process sits is read from the launcher's environment;
a worker trains in place (`workers.run_worker`), anything else starts its node's workers
(`workers.launch_workers`)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchship.components.data.splits import load_split
from torchship.components.errors import UserInputError
from torchship.components.models import build_model, check_model_output
from torchship.components.models.huggingface import check_vocabulary
from torchship.components.train.checkpoints import checkpoint_dir_for
from torchship.components.train.config import TrainConfig, build_parser
from torchship.components.train.launch import resolve_launch, wait_for_master
from torchship.components.train.stream import open_split
from torchship.components.train.workers import PROGRESS_PREFIX, launch_workers, run_worker

__all__ = ["main", "train_model"]


def train_model(
    train_path: str,
    val_path: str,
    model_path: str,
    progress: Callable[[str], None] = print,
    **options: Any,
) -> dict[str, Any]:
    """Train on the train split with DDP; write the model to `model_path`; return its metrics.

    `options` are `TrainConfig`'s settings (model_name, model_options, epochs, batch_size,
    learning_rate,
    num_workers, seed, checkpoint_dir, precision, ...), with its defaults. Where this process
    sits is read from the launcher's environment (see `resolve_launch`): a worker (torchrun,
    PyTorchJob pod) trains in place; otherwise this process starts the node's workers with
    torch.distributed.run - `num_workers` of them on one machine, or as one node of a TrainJob /
    Vertex AI job. `batch_size` is per worker and micro-step; the global batch is batch_size x
    workers x gradient_accumulation_steps. The splits are streamed, never loaded whole
    (`stream`). A checkpoint is written after every epoch (and every `checkpoint_every_steps`
    optimizer steps within one, if set), and a re-run resumes from the newest one. Every step that waits on another process gives up after
    `timeout_s` seconds.
    """
    config = TrainConfig.of(train_path, val_path, model_path, options)
    for path in (config.train_path, config.val_path):
        if not Path(path).exists():
            raise UserInputError(
                f"dataset split '{path}' does not exist; pass a split written by prepare_data"
            )
    # Build and probe the model here, before any worker starts, so a bad spec fails in seconds.
    # The split's index says what the model takes; no rows are read unless it lacks the largest
    # token id, and then only a batch of them.
    index = open_split(config.train_path, "train_path")
    contract, extra = index.contract, index.document.get("extra") or {}
    probe = build_model(config.model_name, contract, contract.n_classes, config.model_options)
    if "vocab_size" in extra and "input_ids" in contract.input_names:
        largest = extra.get("largest_token")
        if largest is None:
            sample = load_split(config.train_path, "train_path", rows=config.batch_size)
            largest = sample.inputs["input_ids"].max(initial=0)
        check_vocabulary(probe, config.model_name, str(extra.get("tokenizer", "")),
                         int(extra["vocab_size"]), int(largest), index.shapes["input_ids"][0])
    check_model_output(probe, contract, contract.n_classes, name=config.model_name)
    config = dataclasses.replace(config, checkpoint_dir=str(
        checkpoint_dir_for(config.model_path, config.checkpoint_dir)))

    launch = resolve_launch(os.environ, num_workers=config.num_workers,
                            cuda_devices=torch.cuda.device_count())
    if launch.is_worker:
        return run_worker(launch, config, progress)
    if launch.node_rank > 0:
        assert launch.master_addr is not None and launch.master_port is not None
        wait_for_master(launch.master_addr, launch.master_port, config.timeout_s)
    return launch_workers(launch, config, progress)


def main(argv: list[str] | None = None) -> None:
    """`python -m torchship.components.train`: run by torch.distributed.run, or in a job pod."""
    args = vars(build_parser().parse_args(argv))
    try:
        train_model(args.pop("train_path"), args.pop("val_path"), args.pop("model_path"), **args,
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

