"""A native Triton install (NGC's ``/opt/tritonserver`` layout, named by
``$TORCHSHIP_TRITONSERVER_HOME``), which the Triton serving image gives the benchmark and the
serving search on Vertex AI and Kubeflow: found before nvidia-pytriton's binary, started as it
is, and its backends decide what is measured (``measurement_backend``).

The install here is laid out from nvidia-pytriton's own files (the real binary, its Python
backend and the stub for this Python): the same binary, run the native way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http

from torchship.components.errors import UserInputError
from torchship.components.triton.binary import HOME_ENV, find_tritonserver, measurement_backend
from torchship.components.triton.repository import build_model_repository
from torchship.components.triton.server import TritonServer


@pytest.fixture
def native_home(tmp_path, monkeypatch) -> Path:
    """bin/tritonserver, backends/python (with its stub) and lib/, as NGC's image has them."""
    monkeypatch.delenv(HOME_ENV, raising=False)
    wheel = find_tritonserver()
    assert not wheel.native
    home = tmp_path / "tritonserver"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "tritonserver").symlink_to(wheel.binary)
    wheel.prepare_backends(home)  # backends/python with the stub for this Python, as NGC's
    (home / "lib").symlink_to(wheel.libs, target_is_directory=True)
    return home


def test_a_native_install_is_found_first_and_served_from_as_it_is(
        native_home, monkeypatch, onnx_dir, test_path, workdir):
    monkeypatch.setenv(HOME_ENV, str(native_home))
    paths = find_tritonserver()
    assert (paths.native, paths.kind, paths.binary) == (
        True, "native", native_home / "bin" / "tritonserver")
    assert paths.available_backends() == ["python"]
    # No onnxruntime backend in this install: auto measures with the python one.
    assert measurement_backend("auto", paths) == "python"
    repository = workdir / "native_repository"
    models = build_model_repository(onnx_dir, repository, measurement_backend(),
                                    warmup_path=test_path)
    x = np.load(test_path)["x"][:4].astype(np.float32)
    with TritonServer(repository) as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)
        request = tritonclient.http.InferInput("input", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        answer = client.infer(models[0]["name"], [request]).as_numpy("logits")
        command = server.log_path.read_text().splitlines()[0]
    assert answer.shape == (4, 3) and np.isfinite(answer).all()
    # Started with the install's own backends folder: nothing copied into the workspace.
    assert command.startswith(f"$ {native_home}/bin/tritonserver ")
    assert f"--backend-directory={native_home}/backends " in command


def test_auto_measures_with_onnxruntime_where_the_install_has_it(native_home, monkeypatch):
    onnxruntime = native_home / "backends" / "onnxruntime"
    onnxruntime.mkdir()
    (onnxruntime / "libtriton_onnxruntime.so").write_bytes(b"")  # what Triton loads it by
    (native_home / "backends" / "half-installed").mkdir()  # no library: not a backend
    monkeypatch.setenv(HOME_ENV, str(native_home))
    paths = find_tritonserver()
    assert paths.available_backends() == ["onnxruntime", "python"]
    assert measurement_backend("auto", paths) == "onnxruntime"
    assert measurement_backend("python", paths) == "python"


def test_a_backend_the_install_lacks_or_a_wrong_home_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(HOME_ENV, raising=False)
    with pytest.raises(UserInputError) as lacking:
        measurement_backend("onnxruntime")
    assert str(lacking.value).startswith(
        "serving_backend: 'onnxruntime' is not among the backends of ")
    assert "(nvidia-pytriton wheel) (python); run in the Triton serving image" in str(lacking.value)
    with pytest.raises(UserInputError, match="^serving_backend: 'tensorrt' is not one of auto"):
        measurement_backend("tensorrt")
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    with pytest.raises(UserInputError) as wrong:
        find_tritonserver()
    assert str(wrong.value) == (
        f"{HOME_ENV}: {tmp_path} has no executable bin/tritonserver; point it at a Triton "
        "install (e.g. /opt/tritonserver) or unset it to use nvidia-pytriton's")
