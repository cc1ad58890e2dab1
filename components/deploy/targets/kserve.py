"""Deploy stage, KServe target: a KServe ``InferenceService`` serving the Triton repository with the
``kserve-tritonserver`` runtime, rolled out as a canary and promoted only after a smoke test.

``render_inference_service`` writes the manifest (``modelFormat: onnx``, ``protocolVersion: v2``,
``runtime: kserve-tritonserver``, ``storageUri``, resources, ``canaryTrafficPercent``);
``apply_inference_service`` creates or patches it with the Kubernetes Python client
(``CustomObjectsApi``); ``deploy_kserve`` does both, waits for the new revision to be ready, runs
the smoke test against it over KServe v2 HTTP, and then promotes it (``canaryTrafficPercent``
removed: all traffic) or rolls it back (``canaryTrafficPercent: 0``: all traffic stays on the
revision that served before; a service this deploy created is deleted). Canary rollouts need
KServe's Serverless (Knative) mode. ``infra/kserve/inferenceservice.yaml`` is the rendered example.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from torchship.components.contracts import MODEL_ONNX, ServingSettings
from torchship.components.deploy.registry import DeployTarget, register, remote_deploy
from torchship.components.deploy.smoke import load_samples, smoke_test_server
from torchship.components.deploy.targets.kserve_api import (
    apply_inference_service,
    delete_inference_service,
    get_inference_service,
    inference_service_yaml,
    is_service_name,
    ready,
    render_inference_service,
    revision_url,
    set_canary_traffic,
)
from torchship.components.errors import ServingError
from torchship.components.files import write_text
from torchship.components.triton.repository import (
    build_model_repository,
    validate_model_repository,
)

__all__ = ["deploy_kserve"]


def deploy_kserve(
    repository_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    *,
    name: str,
    namespace: str,
    storage_uri: str,
    canary_percent: int = 10,
    promote: bool = True,
    resources: dict[str, dict[str, str]] | None = None,
    runtime: str = "kserve-tritonserver",
    min_replicas: int = 1,
    max_replicas: int = 1,
    service_account: str | None = None,
    kubeconfig: str | os.PathLike | None = None,
    context: str | None = None,
    onnx_dir: str | os.PathLike | None = None,
    serving: ServingSettings | None = None,
    model_name: str | None = None,
    manifest_path: str | os.PathLike | None = None,
    smoke_url: str | None = None,
    ready_timeout_s: float = 900.0,
    api_timeout_s: float = 30.0,
    n_samples: int = 32,
    atol: float = 1e-4,
    request_timeout_s: float = 30.0,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Roll the repository at ``storage_uri`` (a local copy at ``repository_dir``, built from
    ``onnx_dir`` when given, with ``serving``'s batching and instances in its model config, the
    model named ``model_name`` when given, else after its variant) out
    as an ``InferenceService``: a canary of
    ``canary_percent`` when the service exists, else a new service; wait until ready, smoke-test
    the new revision, then promote it (``promote``) or leave the canary; on failure roll back (see
    the module docstring) and raise ``ServingError`` with the reason. ``manifest_path``: also
    write the applied manifest there (YAML). Returns ``{"name", "namespace", "manifest", "url",
    "models", "promoted", "canary_percent", "passed"}``."""
    say = progress or (lambda _message: None)
    if onnx_dir is not None:
        gpu = any("nvidia.com/gpu" in (v or {}) for v in (resources or {}).values())
        serving = (serving or ServingSettings()).with_values(
            {"instance_kind": "KIND_GPU" if gpu else "KIND_CPU"})
        build_model_repository(onnx_dir, repository_dir, "onnxruntime", serving,
                               warmup_path=test_path, model_name=model_name)
    models = validate_model_repository(repository_dir, backend="onnxruntime")
    x_all = load_samples(test_path, n_samples)
    kube = {"kubeconfig": kubeconfig, "context": context, "timeout_s": api_timeout_s}
    # Render first: a bad field is the user's to fix before any cluster call.
    render_inference_service(name, namespace, storage_uri, canary_percent, resources, runtime,
                             min_replicas=min_replicas, max_replicas=max_replicas,
                             service_account=service_account)
    existing = get_inference_service(name, namespace, **kube)
    canary = int(canary_percent) if existing is not None else None
    manifest = render_inference_service(
        name, namespace, storage_uri, canary, resources, runtime, min_replicas=min_replicas,
        max_replicas=max_replicas, service_account=service_account,
    )
    if manifest_path is not None:
        write_text(manifest_path, inference_service_yaml(manifest))
    apply_inference_service(manifest, **kube)
    say(f"applied InferenceService {namespace}/{name} "
        f"({f'{canary}% canary' if canary is not None else 'new service'})")

    try:
        deadline = time.monotonic() + float(ready_timeout_s)
        while True:
            service = get_inference_service(name, namespace, **kube) or {}
            is_ready, why = ready(service)
            if is_ready:
                break
            if time.monotonic() > deadline:
                raise ServingError(
                    f"InferenceService {namespace}/{name} not ready after {ready_timeout_s:.0f} s: "
                    f"{why}"
                )
            time.sleep(5.0)
        url = urlparse(smoke_url or revision_url(service))
        for model in models:
            model["onnx_path"] = str(Path(repository_dir) / model["name"] / str(model["version"])
                                     / MODEL_ONNX)
        port = url.port or (443 if url.scheme == "https" else 80)
        smoke = smoke_test_server(
            models, x_all, http_url=f"{url.hostname}:{port}", http_ssl=url.scheme == "https",
            atol=atol, request_timeout_s=request_timeout_s, progress=say,
        )
    except Exception as exc:
        if existing is not None:
            set_canary_traffic(name, namespace, 0, **kube)
            state = "the canary was rolled back to 0%; the previous revision serves all traffic"
        else:
            delete_inference_service(name, namespace, **kube)
            state = "the new InferenceService was deleted"
        raise ServingError(
            f"KServe deploy of {namespace}/{name} failed and was not promoted ({state}): {exc}"
        ) from exc
    if promote and canary is not None:
        set_canary_traffic(name, namespace, None, **kube)
        say(f"promoted {namespace}/{name}: the new revision serves all traffic")
    return {
        "name": name,
        "namespace": namespace,
        "manifest": manifest,
        "url": url.geturl(),
        "models": smoke,
        "promoted": bool(promote or canary is None),
        "canary_percent": canary,
        "target": "kserve",
        "passed": True,
    }


TARGET = register(DeployTarget(
    name="kserve", settings_of=deploy_kserve,
    deploy=remote_deploy(deploy_kserve, "storage_uri", ("name", "url", "promoted")),
    required_settings=("namespace",), name_setting="name",
    name_rule=(is_service_name,
               "at most 63 lower-case letters, digits and '-', starting with a letter"),
    description="a KServe InferenceService (kserve-tritonserver runtime) rolled out as a canary, "
                "smoke-tested, then promoted or rolled back",
))
