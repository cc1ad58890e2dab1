"""Fixtures shared across the tests: the digits splits, the tiny ONNX export, its held-out split
and local Triton repository, and the compiled pipeline. Expensive ones are built once a session;
tests copy them before changing anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from artifacts import VARIANT_RECORDS, write_onnx_dir, write_test_split
from fake_vertex import FakeVertex
from google.cloud.aiplatform.utils import gcs_utils
from processes import TORCHSHIP

from torchship.components.data.stage import prepare_data


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request) -> Path:
    """A directory for one test module's own files."""
    return tmp_path_factory.mktemp(request.module.__name__)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict[str, str]:
    """The built-in digits data set as prepare_data splits it: train, val and test paths."""
    directory = tmp_path_factory.mktemp("digits")
    paths = {name: str(directory / name) for name in ("train", "val", "test")}
    prepare_data("digits", "", paths["train"], paths["val"], paths["test"], seed=0)
    return paths


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory) -> Path:
    """An export of two tiny linear variants, fp32 and pruned, with their records."""
    return write_onnx_dir(tmp_path_factory.mktemp("export") / "onnx",
                          records=VARIANT_RECORDS)


@pytest.fixture(scope="session")
def test_path(tmp_path_factory) -> Path:
    """A held-out split of 256 rows for the tiny models."""
    return write_test_split(tmp_path_factory.mktemp("data") / "test.npz")


@pytest.fixture(scope="session")
def local_repo(tmp_path_factory, onnx_dir) -> Path:
    """``onnx_dir`` as a model repository for the tritonserver bundled in nvidia-pytriton."""
    # Imported here: tests/test_gpu.py runs where only torch and the data stack are installed.
    from torchship.components.triton.repository import build_model_repository

    repo = tmp_path_factory.mktemp("served") / "repo_local"
    build_model_repository(onnx_dir, repo, backend="python")
    return repo


@pytest.fixture(scope="session")
def pipeline_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "torchship.yaml"
    subprocess.run([*TORCHSHIP, "compile", "--output", str(path)], check=True,
                   capture_output=True, timeout=120)
    return path


@pytest.fixture
def fake(monkeypatch):
    """The recording stand-in for Vertex AI's REST API (tests/fake_vertex.py), the SDK pointed
    at it; test modules with another `fake` define their own."""
    # PipelineJob.submit first creates the gs:// bucket through Cloud Storage, which no local
    # endpoint can stand in for; that step is Google's code, made a no-op here.
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda *args, **kwargs: None)
    with FakeVertex() as server:
        monkeypatch.setenv("TORCHSHIP_VERTEX_API_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def gcs(monkeypatch):
    """Cloud Storage, stood in for by fsspec's in-memory filesystem under the gs:// scheme."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class InMemoryGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}  # noqa: RUF012 - fsspec keeps a filesystem's files on the class
        pseudo_dirs: list = [""]  # noqa: RUF012

    fsspec.register_implementation("gs", InMemoryGCS, clobber=True)
    yield InMemoryGCS
    fsspec.register_implementation("gs", "gcsfs.GCSFileSystem", clobber=True)
