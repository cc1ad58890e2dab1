"""Starting and joining training workers: a node's workers under torch.distributed.run, and a
worker's place in the process group. The loop they run is `loop.train`."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchship.components.errors import UserInputError
from torchship.components.files import read_json
from torchship.components.train.checkpoints import metrics_path_for
from torchship.components.train.config import TrainConfig, command_value, flag
from torchship.components.train.launch import Launch, wait_for_master
from torchship.components.train.loop import train

__all__ = ["PROGRESS_PREFIX", "launch_workers", "run_worker"]

# Lines of launcher output kept for the error message when a worker fails.
OUTPUT_TAIL_LINES = 60
# The first line of a worker's exception, as torch.distributed.run passes it on ("[rank1]: ...").
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]: )?([\w.]+\.)?\w*(Error|Exception|Interrupt): ")
# Workers tag their progress lines so the launcher can pick them out of torch.distributed.run's.
PROGRESS_PREFIX = "torchship.train: "


def launch_workers(
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
    for key, value in dataclasses.asdict(config).items():
        if value is not None:
            command += [flag(key), command_value(value)]

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
    return read_json(metrics_path)


def _in_prefix(path: str) -> bool:
    # The interpreter's own paths (stdlib, site-packages) are found by the workers anyway;
    # putting them on PYTHONPATH would reorder them ahead of the stdlib.
    resolved = Path(path).resolve()
    prefixes = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    return any(resolved == p or p in resolved.parents for p in prefixes)




def run_worker(
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
        return train(launch, device, config, progress)
    finally:
        dist.destroy_process_group()



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

