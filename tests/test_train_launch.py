"""Launcher environments resolve to one place in the job; bad ones and dead peers end fast."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from artifacts import synthetic_splits

from torchship.components.errors import UserInputError
from torchship.components.train.checkpoints import checkpoint_dir_for
from torchship.components.train.config import build_parser
from torchship.components.train.launch import Launch, resolve_launch
from torchship.components.train.stage import train_model
from torchship.components.triton.binary import free_port

REPO = Path(__file__).resolve().parents[1]

VERTEX_CLUSTER = {
    "workerpool0": ["cmle-training-workerpool0-ab12-0:2222"],
    "workerpool1": ["cmle-training-workerpool1-ab12-0:2222", "cmle-training-workerpool1-ab12-1:2222"],
}


def vertex_spec(pool: str, index: int, cluster=VERTEX_CLUSTER) -> str:
    return json.dumps({"cluster": cluster, "environment": "cloud",
                       "task": {"type": pool, "index": index}, "job": "{}"})


LAUNCHER_ENVIRONMENTS = {
    "nothing: local workers": (
        {},
        Launch("local", nnodes=1, node_rank=0, nproc_per_node=3, world_size=3),
    ),
    "torchrun worker, node 1 of 2": (
        {"TORCHELASTIC_RUN_ID": "none", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
         "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1",
         "MASTER_PORT": "29500",
         # inherited from the TrainJob pod that started torchrun: the worker must ignore them
         "PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "4"},
        Launch("torchrun", nnodes=2, node_rank=1, nproc_per_node=4, world_size=8,
               master_addr="10.0.0.1", master_port=29500, rank=5, local_rank=1, device="cpu"),
    ),
    "Kubeflow Trainer TrainJob, node 2 of 3": (
        {"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "2",
         "PET_MASTER_ADDR": "torchship-node-0-0.torchship", "PET_MASTER_PORT": "29400"},
        Launch("trainjob", nnodes=3, node_rank=2, nproc_per_node=2, world_size=6,
               master_addr="torchship-node-0-0.torchship", master_port=29400),
    ),
    "PyTorchJob, one worker per pod": (
        {"MASTER_ADDR": "torchship-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3",
         "RANK": "2"},
        Launch("pytorchjob", nnodes=3, node_rank=2, nproc_per_node=1, world_size=3,
               master_addr="torchship-master-0", master_port=23456, rank=2, local_rank=0,
               device="cpu"),
    ),
    "PyTorchJob with nprocPerNode, node 1 of 2": (
        {"MASTER_ADDR": "torchship-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "4",
         "RANK": "1", "PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "2"},
        Launch("pytorchjob", nnodes=2, node_rank=1, nproc_per_node=2, world_size=4,
               master_addr="torchship-master-0", master_port=23456),
    ),
    "Vertex AI workerpool0: node 0 of 3": (
        {"CLUSTER_SPEC": vertex_spec("workerpool0", 0)},
        Launch("vertex", nnodes=3, node_rank=0, nproc_per_node=3, world_size=9,
               master_addr="cmle-training-workerpool0-ab12-0", master_port=2222),
    ),
    "Vertex AI workerpool1[1]: node 2 of 3": (
        {"CLUSTER_SPEC": vertex_spec("workerpool1", 1)},
        Launch("vertex", nnodes=3, node_rank=2, nproc_per_node=3, world_size=9,
               master_addr="cmle-training-workerpool0-ab12-0", master_port=2222),
    ),
    "Vertex AI, one replica, address without a port": (
        {"CLUSTER_SPEC": vertex_spec("workerpool0", 0, {"workerpool0": ["chief"]})},
        Launch("vertex", nnodes=1, node_rank=0, nproc_per_node=3, world_size=3,
               master_addr="chief", master_port=29500),
    ),
}


@pytest.mark.parametrize("name", LAUNCHER_ENVIRONMENTS)
def test_launcher_env_resolves_node_rank_world_size_and_master(name):
    env, expected = LAUNCHER_ENVIRONMENTS[name]
    assert resolve_launch(env, num_workers=3) == expected


def test_launcher_env_on_gpus_uses_one_worker_per_gpu_and_nccl():
    worker = resolve_launch({"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4",
                             "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
                             "MASTER_ADDR": "h", "MASTER_PORT": "1"}, cuda_devices=4)
    assert (worker.device, worker.backend, worker.rank) == ("cuda:3", "nccl", 3)
    trainjob = resolve_launch({"PET_NNODES": "2", "PET_NODE_RANK": "0",
                               "PET_NPROC_PER_NODE": "auto", "PET_MASTER_ADDR": "h"},
                              num_workers=1, cuda_devices=8)
    assert (trainjob.nproc_per_node, trainjob.world_size, trainjob.backend) == (8, 16, "nccl")
    local = resolve_launch({}, num_workers=2, cuda_devices=2)
    assert (local.world_size, local.backend) == (2, "nccl")


@pytest.mark.parametrize("env, cuda_devices, message", [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, 0,
     "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0"}, 0, "WORLD_SIZE is not set"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, 0, "RANK='one' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, 0, "MASTER_ADDR is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, 0,
     "not a TCP port"),
    ({"CLUSTER_SPEC": "{cluster: workerpool0"}, 0, "CLUSTER_SPEC is not JSON"),
    ({"CLUSTER_SPEC": "[]"}, 0, "no 'cluster' and 'task'"),
    ({"CLUSTER_SPEC": vertex_spec("workerpool2", 0)}, 0, "is not a training node"),
    ({"CLUSTER_SPEC": vertex_spec("workerpool1", 2)}, 0, "is not a training node"),
    ({"CLUSTER_SPEC": vertex_spec("workerpool0", 0, {"workerpool0": []})}, 0,
     "exactly one 'host:port'"),
    ({"PET_NNODES": "3", "PET_NODE_RANK": "3", "PET_MASTER_ADDR": "h"}, 0,
     "PET_NODE_RANK=3 is not below PET_NNODES=3"),
    ({"PET_NNODES": "1:4", "PET_NODE_RANK": "0"}, 0, "elastic range"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "1"}, 0, "neither PET_MASTER_ADDR nor MASTER_ADDR"),
    ({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "4"}, 2, "only 2 GPUs are visible"),
    ({"PET_NNODES": "1", "PET_NPROC_PER_NODE": "gpu"}, 0, "no GPU is visible"),
])
def test_launcher_env_that_is_inconsistent_says_what_is_wrong(env, cuda_devices, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(")):
        resolve_launch(env, num_workers=1, cuda_devices=cuda_devices)


def test_checkpoints_go_next_to_the_model_or_where_vertex_ai_says():
    assert checkpoint_dir_for("/out/model", None, {}) == Path("/out/model.checkpoints")
    vertex = {"AIP_CHECKPOINT_DIR": "gs://bucket/job/checkpoints/"}
    assert checkpoint_dir_for("/out/model", None, vertex) == Path("/gcs/bucket/job/checkpoints")
    assert checkpoint_dir_for("/out/model", "/pvc/ckpt", vertex) == Path("/pvc/ckpt")


# --- faults: nothing waits forever ---------------------------------------------------------


@pytest.fixture(scope="module")
def small_splits(tmp_path_factory):
    train, val = synthetic_splits(tmp_path_factory.mktemp("splits"), rows=2048, features=16,
                                  classes=4)
    return {"train": train, "val": val}


@pytest.mark.parametrize("env", [
    {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"},  # PyTorchJob worker
    {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "127.0.0.1"},  # TrainJob node
    {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-master.invalid"},
], ids=["pytorchjob", "trainjob", "unknown-host"])
def test_master_that_does_not_answer_fails_within_the_timeout(small_splits, tmp_path,
                                                               monkeypatch, env):
    port = str(free_port())  # nothing listens there
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT" if "RANK" in env else "PET_MASTER_PORT", port)
    threads = torch.get_num_threads()
    started = time.monotonic()
    try:
        with pytest.raises(UserInputError, match=r"did not answer within 1\.5 s"):
            train_model(small_splits["train"], small_splits["val"], str(tmp_path / "model.pt"),
                        epochs=1, timeout_s=1.5, progress=lambda _: None)
    finally:
        torch.set_num_threads(threads)  # a CPU worker pins itself to one thread
    assert time.monotonic() - started < 6
    assert list(tmp_path.iterdir()) == []


DIES_ON_RANK_1 = """
import os
from torch import nn

