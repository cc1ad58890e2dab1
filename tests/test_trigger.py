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


# Image batches: a folder of class sub-folders, complete when its _SUCCESS marker lands.


def copy_folder(source: Path, url: str, change=None) -> None:
    """The image files of the class folders under SOURCE, written under URL (any fsspec URL),
    each pixel array passed through CHANGE first."""
    import io

    import fsspec
    from PIL import Image

    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(source.glob("*/*")):
        if any(part.startswith(".") for part in (path.name, path.parent.name)) or (
                path.suffix not in (".png", ".bmp")):
            continue
        data = path.read_bytes()
        if change is not None:
            with Image.open(path) as image:
                changed = Image.fromarray(change(np.asarray(image)).astype(np.uint8), image.mode)
            buffer = io.BytesIO()
            changed.save(buffer, format="BMP" if path.suffix == ".bmp" else "PNG")
            data = buffer.getvalue()
        fs.makedirs(f"{root}/{path.parent.name}", exist_ok=True)
        fs.pipe_file(f"{root}/{path.parent.name}/{path.name}", data)


@pytest.fixture
def image_reference(gcs, monkeypatch, tmp_path) -> tuple[str, Path]:
    """REFERENCE_URI holding the statistics prepare-data keeps for a local image folder (8x8
    greyscale shapes, classes circle, line, square); the folder."""
    from test_data import write_image_folder

    from torchship.components.data.stage import prepare_data, write_statistics

    reference = "gs://acme-pipelines/root/torchship-reference/torchship/vertex/"
    monkeypatch.setenv("REFERENCE_URI", reference)
    folder = tmp_path / "shapes"
    write_image_folder(str(folder), per_class=30)
    meta = prepare_data(str(folder), "", *(str(tmp_path / split)
                                           for split in ("train", "val", "test")))
    assert meta["statistics"]["kind"] == "images"
    write_statistics(meta["statistics"], reference + "statistics.json")
    return reference, folder


def test_an_image_batch_is_judged_when_its_marker_lands(fake, image_reference, monkeypatch):
    """Image files on their own are ignored; a _SUCCESS marker makes its folder the new data:
    like the training images, it is skipped with each channel's distances; brightness inverted,
    it is submitted, naming the channel, with the folder as data_source, once per marker."""
    import fsspec

    reference, folder = image_reference
    monkeypatch.setenv("MAX_IMAGES", "40")  # a sample of the 90 images
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    copy_folder(folder, "gs://acme-data/incoming/batch1")
    for name in ("incoming/batch1/circle/00.png", "incoming/batch1/line/01.bmp"):
        storage_event(client, name, "1")
    assert not fake.calls("POST", PIPELINE_JOBS)
    assert not fsspec.filesystem("gs").exists(reference + "decisions")  # ignored: not recorded

    fsspec.filesystem("gs").pipe_file("gs://acme-data/incoming/batch1/_SUCCESS", b"")
    storage_event(client, "incoming/batch1/_SUCCESS", "1")
    assert not fake.calls("POST", PIPELINE_JOBS)
    [skipped] = decisions(reference + "decisions")
    assert skipped["status"] == "skipped" and skipped["reason"] == "no drift"
    assert skipped["uri"] == "gs://acme-data/incoming/batch1/"
    report = skipped["drift"]
    assert set(report["features"]) == {"grey"} and report["features"]["grey"]["js_distance"] < 0.1
    assert report["features"]["grey"]["psi"] < 0.2 and report["label_linf"] < 0.1
    assert report["sample"] == {"images": 40, "of": 90, "unreadable": 0}

    copy_folder(folder, "gs://acme-data/incoming/batch2", change=lambda pixels: 255 - pixels)
    fsspec.filesystem("gs").pipe_file("gs://acme-data/incoming/batch2/_SUCCESS", b"")
    for delivery in ("1", "2"):  # Eventarc delivers at least once
        storage_event(client, "incoming/batch2/_SUCCESS", "7", event_id=delivery)
    assert len([k for k in fake.resources if "/pipelineJobs/" in k]) == 1
    job = next(r for k, r in fake.resources.items() if "/pipelineJobs/" in k)
    assert job["runtimeConfig"]["parameterValues"]["data_source"] == (
        "gs://acme-data/incoming/batch2/")
    _, submitted, duplicate = decisions(reference + "decisions")
    assert submitted["status"] == "submitted" and submitted["reason"] == "drift: grey"
    assert submitted["drift"]["features"]["grey"]["psi"] > 0.2
    assert submitted["uri"] == "gs://acme-data/incoming/batch2/"
    assert duplicate["status"] == "duplicate" and duplicate["job_id"] == submitted["job_id"]


