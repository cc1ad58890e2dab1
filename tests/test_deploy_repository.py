"""The model repository without a server: config.pbtxt fields from Triton's ModelConfig, validation
before the repository leaves the stage, and the lock that gives concurrent deploys turns."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from artifacts import N_FEATURES, write_onnx_dir
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from torchship.components.contracts import ServingSettings
from torchship.components.errors import ServingError, UserInputError
from torchship.components.triton.config import InvalidRepositoryError, read_model_config
from torchship.components.triton.repository import (
    build_model_repository,
    validate_model_repository,
)
from torchship.components.triton.versions import repository_lock


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    """One variant, fp32, in place of conftest's two: these tests read the one model back."""
    return write_onnx_dir(tmp_path_factory.mktemp("export") / "onnx")


def test_config_has_policy_warmup_and_instances(tmp_path, onnx_dir, test_path):
    repo = tmp_path / "repo"
    serving = ServingSettings(max_batch_size=32, max_queue_delay_us=250, instance_count=2)
    (model,) = build_model_repository(onnx_dir, repo, "python", serving, warmup_path=test_path)
    assert (model["version"], model["versions"]) == (1, [1])
    config = read_model_config(repo / "fp32" / "config.pbtxt")
    assert list(config.version_policy.specific.versions) == [1]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, mc.ModelInstanceGroup.KIND_CPU)]
    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1
    entry = warmup.inputs["input"]
    assert (entry.data_type, list(entry.dims)) == (mc.TYPE_FP32, [N_FEATURES])
    sample = (repo / "fp32" / "warmup" / entry.input_data_file).read_bytes()
    assert sample == np.load(test_path)["x"][:1].tobytes()  # a real held-out row
    assert not config.optimization.HasField("execution_accelerators")

    # Without sample data the model is warmed up with zeros.
    bare = tmp_path / "bare"
    build_model_repository(onnx_dir, bare, "python")
    assert read_model_config(bare / "fp32" / "config.pbtxt").model_warmup[0].inputs[
        "input"].zero_data


def test_gpu_backend_with_tensorrt_fp16(tmp_path, onnx_dir):
    repo = tmp_path / "gpu"
    build_model_repository(onnx_dir, repo, "onnxruntime",
                           ServingSettings(instance_kind="KIND_GPU", tensorrt_fp16=True))
    config = read_model_config(repo / "fp32" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    # The text is the proto: it parses back unchanged.
    text = (repo / "fp32" / "config.pbtxt").read_text()
    assert text_format.Parse(text, mc.ModelConfig()) == config


@pytest.mark.parametrize(
    ("backend", "settings", "version", "field"),
    [
        ("python", {"instance_kind": "KIND_GPU"}, 1, "instance_kind"),
        ("onnxruntime", {"instance_kind": "KIND_TPU"}, 1, "instance_kind"),
        ("onnxruntime", {"tensorrt_fp16": True}, 1, "tensorrt_fp16"),
        ("python", {"instance_count": 0}, 1, "instance_count"),
        ("python", {}, 0, "versions"),
        ("tensorrt", {}, 1, "backend"),
    ],
)
def test_bad_config_options(tmp_path, onnx_dir, backend, settings, version, field):
    with pytest.raises(UserInputError, match=f"^{field}"):
        build_model_repository(onnx_dir, tmp_path / "x", backend,
                               ServingSettings().with_values(settings), version=version)
    assert not (tmp_path / "x").exists()


def test_warmup_rows_must_fit(tmp_path, onnx_dir):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((3, N_FEATURES + 1), np.float32))
    with pytest.raises(UserInputError, match="^warmup_path"):
        build_model_repository(onnx_dir, tmp_path / "x", warmup_path=wrong)


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (lambda repo: (repo / "fp32" / "1" / "model.onnx").write_bytes(b"garbage"),
         "is not a readable ONNX model"),
        (lambda repo: (repo / "fp32" / "1" / "model.py").unlink(), "has no model.py"),
        (lambda repo: (repo / ".stale").mkdir(), "Triton would try to load"),
        (lambda repo: shutil.rmtree(repo / "fp32" / "1"), "which have no directory"),
        (lambda repo: (repo / "fp32" / "config.pbtxt").write_text(
            (repo / "fp32" / "config.pbtxt").read_text().replace('name: "fp32"', 'name: "x"')),
         "names it 'x'"),
        (lambda repo: (repo / "fp32" / "config.pbtxt").write_text(
            (repo / "fp32" / "config.pbtxt").read_text().replace('name: "logits"',
                                                                 'name: "scores"')),
         "config.pbtxt declares"),
        (lambda repo: (repo / "fp32" / "config.pbtxt").write_text("max_batch_size: many"),
         "not a valid Triton ModelConfig"),
        (lambda repo: next((repo / "fp32" / "warmup").iterdir()).write_bytes(b"\0"),
         "warmup input 'input' needs 32 bytes"),
    ],
)
def test_validation_names_what_triton_would_refuse(tmp_path, onnx_dir, test_path, break_it,
                                                   expected):
    repo = tmp_path / "repo"
    build_model_repository(onnx_dir, repo, "python", warmup_path=test_path)
    validate_model_repository(repo, backend="python")
    break_it(repo)
    with pytest.raises(InvalidRepositoryError, match=expected) as excinfo:
        validate_model_repository(repo)
    assert "\n" not in str(excinfo.value)


def test_validation_checks_the_backend(tmp_path, onnx_dir):
    repo = tmp_path / "repo"
    build_model_repository(onnx_dir, repo, "python")
    with pytest.raises(InvalidRepositoryError, match="not the 'onnxruntime' backend"):
        validate_model_repository(repo, backend="onnxruntime")


def test_lock_gives_turns_and_times_out_clearly(tmp_path):
    repo = tmp_path / "repo"
    order: list[str] = []
    inside = threading.Event()

    def hold() -> None:
        with repository_lock(repo):
            order.append("first in")
            inside.set()
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(10)
    with (
        pytest.raises(ServingError, match="is locked by another deploy"),
        repository_lock(repo, timeout_s=0.1),
    ):
        pytest.fail("two holders at once")
    with repository_lock(repo, timeout_s=10):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]
