"""train_model: real DDP workers under torch.distributed.run, and joining a launched job."""

import json
import re
import socket
import time

import numpy as np
import pytest
import torch

from torchship.components.data import load_split, prepare_data
from torchship.components.errors import UserInputError
from torchship.components.models import load_checkpoint
from torchship.components.train import metrics_path_for, train_model

METRIC_KEYS = {"val_accuracy", "samples_per_second", "epochs", "world_size", "final_train_loss",
               "model_name", "n_parameters"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    directory = tmp_path_factory.mktemp("digits")
    paths = {name: str(directory / name) for name in ("train", "val", "test")}
    prepare_data("digits", "", paths["train"], paths["val"], paths["test"], seed=0)
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def val_accuracy(model: torch.nn.Module, path: str) -> float:
    split = load_split(path)
    with torch.no_grad():
        predicted = model(torch.from_numpy(split["x"])).argmax(dim=1).numpy()
    return float(np.mean(predicted == split["y"]))


def test_two_workers_with_torch_distributed_run(digits, tmp_path):
    lines: list[str] = []
    model_path = tmp_path / "model" / "model.pt"
    metrics = train_model(digits["train"], digits["val"], str(model_path), model_name="mlp",
                          epochs=3, num_workers=2, seed=0, progress=lines.append)

    assert set(metrics) == METRIC_KEYS
    assert metrics["world_size"] == 2 and metrics["epochs"] == 3
    assert metrics["val_accuracy"] > 0.8
    assert metrics["samples_per_second"] > 0 and metrics["final_train_loss"] < 1.5
    assert len(lines) == 3
    assert re.fullmatch(r"epoch 3/3 loss \d+\.\d{3} val_acc \d\.\d{3} \d+ samples/s", lines[-1])
    assert json.loads(metrics_path_for(model_path).read_text()) == metrics

    checkpoint = torch.load(model_path, weights_only=True)
    assert checkpoint["model_name"] == "mlp" and checkpoint["n_classes"] == 10
    model, _ = load_checkpoint(model_path)
    assert val_accuracy(model, digits["val"]) == pytest.approx(metrics["val_accuracy"])


def test_unknown_model_fails_before_any_worker_starts(digits, tmp_path):
    started = time.perf_counter()
    with pytest.raises(UserInputError, match="model 'resnet' is unknown"):
        train_model(digits["train"], digits["val"], str(tmp_path / "model.pt"),
                    model_name="resnet", num_workers=2)
    assert time.perf_counter() - started < 2  # a launch alone takes several seconds
    assert list(tmp_path.iterdir()) == []


def test_worker_failure_raises_with_the_launcher_output(digits, tmp_path, monkeypatch):
    # The factory works here (the pre-launch check passes) and fails inside a worker, which also
    # shows that a module importable in the caller is importable in the workers.
    (tmp_path / "fails_in_worker.py").write_text(
        "import os\nfrom torch import nn\n\n"
        "def make(n_features, n_classes):\n"
        "    if 'RANK' in os.environ:\n"
        "        raise RuntimeError('boom in worker ' + os.environ['RANK'])\n"
        "    return nn.Linear(n_features, n_classes)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="torch.distributed.run exited") as error:
        train_model(digits["train"], digits["val"], str(tmp_path / "out" / "model.pt"),
                    model_name="fails_in_worker:make", epochs=1, num_workers=2)
    assert "boom in worker" in str(error.value)
    assert not (tmp_path / "out").exists()


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
