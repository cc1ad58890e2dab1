"""Lineage on Vertex AI: the deploy component outputs Vertex AI's own artifact types
(google.VertexModel, google.VertexEndpoint), so the console links a run to the model version and
the endpoint it deployed. Their metadata from a vertex deploy: tests/test_deploy_vertex.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
import yaml
from google_cloud_pipeline_components.types.artifact_types import VertexEndpoint, VertexModel
from kfp.dsl import Artifact, Dataset, Model

from torchship.pipelines.pipeline import PLATFORMS, compile_pipeline

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT_TYPES = "google_cloud_pipeline_components.types.artifact_types"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_compiled_deploy_outputs_vertex_ai_artifact_types(tmp_path, platform):
    spec = yaml.safe_load(compile_pipeline(tmp_path / "pipeline.yaml", image="img:1",
                                           platform=platform).read_text())
    outputs = spec["components"]["comp-deploy"]["outputDefinitions"]["artifacts"]
    assert {name: output["artifactType"]["schemaTitle"] for name, output in outputs.items()} == {
        "model_repository": "system.Artifact", "vertex_model": "google.VertexModel",
        "vertex_endpoint": "google.VertexEndpoint"}
    # The executor imports the types' module (KFP adds the import for a custom artifact type),
    # which the image installs from pyproject.toml's dependencies.
    program = spec["deploymentSpec"]["executors"]["exec-deploy"]["container"]["command"][-1]
    for kind in ("VertexModel", "VertexEndpoint"):
        assert f"from {ARTIFACT_TYPES} import {kind}" in program.splitlines()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("google-cloud-pipeline-components==") for d in dependencies)


def test_other_targets_leave_the_vertex_ai_artifacts_empty_but_for_the_target(tmp_path,
                                                                             test_path):
    """A real local deploy (Triton started, smoke-tested) through the deploy component: the
    Vertex AI artifacts say only the target, and nothing is written to them."""
    from artifacts import write_onnx_dir

    from torchship.pipelines.components_release import deploy

    serving_record = tmp_path / "serving_record.json"
    serving_record.write_text(json.dumps({"settings": {}}))
    outputs = {name: kind(name=name, uri=str(tmp_path / name), metadata={})
               for name, kind in (("vertex_model", VertexModel),
                                  ("vertex_endpoint", VertexEndpoint))}
    model_repository = Artifact(name="model_repository", uri=str(tmp_path / "model_repository"))
    deploy(chosen_model=Model(uri=str(write_onnx_dir(tmp_path / "onnx", 1))),
           test=Dataset(uri=str(test_path)), serving_record=Artifact(uri=str(serving_record)),
           statistics=Artifact(uri=""), gate_record=Artifact(uri=""), target="local",
           local_repository=str(tmp_path / "served"), settings={}, reference_uri="",
           serving_model_name="torchship", model_repository=model_repository, **outputs)
    assert model_repository.metadata["target"] == "local"
    assert (tmp_path / "served" / "torchship" / "1").is_dir()
    for name, artifact in outputs.items():
        assert artifact.metadata == {"target": "local"}
        assert artifact.uri == str(tmp_path / name) and not (tmp_path / name).exists()
