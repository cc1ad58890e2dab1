"""The GPU recipe of the train stage (NCCL workers with bf16, and fp16 with loss scaling) and of
compress (fine-tuning on the GPU).

Skipped where no GPU is visible (CI, the development machine). `make gpu-check` runs this file
on a machine with one or more GPUs: one worker per GPU, as the pipeline's train stage does. It
needs only torch, numpy, scikit-learn and pillow, so on a GPU machine whose python3 already has a
CUDA build of torch, onnx, onnxruntime and torch-pruning (and no network), this is enough:

    python3 -m pip install --no-deps --no-build-isolation -e .
    python3 -m pytest -v --noconftest tests/test_gpu.py

(`--noconftest`: tests/conftest.py loads the Vertex AI and Triton test stand-ins; this file
makes its own data.) prepare_data needs Apache Beam; where it is missing, split the data on
another machine and point TORCHSHIP_GPU_DATA at the folder holding train/, val/ and test/.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from torchship.components.compress.stage import compress_model
from torchship.components.train.stage import train_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, str]:
    """The built-in digits data set as prepare_data splits it (as tests/conftest.py does), or
    those splits made beforehand, in $TORCHSHIP_GPU_DATA."""
    if os.environ.get("TORCHSHIP_GPU_DATA"):
        return {name: str(Path(os.environ["TORCHSHIP_GPU_DATA"]) / name)
                for name in ("train", "val", "test")}
    from torchship.components.data.stage import prepare_data

    directory = tmp_path_factory.mktemp("digits")
    paths = {name: str(directory / name) for name in ("train", "val", "test")}
    prepare_data("digits", "", paths["train"], paths["val"], paths["test"], seed=0)
    return paths


def test_auto_precision_on_gpu_is_mixed(digits, tmp_path):
    metrics = train_model(digits["train"], digits["val"], str(tmp_path / "model.pt"), epochs=3,
                          progress=print)
    assert metrics["backend"] == "nccl"
    assert metrics["world_size"] == torch.cuda.device_count()  # one worker per GPU
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert metrics["precision"] == expected
    assert metrics["val_accuracy"] > 0.9


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_nccl_mixed_precision_resumes_exactly(digits, tmp_path, precision):
    common = {"epochs": 3, "batch_size": 64, "learning_rate": 1e-3, "precision": precision,
              "gradient_accumulation_steps": 2}
    straight = train_model(digits["train"], digits["val"], str(tmp_path / "straight.pt"),
                           progress=print, **common)
    assert straight["backend"] == "nccl" and straight["precision"] == precision
    assert straight["val_accuracy"] > 0.9
    if precision == "fp16":
        assert math.log2(straight["loss_scale"]).is_integer()  # the GradScaler ran
    else:
        assert straight["loss_scale"] is None

    resumed_path = tmp_path / "resumed.pt"
    train_model(digits["train"], digits["val"], str(resumed_path), progress=print, **common)
    (tmp_path / "resumed.pt.checkpoints" / "epoch-0003.pt").unlink()  # killed in epoch 3
    resumed = train_model(digits["train"], digits["val"], str(resumed_path), progress=print,
                          **common)
    assert resumed["resumed_from_epoch"] == 2
    # cuDNN/cuBLAS may pick different kernels between runs: close, not bit-equal.
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-2)
    assert resumed["loss_scale"] == straight["loss_scale"]


def test_compress_fine_tunes_on_the_gpu(digits, tmp_path):
    model = str(tmp_path / "model.pt")
    train_model(digits["train"], digits["val"], model, epochs=3, progress=print)
    lines: list[str] = []
    rows = compress_model(model, digits["train"], digits["val"], digits["test"],
                          str(tmp_path / "variants"), variants=["pruned", "distilled", "qat"],
                          progress=lines.append)
    print("\n".join(lines))
    assert f"fine-tuning on cuda:0 ({torch.cuda.get_device_name(0)})" in lines
    made = {row["name"]: row for row in rows}
    assert set(made) == {"fp32", "pruned", "distilled", "qat"}
    # Fine-tuned on the GPU, saved and measured on the CPU: every variant still classifies.
    for row in made.values():
        assert row["test_accuracy"] > 0.85, row
    assert made["pruned"]["sparsity"] > 0.4
