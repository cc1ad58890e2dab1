"""The GPU recipe of the train stage: NCCL workers with bf16, and fp16 with loss scaling.

Skipped where no GPU is visible (CI, the development machine). `make gpu-check` runs this file
on a machine with one or more GPUs: one worker per GPU, as the pipeline's train stage does. It
needs only torch, numpy, scikit-learn and pillow, so on a GPU machine whose python3 already has a
CUDA build of torch (and no network), this is enough:

    python3 -m pip install --no-deps --no-build-isolation -e . && python3 -m pytest -v tests/test_gpu.py
"""

from __future__ import annotations

import math

import pytest
import torch

from torchship.components.train.stage import train_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
