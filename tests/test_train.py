"""train_model: real DDP workers under torch.distributed.run, and joining a launched job."""

import json
import re
import time

import numpy as np
import pytest
import torch

from torchship.components.data.splits import load_split, split_index
from torchship.components.errors import UserInputError
from torchship.components.models import load_checkpoint
from torchship.components.train.checkpoints import checkpoint_dir_for, metrics_path_for
from torchship.components.train.loop import GPU_HOURS_KEY
from torchship.components.train.stage import train_model
from torchship.components.triton.binary import free_port

METRIC_KEYS = {"val_accuracy", "samples_per_second", "epochs", "world_size", "final_train_loss",
               "model_name", "n_parameters", "val_loss", "epochs_trained", "resumed_from_epoch",
               "stopped_early", "best_epoch", "best_val_loss", "nnodes", "backend",
               "global_batch_size", "optimizer_steps", "precision", "loss_scale",
               "flops_per_sample", "training_flops", GPU_HOURS_KEY, "gpu_hours_assumption",
               "history"}
# The default mlp (64 -> 1024 -> 1024 -> 10): forward 2 FLOP per weight per sample, backward
# twice that, less the gradient of the input, which nothing needs.
MLP_LAYERS = [(64, 1024), (1024, 1024), (1024, 10)]
MLP_FLOPS_PER_SAMPLE = sum(6 * i * o for i, o in MLP_LAYERS) - 2 * 64 * 1024


def val_accuracy(model: torch.nn.Module, path: str) -> float:
    split = load_split(path)
    with torch.no_grad():
        predicted = model(torch.from_numpy(split.inputs["input"])).argmax(dim=1).numpy()
    return float(np.mean(predicted == split.y))


def test_two_workers_with_torch_distributed_run(digits, tmp_path):
    lines: list[str] = []
    model_path = tmp_path / "model" / "model.pt"
    metrics = train_model(digits["train"], digits["val"], str(model_path), model_name="mlp",
                          epochs=3, num_workers=2, seed=0, progress=lines.append)

    assert set(metrics) == METRIC_KEYS
    assert metrics["world_size"] == 2 and metrics["epochs"] == 3
    assert metrics["backend"] == "gloo" and metrics["precision"] == "fp32"  # CPU defaults
    assert metrics["val_accuracy"] > 0.8
    assert metrics["samples_per_second"] > 0 and metrics["final_train_loss"] < 1.5
    assert len(lines) == 4
    assert re.fullmatch(r"epoch 3/3 loss \d+\.\d{3} val_acc \d\.\d{3} \d+ samples/s", lines[2])
    assert json.loads(metrics_path_for(model_path).read_text()) == metrics

    # The job's size: counted FLOPs per sample, times the samples trained, in H100 hours.
    assert metrics["flops_per_sample"] == MLP_FLOPS_PER_SAMPLE
    samples = sum(entry["samples"] for entry in metrics["history"])
    rows = split_index(digits["train"]).n_rows
    assert samples == 3 * rows  # every row once an epoch, none padded in
    assert [entry["rows_seen"] for entry in metrics["history"]] == [rows] * 3
    assert metrics["training_flops"] == MLP_FLOPS_PER_SAMPLE * samples
    assert metrics[GPU_HOURS_KEY] == pytest.approx(samples * MLP_FLOPS_PER_SAMPLE
                                                   / (989e12 * 0.4) / 3600)
    assert "989 TFLOP/s" in metrics["gpu_hours_assumption"]
    assert lines[3].startswith("training size: 6.62e+06 FLOP per sample")
    assert [entry["epoch"] for entry in metrics["history"]] == [1, 2, 3]
    assert sorted(p.name for p in checkpoint_dir_for(model_path).iterdir()) == [
        "epoch-0002.pt", "epoch-0003.pt"]  # one per epoch, the newest two kept

    checkpoint = torch.load(model_path, weights_only=True)
    assert checkpoint["model_name"] == "mlp" and checkpoint["n_classes"] == 10
    model, _ = load_checkpoint(model_path)
    assert val_accuracy(model, digits["val"]) == pytest.approx(metrics["val_accuracy"])


def test_unknown_model_fails_before_any_worker_starts(digits, tmp_path):
    started = time.perf_counter()
    with pytest.raises(UserInputError, match="model 'resnet9000' is unknown"):
        train_model(digits["train"], digits["val"], str(tmp_path / "model.pt"),
                    model_name="resnet9000", num_workers=2)
    assert time.perf_counter() - started < 2  # a launch alone takes several seconds
    assert list(tmp_path.iterdir()) == []


def test_worker_failure_ends_the_job_with_the_launcher_output(digits, tmp_path, monkeypatch):
    # The factory works here (the pre-launch check passes), which also shows that a module
    # importable in the caller is importable in the workers. In the job, rank 1 fails on its
    # 5th forward pass, mid-epoch, while rank 0 trains on and soon waits for it in an
    # all-reduce: torch.distributed.run must end rank 0 rather than let it wait out the
    # 60 s timeout.
    (tmp_path / "fails_in_worker.py").write_text(
        "import os\nfrom torch import nn\n\n"
        "class FailsOnRank1(nn.Linear):\n"
        "    calls = 0\n\n"
        "    def forward(self, x):\n"
        "        FailsOnRank1.calls += 1\n"
        "        if os.environ.get('RANK') == '1' and FailsOnRank1.calls == 5:\n"
        "            raise RuntimeError('boom in worker ' + os.environ['RANK'])\n"
        "        return super().forward(x)\n\n"
        "def make(n_features, n_classes):\n"
        "    return FailsOnRank1(n_features, n_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="torch.distributed.run exited") as error:
        train_model(digits["train"], digits["val"], str(tmp_path / "out" / "model.pt"),
                    model_name="fails_in_worker:make", epochs=1000, num_workers=2,
                    timeout_s=60)
    assert time.monotonic() - started < 60
    assert "first error: [rank1]: RuntimeError: boom in worker 1" in str(error.value)
    assert not (tmp_path / "out").exists()  # failed in epoch 1: no checkpoint, no model


def test_joins_a_launched_job_from_its_environment(digits, tmp_path, monkeypatch):
    # As under torchrun or a PyTorchJob: the environment says this process is rank 0 of 1.
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    try:
        metrics = train_model(digits["train"], digits["val"], str(tmp_path / "model.pt"),
                              model_name="cnn", epochs=2, num_workers=2, progress=lambda _: None)
    finally:
        torch.set_num_threads(threads)  # a CPU worker pins itself to one thread
    assert metrics["world_size"] == 1 and metrics["model_name"] == "cnn"
    assert metrics["val_accuracy"] > 0.8
    assert not torch.distributed.is_initialized()


def test_model_options_reach_the_workers_and_the_checkpoint(digits, tmp_path):
    metrics = train_model(digits["train"], digits["val"], str(tmp_path / "model.pt"),
                          model_name="mlp", model_options={"hidden": 48, "depth": 1},
                          epochs=1, num_workers=2, progress=lambda _: None)
    assert metrics["n_parameters"] == 64 * 48 + 48 + 48 * 10 + 10
    model, checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint["model_options"] == {"hidden": 48, "depth": 1}
    assert model.layers[0].out_features == 48
    with pytest.raises(UserInputError, match="does not take options"):
        train_model(digits["train"], digits["val"], str(tmp_path / "other.pt"),
                    model_name="mlp", model_options={"width": 3}, num_workers=2)
