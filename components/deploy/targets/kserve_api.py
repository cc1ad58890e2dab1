"""The KServe ``InferenceService`` of a Triton repository: the manifest (rendered and checked as
Kubernetes and KServe would), and the Kubernetes API calls that apply, read, patch and delete it,
each bounded in time. ``infra/kserve/inferenceservice.yaml`` is ``example_inference_service()``."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from torchship.components.errors import ServingError, UserInputError

__all__ = [
    "apply_inference_service",
    "delete_inference_service",
    "example_inference_service",
    "get_inference_service",
    "inference_service_yaml",
    "is_service_name",
    "ready",
    "render_inference_service",
    "revision_url",
    "set_canary_traffic",
]

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
DEFAULT_RESOURCES = {
    "requests": {"cpu": "1", "memory": "2Gi"},
    "limits": {"cpu": "2", "memory": "4Gi"},
}
STORAGE_SCHEMES = ("gs", "s3", "pvc", "http", "https", "hdfs", "webhdfs", "oci")
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?")


def is_service_name(name: str) -> bool:
    """Whether Kubernetes takes `name` as an InferenceService's name (a DNS-1035 label)."""
    return len(name) <= 63 and bool(_DNS_1035.fullmatch(name))


def render_inference_service(
    name: str,
    namespace: str,
    storage_uri: str,
    canary_percent: int | None = None,
    resources: dict[str, dict[str, str]] | None = None,
    runtime: str = "kserve-tritonserver",
    *,
    min_replicas: int = 1,
    max_replicas: int = 1,
    service_account: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict:
    """An ``InferenceService`` (``serving.kserve.io/v1beta1``) for a Triton model repository.

    ``canary_percent``: the share of traffic the new revision gets while the previous one keeps
    the rest (``None``: no canary, the new revision takes all traffic once ready). ``resources``:
    Kubernetes ``requests``/``limits`` (``nvidia.com/gpu`` for GPUs). Tag routing is on, so the
    new revision also answers at its own ``latest-`` URL for the smoke test. Raises
    ``UserInputError`` naming the field that KServe or Kubernetes would reject.
    """
    if not is_service_name(name):
        raise UserInputError(
            f"name: '{name}' is not a valid InferenceService name; use at most 63 lower-case "
            "letters, digits and '-', starting with a letter"
        )
    if not (len(namespace) <= 63 and _DNS_1123.fullmatch(namespace)):
        raise UserInputError(
            f"namespace: '{namespace}' is not a valid Kubernetes namespace; use lower-case "
            "letters, digits and '-'"
        )
    scheme = urlparse(storage_uri).scheme
    if scheme not in STORAGE_SCHEMES or not urlparse(storage_uri).netloc:
        raise UserInputError(
            f"storage_uri: '{storage_uri}' is not one KServe's storage initializer can fetch; use "
            f"one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}"
        )
    if canary_percent is not None and not 0 <= int(canary_percent) <= 100:
        raise UserInputError(f"canary_percent: {canary_percent} must be 0-100 (or None)")
    if not 0 <= int(min_replicas) <= int(max_replicas) or int(max_replicas) < 1:
        raise UserInputError(
            f"min_replicas/max_replicas: {min_replicas}/{max_replicas}; need 0 <= min <= max, "
            "max >= 1"
        )
    if not runtime:
        raise UserInputError("runtime: empty; use kserve-tritonserver (or your ServingRuntime)")
    resources = _check_resources(DEFAULT_RESOURCES if resources is None else resources)

    predictor: dict = {"minReplicas": int(min_replicas), "maxReplicas": int(max_replicas)}
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = int(canary_percent)
    if service_account:
        predictor["serviceAccountName"] = service_account
    predictor["model"] = {
        "modelFormat": {"name": "onnx"},
        "protocolVersion": "v2",
        "runtime": runtime,
        "storageUri": storage_uri,
        "resources": resources,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "torchship", **(labels or {})},
            "annotations": {"serving.kserve.io/enable-tag-routing": "true"},
        },
        "spec": {"predictor": predictor},
    }