def test_single_images_and_empty_batches_are_ignored_with_a_hint(fake, gcs, monkeypatch):
    import importlib.util

    import fsspec

    monkeypatch.setenv("BATCH_MARKER", "READY")
    monkeypatch.syspath_prepend(str(TRIGGER.parent))
    spec = importlib.util.spec_from_file_location("trigger_main", TRIGGER)
    trigger = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trigger)
    settings = trigger.Settings.from_env()
    assert settings.batch_marker == "READY" and settings.max_images == 500

    image = trigger.handle({"bucket": "acme-data", "name": "incoming/b/cat/1.JPG",
                            "generation": "1"}, settings)
    assert image["status"] == "ignored" and "upload a READY marker" in image["reason"]
    fsspec.filesystem("gs").pipe_file("gs://acme-data/incoming/b/notes.txt", b"x")
    empty = trigger.handle({"bucket": "acme-data", "name": "incoming/b/READY",
                            "generation": "1"}, settings)
    assert empty["status"] == "ignored" and empty["uri"] == "gs://acme-data/incoming/b/"
    assert "no class sub-folders of images" in empty["reason"]
    other = trigger.handle({"bucket": "acme-data", "name": "incoming/b/_SUCCESS",
                            "generation": "1"}, settings)
    assert other["status"] == "ignored" and not fake.calls("POST", PIPELINE_JOBS)


def test_a_batch_of_tables_is_judged_by_its_newest_table(fake, gcs, monkeypatch, tmp_path):
    """A marker in a folder of tables: the run gets the folder (its data step trains on the
    newest table) and the drift check reads that newest table, by modification time."""
    import time

    import fsspec

    from torchship.components.data.stage import prepare_data, write_statistics

    reference = "gs://acme-pipelines/root/torchship-reference/torchship/vertex/"
    monkeypatch.setenv("REFERENCE_URI", reference)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(2000, 2)), columns=["a", "b"])
    frame["label"] = np.arange(2000) % 2
    frame.to_csv(tmp_path / "train.csv", index=False)
    meta = prepare_data(str(tmp_path / "train.csv"), "label",
                        *(str(tmp_path / split) for split in ("train", "val", "test")))
    write_statistics(meta["statistics"], reference + "statistics.json")
    for name, table in (("z-old.csv", frame), ("a-new.csv", frame.assign(b=frame["b"] + 1.0))):
        with fsspec.open(f"gs://acme-data/incoming/tables/{name}", "w") as handle:
            table.to_csv(handle, index=False)
        time.sleep(0.01)
    fsspec.filesystem("gs").pipe_file("gs://acme-data/incoming/tables/_SUCCESS", b"")
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    storage_event(client, "incoming/tables/_SUCCESS", "3")
    [create] = fake.calls("POST", PIPELINE_JOBS)
    assert create.body["runtimeConfig"]["parameterValues"]["data_source"] == (
        "gs://acme-data/incoming/tables/")
    [decision] = decisions(reference + "decisions")
    assert decision["reason"] == "drift: b"
    assert decision["table"] == "gs://acme-data/incoming/tables/a-new.csv"


def test_drift_of_an_rgb_image_folder_samples_evenly_and_names_the_channels(tmp_path):
    from test_data import write_image_folder

    from torchship.components.data import drift as trigger  # what the function ships
    from torchship.components.data.stage import prepare_data

    write_image_folder(str(tmp_path / "shapes"), per_class=30, colour_every=3)
    statistics = prepare_data(str(tmp_path / "shapes"), "", *(
        str(tmp_path / split) for split in ("train", "val", "test")))["statistics"]
    assert list(statistics["features"]) == ["red", "green", "blue"]
    files = trigger.image_files(str(tmp_path / "shapes"))
    assert len(files) == 90 and {name for name, _ in files} == {"circle", "line", "square"}
    report = trigger.image_drift(statistics, str(tmp_path / "shapes"), trigger.Thresholds(),
                                 max_images=30)
    assert not report["drifted"] and report["sample"]["images"] == 30
    # Ten of each class: the sample is spread over the whole listing, not its first class.
    assert report["label_linf"] == trigger.label_distance(statistics["labels"]["counts"],
                                                          ["circle", "line", "square"] * 10)
    assert max(m["js_distance"] for m in report["features"].values()) < 0.1
    # A table's reference is not an image folder's: its features are missing, which is drift.
    table = {"features": {"a": {"histogram": {"edges": [0.0], "counts": [1, 1]}}}}
    other = trigger.image_drift(table, str(tmp_path / "shapes"), trigger.Thresholds())
    assert other["drifted"] and other["missing"] == ["a"] and other["features"] == {}


