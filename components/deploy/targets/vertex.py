"""Deploy stage, Vertex AI target: a Triton repository in Cloud Storage -> a new version in the Model
Registry -> a canary on an Endpoint, smoke-tested, rolled back on failure.

Why the ``google-cloud-aiplatform`` SDK inside the component and not the
``google_cloud_pipeline_components`` ops (``ModelUploadOp``, ``EndpointCreateOp``,
``ModelDeployOp``): those ops each run one API call as its own pipeline task, and a DAG cannot
express the decisions a safe canary needs between them: find the parent model to add a version to,
create the endpoint only when absent, remember the traffic split before the deploy, send requests
until the *new* deployed model has answered, and on a failed check undeploy it so the traffic goes
back to the models that served before. Here those steps are plain code with one error path, and the
same function is tested against a recorded fake of the Vertex AI REST API. The pipeline's deploy
task still outputs those ops' artifact types (``google.VertexModel``, ``google.VertexEndpoint``,
filled from the result) for Vertex AI's lineage.

The serving container is Triton (an NGC ``tritonserver`` image pushed to Artifact Registry; its
URI is a parameter). Vertex AI copies the model's ``artifact_uri`` (the repository's ``gs://``
URI) to ``AIP_STORAGE_URI`` and sets ``AIP_MODE=PREDICTION``, which makes Triton load that
repository and answer Vertex AI's predict route; ``X-Vertex-Ai-Triton-Redirect`` selects the Triton
API (``v2/models/<model>`` metadata, ``v2/models/<model>/infer``) for a ``rawPredict`` call carrying
KServe v2 JSON. Vertex AI says which deployed model answered in ``X-Vertex-AI-Deployed-Model-Id``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from torchship.components.contracts import MODEL_ONNX, ServingSettings
from torchship.components.deploy.registry import DeployTarget, register, remote_deploy
from torchship.components.deploy.smoke import (
    check_metadata,
    compare_outputs,
    load_samples,
    model_input,
    onnx_reference,
    rows_count,
    v2_outputs,
    v2_request,
)
from torchship.components.errors import ServingError, UserInputError
from torchship.components.triton.repository import (
    build_model_repository,
    validate_model_repository,
)
from torchship.components.triton.versions import version_variant

__all__ = ["DEPLOYED_MODEL_HEADER", "TRITON_REDIRECT_HEADER", "deploy_vertex", "gcs_uri",
           "resource_uri"]

DEPLOYED_MODEL_HEADER = "X-Vertex-AI-Deployed-Model-Id"
TRITON_REDIRECT_HEADER = "X-Vertex-Ai-Triton-Redirect"


def gcs_uri(repository_dir: str | os.PathLike, repository_uri: str | None = None) -> str:
    """The ``gs://`` URI of the repository: given, or read off a Cloud Storage FUSE path
    (``/gcs/<bucket>/...``, where Vertex AI Pipelines mounts the pipeline root)."""
    if repository_uri:
        uri = str(repository_uri).rstrip("/")
    else:
        path = Path(repository_dir).as_posix()
        uri = "gs://" + path[len("/gcs/") :] if path.startswith("/gcs/") else ""
    if not uri.startswith("gs://") or len(uri) <= len("gs://"):
        raise UserInputError(
            f"repository_uri: Vertex AI reads the model repository from Cloud Storage, but "
            f"{repository_uri or repository_dir} is not a gs:// URI; run the stage with a gs:// "
            "pipeline root or pass repository_uri=gs://..."
        )
    return uri


def deploy_vertex(
    repository_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    *,
    project: str,
    location: str,
    model_display_name: str,
    serving_image_uri: str,
    endpoint_display_name: str | None = None,
    machine_type: str = "n1-standard-4",
    accelerator_type: str | None = None,
    accelerator_count: int = 0,
    min_replicas: int = 1,
    max_replicas: int = 1,
    canary_percent: int = 10,
    alias: str = "candidate",
    promote: bool = False,
    repository_uri: str | None = None,
    onnx_dir: str | os.PathLike | None = None,
    serving: ServingSettings | None = None,
    model_name: str | None = None,
    parent_model: str | None = None,
    labels: dict[str, str] | None = None,
    n_samples: int = 32,
    atol: float = 1e-4,
    smoke_max_requests: int | None = None,
    request_timeout_s: float = 60.0,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Upload ``repository_dir`` (a ``backend="onnxruntime"`` repository) as a new version of the
    model named ``model_display_name``, deploy it next to what the endpoint serves with
    ``canary_percent`` of the traffic, and check it; undeploy it again if the check fails.

    ``onnx_dir``: build the repository there first (backend ``onnxruntime`` with ``serving``'s
    batching, instances and optional TensorRT FP16, ``KIND_GPU`` when an accelerator is given, a
    warmup sample from ``test_path``).
    ``repository_uri``: the repository's ``gs://`` URI (default: derived from a ``/gcs/`` path).
    The first version of a model, and the first model on an endpoint, get all the traffic.

    The check sends ``rawPredict`` requests until the new deployed model has answered: for each
    Triton model, its metadata must match the repository and its answers on ``n_samples`` rows of
    ``test_path`` must match ONNX Runtime within ``atol``. ``promote``: on success give the new
    deployed model all the traffic and make its version the model's default.

    On failure the new deployed model is undeployed with the endpoint's previous traffic split
    restored, the alias is taken off the new version, and ``ServingError`` says why. Returns
    ``{"model", "model_version", "model_version_name", "alias", "endpoint", "deployed_model_id",
    "traffic_split", "previous_traffic_split", "promoted", "models": {name: smoke results},
    "repository_uri", "passed"}``; ``model_version_name`` is the new version's resource name
    (``<model>@<version>``) and ``endpoint`` the endpoint's.
    """
    from google.cloud import aiplatform

    say = progress or (lambda _message: None)
    if not 1 <= int(canary_percent) <= 100:
        raise UserInputError(
            f"canary_percent: {canary_percent} must be 1-100 (the share of traffic the new version "
            "gets until it is promoted)"
        )
    if not 1 <= int(min_replicas) <= int(max_replicas):
        raise UserInputError(
            f"min_replicas/max_replicas: {min_replicas}/{max_replicas}; need 1 <= min <= max"
        )
    if bool(accelerator_type) != (int(accelerator_count) > 0):
        raise UserInputError(
            f"accelerator_type/accelerator_count: '{accelerator_type or ''}' x {accelerator_count}; "
            "give both (e.g. NVIDIA_TESLA_T4 x 1) or neither"
        )
    uri = gcs_uri(repository_dir, repository_uri)
    if onnx_dir is not None:
        serving = (serving or ServingSettings()).with_values(
            {"instance_kind": "KIND_GPU" if accelerator_type else "KIND_CPU"})
        build_model_repository(onnx_dir, repository_dir, "onnxruntime", serving,
                               warmup_path=test_path, model_name=model_name)
    models = validate_model_repository(repository_dir, backend="onnxruntime")
    x_all = load_samples(test_path, n_samples)
    where = {"project": project, "location": location}
    # The Model Registry version says which variant it is (a label value: [a-z0-9_-], 63 long).
    variant = version_variant(Path(repository_dir) / models[0]["name"], models[0]["version"])
    if variant:
        labels = {"variant": re.sub(r"[^a-z0-9_-]", "-", variant.lower())[:63], **(labels or {})}

    parent = parent_model or _find_parent(aiplatform, model_display_name, where)
    model = aiplatform.Model.upload(
        display_name=model_display_name,
        artifact_uri=uri,
        serving_container_image_uri=serving_image_uri,
        serving_container_command=["tritonserver"],
        serving_container_args=[
            f"--vertex-ai-default-model={models[0]['name']}",
            "--model-control-mode=none",
            "--strict-readiness=true",
        ],
        serving_container_ports=[8080],
        parent_model=parent,
        # The new version becomes the default only once it has passed (see promote).
        is_default_version=parent is None,
        version_aliases=[alias],
        labels={"torchship": "triton", **(labels or {})},
        sync=True,
        **where,
    )
    version = str(model.version_id)
    say(f"uploaded {uri} as {model.resource_name} version {version} (alias '{alias}')")

    endpoint_name = endpoint_display_name or model_display_name
    endpoint = _find_endpoint(aiplatform, endpoint_name, where)
    if endpoint is None:
        endpoint = aiplatform.Endpoint.create(
            display_name=endpoint_name, labels={"torchship": "triton"}, sync=True, **where
        )
        say(f"created endpoint {endpoint.resource_name}")
    before = {str(k): int(v) for k, v in (endpoint.traffic_split or {}).items() if int(v) > 0}
    before_ids = {d.id for d in endpoint.list_models()}
    share = int(canary_percent) if before else 100
    try:
        endpoint.deploy(
            model=model,
            deployed_model_display_name=f"{model_display_name}-v{version}",
            traffic_percentage=share,
            machine_type=machine_type,
            min_replica_count=int(min_replicas),
            max_replica_count=int(max_replicas),
            accelerator_type=accelerator_type or None,
            accelerator_count=int(accelerator_count) or None,
            sync=True,
        )
    except Exception as exc:
        note = _drop_alias(aiplatform, model, alias, version)
        raise ServingError(
            f"Vertex AI could not deploy {model.resource_name} version {version} to "
            f"{endpoint.resource_name} (traffic unchanged: {before}): {exc}{note}"
        ) from exc
    endpoint = aiplatform.Endpoint(endpoint.resource_name, **where)
    new_ids = [d.id for d in endpoint.list_models() if d.id not in before_ids]
    if len(new_ids) != 1:
        raise ServingError(
            f"endpoint {endpoint.resource_name}: expected one new deployed model after the deploy, "
            f"found {new_ids}; check the endpoint in the console"
        )
    new_id = new_ids[0]
    say(f"deployed as {new_id} on {endpoint.resource_name} with {share}% of the traffic")

    max_requests = smoke_max_requests or max(20, 20 * math.ceil(100 / share))
    try:
        smoke = _smoke(endpoint, new_id, models, Path(repository_dir), x_all, atol,
                       max_requests, request_timeout_s, location, say)
    except Exception as exc:
        _rollback(aiplatform, endpoint, new_id, before, where)
        note = _drop_alias(aiplatform, model, alias, version)
        kept = f"traffic stays on {before}" if before else "the endpoint serves nothing"
        raise ServingError(
            f"Vertex AI smoke test of {model.resource_name} version {version} (deployed model "
            f"{new_id}) failed; it was undeployed and {kept}: {exc}{note}"
        ) from exc

    if promote:
        endpoint.update(traffic_split={new_id: 100, **{k: 0 for k in before}})
        aiplatform.ModelRegistry(model, **where).add_version_aliases(["default"], version)
        say(f"promoted {new_id}: all traffic, version {version} is the default")
    endpoint = aiplatform.Endpoint(endpoint.resource_name, **where)
    return {
        "model": model.resource_name,
        "model_version": version,
        "model_version_name": f"{model.resource_name}@{version}",
        "alias": alias,
        "endpoint": endpoint.resource_name,
        "deployed_model_id": new_id,
        "traffic_split": {str(k): int(v) for k, v in endpoint.traffic_split.items()},
        "previous_traffic_split": before,
        "promoted": bool(promote),
        "models": smoke,
        "repository_uri": uri,
        "target": "vertex",
        "passed": True,
    }