def _check_resources(resources: dict) -> dict:
    unknown = set(resources) - {"requests", "limits"}
    if unknown:
        raise UserInputError(
            f"resources: unknown keys {sorted(unknown)}; give 'requests' and/or 'limits'"
        )
    checked: dict[str, dict[str, str]] = {}
    for kind, amounts in resources.items():
        checked[kind] = {}
        for resource, amount in (amounts or {}).items():
            if resource not in ("cpu", "memory", "ephemeral-storage") and "/" not in resource:
                raise UserInputError(
                    f"resources: '{resource}' in {kind} is not a Kubernetes resource name "
                    "(cpu, memory, nvidia.com/gpu, ...)"
                )
            text = str(amount)
            if not _QUANTITY.fullmatch(text):
                raise UserInputError(
                    f"resources: {kind}.{resource} = '{amount}' is not a Kubernetes quantity "
                    "(e.g. 500m, 2, 4Gi)"
                )
            if resource == "nvidia.com/gpu" and not text.isdigit():
                raise UserInputError(f"resources: {kind}.nvidia.com/gpu = '{amount}' must be whole")
            checked[kind][resource] = text
    gpus = {kind: amounts.get("nvidia.com/gpu") for kind, amounts in checked.items()}
    if gpus.get("requests") and gpus.get("requests") != gpus.get("limits"):
        raise UserInputError("resources: nvidia.com/gpu requests must equal its limits")
    return checked


def inference_service_yaml(manifest: dict) -> str:
    """The manifest as YAML, fields in the order Kubernetes shows them."""
    import yaml

    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)


def example_inference_service() -> dict:
    """The manifest kept as ``infra/kserve/inferenceservice.yaml`` (a 10% canary on a T4)."""
    return render_inference_service(
        "torchship",
        "kubeflow-user-example-com",
        "gs://YOUR_BUCKET/pipeline-root/RUN/deploy/model_repository",
        canary_percent=10,
        resources={
            "requests": {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"},
            "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
        },
        min_replicas=1,
        max_replicas=3,
        service_account="torchship-serving",
    )


# -- the Kubernetes API ---------------------------------------------------------------------------


def _api(kubeconfig: str | os.PathLike | None, context: str | None):
    """A ``CustomObjectsApi`` for the cluster: ``kubeconfig``, else in-cluster, else
    ``$KUBECONFIG`` / ``~/.kube/config``. Requests are not retried (the caller bounds time)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is not None:
        if not Path(kubeconfig).is_file():
            raise UserInputError(
                f"kubeconfig: {kubeconfig} does not exist; pass the kubeconfig of the cluster "
                "that runs KServe"
            )
        sources = [("file", str(kubeconfig))]
    else:
        default = Path(os.path.expanduser(os.environ.get("KUBECONFIG", "~/.kube/config")))
        sources = [("in-cluster", None)] + ([("file", str(default))] if default.is_file() else [])
    errors = []
    for kind, path in sources:
        try:
            if kind == "in-cluster":
                config.load_incluster_config(client_configuration=configuration)
            else:
                config.load_kube_config(config_file=path, context=context,
                                        client_configuration=configuration, persist_config=False)
            break
        except (config.ConfigException, OSError, ValueError, TypeError) as exc:
            errors.append(f"{kind}: {' '.join(str(exc).split())}")
    else:
        raise UserInputError(
            "kubeconfig: no Kubernetes cluster is configured (" + "; ".join(errors or [
                "not running in a cluster, no $KUBECONFIG or ~/.kube/config"]) + "); pass "
            "kubeconfig= the cluster that runs KServe, or run the stage inside it"
        )
    configuration.retries = False
    return client.CustomObjectsApi(client.ApiClient(configuration)), configuration.host


def _call(what: str, host: str, call: Callable, *args, timeout_s: float, **kwargs):
    """One API call, bounded by ``timeout_s``; connection problems become one clear line."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return call(*args, _request_timeout=(timeout_s, timeout_s), **kwargs)
    except ApiException:
        raise
    except (HTTPError, OSError) as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split())[:300]
        raise ServingError(
            f"kubernetes: {what} failed, the API server at {host} is unreachable ({reason}); "
            "check that the cluster is up and the kubeconfig points at it"
        ) from exc


def get_inference_service(name: str, namespace: str, kubeconfig=None, *, context=None,
                          timeout_s: float = 30.0) -> dict | None:
    """The ``InferenceService`` as the cluster has it, or ``None`` when there is none."""
    from kubernetes.client.exceptions import ApiException

    api, host = _api(kubeconfig, context)
    try:
        return _call(f"reading InferenceService {namespace}/{name}", host,
                     api.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                     timeout_s=timeout_s)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _api_error(f"reading InferenceService {namespace}/{name}", exc) from exc


