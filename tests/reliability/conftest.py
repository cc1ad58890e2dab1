"""Shared parts of the reliability tests: a tiny ONNX export, a held-out split, a local Triton
repository, the `torchship` command and a /proc scan for stray Triton processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from torchship.components.model_repository import build_model_repository

N_FEATURES, N_CLASSES = 8, 3
TORCHSHIP = [sys.executable, "-m", "torchship.pipelines.cli"]


def export_linear(path: Path, seed: int = 0) -> Path:
    """A linear model at ``path`` (model.onnx) with the contract's input and output names."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(N_FEATURES, N_CLASSES).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, N_FEATURES),), str(path),
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
    return path


def make_onnx_dir(directory: Path, seed: int = 0) -> Path:
    export_linear(directory / "fp32" / "model.onnx", seed)
    (directory / "variants.json").write_text(json.dumps([{"name": "fp32"}]))
    return directory


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def onnx_dir(workdir) -> Path:
    return make_onnx_dir(workdir / "onnx")


@pytest.fixture(scope="session")
def test_path(workdir) -> Path:
    rng = np.random.default_rng(0)
    path = workdir / "test.npz"
    np.savez(path, x=rng.standard_normal((64, N_FEATURES)).astype(np.float32),
             y=rng.integers(0, N_CLASSES, 64).astype(np.int64))
    return path


@pytest.fixture(scope="session")
def local_repo(workdir, onnx_dir) -> Path:
    repo = workdir / "repo_local"
    build_model_repository(onnx_dir, repo, target="local")
    return repo


@pytest.fixture(scope="session")
def pipeline_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "torchship.yaml"
    subprocess.run([*TORCHSHIP, "compile", "--output", str(path)], check=True,
                   capture_output=True, timeout=120)
    return path


def torchship(*args: str, env: dict | None = None, timeout: float = 300,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHSHIP, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env=env, cwd=cwd)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def triton_processes(marker: str) -> list[tuple[int, str]]:
    """Live (non-zombie) tritonserver / stub processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state = stat[stat.rindex(")") + 2:].split()[0]
        if state != "Z" and marker in cmd and (
                "tritonserver" in cmd or "triton_python_backend_stub" in cmd):
            found.append((int(entry), cmd))
    return found


def wait_gone(marker: str, timeout: float = 10.0) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while (left := triton_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