def test_retrain_status_measures_an_image_folder_per_channel(tmp_path):
    """`torchship retrain-status --data FOLDER` on an image folder: each channel's line, the
    sample it measured, the classes' distance; on a folder of tables, its newest table."""
    from test_data import write_image_folder

    from torchship.components.data.stage import prepare_data, write_statistics
    from torchship.components.errors import UserInputError
    from torchship.pipelines.retrain import status_lines

    write_image_folder(str(tmp_path / "shapes"), per_class=30, colour_every=3)
    statistics = prepare_data(str(tmp_path / "shapes"), "", *(
        str(tmp_path / split) for split in ("train", "val", "test")))["statistics"]
    reference = tmp_path / "reference"
    write_statistics(statistics, str(reference / "statistics.json"))
    (reference / "serving.json").write_text(json.dumps({
        "model": "fp32", "version": 1, "target": "local", "test_accuracy": 0.9, "p99_ms": 1.0,
        "target_concurrency": 2, "training_rows": 60, "data_source": "x",
        "kept_at": "2026-12-04T00:00:00Z"}))
    copy_folder(tmp_path / "shapes", str(tmp_path / "inverted"), change=lambda p: 255 - p)

    same = status_lines(str(reference), str(tmp_path / "shapes"), max_images=45)
    assert f"{tmp_path / 'shapes'} against the reference: no drift" in same[2]
    assert same[3].startswith("  a sample of 45 of 90 images (pixel-intensity histogram")
    assert same[4].split()[:3] == ["channel", "JS", "distance"]
    rows = [line.split() for line in same[5:8]]
    assert [row[0] for row in rows] == ["red", "green", "blue"]
    assert all(float(row[1]) < 0.1 and len(row) == 3 for row in rows)
    assert same[-1].startswith("  labels L-inf ")

    inverted = status_lines(str(reference), str(tmp_path / "inverted"))
    assert "drifted" in inverted[2] and "of 90 images" in inverted[3]
    assert [line.split()[-1] for line in inverted[5:8]] == ["yes", "yes", "yes"]

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no class sub-folders of images"):
        status_lines(str(reference), str(tmp_path / "empty"))


def test_a_feature_can_have_its_own_thresholds(monkeypatch):
    """FEATURE_THRESHOLDS: a feature known to wander gets looser thresholds, the rest the global
    ones; a malformed value is one line naming the setting."""
    import importlib.util

    from torchship.components.data import drift as measures

    histogram = {"edges": [-1.0, 0.0, 1.0], "counts": [16, 34, 34, 16]}
    statistics = {"features": {"a": {"histogram": histogram}, "b": {"histogram": histogram}}}
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"a": rng.normal(size=2000) + 2, "b": rng.normal(size=2000) + 2})
    assert measures.drift(statistics, table, measures.Thresholds())["moved"] == ["a", "b"]
    loose = measures.Thresholds(features={"a": {"js_distance": 0.9, "psi": 50.0}})
    report = measures.drift(statistics, table, loose)
    assert report["moved"] == ["b"] and report["thresholds"]["features"] == loose.features

    monkeypatch.syspath_prepend(str(TRIGGER.parent))
    spec = importlib.util.spec_from_file_location("trigger_main", TRIGGER)
    trigger = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trigger)
    assert trigger.feature_thresholds_from('{"a": {"psi": 1}}') == {"a": {"psi": 1}}
    for bad in ('{"a": 0.3}', '{"a": {"jsd": 0.3}}', '{"a": {"psi": -1}}', "[1]", "{"):
        with pytest.raises(RuntimeError, match="^FEATURE_THRESHOLDS ") as raised:
            trigger.feature_thresholds_from(bad)
        assert "\n" not in str(raised.value)