def _api_error(what: str, exc) -> ServingError:
    detail = exc.reason
    if exc.status == 404 and "the server could not find the requested resource" in str(exc.body):
        detail = "no InferenceService resource type: is KServe installed in this cluster?"
    return ServingError(f"kubernetes: {what} failed with HTTP {exc.status}: {detail}")


def apply_inference_service(manifest: dict, kubeconfig: str | os.PathLike | None = None, *,
                            context: str | None = None, timeout_s: float = 30.0) -> dict:
    """Create the ``InferenceService``, or merge-patch it when it exists; return what the API
    server answered. Raises ``UserInputError`` without a cluster to talk to, ``ServingError``
    (one line, within about ``timeout_s``) when it is unreachable or refuses."""
    from kubernetes.client.exceptions import ApiException

    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    api, host = _api(kubeconfig, context)
    what = f"applying InferenceService {namespace}/{name}"
    try:
        existing = _call(what, host, api.get_namespaced_custom_object, GROUP, VERSION, namespace,
                         PLURAL, name, timeout_s=timeout_s)
    except ApiException as exc:
        if exc.status != 404:
            raise _api_error(what, exc) from exc
        existing = None
    try:
        if existing is None:
            return _call(what, host, api.create_namespaced_custom_object, GROUP, VERSION,
                         namespace, PLURAL, manifest, timeout_s=timeout_s)
        patch = copy.deepcopy(manifest)
        # A merge patch keeps fields it does not mention: say explicitly that there is no canary.
        patch["spec"]["predictor"].setdefault("canaryTrafficPercent", None)
        return _call(what, host, api.patch_namespaced_custom_object, GROUP, VERSION, namespace,
                     PLURAL, name, patch, timeout_s=timeout_s)
    except ApiException as exc:
        raise _api_error(what, exc) from exc


def set_canary_traffic(name: str, namespace: str, percent: int | None, kubeconfig=None, *,
                       context: str | None = None, timeout_s: float = 30.0) -> dict:
    """Set ``canaryTrafficPercent``: ``0`` rolls back to the previous revision, ``None`` removes
    the field, promoting the latest revision to all traffic."""
    from kubernetes.client.exceptions import ApiException

    api, host = _api(kubeconfig, context)
    what = f"setting the canary traffic of {namespace}/{name} to {percent}"
    patch = {"spec": {"predictor": {"canaryTrafficPercent": percent}}}
    try:
        return _call(what, host, api.patch_namespaced_custom_object, GROUP, VERSION, namespace,
                     PLURAL, name, patch, timeout_s=timeout_s)
    except ApiException as exc:
        raise _api_error(what, exc) from exc


def delete_inference_service(name: str, namespace: str, kubeconfig=None, *,
                             context: str | None = None, timeout_s: float = 30.0) -> None:
    from kubernetes.client.exceptions import ApiException

    api, host = _api(kubeconfig, context)
    what = f"deleting InferenceService {namespace}/{name}"
    try:
        _call(what, host, api.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
              name, timeout_s=timeout_s)
    except ApiException as exc:
        if exc.status != 404:
            raise _api_error(what, exc) from exc


def ready(service: dict) -> tuple[bool, str]:
    status = service.get("status") or {}
    generation = service.get("metadata", {}).get("generation")
    if generation is not None and status.get("observedGeneration", -1) < generation:
        return False, "the controller has not seen the latest spec yet"
    conditions = {c.get("type"): c for c in status.get("conditions", [])}
    ready = conditions.get("Ready", {})
    if ready.get("status") == "True":
        return True, ""
    waiting = [f"{t}: {c.get('reason', '')} {c.get('message', '')}".strip()
               for t, c in conditions.items() if c.get("status") != "True"]
    return False, "; ".join(waiting) or "no Ready condition yet"


def revision_url(service: dict) -> str:
    """Where the newest revision answers: its ``latest`` tag URL, else the service's address."""
    status = service.get("status") or {}
    predictor = (status.get("components") or {}).get("predictor") or {}
    for route in predictor.get("traffic") or []:
        if route.get("tag") == "latest" and route.get("url"):
            return route["url"]
    address = (status.get("address") or {}).get("url") or status.get("url")
    if not address:
        raise ServingError("the InferenceService is ready but reports no URL; pass smoke_url=")
    return address

