"""KServe target: the rendered InferenceService, its validation, the kept example, and a clear,
prompt error when no cluster can be reached (there is no Kubernetes cluster here)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import yaml
from artifacts import write_onnx_dir

from torchship.components.deploy.targets.kserve import deploy_kserve
from torchship.components.deploy.targets.kserve_api import (
    apply_inference_service,
    example_inference_service,
    inference_service_yaml,
    render_inference_service,
)
from torchship.components.errors import ServingError, UserInputError
from torchship.components.triton.versions import version_variant

EXAMPLE = Path(__file__).parents[1] / "infra" / "kserve" / "inferenceservice.yaml"
STORAGE = "gs://bucket/root/run/deploy/model_repository"


def test_rendered_inference_service_fields():
    manifest = render_inference_service(
        "torchship", "models", STORAGE, canary_percent=20,
        resources={"requests": {"cpu": "500m", "memory": "1Gi"},
                   "limits": {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}},
        min_replicas=1, max_replicas=4,
    )
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "torchship"
    assert manifest["metadata"]["namespace"] == "models"
    predictor = manifest["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 20
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 4)
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "onnx"}
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == "kserve-tritonserver"
    assert model["storageUri"] == STORAGE
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # No canary: the field is absent (KServe then sends all traffic to the new revision).
    plain = render_inference_service("torchship", "models", STORAGE)
    assert "canaryTrafficPercent" not in plain["spec"]["predictor"]
    assert plain["spec"]["predictor"]["model"]["resources"]["requests"] == {"cpu": "1",
                                                                            "memory": "2Gi"}
    assert yaml.safe_load(inference_service_yaml(manifest)) == manifest


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "Torch_Ship"}, "name"),
        ({"name": "1torchship"}, "name"),
        ({"namespace": "Models"}, "namespace"),
        ({"storage_uri": "/local/path"}, "storage_uri"),
        ({"storage_uri": "ftp://host/repo"}, "storage_uri"),
        ({"canary_percent": 101}, "canary_percent"),
        ({"resources": {"limits": {"cpu": "two"}}}, "resources"),
        ({"resources": {"limits": {"gpu": "1"}}}, "resources"),
        ({"resources": {"requests": {"nvidia.com/gpu": "1"}}}, "resources"),
        ({"resources": {"limit": {"cpu": "1"}}}, "resources"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"runtime": ""}, "runtime"),
    ],
)
def test_rendering_rejects_what_the_cluster_would(kwargs, field):
    args = {"name": "torchship", "namespace": "models", "storage_uri": STORAGE, **kwargs}
    with pytest.raises(UserInputError, match=rf"^{field}"):
        render_inference_service(**args)


def test_infra_example_is_the_rendered_manifest():
    assert yaml.safe_load(EXAMPLE.read_text()) == example_inference_service()


def _dead_kubeconfig(tmp_path: Path) -> tuple[Path, int]:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "dead", "user": {"token": "not-a-token"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "dead"}}],
    }))
    return path, port


def test_apply_without_a_reachable_cluster_is_one_clear_line(tmp_path):
    kubeconfig, port = _dead_kubeconfig(tmp_path)
    manifest = render_inference_service("torchship", "models", STORAGE)
    started = time.monotonic()
    with pytest.raises(ServingError) as excinfo:
        apply_inference_service(manifest, kubeconfig, timeout_s=5)
    assert time.monotonic() - started < 20
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"https://127.0.0.1:{port}" in message and "unreachable" in message

    with pytest.raises(UserInputError, match="^kubeconfig: .* does not exist"):
        apply_inference_service(manifest, tmp_path / "missing")


def test_apply_without_any_cluster_configured(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    manifest = render_inference_service("torchship", "models", STORAGE)
    with pytest.raises(UserInputError, match="^kubeconfig: no Kubernetes cluster is configured"):
        apply_inference_service(manifest)


def test_deploy_kserve_builds_and_fails_clearly_without_a_cluster(tmp_path, test_path):
    write_onnx_dir(tmp_path / "onnx")
    kubeconfig, _ = _dead_kubeconfig(tmp_path)
    repository = tmp_path / "model_repository"
    started = time.monotonic()
    with pytest.raises(ServingError, match="unreachable"):
        deploy_kserve(repository, test_path, name="torchship", namespace="models",
                      storage_uri=STORAGE, onnx_dir=tmp_path / "onnx", kubeconfig=kubeconfig,
                      api_timeout_s=5, progress=None)
    assert time.monotonic() - started < 30
    # The repository it would serve was built for the Triton container (ONNX Runtime).
    assert "onnxruntime_onnx" in (repository / "fp32" / "config.pbtxt").read_text()


def test_deploy_to_kserve_builds_the_repository_with_the_serving_search_settings(
        tmp_path, test_path):
    from torchship.components.deploy.stage import deploy_to
    from torchship.components.triton.config import read_model_config

    write_onnx_dir(tmp_path / "onnx")
    kubeconfig, _ = _dead_kubeconfig(tmp_path)
    repository = tmp_path / "model_repository"
    # No name setting: the InferenceService is named after the serving model name.
    settings = {"namespace": "models", "kubeconfig": str(kubeconfig), "api_timeout_s": 5}
    with pytest.raises(ServingError, match="unreachable") as failed:
        deploy_to("kserve", tmp_path / "onnx", repository, STORAGE, test_path, settings=settings,
                  serving={"instance_count": 2, "max_queue_delay_us": 2000},
                  model_name="digits-classifier", progress=lambda _line: None)
    assert "models/digits-classifier" in str(failed.value)
    # The Triton model inside is that name too, whichever variant; its version says which.
    assert [p.name for p in repository.iterdir()] == ["digits-classifier"]
    config = read_model_config(repository / "digits-classifier" / "config.pbtxt")
    assert config.name == "digits-classifier" and config.platform == "onnxruntime_onnx"
    assert config.instance_group[0].count == 2
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert version_variant(repository / "digits-classifier", 1) == "fp32"


def test_a_serving_model_name_kserve_would_refuse_is_refused_up_front():
    from torchship.components.deploy.stage import check_serving_model_name

    with pytest.raises(UserInputError, match=r"^parameter serving_model_name='Digits_v2' also "
                       r"names the kserve target's name, .* or give deploy_settings name$"):
        check_serving_model_name("Digits_v2", "kserve", {"namespace": "models"})
    # With its own InferenceService name, any Triton model name will do.
    check_serving_model_name("Digits_v2", "kserve", {"namespace": "models", "name": "digits"})
    check_serving_model_name("Digits_v2", "local")


def test_the_rbac_lets_the_pipeline_pod_make_every_call_the_deploy_step_makes():
    """infra/kserve/rbac.yaml: the pipeline's service account, bound in the serving namespace to
    a Role whose verbs cover each Kubernetes call in kserve_api.py, on InferenceServices only."""
    import re

    import yaml

    from torchship.components.deploy.targets import kserve_api

    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(
        (EXAMPLE.parent / "rbac.yaml").read_text())}
    account, role, binding = (documents[k] for k in ("ServiceAccount", "Role", "RoleBinding"))
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    assert binding["metadata"]["namespace"] == role["metadata"]["namespace"]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert {group for group, _, _ in granted} == {kserve_api.GROUP}
    calls = set(re.findall(r"api\.(\w+?)_namespaced_custom_object",
                           Path(kserve_api.__file__).read_text()))
    assert calls and calls <= {"get", "create", "patch", "delete", "list", "replace"}
    verbs = {"get": "get", "create": "create", "patch": "patch", "delete": "delete",
             "list": "list", "replace": "update"}
    for call in calls:
        assert (kserve_api.GROUP, kserve_api.PLURAL, verbs[call]) in granted, call