def resource_uri(resource_name: str) -> str:
    """The URI of a Vertex AI resource (``projects/P/locations/L/...``) as the Google Cloud
    Pipeline Components write it in a ``google.VertexModel`` or ``google.VertexEndpoint``
    artifact: the resource's REST URL in its region."""
    location = resource_name.split("/")[3]
    return f"https://{location}-aiplatform.googleapis.com/v1/{resource_name}"


def _find_parent(aiplatform, display_name: str, where: dict) -> str | None:
    found = {
        m.resource_name
        for m in aiplatform.Model.list(filter=f'display_name="{display_name}"', **where)
        if m.display_name == display_name
    }
    if len(found) > 1:
        raise UserInputError(
            f"model_display_name: {len(found)} models are named '{display_name}' "
            f"({', '.join(sorted(found))}); pass parent_model= the one to add a version to"
        )
    return found.pop() if found else None


def _find_endpoint(aiplatform, display_name: str, where: dict):
    found = [
        e
        for e in aiplatform.Endpoint.list(filter=f'display_name="{display_name}"', **where)
        if e.display_name == display_name
    ]
    if len(found) > 1:
        names = ", ".join(sorted(e.resource_name for e in found))
        raise UserInputError(
            f"endpoint_display_name: {len(found)} endpoints are named '{display_name}' ({names}); "
            "rename all but one"
        )
    return found[0] if found else None


