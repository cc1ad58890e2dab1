"""The retraining trigger (infra/trigger/main.py) under the real functions-framework, submitting
through the real aiplatform SDK to a local fake of Vertex AI."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_vertex import FakeVertex
from functions_framework import create_app
from google.cloud.aiplatform.utils import gcs_utils

TRIGGER = Path(__file__).resolve().parents[1] / "infra" / "trigger" / "main.py"
PIPELINE_JOBS = r"/pipelineJobs$"


@pytest.fixture(scope="module")
def pipeline_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "torchship.yaml"
    subprocess.run([sys.executable, "-m", "torchship.pipelines.cli", "compile", "-o", str(path)],
                   check=True, capture_output=True)
    return path


@pytest.fixture
def fake(monkeypatch, pipeline_yaml):
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda *args, **kwargs: None)
    with FakeVertex() as server:
        for key, value in {"PROJECT": "acme", "REGION": "us-central1",
                           "PIPELINE_TEMPLATE": str(pipeline_yaml),
                           "PIPELINE_ROOT": "gs://acme-pipelines/root",
                           "DATA_PREFIX": "gs://acme-data/incoming/",
                           "VERTEX_API_ENDPOINT": server.endpoint}.items():
            monkeypatch.setenv(key, value)
        yield server


def storage_event(client, name: str, generation: str, bucket: str = "acme-data", event_id="1"):
    headers = {"ce-id": event_id, "ce-specversion": "1.0",
               "ce-type": "google.cloud.storage.object.v1.finalized",
               "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
               "Content-Type": "application/json"}
    body = {"bucket": bucket, "name": name, "generation": generation}
    response = client.post("/", headers=headers, data=json.dumps(body))
    assert response.status_code == 200, response.data


def test_redelivered_event_submits_once_with_the_new_data_as_source(fake):
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    for delivery in ("1", "2", "3"):  # Eventarc delivers at least once
        storage_event(client, "incoming/2026-11-27.csv", "1700000000000001", event_id=delivery)
    accepted = [r for r in fake.requests if r.method == "POST" and "pipelineJobs" in r.path]
    assert len(accepted) == 3  # each delivery tried...
    assert len([k for k in fake.resources if "/pipelineJobs/" in k]) == 1  # ...one job exists
    job = next(r for k, r in fake.resources.items() if "/pipelineJobs/" in k)
    assert job["runtimeConfig"]["parameterValues"]["data_source"] == (
        "gs://acme-data/incoming/2026-11-27.csv")

    # A new generation of the same object is new data: one more run.
    storage_event(client, "incoming/2026-11-27.csv", "1700000000000002")
    assert len([k for k in fake.resources if "/pipelineJobs/" in k]) == 2


def test_objects_outside_the_prefix_submit_nothing(fake):
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    storage_event(client, "archive/old.csv", "5")
    storage_event(client, "incoming/2026-11-27.csv", "6", bucket="someone-elses-bucket")
    storage_event(client, "incoming/readme.txt", "7")
    assert not fake.calls("POST", PIPELINE_JOBS)


def test_pubsub_notification_submits_like_a_storage_event(fake):
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    message = {"message": {"data": base64.b64encode(json.dumps(
        {"bucket": "acme-data", "name": "incoming/batch.parquet", "generation": "9"}).encode()
    ).decode(), "attributes": {}}}
    headers = {"ce-id": "p1", "ce-specversion": "1.0",
               "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
               "ce-source": "//pubsub.googleapis.com/projects/acme/topics/new-data",
               "Content-Type": "application/json"}
    assert client.post("/", headers=headers, data=json.dumps(message)).status_code == 200
    [create] = fake.calls("POST", PIPELINE_JOBS)
    assert create.body["runtimeConfig"]["parameterValues"]["data_source"] == (
        "gs://acme-data/incoming/batch.parquet")


def decisions(folder: str) -> list[dict]:
    import fsspec

    fs = fsspec.filesystem("gs")
    return [json.loads(fs.cat_file(path)) for path in sorted(fs.ls(folder, detail=False))
            if not path.endswith("latest.json")]


def test_drift_trigger_submits_first_then_only_when_the_data_moved(fake, gcs, monkeypatch,
                                                                   tmp_path):
    """No reference yet: the first object is submitted, and says so. Once the reference is
    there, data like the training data is skipped with its distances; a feature whose
    distribution moved, or labels whose classes shifted, is submitted, with caching off. Every
    decision is kept next to the reference."""
    import fsspec

    from torchship.components.data.stage import prepare_data, write_statistics

    reference = "gs://acme-pipelines/root/torchship-reference/torchship/vertex/"
    monkeypatch.setenv("REFERENCE_URI", reference)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(3000, 3)), columns=["a", "b", "c"])
    frame["label"] = np.arange(3000) % 3
    frame.to_csv(tmp_path / "train.csv", index=False)
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    with fsspec.open("gs://acme-data/incoming/first.csv", "w") as handle:
        frame.to_csv(handle, index=False)
    storage_event(client, "incoming/first.csv", "1")
    [first] = fake.calls("POST", PIPELINE_JOBS)
    [decision] = decisions(reference + "decisions")
    assert decision["status"] == "submitted" and decision["reason"] == "first run: no reference yet"
    tasks = first.body["pipelineSpec"]["root"]["dag"]["tasks"]
    assert all(task.get("cachingOptions", {}).get("enableCache") is not True
               for task in tasks.values()) and "prepare-data" in tasks

    meta = prepare_data(str(tmp_path / "train.csv"), "label",
                        *(str(tmp_path / split) for split in ("train", "val", "test")))
    write_statistics(meta["statistics"], reference + "statistics.json")
    same = frame.sample(1000, random_state=1)
    tables = {"same.csv": same, "moved.csv": same.assign(b=same["b"] + 1.0),
              "relabelled.csv": same.assign(label=0)}
    for name, table in tables.items():
        with fsspec.open(f"gs://acme-data/incoming/{name}", "w") as handle:
            table.to_csv(handle, index=False)
    storage_event(client, "incoming/same.csv", "1")
    assert len(fake.calls("POST", PIPELINE_JOBS)) == 1  # no drift: nothing to retrain on
    skipped = decisions(reference + "decisions")[-1]
    assert skipped["status"] == "skipped" and skipped["reason"] == "no drift"
    assert max(d["js_distance"] for d in skipped["drift"]["features"].values()) < 0.1
    assert skipped["drift"]["label_linf"] < 0.1

    storage_event(client, "incoming/moved.csv", "1")
    storage_event(client, "incoming/relabelled.csv", "1")
    _, moved, _ = fake.calls("POST", PIPELINE_JOBS)
    assert moved.body["runtimeConfig"]["parameterValues"]["data_source"] == (
        "gs://acme-data/incoming/moved.csv")
    made = decisions(reference + "decisions")
    assert [d["status"] for d in made] == ["submitted", "skipped", "submitted", "submitted"]
    assert made[2]["reason"] == "drift: b" and made[2]["drift"]["features"]["b"]["psi"] > 0.2
    assert made[3]["reason"] == "drift: labels" and made[3]["drift"]["label_linf"] > 0.6
    latest = json.loads(fsspec.filesystem("gs").cat_file(reference + "decisions/latest.json"))
    assert latest == made[3]


def test_drift_measures_and_names_the_features_that_moved():
    from torchship.components.data import drift as trigger  # what the function ships

    settings = trigger.Thresholds()
    histogram = {"edges": [-1.0, 0.0, 1.0], "counts": [16, 34, 34, 16]}
    statistics = {"features": {"a": {"histogram": histogram}, "b": {"histogram": histogram},
                               "c": {"histogram": histogram}},
                  "labels": {"column": "label", "counts": {"x": 50, "y": 50}}}
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"a": rng.normal(size=2000), "b": rng.normal(size=2000) + 2,
                          "label": ["x", "y"] * 1000})
    report = trigger.drift(statistics, table, settings)
    assert report["drifted"] and report["moved"] == ["b"] and report["missing"] == ["c"]
    assert report["features"]["a"]["js_distance"] < 0.05 and report["features"]["a"]["psi"] < 0.02
    assert report["features"]["b"]["js_distance"] > 0.5 and report["label_linf"] == 0.0
    assert trigger.label_distance({"x": 50, "y": 50}, pd.Series(["x"] * 9 + ["y"])) == 0.4


def test_parameter_values_reach_the_run_with_the_new_data_and_the_reference(fake, gcs,
                                                                           monkeypatch):
    """PARAMETER_VALUES is every run's base; the trigger adds data_source, label_column and
    reference_uri, so a triggered run deploys where it should and keeps the reference the next
    event is judged by. The decision records what was submitted."""
    import fsspec

    reference = "gs://acme-pipelines/root/torchship-reference/torchship/vertex/"
    settings = {"deploy_target": "vertex", "epochs": 3,
                "deploy_settings": {"endpoint": "torchship", "machine_type": "n1-standard-4"}}
    monkeypatch.setenv("REFERENCE_URI", reference)
    monkeypatch.setenv("PARAMETER_VALUES", json.dumps(settings))
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    storage_event(client, "incoming/2026-11-28.csv", "11")
    [create] = fake.calls("POST", PIPELINE_JOBS)
    values = create.body["runtimeConfig"]["parameterValues"]
    assert values == {**settings, "data_source": "gs://acme-data/incoming/2026-11-28.csv",
                      "label_column": "label", "reference_uri": reference}
    latest = json.loads(fsspec.filesystem("gs").cat_file(reference + "decisions/latest.json"))
    assert latest["status"] == "submitted" and latest["parameters"] == values
    assert latest["platform"] == "vertex" and "run_id" not in latest
    assert {"status", "uri", "reason", "job_id", "drift", "time", "generation"} <= set(latest)


@pytest.mark.parametrize("value, says", [
    ("{deploy_target: vertex}", "is not valid JSON"),
    ('["deploy_target", "vertex"]', "is a JSON array, not an object"),
    ('{"data_source": "gs://elsewhere/x.csv"}', "sets data_source"),
    ('{"reference_uri": "gs://elsewhere/"}', "sets reference_uri"),
    ('{"label_column": "target"}', "but LABEL_COLUMN is 'label'"),
])
def test_bad_parameter_values_is_one_clear_line(fake, monkeypatch, value, says):
    import importlib.util

    monkeypatch.setenv("PARAMETER_VALUES", value)
    monkeypatch.setenv("LABEL_COLUMN", "label")
    monkeypatch.syspath_prepend(str(TRIGGER.parent))
    spec = importlib.util.spec_from_file_location("trigger_main", TRIGGER)
    trigger = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trigger)
    with pytest.raises(RuntimeError) as raised:
        trigger.Settings.from_env()
    message = str(raised.value)
    assert "\n" not in message and message.startswith("PARAMETER_VALUES ") and says in message
    assert any(fix in message for fix in ("set it to a JSON object",
                                          "remove it from PARAMETER_VALUES", "both the same"))

    # Under the functions-framework the event fails (and is retried), and nothing is submitted.
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    headers = {"ce-id": "1", "ce-specversion": "1.0",
               "ce-type": "google.cloud.storage.object.v1.finalized",
               "ce-source": "//storage.googleapis.com/projects/_/buckets/acme-data",
               "Content-Type": "application/json"}
    body = {"bucket": "acme-data", "name": "incoming/x.csv", "generation": "1"}
    assert client.post("/", headers=headers, data=json.dumps(body)).status_code == 500
    assert not fake.calls("POST", PIPELINE_JOBS)