calls = 0


class Dies(nn.Linear):
    # Rank 1 dies abruptly (no exception, no goodbye) on its 100th forward pass, in its second epoch.
    def forward(self, x):
        global calls
        calls += 1
        if os.environ.get("RANK") == "1" and calls == 100:
            os._exit(3)
        return super().forward(x)


def make(n_features, n_classes):
    return Dies(n_features, n_classes)
"""


def test_dead_peer_ends_a_joined_worker_within_the_timeout(small_splits, tmp_path):
    # PyTorchJob style: each worker is its own process with RANK set; no agent watches them
    # (under torch.distributed.run the agent ends the others: test_train.py), so only the
    # process group - gloo's closed connection, or the timeout - can end rank 0.
    (tmp_path / "dies_on_rank_1.py").write_text(DIES_ON_RANK_1)
    port = str(free_port())
    workers = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "PYTHONPATH": str(tmp_path), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "torchship.components.train",
                   "--train-path", small_splits["train"], "--val-path", small_splits["val"],
                   "--model-path", str(tmp_path / f"out{rank}" / "m.pt"),
                   "--model-name", "dies_on_rank_1:make", "--epochs", "1000",
                   "--batch-size", "16", "--timeout-s", "20"]
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
    try:
        assert workers[1].wait(timeout=60) == 3  # rank 1 died as planned
        died = time.monotonic()
        rank0_exit = workers[0].wait(timeout=40)
        assert rank0_exit != 0
        assert time.monotonic() - died < 25  # within the 20 s timeout (and some slack)
        assert "epoch 1/1000" in workers[0].stdout.read()  # it had been training
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
                worker.wait()


# --- the Kubeflow manifests run the same entry point --------------------------------------


@pytest.mark.parametrize("manifest", ["trainjob.yaml", "pytorchjob.yaml"])
def test_kubeflow_manifest_runs_the_train_entry_point(manifest):
    documents = list(yaml.safe_load_all((REPO / "infra" / "kubeflow" / manifest).read_text()))
    job = next(doc for doc in documents if doc["kind"] in ("TrainJob", "PyTorchJob"))
    if job["kind"] == "TrainJob":
        containers = [job["spec"]["trainer"]]
    else:
        specs = job["spec"]["pytorchReplicaSpecs"].values()
        containers = [spec["template"]["spec"]["containers"][0] for spec in specs]
    for container in containers:
        command = container["command"] + container.get("args", [])
        assert command[:3] == ["python", "-m", "torchship.components.train"]
        args = build_parser().parse_args(command[3:])  # every flag is one train accepts
        assert args.checkpoint_dir and args.model_path