def _rollback(aiplatform, endpoint, new_id: str, before: dict, where: dict) -> None:
    """Undeploy the new deployed model and put the traffic back where it was."""
    endpoint = aiplatform.Endpoint(endpoint.resource_name, **where)
    endpoint.undeploy(new_id, traffic_split=before or None, sync=True)


def _drop_alias(aiplatform, model, alias: str, version: str) -> str:
    """Take the alias off a version that never served; a note when that failed too."""
    try:
        aiplatform.ModelRegistry(model).remove_version_aliases([alias], version)
    except Exception as exc:  # noqa: BLE001 - the failure being reported matters more
        return f" (alias '{alias}' still on version {version}: {exc})"
    return ""


def _raw_predict(endpoint, body: dict, redirect: str, timeout: float, location: str):
    """POST ``:rawPredict`` to the API endpoint ``aiplatform.init`` set up (REST), returning the
    status, the response headers and the body. (``Endpoint.raw_predict`` always goes to
    ``https://<location>-aiplatform.googleapis.com``.)"""
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud.aiplatform import initializer

    api = initializer.global_config.get_client_options(
        location_override=location, prediction_client=True
    ).api_endpoint
    base = api if "://" in api else f"https://{api}"
    session = AuthorizedSession(endpoint.credentials or initializer.global_config.credentials)
    try:
        response = session.post(
            f"{base.rstrip('/')}/v1/{endpoint.resource_name}:rawPredict",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", TRITON_REDIRECT_HEADER: redirect},
            timeout=timeout,
        )
    finally:
        session.close()
    return response.status_code, response.headers, response.content


