"""Retraining trigger: submit the torchship pipeline when new data lands under a bucket prefix.

New data is a .csv/.parquet table, or a batch: a folder under the prefix that gets a
BATCH_MARKER object (`_SUCCESS`, as Hadoop, Spark and Dataflow write) once complete. A batch of
class sub-folders of images is an image folder; a batch of tables is judged by its newest
table. Either way the run's data_source is the folder. Image files on their own are ignored.

Deployed as a Cloud Function (functions-framework) behind an Eventarc storage-finalize trigger or
a Pub/Sub subscription. Self-contained on purpose: the function must not pull in torch.

The run goes to Vertex AI Pipelines, or, with KFP_HOST set, to a Kubeflow Pipelines cluster
through kfp.Client (the same function, or any container running functions-framework).

Settings (environment variables):
  PROJECT, REGION            where the pipeline runs (Vertex AI; not needed with KFP_HOST)
  PIPELINE_TEMPLATE          compiled YAML (gs:// or local path) or Artifact Registry template URI;
                             with KFP_HOST a compiled YAML only
  PIPELINE_ROOT              gs://BUCKET/PATH for the run's artifacts
  DATA_PREFIX                gs://BUCKET/PREFIX/ watched for new data; other objects are ignored
  SERVICE_ACCOUNT            the pipeline's service account (optional; with KFP_HOST the
                             Kubernetes service account the run's pods use)
  LABEL_COLUMN               label column of the new tables (default: PARAMETER_VALUES'
                             label_column, else label)
  REFERENCE_URI              the folder where a deploying run keeps the reference
                             (statistics.json: the training statistics of what serves now); the
                             decisions go to its decisions/. No reference yet: every new object
                             is submitted, as a first run
  DRIFT_THRESHOLD            Jensen-Shannon distance (base 2, 0-1) of a numeric feature's binned
                             distribution that counts as drift (default 0.1)
  PSI_THRESHOLD              population stability index that counts as drift (default 0.2)
  LABEL_DRIFT_THRESHOLD      L-infinity distance of the class distribution (default 0.1)
  FEATURE_THRESHOLDS         per feature, its own thresholds as JSON, e.g.
                             {"income": {"js_distance": 0.2, "psi": 0.5}} (the rest: the above)
  MAX_ROWS                   rows of a new table read to judge it (default 100000)
  MAX_IMAGES                 image files of a new image folder decoded to judge it, spread
                             evenly over the folder's sorted listing (default 500)
  BATCH_MARKER               the object name that marks its folder a complete batch
                             (default: _SUCCESS)
  PARAMETER_VALUES           JSON object of pipeline parameter values every submitted run gets,
                             e.g. {"deploy_target": "vertex", "deploy_settings": {...},
                             "epochs": 20}; the trigger sets data_source (the new object's gs://
                             URI, or the batch folder's), label_column (LABEL_COLUMN) and, when REFERENCE_URI is set,
                             reference_uri on top, so it must not set data_source or
                             reference_uri itself (default: {})
  VERTEX_API_ENDPOINT        a private API endpoint (optional)
  KFP_HOST                   a Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline-ui.kubeflow
                             or https://HOST/pipeline: submit there instead of Vertex AI
  KFP_EXPERIMENT             the Kubeflow experiment the runs go to (default: torchship)
  KFP_NAMESPACE              the Kubeflow namespace (profile) of a multi-user cluster (optional)
"""

import base64
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import functions_framework

# drift.py is components/data/drift.py (a link, so the function's source folder holds it): the
# same measures `torchship retrain-status` prints.
from drift import (
    IMAGE_SUFFIXES,
    MAX_IMAGES,
    Thresholds,
    drift,
    image_drift,
    image_files,
    newest_table,
    read_table,
)

SUPPORTED_SUFFIXES = (".csv", ".parquet")
# Parameters the trigger sets itself from the event and its settings.
TRIGGER_PARAMETERS = ("data_source", "reference_uri")


