"""The training loop itself: DDP equals one process, resume after SIGKILL, early stopping, schedule."""

import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from artifacts import synthetic_splits
from processes import one_process_job

from torchship.components.data.splits import load_split
from torchship.components.errors import UserInputError
from torchship.components.models import MLP, load_checkpoint
from torchship.components.train.checkpoints import checkpoint_dir_for
from torchship.components.train.loop import MIN_LEARNING_RATE_RATIO, learning_rate_at
from torchship.components.train.stage import train_model

NO_DROPOUT = """
from torchship.components.models import MLP


def make(n_features, n_classes):
    return MLP(n_features, n_classes, dropout=0.0)
"""


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def trainjob_nodes(train: str, val: str, directory: Path, flags: list[str],
                   pythonpath: str) -> list[dict]:
    """Train as a 2-node TrainJob on this machine: one process per node, each given the PET_*
    environment of a TrainJob pod and started as the pod's command. Node 1 starts first and
    waits for node 0. Returns each node's metrics."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    nodes = []
    for node_rank in (1, 0):
        env = {**os.environ, "PET_NNODES": "2", "PET_NODE_RANK": str(node_rank),
               "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1",
               "PET_MASTER_PORT": port, "PYTHONPATH": pythonpath}
        command = [sys.executable, "-m", "torchship.components.train", "--train-path", train,
                   "--val-path", val, "--model-path", str(directory / f"node{node_rank}.pt"),
                   "--timeout-s", "60", *flags]
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=120)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "epoch" not in outputs[0] and "epoch 2/2" in outputs[1]  # rank 0 (node 0) reports
    assert not (directory / "node1.pt").exists()  # and alone writes the model
    return [json.loads((directory / f"node{rank}.pt.metrics.json").read_text())
            for rank in (0, 1)]


def test_global_batch_does_not_depend_on_how_it_is_split(tmp_path, monkeypatch):
    # 1024 rows, global batch 128: 8 optimizer steps an epoch, 16 in all. At a given world size
    # a rank's rows and their order do not depend on its batch size (see train/stream.py), so
    # per-rank batches of 64, or of 32 accumulated twice, make each step's global batch the same
    # 128 rows; without dropout the weights must then agree, whichever launcher ran the workers.
    # Across world sizes they differ: each rank takes a contiguous range of the epoch's rows
    # and shuffles within it, so 1 process and 2 see other global batches (as DistributedSampler
    # did not), and the property is checked at 1 and at 2.
    train, val = synthetic_splits(tmp_path, rows=1024)
    (tmp_path / "no_dropout.py").write_text(NO_DROPOUT)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = {"model_name": "no_dropout:make", "epochs": 2, "seed": 0}
    weights, metrics = {}, {}

    single = "1 process, batch 128"
    accumulated = "1 process, batch 64 x 2 accumulation steps"
    with one_process_job():  # trains in this process
        for name, batch, steps in ((single, 128, 1), (accumulated, 64, 2)):
            path = tmp_path / f"single-{batch}.pt"
            metrics[name] = train_model(train, val, str(path), batch_size=batch,
                                        gradient_accumulation_steps=steps,
                                        progress=lambda _: None, **common)
            weights[name] = torch.load(path, weights_only=True)["state_dict"]

    local = "2 local processes (torch.distributed.run), batch 64"
    metrics[local] = train_model(train, val, str(tmp_path / "local.pt"), num_workers=2,
                                 batch_size=64, progress=lambda _: None, **common)
    weights[local] = torch.load(tmp_path / "local.pt", weights_only=True)["state_dict"]

    # Two nodes of one worker each; gradients accumulate (no all-reduce) on every other step.
    nodes = "2 TrainJob nodes, batch 32 x 2 accumulation steps"
    (tmp_path / "nodes").mkdir()
    per_node = trainjob_nodes(train, val, tmp_path / "nodes",
                              ["--model-name", "no_dropout:make", "--epochs", "2", "--seed", "0",
                               "--batch-size", "32", "--gradient-accumulation-steps", "2"],
                              pythonpath=str(tmp_path))
    assert per_node[0] == per_node[1]  # every node returns the job's metrics
    metrics[nodes] = per_node[0]
    assert metrics[nodes]["nnodes"] == 2
    weights[nodes] = torch.load(tmp_path / "nodes" / "node0.pt",
                                weights_only=True)["state_dict"]

    assert max_abs_difference(weights[single], weights[accumulated]) <= 1e-5
    assert max_abs_difference(weights[local], weights[nodes]) <= 1e-5
    for name in (local, nodes):
        assert metrics[name]["world_size"] == 2 and metrics[single]["world_size"] == 1
    for name in metrics:
        assert metrics[name]["global_batch_size"] == 128
        assert metrics[name]["optimizer_steps"] == 16
        # Every row once an epoch, at any world size: the same rows, whatever their order.
        assert [(e["rows_seen"], e["row_key_digest"]) for e in metrics[name]["history"]] == [
            (e["rows_seen"], e["row_key_digest"]) for e in metrics[single]["history"]], name
        assert metrics[name]["history"][0]["rows_seen"] == 1024
    torch.manual_seed(0)
    initial = MLP(64, 10, dropout=0.0).state_dict()
    for name in (single, local):  # it did train: 500x the tolerance
        assert max_abs_difference(initial, weights[name]) > 5e-3, name


KILLED_RUN_EPOCHS = 3


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:  # it ended while we looked
                pass
    return found


def test_resume_after_kill(tmp_path):
    train, val = synthetic_splits(tmp_path, rows=3072)
    model_path = tmp_path / "run" / "model.pt"
    checkpoints = checkpoint_dir_for(model_path)
    options = {"epochs": KILLED_RUN_EPOCHS, "batch_size": 128, "seed": 0}

    # The real entry point, in its own process group: SIGKILL takes the launcher and
    # torch.distributed.run's agent at once, as a preempted VM or a deleted pod would.
    command = [sys.executable, "-m", "torchship.components.train", "--train-path", train,
               "--val-path", val, "--model-path", str(model_path), "--num-workers", "1",
               "--epochs", str(options["epochs"]), "--batch-size", "128", "--seed", "0"]
    killed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    first_epoch = None
    assert killed.stdout is not None
    for line in killed.stdout:
        if "epoch 1/" in line:
            first_epoch = line
            break
    assert first_epoch, "the run ended before its first epoch"
    # Mid-epoch 2: the epoch-1 checkpoint follows the epoch line at once; wait a third of an
    # epoch more (its length from the samples/s that line reports).
    rate = float(re.search(r"(\d+) samples/s", first_epoch).group(1))
    deadline = time.monotonic() + 30
    while not (checkpoints / "epoch-0001.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(3072 / rate / 3)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()

    # The orphaned worker notices its agent is gone and exits, rather than train on.
    deadline = time.monotonic() + 10
    while processes_mentioning(str(model_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(model_path)) == []
    last_epoch = int(max(checkpoints.glob("epoch-*.pt")).stem.split("-")[1])
    assert 1 <= last_epoch < KILLED_RUN_EPOCHS
    assert not model_path.exists()  # it did not finish

    lines: list[str] = []
    with one_process_job():  # the re-run, as a restarted PyTorchJob pod (rank 0 of 1)
        metrics = train_model(train, val, str(model_path), progress=lines.append, **options)
    assert f"resuming from epoch {last_epoch} " in lines[0]
    trained_now = [int(re.match(r"epoch (\d+)/", line).group(1))
                   for line in lines if line.startswith("epoch ")]
    assert trained_now == list(range(last_epoch + 1, KILLED_RUN_EPOCHS + 1))
    assert [entry["epoch"] for entry in metrics["history"]] == [1, 2, 3]  # each exactly once
    assert metrics["epochs_trained"] == KILLED_RUN_EPOCHS
    assert metrics["resumed_from_epoch"] == last_epoch

    # Checkpoints are plain data and load with weights_only=True.
    newest = torch.load(max(checkpoints.glob("epoch-*.pt")), weights_only=True)
    assert newest["epoch"] == KILLED_RUN_EPOCHS and newest["config"]["seed"] == 0
    assert {"model", "optimizer", "history", "step"} <= newest.keys()
    assert not list(checkpoints.glob(".*.tmp*"))  # no half-written file left behind

    # Resuming is exact: the same weights as a run that was never interrupted.
    with one_process_job():
        train_model(train, val, str(tmp_path / "straight" / "model.pt"),
                    progress=lambda _: None, **options)
    resumed, _ = load_checkpoint(model_path)
    straight, _ = load_checkpoint(tmp_path / "straight" / "model.pt")
    assert max_abs_difference(resumed.state_dict(), straight.state_dict()) <= 1e-6


def test_resume_refuses_checkpoints_of_another_model(tmp_path):
    train, val = synthetic_splits(tmp_path, rows=256)
    model_path = str(tmp_path / "model.pt")
    with one_process_job():
        train_model(train, val, model_path, model_name="cnn", epochs=1, progress=print)
        with pytest.raises(UserInputError, match="holds a run of model 'cnn'"):
            train_model(train, val, model_path, model_name="mlp", epochs=2, progress=print)


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    # Random labels: the model memorises the train split and the val loss soon rises.
    train, val = synthetic_splits(tmp_path, rows=512, random_labels=True)
    lines: list[str] = []
    with one_process_job():
        metrics = train_model(train, val, str(tmp_path / "model.pt"), epochs=40,
                              batch_size=32, early_stopping_patience=2, progress=lines.append)
    assert metrics["stopped_early"] is True
    assert metrics["epochs_trained"] == metrics["best_epoch"] + 2 < 40
    assert any(line.startswith("early stop: val loss has not improved for 2 epochs")
               for line in lines)
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert metrics["val_loss"] == best["val_loss"] == metrics["best_val_loss"]
    assert min(entry["val_loss"] for entry in metrics["history"]) == best["val_loss"]
    # The saved model is the best epoch's, not the last one's.
    model, _ = load_checkpoint(tmp_path / "model.pt")
    split = load_split(val)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(split.inputs["input"])),
                                                 torch.from_numpy(split.y))
    assert float(loss) == pytest.approx(best["val_loss"], rel=1e-5)


def test_bf16_autocast_on_cpu_trains(tmp_path):
    # bf16 matmuls are slow on CPUs without bf16 units, so a small model and split.
    train, val = synthetic_splits(tmp_path, rows=512, features=16, classes=4)
    with one_process_job():
        metrics = train_model(train, val, str(tmp_path / "model.pt"), model_name="cnn",
                              epochs=3, batch_size=32, learning_rate=3e-3, precision="bf16",
                              progress=lambda _: None)
    assert metrics["precision"] == "bf16"
    assert metrics["val_accuracy"] > 0.6  # four classes: chance is 0.25
    assert metrics["loss_scale"] is None  # bf16 has fp32's range: no loss scaling


def test_fp16_loss_scaling_under_ddp_resumes_exactly(tmp_path):
    # fp16 autocast and the GradScaler run on CPU too, so the GPU recipe's loss scaling, its
    # interplay with no_sync accumulation and its checkpointed state are checked here with 2
    # gloo workers. A run resumed from epoch 2 must end exactly where an uninterrupted one did:
    # a scaler restarted at its initial scale would skip different steps or scale differently.
    train, val = synthetic_splits(tmp_path, rows=512, features=16, classes=4)
    common = {"model_name": "cnn", "epochs": 3, "batch_size": 16, "learning_rate": 3e-3,
              "precision": "fp16", "num_workers": 2, "gradient_accumulation_steps": 2}
    lines: list[str] = []
    straight = train_model(train, val, str(tmp_path / "straight.pt"), progress=lines.append,
                           **common)
    assert straight["precision"] == "fp16"
    assert any("fp16 on CPU" in line for line in lines)  # says it is meant for GPUs
    # Loss scaling kept the loss finite and the model learned. How well it learns in three
    # epochs depends on the CPU's kernels (AVX2 or AVX-512 round fp16 differently), so the
    # bar is "clearly above chance", not a fixed accuracy: four classes, chance is 0.25.
    losses = [epoch["train_loss"] for epoch in straight["history"]]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    assert straight["val_accuracy"] >= 0.4
    scale = straight["loss_scale"]
    assert scale >= 1 and math.log2(scale).is_integer()  # the scaler ran: a power of two

    checkpoints = tmp_path / "resumed.pt.checkpoints"
    train_model(train, val, str(tmp_path / "resumed.pt"), progress=lambda _: None, **common)
    (checkpoints / "epoch-0003.pt").unlink()  # as if killed during epoch 3
    resumed = train_model(train, val, str(tmp_path / "resumed.pt"), progress=lambda _: None,
                          **common)
    assert resumed["resumed_from_epoch"] == 2 and resumed["loss_scale"] == scale

    def final(name: str) -> dict:
        return torch.load(tmp_path / f"{name}.pt.checkpoints" / "epoch-0003.pt",
                          weights_only=True)

    assert final("resumed")["scaler"] == final("straight")["scaler"]
    assert max_abs_difference(final("resumed")["model"], final("straight")["model"]) == 0


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    rates = [learning_rate_at(step, 100, 1.0, warmup_steps=5) for step in range(100)]
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert rates[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[5:]))  # never rises after warm-up
    assert learning_rate_at(100, 100, 1.0, 5) == pytest.approx(MIN_LEARNING_RATE_RATIO)
