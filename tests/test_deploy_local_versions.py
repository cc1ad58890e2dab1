"""Versioned local deploys against the real ``tritonserver``: versions answer at their URLs, a broken
version is never promoted, concurrent deploys get distinct versions, leftovers are never served."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from artifacts import export_linear, write_onnx_dir
from tritonclient.utils import InferenceServerException

from torchship.components.deploy.targets.local import deploy_local
from torchship.components.errors import ServingError, UserInputError
from torchship.components.triton import repository as model_repository
from torchship.components.triton.config import read_model_config
from torchship.components.triton.repository import build_model_repository
from torchship.components.triton.server import TritonServer
from torchship.components.triton.versions import LOCK_NAME


def _ort(onnx_dir: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "fp32" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def _infer(client: httpclient.InferenceServerClient, x: np.ndarray, version: str) -> np.ndarray:
    infer_input = httpclient.InferInput("input", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    return client.infer("fp32", [infer_input], model_version=version).as_numpy("logits")


def _snapshot(repository: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(repository)): p.read_bytes()
        for p in sorted(repository.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def _served(repository: Path) -> list[int]:
    return list(read_model_config(repository / "fp32" / "config.pbtxt").version_policy
                .specific.versions)


@pytest.fixture(scope="module")
def x(test_path) -> np.ndarray:
    return np.load(test_path)["x"][:16]


# A Python-backend model that loads and answers, but wrongly: only the smoke test can catch it.
def _wrong_model_source(tmp: Path) -> Path:
    source = model_repository.PYTHON_MODEL_SOURCE.read_text()
    old = "return self.session.run(self.output_names, feeds)"
    assert old in source
    path = tmp / "wrong_model.py"
    path.write_text(source.replace(old, "return [o + 1.0 for o in self.session.run("
                                        "self.output_names, feeds)]"))
    return path


def test_versions_answer_at_their_urls_and_a_broken_version_is_never_served(
    workdir, test_path, x, monkeypatch
):
    onnx_v1 = write_onnx_dir(workdir / "onnx_v1", 1)
    onnx_v2 = write_onnx_dir(workdir / "onnx_v2", 2)
    repo = workdir / "served"

    first = deploy_local(onnx_v1, workdir / "artifact_v1", test_path,
                         persistent_repository=repo, progress=None)
    second = deploy_local(onnx_v2, workdir / "artifact_v2", test_path,
                          persistent_repository=repo, progress=None)

    assert first["versions"] == {"fp32": 1} and second["versions"] == {"fp32": 2}
    assert second["models"]["fp32"]["previous_versions"] == [1]
    assert second["models"]["fp32"]["served_versions"] == [1, 2]
    assert _served(repo) == [1, 2]
    config = read_model_config(repo / "fp32" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 64
    (warmup,) = config.model_warmup
    sample = (repo / "fp32" / "warmup" / warmup.inputs["input"].input_data_file).read_bytes()
    assert sample == np.load(test_path)["x"][:1].astype(np.float32).tobytes()
    # Each artifact holds exactly what its run deployed, for the benchmark stage.
    for artifact, version in ((workdir / "artifact_v1", 1), (workdir / "artifact_v2", 2)):
        assert [p.name for p in (artifact / "fp32").iterdir() if p.name.isdigit()] == [str(version)]
        assert list(read_model_config(artifact / "fp32" / "config.pbtxt")
                    .version_policy.specific.versions) == [version]
    before = _snapshot(repo)

    with TritonServer(repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            np.testing.assert_allclose(_infer(client, x, "1"), _ort(onnx_v1, x), atol=1e-5)
            np.testing.assert_allclose(_infer(client, x, "2"), _ort(onnx_v2, x), atol=1e-5)
            assert not np.allclose(_ort(onnx_v1, x), _ort(onnx_v2, x))

            # Version 3 with a corrupt ONNX file: refused before anything is written.
            corrupt = write_onnx_dir(workdir / "onnx_corrupt", 3)
            (corrupt / "fp32" / "model.onnx").write_bytes(b"\x08\x07not an onnx model")
            with pytest.raises(UserInputError) as refused:
                deploy_local(corrupt, workdir / "artifact_v3", test_path,
                             persistent_repository=repo, progress=None)
            message = str(refused.value)
            assert "not promoted" in message and "'fp32' versions [1, 2] stay served" in message
            assert "model.onnx is not a readable ONNX model" in message

            # Version 3 that loads but answers wrongly: the real server's smoke test rejects it.
            onnx_v3 = write_onnx_dir(workdir / "onnx_v3", 3)
            monkeypatch.setattr(model_repository, "PYTHON_MODEL_SOURCE",
                                _wrong_model_source(workdir))
            with pytest.raises(ServingError) as rejected:
                deploy_local(onnx_v3, workdir / "artifact_v3", test_path,
                             persistent_repository=repo, progress=None)
            monkeypatch.undo()
            message = str(rejected.value)
            assert "not promoted" in message and "differs from ONNX Runtime" in message
            assert "model 'fp32' (version 3 over gRPC)" in message

            # Meanwhile version 2 kept serving, and nothing in the repository changed.
            np.testing.assert_allclose(_infer(client, x, "2"), _ort(onnx_v2, x), atol=1e-5)
        finally:
            client.close()
    assert _snapshot(repo) == before
    assert not (workdir / "artifact_v3").exists()
    assert not list(workdir.glob(".served.*"))

    # A version directory nobody promoted (a deploy killed between its two renames) is never
    # loaded: a fresh server serves versions 1 and 2 only.
    orphan = repo / "fp32" / "3"
    orphan.mkdir()
    (orphan / "model.onnx").write_bytes(b"half-written")
    with TritonServer(repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            np.testing.assert_allclose(_infer(client, x, "1"), _ort(onnx_v1, x), atol=1e-5)
            np.testing.assert_allclose(_infer(client, x, "2"), _ort(onnx_v2, x), atol=1e-5)
            np.testing.assert_allclose(_infer(client, x, ""), _ort(onnx_v2, x), atol=1e-5)
            with pytest.raises(InferenceServerException, match="version 3"):
                _infer(client, x, "3")
        finally:
            client.close()


def test_concurrent_deploys_get_distinct_versions(workdir, test_path, x):
    onnx_a, onnx_b = write_onnx_dir(workdir / "onnx_a", 11), write_onnx_dir(workdir / "onnx_b", 12)
    repo = workdir / "shared"
    # Staging left by a deploy that was killed: removed by the next deploy, never served.
    stale = workdir / ".shared.deploy-killed00" / "fp32" / "1"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half-written")

    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(label: str, onnx_dir: Path) -> None:
        try:
            results[label] = deploy_local(onnx_dir, workdir / f"artifact_{label}", test_path,
                                          persistent_repository=repo, progress=None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(label, onnx_dir))
               for label, onnx_dir in (("a", onnx_a), ("b", onnx_b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    versions = sorted(r["versions"]["fp32"] for r in results.values())
    assert versions == [1, 2]
    assert _served(repo) == [1, 2]
    assert not stale.exists()
    # Each run's artifact holds its own version, and that version answers like its own ONNX.
    by_version = {r["versions"]["fp32"]: label for label, r in results.items()}
    with TritonServer(repo) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            for version, label in by_version.items():
                artifact_config = read_model_config(workdir / f"artifact_{label}" / "fp32" /
                                                    "config.pbtxt")
                assert list(artifact_config.version_policy.specific.versions) == [version]
                onnx_dir = onnx_a if label == "a" else onnx_b
                np.testing.assert_allclose(_infer(client, x, str(version)), _ort(onnx_dir, x),
                                           atol=1e-5)
        finally:
            client.close()


def test_incompatible_new_version_is_refused(workdir, test_path):
    """All versions share one config: a model with other tensors cannot join an existing one."""
    repo = workdir / "narrow"
    build_model_repository(write_onnx_dir(workdir / "onnx_narrow", 1), repo, "python")
    wide = workdir / "onnx_wide"
    export_linear(wide / "fp32" / "model.onnx", n_classes=5)
    before = _snapshot(repo)
    with pytest.raises(UserInputError, match=r"outputs .* but .* serves"):
        deploy_local(wide, workdir / "artifact_wide", test_path, persistent_repository=repo,
                     progress=None)
    assert _snapshot(repo) == before
