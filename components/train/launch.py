"""Where a training process sits in its job, read in one place from the launcher's environment."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torchship.components.errors import UserInputError

# torchrun's default; Kubeflow Trainer uses 29400 and Vertex AI the port in CLUSTER_SPEC.
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Launch:
    """This process's place in a training job, as its launcher described it.

    A worker (`rank` set: a torchrun worker, a PyTorchJob pod) trains in place. Otherwise the
    process is node `node_rank` of `nnodes`: it starts `nproc_per_node` workers with
    torch.distributed.run, which meet at `master_addr:master_port` (`local`: one node with its
    own rendezvous on a free port, so no address).
    """

    launcher: str  # local, torchrun, pytorchjob, trainjob or vertex
    nnodes: int
    node_rank: int
    nproc_per_node: int
    world_size: int
    master_addr: str | None = None
    master_port: int | None = None
    rank: int | None = None
    local_rank: int | None = None
    device: str | None = None  # a worker's device: "cpu" or "cuda:N"
    backend: str = "gloo"

    @property
    def is_worker(self) -> bool:
        return self.rank is not None


def resolve_launch(
    env: Mapping[str, str], num_workers: int = 1, cuda_devices: int = 0
) -> Launch:
    """Read rank, world size, local rank, node and device from a launcher's environment.

    Checked in this order, so that a worker started by torch.distributed.run inside a TrainJob
    or Vertex AI replica (which inherits their variables) is seen as the worker it is:

    - torchrun worker: `TORCHELASTIC_RUN_ID`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, ...
    - Vertex AI: `CLUSTER_SPEC` JSON; `workerpool0` is node 0, `workerpool1[i]` node 1 + i.
    - Kubeflow Trainer TrainJob (and PyTorchJob with `nprocPerNode`): `PET_NNODES`,
      `PET_NODE_RANK`, `PET_NPROC_PER_NODE`, `PET_MASTER_ADDR`, `PET_MASTER_PORT`.
    - Training Operator PyTorchJob, one worker per pod: `RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
      `MASTER_PORT`.
    - none of these: one machine, `num_workers` local workers.

    `num_workers` is the number of workers per node where the launcher does not say (CPU);
    with `cuda_devices` GPUs there is one worker per GPU. Inconsistent values raise
    UserInputError naming the variable.
    """
    backend = "nccl" if cuda_devices > 0 else "gloo"
    if "TORCHELASTIC_RUN_ID" in env:
        return _worker("torchrun", env, cuda_devices)
    if "CLUSTER_SPEC" in env:
        return _vertex(env, _nproc(env, num_workers, cuda_devices), backend)
    if any(key in env for key in ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE")):
        return _pet(env, _nproc(env, num_workers, cuda_devices), backend)
    if "RANK" in env or "WORLD_SIZE" in env:
        return _worker("pytorchjob", env, cuda_devices)
    nproc = _nproc(env, num_workers, cuda_devices)
    return Launch("local", nnodes=1, node_rank=0, nproc_per_node=nproc, world_size=nproc,
                  backend=backend)


def _worker(launcher: str, env: Mapping[str, str], cuda_devices: int) -> Launch:
    world_size = _integer(env, "WORLD_SIZE", minimum=1)
    rank = _integer(env, "RANK", minimum=0)
    if rank >= world_size:
        raise UserInputError(
            f"RANK={rank} is not below WORLD_SIZE={world_size}; ranks run from 0 to "
            "WORLD_SIZE - 1 - fix the launcher's environment"
        )
    # A PyTorchJob pod is one worker: its own node, local rank 0.
    nproc = _integer(env, "LOCAL_WORLD_SIZE", minimum=1, default=1)
    local_rank = _integer(env, "LOCAL_RANK", minimum=0, default=0)
    if local_rank >= nproc:
        raise UserInputError(
            f"LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={nproc}; fix the "
            "launcher's environment"
        )
    node_rank = _integer(env, "GROUP_RANK", minimum=0, default=rank // nproc)
    master_addr = env.get("MASTER_ADDR", "").strip()
    if not master_addr:
        raise UserInputError(
            f"RANK and WORLD_SIZE are set ({launcher} worker) but MASTER_ADDR is not; set "
            "MASTER_ADDR and MASTER_PORT to the address of rank 0"
        )
    master_port = _port(env, "MASTER_PORT", None)
    if cuda_devices > 0:
        if local_rank >= cuda_devices:
            raise UserInputError(
                f"LOCAL_RANK={local_rank} but only {cuda_devices} GPUs are visible; run one "
                "worker per GPU"
            )
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    return Launch(launcher, nnodes=max(1, world_size // nproc), node_rank=node_rank,
                  nproc_per_node=nproc, world_size=world_size, master_addr=master_addr,
                  master_port=master_port, rank=rank, local_rank=local_rank, device=device,
                  backend=backend)


def _vertex(env: Mapping[str, str], nproc: int, backend: str) -> Launch:
    try:
        spec = json.loads(env["CLUSTER_SPEC"])
    except json.JSONDecodeError as error:
        raise UserInputError(
            f"CLUSTER_SPEC is not JSON ({error}); Vertex AI sets it as "
            '{"cluster": {"workerpool0": ["host:port"], ...}, "task": {"type": ..., "index": ...}}'
        ) from error
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserInputError(
            "CLUSTER_SPEC has no 'cluster' and 'task' objects; pass the CLUSTER_SPEC that "
            "Vertex AI sets for a multi-replica custom job"
        )
    chief = cluster.get("workerpool0")
    if not isinstance(chief, list) or len(chief) != 1 or not isinstance(chief[0], str):
        raise UserInputError(
            f"CLUSTER_SPEC cluster.workerpool0 must list exactly one 'host:port', got {chief!r}; "
            "give worker pool 0 one replica"
        )
    workers = cluster.get("workerpool1", [])
    if not isinstance(workers, list):
        raise UserInputError(
            f"CLUSTER_SPEC cluster.workerpool1 must be a list of 'host:port', got {workers!r}"
        )
    pool, index = task.get("type"), task.get("index", 0)
    if not isinstance(index, int) or index < 0:
        raise UserInputError(f"CLUSTER_SPEC task.index must be an integer >= 0, got {index!r}")
    if pool == "workerpool0" and index == 0:
        node_rank = 0
    elif pool == "workerpool1" and index < len(workers):
        node_rank = 1 + index
    else:
        raise UserInputError(
            f"CLUSTER_SPEC task {pool!r} index {index} is not a training node (workerpool0 "
            f"index 0, or workerpool1 index 0..{len(workers) - 1}); run training only in "
            "worker pools 0 and 1"
        )
    nnodes = 1 + len(workers)
    host, port = _split_address(chief[0], "CLUSTER_SPEC cluster.workerpool0[0]")
    return Launch("vertex", nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc,
                  world_size=nnodes * nproc, master_addr=host, master_port=port,
                  backend=backend)


def _pet(env: Mapping[str, str], nproc: int, backend: str) -> Launch:
    # A PyTorchJob with nprocPerNode sets PET_* alongside RANK; a TrainJob sets only PET_*.
    launcher = "pytorchjob" if "RANK" in env else "trainjob"
    if ":" in env.get("PET_NNODES", ""):
        raise UserInputError(
            f"PET_NNODES={env['PET_NNODES']!r} is an elastic range; torchship trains on a fixed "
            "number of nodes - set numNodes (or replicas) to one number"
        )
    nnodes = _integer(env, "PET_NNODES", minimum=1, default=None)
    if nnodes is None:
        world_size = _integer(env, "WORLD_SIZE", minimum=1, default=1)
        nnodes = max(1, world_size // nproc)
    node_rank = _integer(env, "PET_NODE_RANK", minimum=0, default=None)
    if node_rank is None:
        node_rank = _integer(env, "RANK", minimum=0, default=0)
    if node_rank >= nnodes:
        raise UserInputError(
            f"PET_NODE_RANK={node_rank} is not below PET_NNODES={nnodes}; node ranks run from 0 "
            "to PET_NNODES - 1 - fix the launcher's environment"
        )
    addr_key = "PET_MASTER_ADDR" if "PET_MASTER_ADDR" in env else "MASTER_ADDR"
    master_addr = env.get(addr_key, "").strip()
    if not master_addr:
        if nnodes > 1:
            raise UserInputError(
                f"PET_NNODES={nnodes} but neither PET_MASTER_ADDR nor MASTER_ADDR is set; set "
                "the address of node 0"
            )
        master_addr = "127.0.0.1"
    port_key = "PET_MASTER_PORT" if "PET_MASTER_PORT" in env else "MASTER_PORT"
    master_port = _port(env, port_key, DEFAULT_MASTER_PORT)
    return Launch(launcher, nnodes=nnodes, node_rank=node_rank, nproc_per_node=nproc,
                  world_size=nnodes * nproc, master_addr=master_addr, master_port=master_port,
                  backend=backend)


def _nproc(env: Mapping[str, str], num_workers: int, cuda_devices: int) -> int:
    """Workers per node: PET_NPROC_PER_NODE if set, else one per GPU, else `num_workers`."""
    value = env.get("PET_NPROC_PER_NODE", "auto").strip()
    if value == "auto":
        nproc = cuda_devices or num_workers
    elif value == "gpu":
        if cuda_devices == 0:
            raise UserInputError(
                "PET_NPROC_PER_NODE=gpu but no GPU is visible; request GPUs for the node or set "
                "a number"
            )
        nproc = cuda_devices
    elif value == "cpu":
        nproc = os.cpu_count() or 1  # what torchrun means by it
    else:
        nproc = _integer(env, "PET_NPROC_PER_NODE", minimum=1)
    if cuda_devices and nproc > cuda_devices:
        raise UserInputError(
            f"{nproc} workers per node but only {cuda_devices} GPUs are visible; NCCL needs one "
            "GPU per worker - lower the worker count (--workers, or PET_NPROC_PER_NODE)"
        )
    return nproc


_MISSING = object()


def _integer(env: Mapping[str, str], key: str, minimum: int, default: object = _MISSING) -> Any:
    """`env[key]` as an integer >= `minimum`; `default` if unset (required if none is given)."""
    if key not in env:
        if default is _MISSING:
            raise UserInputError(f"{key} is not set; the launcher must set it (an integer)")
        return default
    try:
        value = int(env[key])
    except ValueError:
        raise UserInputError(f"{key}={env[key]!r} is not an integer; fix the launcher's "
                             "environment") from None
    if value < minimum:
        raise UserInputError(f"{key}={value} must be at least {minimum}; fix the launcher's "
                             "environment")
    return value


def _port(env: Mapping[str, str], key: str, default: int | None) -> int:
    if key not in env:
        if default is None:
            raise UserInputError(f"{key} is not set; set it to the port rank 0 listens on")
        return default
    port = _integer(env, key, minimum=1)
    if port > 65535:
        raise UserInputError(f"{key}={port} is not a TCP port (1-65535); fix it")
    return port


def _split_address(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port:  # no port, or a bare IPv6 address
        host, port = address, ""
    host = host.strip("[]")
    if not host:
        raise UserInputError(f"{what} {address!r} has no host; expected 'host:port'")
    if not port:
        return host, DEFAULT_MASTER_PORT
    return host, _port({what: port}, what, DEFAULT_MASTER_PORT)


def wait_for_master(host: str, port: int, timeout_s: float) -> None:
    """Wait until rank 0's store at host:port accepts a connection, or raise after `timeout_s`.

    Other nodes may start before node 0 (pods are scheduled one by one), so refused connections
    and names that do not resolve yet are retried until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, remaining))):
                return
        except OSError as error:
            last_error = error
        if time.monotonic() >= deadline:
            raise UserInputError(
                f"master {host}:{port} did not answer within {timeout_s:g} s "
                f"({type(last_error).__name__}: {last_error}); check that node 0 is running "
                "and that MASTER_ADDR/MASTER_PORT (or PET_MASTER_*, CLUSTER_SPEC) name it, "
                "or raise --timeout-s"
            )
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