def parameter_values_from(text: str | None) -> dict[str, Any]:
    """PARAMETER_VALUES: a JSON object of parameter values, none of them the trigger's own."""
    if not text or not text.strip():
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"PARAMETER_VALUES is not valid JSON ({exc.msg} at character "
                           f"{exc.pos}); set it to a JSON object such as "
                           '{"deploy_target": "vertex", "epochs": 20}') from None
    if not isinstance(values, dict):  # a settings error, like the others: RuntimeError
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
                type(None): "null"}[type(values)]
        raise RuntimeError(  # noqa: TRY004
            f"PARAMETER_VALUES is a JSON {kind}, not an object; set it to a JSON "
            'object such as {"deploy_target": "vertex", "epochs": 20}')
    own = [name for name in TRIGGER_PARAMETERS if name in values]
    if own:
        raise RuntimeError(f"PARAMETER_VALUES sets {', '.join(own)}, which the trigger sets "
                           "itself (data_source: the new object; reference_uri: REFERENCE_URI); "
                           "remove it from PARAMETER_VALUES")
    return values


def feature_thresholds_from(text: str | None) -> dict[str, dict[str, float]]:
    """FEATURE_THRESHOLDS: per feature, its own JS distance and/or PSI threshold."""
    if not text or not text.strip():
        return {}
    example = '{"income": {"js_distance": 0.2, "psi": 0.5}}'
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"FEATURE_THRESHOLDS is not valid JSON ({exc.msg} at character "
                           f"{exc.pos}); set it to a JSON object such as {example}") from None
    good = isinstance(values, dict) and all(
        isinstance(own, dict) and own and set(own) <= {"js_distance", "psi"}
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for v in own.values())
        for own in values.values())
    if not good:
        raise RuntimeError("FEATURE_THRESHOLDS must map each feature to its js_distance and/or "
                           f"psi threshold (numbers >= 0), e.g. {example}")
    return values


class AlreadySubmitted(Exception):
    """This object generation's run exists: a redelivered event."""

    def __init__(self, run_id: str | None = None):
        super().__init__(run_id)
        self.run_id = run_id


