"""Vertex AI deploy with the real google-cloud-aiplatform SDK against the local fake of the REST API:
new versions of one parent model, an endpoint created once, a canary split, rollback on a failed
smoke test. The fake routes ``rawPredict`` by the traffic split; what a deployed model answers is
computed here with ONNX Runtime on the repository that version was uploaded from (as the Triton
container would)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from artifacts import write_onnx_dir
from fake_vertex import FakeVertex, Request
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform
from google.cloud.aiplatform_v1.types import AcceleratorType

from torchship.components.deploy.targets.vertex import deploy_vertex, gcs_uri
from torchship.components.errors import ServingError, UserInputError
from torchship.components.triton.config import read_model_config
from torchship.components.triton.repository import build_model_repository

PROJECT, REGION = "torchship-test", "us-central1"
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/serving/tritonserver:24.10-py3"
BUCKET = "gs://torchship-test-pipelines/root"
PARENT = f"/v1/projects/{PROJECT}/locations/{REGION}"
V2_TYPES = {"TYPE_FP32": "FP32"}


class TritonOnVertex:
    """What the Triton container behind each deployed model answers: metadata from the uploaded
    repository's config, inference with ONNX Runtime on its model file. ``wrong`` lists the
    artifact URIs whose container answers wrongly (a broken version)."""

    def __init__(self, fake: FakeVertex):
        self.fake = fake
        self.local: dict[str, Path] = {}  # artifact URI -> local repository
        self.wrong: set[str] = set()
        self.answered: list[str] = []  # deployed model IDs, in order

    def __call__(self, request: Request, endpoint: dict, deployed: dict) -> tuple[int, dict]:
        import onnxruntime as ort

        self.answered.append(deployed["id"])
        uri = self.fake.resources[deployed["model"]]["artifactUri"]
        repository = self.local[uri]
        redirect = request.headers["X-Vertex-Ai-Triton-Redirect"]
        name, _, action = redirect.removeprefix("v2/models/").partition("/")
        config = read_model_config(repository / name / "config.pbtxt")
        version = str(max(config.version_policy.specific.versions))
        if action == "":
            def tensors(items):
                return [{"name": t.name, "datatype": "FP32", "shape": [-1, *t.dims]}
                        for t in items]
            return 200, {"name": name, "versions": [version], "platform": config.platform,
                         "inputs": tensors(config.input), "outputs": tensors(config.output)}
        assert action == "infer", redirect
        (tensor,) = request.body["inputs"]
        x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        session = ort.InferenceSession(str(repository / name / version / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {"input": x})[0] + (1.0 if uri in self.wrong else 0.0)
        return 200, {"model_name": name, "model_version": version, "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": list(logits.shape),
             "data": logits.reshape(-1).tolist()}]}


@pytest.fixture
def fake():
    with FakeVertex() as server:
        aiplatform.init(project=PROJECT, location=REGION, credentials=AnonymousCredentials(),
                        api_endpoint=server.endpoint, api_transport="rest")
        yield server


def _deploy(tmp_path: Path, test_path: Path, triton: TritonOnVertex, run: int, **overrides):
    repository = tmp_path / f"run{run}" / "model_repository"
    uri = f"{BUCKET}/run{run}/model_repository"
    triton.local[uri] = repository
    options = {
        "project": PROJECT, "location": REGION, "model_display_name": "torchship",
        "serving_image_uri": IMAGE, "endpoint_display_name": "torchship-endpoint",
        "machine_type": "n1-standard-8", "accelerator_type": "NVIDIA_TESLA_T4",
        "accelerator_count": 1, "min_replicas": 1, "max_replicas": 3, "canary_percent": 10,
        "alias": f"run{run}", "repository_uri": uri,
        "onnx_dir": write_onnx_dir(tmp_path / f"onnx{run}", run), "progress": None,
        **overrides,
    }
    return deploy_vertex(repository, test_path, **options), uri


def test_versions_canary_and_rollback(fake, tmp_path, test_path):
    triton = TritonOnVertex(fake)
    fake.raw_predict = triton

    # First deploy: a new model and a new endpoint; all traffic to it.
    first, uri1 = _deploy(tmp_path, test_path, triton, 1)
    [upload] = fake.calls("POST", rf"^{PARENT}/models:upload$")
    model = upload.body["model"]
    assert model["artifactUri"] == uri1
    assert model["containerSpec"]["imageUri"] == IMAGE
    assert model["containerSpec"]["command"] == ["tritonserver"]
    assert "--vertex-ai-default-model=fp32" in model["containerSpec"]["args"]
    assert "parentModel" not in upload.body
    assert "run1" in model["versionAliases"]
    assert len(fake.calls("POST", rf"^{PARENT}/endpoints$")) == 1
    [deploy] = fake.calls("POST", r"endpoints/\d+:deployModel$")
    resources = deploy.body["deployedModel"]["dedicatedResources"]
    # (The SDK sends enums as numbers: `$alt=json;enum-encoding=int`.)
    assert resources["machineSpec"] == {"machineType": "n1-standard-8",
                                        "acceleratorType": AcceleratorType.NVIDIA_TESLA_T4.value,
                                        "acceleratorCount": 1}
    assert (resources["minReplicaCount"], resources["maxReplicaCount"]) == (1, 3)
    assert deploy.body["trafficSplit"] == {"0": 100}
    old_id = first["deployed_model_id"]
    assert first["traffic_split"] == {old_id: 100} and first["passed"]
    assert first["models"]["fp32"]["max_abs_diff"] <= 1e-4
    # The repository built for Vertex AI is the production form: ONNX Runtime on GPU instances.
    config = read_model_config(tmp_path / "run1" / "model_repository" / "fp32" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == 1  # KIND_GPU

    # Second deploy: a version of the same parent model, the same endpoint, a 10% canary.
    second, uri2 = _deploy(tmp_path, test_path, triton, 2)
    upload = fake.calls("POST", rf"^{PARENT}/models:upload$")[-1]
    assert upload.body["parentModel"] == first["model"] and second["model"] == first["model"]
    assert upload.body["model"]["artifactUri"] == uri2
    assert upload.body["model"]["versionAliases"] == ["run2"]  # not the default until promoted
    assert second["model_version"] == "2"
    assert len(fake.calls("POST", rf"^{PARENT}/endpoints$")) == 1  # found, not created again
    deploy = fake.calls("POST", r"endpoints/\d+:deployModel$")[-1]
    assert deploy.body["trafficSplit"] == {"0": 10, old_id: 90}
    new_id = second["deployed_model_id"]
    assert second["traffic_split"] == {old_id: 90, new_id: 10}
    assert new_id in triton.answered  # the smoke test reached the canary itself

    # Third deploy: the new version answers wrongly; it is undeployed, traffic as before.
    triton.wrong.add(f"{BUCKET}/run3/model_repository")
    endpoint_name = second["endpoint"]
    with pytest.raises(ServingError) as failed:
        _deploy(tmp_path, test_path, triton, 3)
    message = str(failed.value)
    assert "differs from ONNX Runtime" in message and "undeployed" in message
    [undeploy] = fake.calls("POST", r"endpoints/\d+:undeployModel$")
    bad_id = undeploy.body["deployedModelId"]
    assert bad_id not in (old_id, new_id)
    assert undeploy.body["trafficSplit"] == {old_id: 90, new_id: 10}
    endpoint = fake.resources[endpoint_name]
    assert endpoint["trafficSplit"] == {old_id: 90, new_id: 10}
    assert [d["id"] for d in endpoint["deployedModels"]] == [old_id, new_id]
    # The failed version is registered (nothing is lost) but carries no alias.
    assert fake.resources[f"{first['model']}@3"]["versionAliases"] == []
    assert "run2" in fake.resources[f"{first['model']}@2"]["versionAliases"]


def test_promote_moves_traffic_and_default(fake, tmp_path, test_path):
    triton = TritonOnVertex(fake)
    fake.raw_predict = triton
    first, _ = _deploy(tmp_path, test_path, triton, 1, accelerator_type=None,
                       accelerator_count=0)
    second, _ = _deploy(tmp_path, test_path, triton, 2, accelerator_type=None,
                        accelerator_count=0, promote=True)
    assert second["promoted"]
    assert second["traffic_split"][second["deployed_model_id"]] == 100
    assert second["traffic_split"].get(first["deployed_model_id"], 0) == 0
    assert "default" in fake.resources[f"{first['model']}@2"]["versionAliases"]
    assert "default" not in fake.resources[f"{first['model']}@1"]["versionAliases"]
    [deploy, _] = fake.calls("POST", r"endpoints/\d+:deployModel$")
    assert "machineSpec" in deploy.body["deployedModel"]["dedicatedResources"]
    assert "acceleratorType" not in deploy.body["deployedModel"]["dedicatedResources"][
        "machineSpec"]


def test_bad_inputs_fail_before_any_call(fake, tmp_path, test_path):
    repository = tmp_path / "repo"
    build_model_repository(write_onnx_dir(tmp_path / "onnx", 1), repository, "onnxruntime")
    common = {"project": PROJECT, "location": REGION, "model_display_name": "torchship",
              "serving_image_uri": IMAGE, "progress": None}
    with pytest.raises(UserInputError, match="repository_uri"):
        deploy_vertex(repository, test_path, **common)
    with pytest.raises(UserInputError, match="canary_percent"):
        deploy_vertex(repository, test_path, canary_percent=0, repository_uri=BUCKET, **common)
    with pytest.raises(UserInputError, match="accelerator"):
        deploy_vertex(repository, test_path, accelerator_type="NVIDIA_TESLA_T4",
                      repository_uri=BUCKET, **common)
    local = tmp_path / "local_repo"
    build_model_repository(tmp_path / "onnx", local, "python")
    with pytest.raises(UserInputError, match="not the 'onnxruntime' backend"):
        deploy_vertex(local, test_path, repository_uri=BUCKET, **common)
    assert fake.requests == []
    assert gcs_uri("/gcs/bucket/run/model_repository") == "gs://bucket/run/model_repository"


def test_deploy_component_names_the_model_version_and_endpoint_for_lineage(fake, tmp_path,
                                                                           test_path):
    """The pipeline's deploy component, called as KFP's executor would: its google.VertexModel
    and google.VertexEndpoint outputs name what the deploy created, as GCPC's ops write them."""
    import json

    from google_cloud_pipeline_components.types.artifact_types import VertexEndpoint, VertexModel
    from kfp.dsl import Artifact, Dataset, Model

    from torchship.pipelines.components_release import deploy

    triton = TritonOnVertex(fake)
    fake.raw_predict = triton
    uri = f"{BUCKET}/run1/model_repository"
    model_repository = Artifact(name="model_repository", uri=str(tmp_path / "model_repository"))
    triton.local[uri] = Path(model_repository.path)
    serving_record = tmp_path / "serving_record.json"
    serving_record.write_text(json.dumps({"settings": {}}))
    outputs = {name: kind(name=name, uri=f"{BUCKET}/run1/{name}", metadata={})
               for name, kind in (("vertex_model", VertexModel),
                                  ("vertex_endpoint", VertexEndpoint))}
    deploy(chosen_model=Model(uri=str(write_onnx_dir(tmp_path / "onnx", 1))),
           test=Dataset(uri=str(test_path)), serving_record=Artifact(uri=str(serving_record)),
           statistics=Artifact(uri=""), gate_record=Artifact(uri=""), target="vertex",
           local_repository="", reference_uri="", serving_model_name="torchship",
           settings={"project": PROJECT, "location": REGION, "serving_image_uri": IMAGE,
                     "repository_uri": uri},
           model_repository=model_repository, **outputs)

    [version] = [name for name in fake.resources if "/models/" in name and "@" in name]
    [endpoint] = [name for name in fake.resources if "/endpoints/" in name]
    assert version.endswith("@1")
    for artifact, name in ((outputs["vertex_model"], version),
                           (outputs["vertex_endpoint"], endpoint)):
        assert artifact.metadata == {"target": "vertex", "resourceName": name}
        assert artifact.uri == f"https://{REGION}-aiplatform.googleapis.com/v1/{name}"
    assert model_repository.metadata["endpoint"] == endpoint
