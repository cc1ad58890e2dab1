"""A stable serving name: whichever variant a run chooses, the deploy adds it as the next version of
one model (pipeline parameter serving_model_name), the version says which variant it is, and a
client that names no version gets the newest, on the real tritonserver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from artifacts import export_linear, write_onnx_dir
from processes import error_lines, torchship

from torchship.components.data.splits import load_split
from torchship.components.deploy.reference import keep_reference
from torchship.components.deploy.stage import deploy_to
from torchship.components.errors import UserInputError
from torchship.components.triton.config import read_model_config
from torchship.components.triton.server import TritonServer
from torchship.components.triton.versions import (
    LOCK_NAME,
    SERVING_RECORD,
    serving_model,
    version_variant,
)

NAME = "digits"


def _ort(onnx_dir: Path, variant: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / variant / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def _deploy(onnx_dir: Path, artifact: Path, repository: Path, test_path: Path) -> dict:
    return deploy_to("local", onnx_dir, artifact, str(artifact), test_path,
                     local_repository=str(repository), model_name=NAME,
                     progress=lambda _line: None)


def _snapshot(repository: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repository)): p.read_bytes() for p in sorted(repository.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


@pytest.fixture(scope="module")
def two_deploys(workdir, test_path) -> dict:
    """Run 1 chose fp32, run 2 chose int8 (different weights, so their answers differ): each
    gate's chosen model, deployed through the deploy stage into one persistent repository."""
    chosen = {
        "fp32": write_onnx_dir(workdir / "run1" / "chosen", 1, [{"name": "fp32"}]),
        "int8": write_onnx_dir(workdir / "run2" / "chosen", 2, [{"name": "int8"}]),
    }
    repository = workdir / "model_repository"
    results = [_deploy(chosen[variant], workdir / f"run{run}" / "deploy", repository, test_path)
               for run, variant in ((1, "fp32"), (2, "int8"))]
    return {"chosen": chosen, "repository": repository, "results": results}


def test_two_runs_choosing_different_variants_are_two_versions_of_one_model(two_deploys):
    repository, (first, second) = two_deploys["repository"], two_deploys["results"]
    assert (first["serving_model_name"], first["variant"], first["versions"]) == (
        NAME, "fp32", {NAME: 1})
    assert (second["serving_model_name"], second["variant"], second["versions"]) == (
        NAME, "int8", {NAME: 2})
    assert second["models"][NAME]["served_versions"] == [1, 2]
    # One model folder, named for clients, not for a variant; each version says its variant.
    assert sorted(p.name for p in repository.iterdir() if p.is_dir()) == [NAME]
    model_dir = repository / NAME
    assert [version_variant(model_dir, v) for v in (1, 2)] == ["fp32", "int8"]
    config = read_model_config(model_dir / "config.pbtxt")
    assert config.name == NAME and list(config.version_policy.specific.versions) == [1, 2]
    # What serves now, for the next run's gate: the name, the newest version and its variant.
    assert json.loads((repository / SERVING_RECORD).read_text()) == {
        "model": NAME, "version": 2, "variant": "int8"}
    serving = serving_model(repository)
    assert (serving.name, serving.version, serving.variant) == (NAME, 2, "int8")
    assert serving.onnx_path.read_bytes() == (
        two_deploys["chosen"]["int8"] / "int8" / "model.onnx").read_bytes()
    # Each run's artifact holds the version it deployed, under the same name.
    artifact = read_model_config(Path(second["artifact_repository"]) / NAME / "config.pbtxt")
    assert list(artifact.version_policy.specific.versions) == [2]
    assert version_variant(Path(second["artifact_repository"]) / NAME, 2) == "int8"


def test_a_client_naming_no_version_gets_the_newest_and_version_1_still_answers(
        two_deploys, test_path):
    repository, chosen = two_deploys["repository"], two_deploys["chosen"]
    x = np.load(test_path)["x"][:8]
    newest, first = _ort(chosen["int8"], "int8", x), _ort(chosen["fp32"], "fp32", x)
    assert np.abs(newest - first).max() > 1e-2  # the two versions are told apart by their answers
    with TritonServer(repository) as server:
        grpc = grpcclient.InferenceServerClient(server.grpc_url)
        http = httpclient.InferenceServerClient(server.http_url)
        try:
            assert http.get_model_metadata(NAME)["versions"] == ["1", "2"]
            for client, module in ((grpc, grpcclient), (http, httpclient)):
                infer_input = module.InferInput("input", list(x.shape), "FP32")
                infer_input.set_data_from_numpy(x)
                latest = client.infer(NAME, [infer_input])
                pinned = client.infer(NAME, [infer_input], model_version="1")
                latest_version = (latest.get_response().model_version if module is grpcclient
                                  else latest.get_response()["model_version"])
                pinned_version = (pinned.get_response().model_version if module is grpcclient
                                  else pinned.get_response()["model_version"])
                assert (latest_version, pinned_version) == ("2", "1"), module.__name__
                np.testing.assert_allclose(latest.as_numpy("logits"), newest, atol=1e-4)
                np.testing.assert_allclose(pinned.as_numpy("logits"), first, atol=1e-4)
        finally:
            grpc.close()
            http.close()


SERVE_SCRIPT = """
import os, signal, sys
from torchship.components.triton.serve import serve

serve(sys.argv[1], on_ready=lambda _server: os.kill(os.getpid(), signal.SIGTERM))
"""