@dataclass(frozen=True)
class Settings:
    project: str
    region: str
    template: str
    pipeline_root: str
    data_prefix: str
    service_account: str | None = None
    label_column: str = "label"
    reference_uri: str | None = None
    drift_threshold: float = 0.1
    psi_threshold: float = 0.2
    label_drift_threshold: float = 0.1
    feature_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    max_rows: int = 100_000
    max_images: int = MAX_IMAGES
    batch_marker: str = "_SUCCESS"
    api_endpoint: str | None = None
    parameter_values: dict[str, Any] = field(default_factory=dict)
    kfp_host: str | None = None
    kfp_experiment: str = "torchship"
    kfp_namespace: str | None = None

    @property
    def platform(self) -> str:
        return "kubeflow" if self.kfp_host else "vertex"

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        kubeflow = bool(env.get("KFP_HOST"))  # PROJECT and REGION are Vertex AI's
        missing = [k for k in ("PROJECT", "REGION", "PIPELINE_TEMPLATE", "PIPELINE_ROOT",
                               "DATA_PREFIX") if not env.get(k)
                   and not (kubeflow and k in ("PROJECT", "REGION"))]
        if missing:
            raise RuntimeError(f"trigger settings missing: {', '.join(missing)}; set them on "
                               "the function (see infra/trigger/main.py)")
        if kubeflow and not env["PIPELINE_TEMPLATE"].endswith((".yaml", ".yml")):
            raise RuntimeError(f"PIPELINE_TEMPLATE {env['PIPELINE_TEMPLATE']} is not a compiled "
                               "pipeline YAML, which KFP_HOST (Kubeflow) needs: set it to the "
                               "gs:// or local path of `torchship compile -o PATH.yaml`")
        parameter_values = parameter_values_from(env.get("PARAMETER_VALUES"))
        # One label column: the drift check's and the run's.
        label_column = env.get("LABEL_COLUMN") or parameter_values.get("label_column", "label")
        if parameter_values.get("label_column", label_column) != label_column:
            raise RuntimeError(f"PARAMETER_VALUES sets label_column "
                               f"{parameter_values['label_column']!r} but LABEL_COLUMN is "
                               f"{label_column!r}; set one of them, or both the same")
        return cls(
            project=env.get("PROJECT", ""), region=env.get("REGION", ""),
            template=env["PIPELINE_TEMPLATE"],
            pipeline_root=env["PIPELINE_ROOT"], data_prefix=env["DATA_PREFIX"],
            service_account=env.get("SERVICE_ACCOUNT") or None,
            label_column=label_column,
            reference_uri=env.get("REFERENCE_URI") or None,
            drift_threshold=float(env.get("DRIFT_THRESHOLD", "0.1")),
            psi_threshold=float(env.get("PSI_THRESHOLD", "0.2")),
            label_drift_threshold=float(env.get("LABEL_DRIFT_THRESHOLD", "0.1")),
            feature_thresholds=feature_thresholds_from(env.get("FEATURE_THRESHOLDS")),
            max_rows=int(env.get("MAX_ROWS", "100000")),
            max_images=int(env.get("MAX_IMAGES", str(MAX_IMAGES))),
            batch_marker=env.get("BATCH_MARKER") or "_SUCCESS",
            api_endpoint=env.get("VERTEX_API_ENDPOINT") or None,
            parameter_values=parameter_values,
            kfp_host=env.get("KFP_HOST") or None,
            kfp_experiment=env.get("KFP_EXPERIMENT") or "torchship",
            kfp_namespace=env.get("KFP_NAMESPACE") or None,
        )

    def parameters_for(self, data_uri: str) -> dict[str, Any]:
        """The parameter values of a run on DATA_URI: PARAMETER_VALUES, then the trigger's."""
        parameters = {**self.parameter_values, "data_source": data_uri,
                      "label_column": self.label_column}
        if self.reference_uri:  # the run keeps the reference the next event is judged by
            parameters["reference_uri"] = self.reference_uri
        return parameters


def object_from_event(data: Any, attributes: dict[str, str] | None = None) -> dict[str, str]:
    """(bucket, name, generation) from a storage CloudEvent's data or a Pub/Sub message."""
    if isinstance(data, dict) and "message" in data:  # Pub/Sub push, as Eventarc delivers it
        message = data["message"]
        attributes = message.get("attributes") or {}
        payload = message.get("data")
        data = json.loads(base64.b64decode(payload)) if payload else {}
    attributes = attributes or {}
    bucket = data.get("bucket") or attributes.get("bucketId")
    name = data.get("name") or attributes.get("objectId")
    generation = str(data.get("generation") or attributes.get("objectGeneration") or "")
    if not bucket or not name or not generation:
        raise ValueError(f"event has no bucket/name/generation: {json.dumps(data)[:200]}")
    return {"bucket": bucket, "name": name, "generation": generation}


def job_id_for(uri: str, generation: str) -> str:
    """One pipeline job ID per object generation: a redelivered event reuses it, and Vertex AI
    refuses a second job with the same ID, so the pipeline is submitted once."""
    digest = hashlib.sha256(f"{uri}#{generation}".encode()).hexdigest()[:20]
    return f"torchship-data-{digest}"


def read_reference(settings: "Settings") -> dict[str, Any] | None:
    """The training statistics of what serves now, or None before the first deploying run."""
    import fsspec

    uri = settings.reference_uri.rstrip("/") + "/statistics.json"
    try:
        with fsspec.open(uri, "r") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def record(settings: Settings, obj: dict[str, str], decision: dict[str, Any]) -> dict[str, Any]:
    """Keep the decision next to the reference (one file per event, and latest.json)."""
    import time

    import fsspec

    decision = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "generation": obj["generation"], **decision}
    if settings.reference_uri:
        folder = settings.reference_uri.rstrip("/") + "/decisions"
        # Named by the clock in nanoseconds: listed in the order they were made.
        name = f"{time.time_ns()}-{job_id_for(decision['uri'], obj['generation'])}"
        for path in (f"{folder}/{name}.json", f"{folder}/latest.json"):
            with fsspec.open(path, "w") as handle:
                json.dump(decision, handle, indent=1)
    return decision


