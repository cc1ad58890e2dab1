"""Retraining trigger: submit the torchship pipeline when new data lands under a bucket prefix.

Deployed as a Cloud Function (functions-framework) behind an Eventarc storage-finalize trigger or
a Pub/Sub subscription. Self-contained on purpose: the function must not pull in torch.

Settings (environment variables):
  PROJECT, REGION            where the pipeline runs
  PIPELINE_TEMPLATE          compiled YAML (gs:// or local path) or Artifact Registry template URI
  PIPELINE_ROOT              gs://BUCKET/PATH for the run's artifacts
  DATA_PREFIX                gs://BUCKET/PREFIX/ watched for new data; other objects are ignored
  SERVICE_ACCOUNT            the pipeline's service account (optional)
  LABEL_COLUMN               label column of the new tables (default: label)
  STATISTICS_URI             training statistics (statistics.json from prepare_data); when set,
                             the pipeline is submitted only if the new data drifted
  DRIFT_THRESHOLD            mean shift, in training standard deviations, that counts as drift
                             (default 0.5)
  VERTEX_API_ENDPOINT        a private API endpoint (optional)
"""

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import functions_framework

SUPPORTED_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class Settings:
    project: str
    region: str
    template: str
    pipeline_root: str
    data_prefix: str
    service_account: str | None = None
    label_column: str = "label"
    statistics_uri: str | None = None
    drift_threshold: float = 0.5
    api_endpoint: str | None = None

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        missing = [k for k in ("PROJECT", "REGION", "PIPELINE_TEMPLATE", "PIPELINE_ROOT",
                               "DATA_PREFIX") if not env.get(k)]
        if missing:
            raise RuntimeError(f"trigger settings missing: {', '.join(missing)}; set them on "
                               "the function (see infra/trigger/main.py)")
        return cls(
            project=env["PROJECT"], region=env["REGION"], template=env["PIPELINE_TEMPLATE"],
            pipeline_root=env["PIPELINE_ROOT"], data_prefix=env["DATA_PREFIX"],
            service_account=env.get("SERVICE_ACCOUNT") or None,
            label_column=env.get("LABEL_COLUMN", "label"),
            statistics_uri=env.get("STATISTICS_URI") or None,
            drift_threshold=float(env.get("DRIFT_THRESHOLD", "0.5")),
            api_endpoint=env.get("VERTEX_API_ENDPOINT") or None,
        )


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


def drift(statistics: dict[str, Any], table: Any, threshold: float) -> dict[str, Any]:
    """Features whose mean moved by more than `threshold` training standard deviations."""
    moved, missing = {}, []
    for feature, reference in statistics["features"].items():
        if feature not in table.columns:
            missing.append(feature)
            continue
        shift = abs(float(table[feature].mean()) - reference["mean"]) / max(reference["std"], 1e-12)
        if shift > threshold:
            moved[feature] = round(shift, 3)
    return {"drifted": bool(moved or missing), "moved": moved, "missing": missing,
            "threshold": threshold}


def read_table(uri: str) -> Any:
    import fsspec
    import pandas as pd

    with fsspec.open(uri, "rb") as handle:
        return pd.read_parquet(handle) if uri.endswith(".parquet") else pd.read_csv(handle)


def handle(obj: dict[str, str], settings: Settings) -> dict[str, Any]:
    """Decide and, when warranted, submit; returns what was done, for the log."""
    from google.api_core.exceptions import Conflict  # AlreadyExists (gRPC) is a Conflict too

    uri = f"gs://{obj['bucket']}/{obj['name']}"
    if not uri.startswith(settings.data_prefix):
        return {"status": "ignored", "uri": uri, "reason": f"outside {settings.data_prefix}"}
    if not uri.endswith(SUPPORTED_SUFFIXES):
        return {"status": "ignored", "uri": uri, "reason": "not a .csv or .parquet table"}
    report = None
    if settings.statistics_uri:
        import fsspec

        with fsspec.open(settings.statistics_uri, "r") as handle_:
            statistics = json.load(handle_)
        report = drift(statistics, read_table(uri), settings.drift_threshold)
        if not report["drifted"]:
            return {"status": "skipped", "uri": uri, "reason": "no drift", "drift": report}
    job_id = job_id_for(uri, obj["generation"])
    try:
        submit(settings, uri, job_id)
    except Conflict:
        return {"status": "duplicate", "uri": uri, "job_id": job_id}
    return {"status": "submitted", "uri": uri, "job_id": job_id, "drift": report}


def submit(settings: Settings, data_uri: str, job_id: str) -> None:
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
        parameter_values={"data_source": data_uri, "label_column": settings.label_column},
        labels={"trigger": "new-data"},
    )
    job.submit(service_account=settings.service_account)


@functions_framework.cloud_event
def on_new_data(event: Any) -> None:
    """Entry point for Eventarc (storage finalize) and Pub/Sub CloudEvents."""
    result = handle(object_from_event(event.data), Settings.from_env())
    print(json.dumps(result))