def test_torchship_serve_says_which_variant_each_version_is(two_deploys):
    repository = two_deploys["repository"]
    done = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, str(repository)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"serving {NAME} (versions 1 (fp32), 2 (int8)) from {repository}" in done.stdout


def test_the_reference_names_the_model_its_version_and_the_variant(two_deploys, tmp_path):
    statistics, gate = tmp_path / "statistics.json", tmp_path / "gate.json"
    statistics.write_text(json.dumps({"source": "digits", "n_rows": 1437}))
    gate.write_text(json.dumps({
        "variant": "int8", "settings": {"target_concurrency": 2},
        "choice": {"table": [{"name": "int8", "onnx_test_accuracy": 0.95}]},
        "checks": [{"name": "p99 latency", "variant": "int8", "value": 3.5}]}))
    record = keep_reference(str(tmp_path / "reference"), str(statistics), str(gate), "local",
                            two_deploys["results"][1])
    kept = json.loads((tmp_path / "reference" / "serving.json").read_text())
    assert kept == record
    assert (kept["model"], kept["version"], kept["variant"]) == (NAME, 2, "int8")


def test_a_variant_with_other_tensors_is_refused_under_the_name_and_nothing_changes(
        two_deploys, workdir, test_path):
    repository = two_deploys["repository"]
    before = _snapshot(repository)
    wider = workdir / "run3" / "chosen"
    export_linear(wider / "structured" / "model.onnx", n_classes=5)
    with pytest.raises(UserInputError, match="under another serving_model_name") as refused:
        _deploy(wider, workdir / "run3" / "deploy", repository, test_path)
    assert f"'{NAME}' versions [1, 2] stay served" in str(refused.value)
    assert _snapshot(repository) == before


@pytest.mark.parametrize("name", ["a/b", ".hidden", ""])
def test_a_bad_serving_model_name_is_refused_before_the_run_in_one_line(pipeline_yaml, tmp_path,
                                                                        name):
    done = torchship("run", str(pipeline_yaml), "--pipeline-root", str(tmp_path / "runs"),
                     "--serving-model-name", name)
    assert done.returncode != 0
    refusal = (f"error: parameter serving_model_name={name!r} is not a valid Triton model name; "
               "pass up to 128 letters, digits, '_', '-' or '.', not starting with '.' or '-', "
               "e.g. 'torchship'")
    assert error_lines(done.stderr) == [refusal]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("prepare-data"))


def test_two_pipeline_runs_choosing_different_variants_serve_under_one_name(pipeline_yaml,
                                                                           tmp_path):
    """Two kfp.local runs of the pipeline, the first choosing fp32 and the second int8: one
    model, `digits`, versions 1 and 2, each saying its variant; a request naming no version is
    answered by version 2."""
    quick = ["--epochs", "3", "--finetune-epochs", "1", "--bench-duration", "1",
             "--concurrency", "1", "--max-accuracy-drop", "5", "--serving-model-name", NAME,
             "-p", "serving_instance_counts=[]", "-p", "serving_queue_delays_us=[]"]
    root = tmp_path / "runs"
    for version, variant in ((1, "fp32"), (2, "int8")):
        done = torchship("run", str(pipeline_yaml), "--pipeline-root", str(root),
                         "--variants", variant, *quick, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"deployed: {variant} as version {version} of model '{NAME}'" in done.stdout
    repository = root / "model_repository"
    assert [p.name for p in repository.iterdir() if p.is_dir()] == [NAME]
    assert {v: version_variant(repository / NAME, v) for v in (1, 2)} == {1: "fp32", 2: "int8"}
    x = load_split(str(next(root.rglob("prepare-data/test")))).inputs["input"][:4]
    with TritonServer(repository) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            infer_input = httpclient.InferInput("input", list(x.shape), "FP32")
            infer_input.set_data_from_numpy(x)
            answer = client.infer(NAME, [infer_input]).get_response()
        finally:
            client.close()
    assert answer["model_name"] == NAME and answer["model_version"] == "2"


@pytest.mark.parametrize("target", ["vertex", "kserve"])
def test_the_deployed_line_names_the_variant_deploy_served_not_the_gates(tmp_path, target):
    """The serving search may choose another variant than the gate's pick, and deploy serves the
    search's: a cloud target's `deployed:` line names that one, from the deploy task's
    model_repository metadata as kfp.local keeps it."""
    from torchship.pipelines.cli import _deployed_line

    run_dir = tmp_path / "torchship-2026-12-04-12-00-00-000000"
    (run_dir / "deploy").mkdir(parents=True)
    arguments = {"deploy_target": target, "serving_model_name": NAME}
    # Before the deploy task wrote its outputs (or an older layout): the gate's pick.
    assert _deployed_line("fp32", arguments, {}, run_dir) == \
        f"deployed: fp32 as model '{NAME}' ({target})"
    metadata = {"target": target, "model_name": NAME, "variant": "int8"}
    (run_dir / "deploy" / "executor_output.json").write_text(json.dumps({"artifacts": {
        "vertex_model": {"artifacts": [{"name": "vertex_model", "metadata": {"target": target}}]},
        "model_repository": {"artifacts": [{"name": "model_repository", "metadata": metadata}]},
    }}))
    assert _deployed_line("fp32", arguments, {}, run_dir) == \
        f"deployed: int8 as model '{NAME}' ({target})"