def _smoke(endpoint, new_id, models, repository_dir, x_all, atol, max_requests, timeout,
           location, say) -> dict[str, dict]:
    def ask(body: dict, redirect: str) -> dict:
        """Send until the new deployed model answers; return its (200, JSON) answer."""
        seen: Counter = Counter()
        last = ""
        for _ in range(max_requests):
            status, headers, payload = _raw_predict(endpoint, body, redirect, timeout, location)
            answered_by = headers.get(DEPLOYED_MODEL_HEADER)
            if answered_by != new_id:
                seen[answered_by or f"none (HTTP {status})"] += 1
                last = payload[:200].decode(errors="replace")
                continue
            if status != 200:
                raise ServingError(
                    f"{redirect} answered HTTP {status}: {payload[:300].decode(errors='replace')}"
                )
            return json.loads(payload)
        raise ServingError(
            f"the new deployed model {new_id} answered none of {max_requests} requests to "
            f"{redirect} (answered by: {dict(seen)}; last body: {last!r})"
        )

    results = {}
    for model in models:
        name, version = model["name"], model["version"]
        check_metadata(model, ask({}, f"v2/models/{name}"), f"deployed model {new_id}")
        x = model_input(model, x_all)
        n = rows_count(x)
        expected = onnx_reference(repository_dir / name / str(version) / MODEL_ONNX, model, x)
        chunk = model["max_batch_size"] or n
        got: dict[str, list] = {o["name"]: [] for o in model["outputs"]}
        for start in range(0, n, chunk):
            part = {key: array[start : start + chunk] for key, array in x.items()}
            answer = v2_outputs(ask(v2_request(model, part), f"v2/models/{name}/infer"), model)
            for out, parts in got.items():
                parts.append(answer.get(out))
        if any(part is None for parts in got.values() for part in parts):
            missing = [out for out, parts in got.items() if any(p is None for p in parts)]
            raise ServingError(f"model '{name}' (deployed model {new_id}) returned no {missing}")
        merged = {out: np.concatenate(parts, axis=0) for out, parts in got.items()}
        diff = compare_outputs(model, merged, expected, atol, f"deployed model {new_id}")
        say(f"{name}: deployed model {new_id} matches ONNX Runtime (max |diff| {diff:.2g}, "
            f"{n} rows)")
        results[name] = {"max_abs_diff": diff, "n_samples": n, "ready": True,
                         "inputs": model["inputs"], "outputs": model["outputs"],
                         "max_batch_size": model["max_batch_size"]}
    return results


TARGET = register(DeployTarget(
    name="vertex", settings_of=deploy_vertex,
    deploy=remote_deploy(deploy_vertex, "repository_uri",
                         ("endpoint", "deployed_model_id", "promoted")),
    required_settings=("project", "location", "serving_image_uri"),
    name_setting="model_display_name",
    description="a new Model Registry version on a Vertex AI Endpoint (Triton serving image), "
                "as a canary that is smoke-tested and rolled back on failure",
))