def handle(obj: dict[str, str], settings: Settings) -> dict[str, Any]:
    """Decide and, when warranted, submit; returns the decision, which is also recorded."""
    uri = f"gs://{obj['bucket']}/{obj['name']}"
    if not uri.startswith(settings.data_prefix):
        return {"status": "ignored", "uri": uri, "reason": f"outside {settings.data_prefix}"}
    name = uri.rsplit("/", 1)[-1]
    if name == settings.batch_marker:
        return _batch(obj, settings, uri[:-len(name)])
    if uri.lower().endswith(IMAGE_SUFFIXES):
        return {"status": "ignored", "uri": uri, "reason": (
            "an image file: images are judged and trained on as a batch, a folder of class "
            f"sub-folders; upload a {settings.batch_marker} marker to the folder when the batch "
            "is complete")}
    if not uri.endswith(SUPPORTED_SUFFIXES):
        return {"status": "ignored", "uri": uri, "reason": (
            f"not a .csv or .parquet table, nor a {settings.batch_marker} batch marker")}
    return record(settings, obj, _decide(obj, settings, uri, lambda statistics, thresholds: drift(
        statistics, read_table(uri, settings.max_rows), thresholds)))


def _batch(obj: dict[str, str], settings: Settings, folder: str) -> dict[str, Any]:
    """A batch marker: the folder is the new data, an image folder or a folder of tables."""
    files = image_files(folder)
    if files:
        return record(settings, obj, _decide(
            obj, settings, folder, lambda statistics, thresholds: image_drift(
                statistics, folder, thresholds, settings.max_images, files)))
    table = newest_table(folder)
    if table is None:
        return {"status": "ignored", "uri": folder, "reason": (
            f"{settings.batch_marker} marks a folder with no class sub-folders of images "
            "(.png, .jpg, .jpeg, .bmp, .gif) and no .csv or .parquet table")}
    # The run's data step trains on the folder's newest table: that is the one judged.
    decision = _decide(obj, settings, folder, lambda statistics, thresholds: drift(
        statistics, read_table(table, settings.max_rows), thresholds))
    return record(settings, obj, {**decision, "table": table})


def _decide(obj: dict[str, str], settings: Settings, uri: str,
            judge: Callable[[dict[str, Any], Thresholds], dict[str, Any]]) -> dict[str, Any]:
    """Skip data that has not drifted from the reference; else submit a run on URI. `judge`
    measures the drift of the new data from the reference statistics."""
    report, reason = None, "no drift check (REFERENCE_URI not set)"
    if settings.reference_uri:
        statistics = read_reference(settings)
        if statistics is None:
            reason = "first run: no reference yet"
        else:
            report = judge(statistics, Thresholds(
                settings.drift_threshold, settings.psi_threshold,
                settings.label_drift_threshold, settings.label_column,
                settings.feature_thresholds))
            if not report["drifted"]:
                return {"status": "skipped", "uri": uri, "reason": "no drift", "drift": report}
            reason = "drift: " + ", ".join(
                report["moved"] + [f"missing {m}" for m in report["missing"]]
                + (["labels"] if report["label_linf"] is not None
                   and report["label_linf"] > settings.label_drift_threshold else []))
    job_id = job_id_for(uri, obj["generation"])
    parameters = settings.parameters_for(uri)
    platform = {"platform": settings.platform}
    try:
        run_id = (submit_kubeflow if settings.kfp_host else submit)(settings, parameters, job_id)
    except AlreadySubmitted as existing:
        return {"status": "duplicate", "uri": uri, "job_id": job_id,
                "reason": "this object generation was submitted before", **platform,
                **({"run_id": existing.run_id} if existing.run_id else {})}
    return {"status": "submitted", "uri": uri, "job_id": job_id, "reason": reason,
            "drift": report, "parameters": parameters, **platform,
            **({"run_id": run_id} if run_id else {})}


def submit(settings: Settings, parameters: dict[str, Any], job_id: str) -> None:
    """A Vertex AI PipelineJob named JOB_ID; AlreadySubmitted when that job exists."""
    from google.api_core.exceptions import Conflict  # AlreadyExists (gRPC) is a Conflict too
    from google.cloud import aiplatform

    credentials = None
    if settings.api_endpoint and settings.api_endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        credentials = AnonymousCredentials()  # a local test double: never send a token over http
    aiplatform.init(project=settings.project, location=settings.region, credentials=credentials,
                    api_endpoint=settings.api_endpoint,
                    api_transport="rest" if settings.api_endpoint else None)
    job = aiplatform.PipelineJob(
        display_name="torchship-retrain", template_path=settings.template, job_id=job_id,
        pipeline_root=settings.pipeline_root,
        parameter_values=parameters,
        labels={"trigger": "new-data"},
        # New data under an old name must never reuse an old run's prepare-data (or anything
        # after it): caching is off for the whole run.
        enable_caching=False,
    )
    try:
        job.submit(service_account=settings.service_account)
    except Conflict:
        raise AlreadySubmitted from None


def runs_named(client: Any, experiment_id: str, name: str) -> list[Any]:
    """The runs of the experiment whose display name is NAME."""
    name_filter = json.dumps({"predicates": [
        {"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    return client.list_runs(experiment_id=experiment_id, filter=name_filter,
                            page_size=10).runs or []


def uncached_copy(template: str, folder: str) -> str:
    """The compiled pipeline YAML (local or gs://) with caching off for every task, nested DAGs'
    too (kfp.Client's enable_caching=False rewrites only the root DAG's tasks); its path."""
    import fsspec
    import yaml

    with fsspec.open(template, "r") as handle:
        documents = list(yaml.safe_load_all(handle))
    spec = documents[0]
    if not isinstance(spec, dict) or "root" not in spec:
        raise RuntimeError(f"PIPELINE_TEMPLATE {template} is not a compiled pipeline YAML; with "
                           "KFP_HOST it must be one (torchship compile -o PATH), local or gs://")
    for component in [spec["root"], *spec.get("components", {}).values()]:
        for task in component.get("dag", {}).get("tasks", {}).values():
            task["cachingOptions"] = {"enableCache": False}
    path = os.path.join(folder, "pipeline.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump_all(documents, handle, sort_keys=False)
    return path


def submit_kubeflow(settings: Settings, parameters: dict[str, Any], job_id: str) -> str:
    """A Kubeflow Pipelines run named JOB_ID, caching off; its run ID. Kubeflow has no run-ID
    idempotency: a run of that name in the experiment means AlreadySubmitted."""
    import kfp

    # kfp prints links to the UI; the function's own output is the one decision line.
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as folder:
        client = kfp.Client(host=settings.kfp_host, namespace=settings.kfp_namespace)
        experiment = client.create_experiment(settings.kfp_experiment,
                                              namespace=settings.kfp_namespace)
        existing = runs_named(client, experiment.experiment_id, job_id)
        if existing:
            raise AlreadySubmitted(existing[0].run_id)
        run = client.create_run_from_pipeline_package(
            uncached_copy(settings.template, folder), arguments=parameters, run_name=job_id,
            experiment_id=experiment.experiment_id, pipeline_root=settings.pipeline_root,
            enable_caching=False, service_account=settings.service_account)
    return run.run_id


@functions_framework.cloud_event
def on_new_data(event: Any) -> None:
    """Entry point for Eventarc (storage finalize) and Pub/Sub CloudEvents."""
    result = handle(object_from_event(event.data), Settings.from_env())
    print(json.dumps(result))
