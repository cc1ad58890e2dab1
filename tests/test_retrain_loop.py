"""The retraining loop played whole: the trigger (infra/trigger/main.py) under the real
functions-framework, submitting through the real aiplatform SDK to the recording fake of Vertex
AI; the runs it submits executed by kfp.local (`torchship run`) with the parameter values Vertex
AI received; a local folder standing for Cloud Storage (fsspec, under gs://) between them.

Event by event: a first object with no reference yet is submitted and says why; redelivered, it
stays one job; its run deploys and keeps the reference; a new object like the training data is
skipped with its distances; a drifted one is submitted with caching off and itself as the data
source, and its run, training a worse model, gates against the first run's serving record and is
refused, the serving version unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fake_vertex import FakeVertex
from functions_framework import create_app
from google.cloud.aiplatform.utils import gcs_utils
from processes import torchship
from test_trigger import storage_event

TRIGGER = Path(__file__).resolve().parents[1] / "infra" / "trigger" / "main.py"
PIPELINES, DATA = "acme-pipelines", "acme-data"
REFERENCE = f"gs://{PIPELINES}/root/torchship-reference/torchship/local/"
# What every triggered run gets (the trigger's PARAMETER_VALUES): deploy here, small and quick.
RUN_PARAMETERS = {"deploy_target": "local", "epochs": 3, "finetune_epochs": 1,
                  "benchmark_duration_s": 1, "benchmark_concurrency": [1, 2],
                  "target_concurrency": 2, "variants": ["fp32", "int8"]}


@pytest.fixture
def storage(tmp_path, monkeypatch):
    """Cloud Storage as a local folder: gs://BUCKET/NAME is tmp_path/gcs/BUCKET/NAME, through
    fsspec in this process (the trigger), and as plain paths for the runs."""
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "gcs"
    root.mkdir()

    class LocalGCS(DirFileSystem):
        protocol = ("gs", "gcs")
        cachable = False

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    fsspec.register_implementation("gs", LocalGCS, clobber=True)
    yield root
    fsspec.register_implementation("gs", "gcsfs.GCSFileSystem", clobber=True)


def local(uri: str, root: Path) -> str:
    return str(root / uri[len("gs://"):]) + ("/" if uri.endswith("/") else "")


@pytest.fixture
def vertex(monkeypatch, pipeline_yaml, storage):
    monkeypatch.setattr(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist",
                        lambda *args, **kwargs: None)
    with FakeVertex() as server:
        for key, value in {"PROJECT": "acme", "REGION": "us-central1",
                           "PIPELINE_TEMPLATE": str(pipeline_yaml),
                           "PIPELINE_ROOT": f"gs://{PIPELINES}/root",
                           "DATA_PREFIX": f"gs://{DATA}/incoming/", "LABEL_COLUMN": "target",
                           "REFERENCE_URI": REFERENCE,
                           "PARAMETER_VALUES": json.dumps(RUN_PARAMETERS),
                           "VERTEX_API_ENDPOINT": server.endpoint}.items():
            monkeypatch.setenv(key, value)
        yield server


def deliver(client, name: str, generation: str, event_id: str) -> None:
    storage_event(client, name, generation, bucket=DATA, event_id=event_id)


def jobs(fake: FakeVertex) -> list[dict]:
    return [job for key, job in fake.resources.items() if "/pipelineJobs/" in key]


def decisions(root: Path) -> list[dict]:
    folder = Path(local(REFERENCE, root)) / "decisions"
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))
            if path.name != "latest.json"]


def run_as_vertex_would(pipeline_yaml: Path, job: dict, root: Path,
                        **overrides) -> tuple[int, str]:
    """Execute a submitted job on kfp.local: its parameter values, gs:// read from the folder
    that stands for Cloud Storage, under the pipeline root it was given."""
    values = {**job["runtimeConfig"]["parameterValues"], **overrides}
    arguments = []
    for name, value in values.items():
        if isinstance(value, str) and value.startswith("gs://"):
            value = local(value, root)
        arguments += ["-p", f"{name}={json.dumps(value) if not isinstance(value, str) else value}"]
    done = torchship("run", str(pipeline_yaml), "--pipeline-root",
                     local(job["runtimeConfig"]["gcsOutputDirectory"], root), *arguments,
                     timeout=900)
    return done.returncode, done.stdout + done.stderr


def test_the_loop_retrains_on_new_data_only_when_it_drifted_and_keeps_what_serves(
        vertex, storage, pipeline_yaml):
    from sklearn.datasets import load_digits

    digits = load_digits(as_frame=True).frame
    incoming = storage / DATA / "incoming"
    incoming.mkdir(parents=True)
    digits.to_csv(incoming / "2026-12-01.csv", index=False)
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()

    # 1. The first object: no reference yet, so it is submitted, and the decision says why.
    deliver(client, "incoming/2026-12-01.csv", "1", "e1")
    [job] = jobs(vertex)
    [first] = decisions(storage)
    assert (first["status"], first["reason"]) == ("submitted", "first run: no reference yet")
    parameters = job["runtimeConfig"]["parameterValues"]
    assert parameters["data_source"] == f"gs://{DATA}/incoming/2026-12-01.csv"
    assert parameters["reference_uri"] == REFERENCE and parameters["deploy_target"] == "local"

    # 2. Eventarc delivers at least once: the same object generation again is still one job.
    deliver(client, "incoming/2026-12-01.csv", "1", "e1-again")
    assert len(jobs(vertex)) == 1 and decisions(storage)[-1]["status"] == "duplicate"

    # 3. The run (Vertex AI's part, here kfp.local) deploys and keeps the reference.
    status, output = run_as_vertex_would(pipeline_yaml, job, storage)
    assert status == 0, output[-4000:]
    reference = Path(local(REFERENCE, storage))
    serving = json.loads((reference / "serving.json").read_text())
    assert serving["version"] == 1 and serving["target"] == "local"
    assert serving["data_source"] == local(parameters["data_source"], storage)
    assert (reference / "statistics.json").is_file()

    # 4. A new object drawn like the training data: skipped, with the distances that say so.
    digits.sample(900, random_state=7).to_csv(incoming / "2026-12-02.csv", index=False)
    deliver(client, "incoming/2026-12-02.csv", "1", "e2")
    assert len(jobs(vertex)) == 1
    skipped = decisions(storage)[-1]
    assert (skipped["status"], skipped["reason"]) == ("skipped", "no drift")
    assert len(skipped["drift"]["features"]) == 64
    assert max(f["js_distance"] for f in skipped["drift"]["features"].values()) < 0.1
    assert skipped["drift"]["label_linf"] < 0.1

    # 5. A drifted object (zeros five times as common): submitted, caching off, itself the data.
    zeros = digits[digits["target"] == 0]
    drifted = pd.concat([digits, *[zeros] * 4])
    drifted.to_csv(incoming / "2026-12-03.csv", index=False)
    deliver(client, "incoming/2026-12-03.csv", "1", "e3")
    _, second = jobs(vertex)  # in the order they were created
    made = decisions(storage)[-1]
    assert made["status"] == "submitted" and made["reason"].startswith("drift: ")
    assert made["reason"].endswith("labels")
    assert made["drift"]["label_linf"] > 0.1
    assert second["runtimeConfig"]["parameterValues"]["data_source"] == (
        f"gs://{DATA}/incoming/2026-12-03.csv")
    tasks = second["pipelineSpec"]["root"]["dag"]["tasks"]
    assert "prepare-data" in tasks and all(
        task.get("cachingOptions", {}).get("enableCache") is not True for task in tasks.values())

    # 6. Its run trains a worse model (one epoch at a crawl, fp32 alone): the gate compares it
    # with the first run's serving record, refuses it, and version 1 still serves.
    status, output = run_as_vertex_would(pipeline_yaml, second, storage, epochs=1,
                                         learning_rate=1e-5, variants=["fp32"])
    assert status == 1, output[-4000:]
    assert "not deployed: the serving version is unchanged" in output
    [gate_path] = [line.split(": ", 1)[1] for line in output.splitlines()
                   if line.startswith("gate: /")]
    gate = json.loads(Path(gate_path).read_text())
    assert not gate["passed"]
    assert gate["baseline"]["source"].startswith(
        f"serving record {reference}/serving.json ('{serving['model']}' version 1)")
    [accuracy] = [c for c in gate["checks"] if c["name"] == "accuracy"]
    assert not accuracy["passed"] and "vs serving baseline" in accuracy["detail"]
    assert json.loads((reference / "serving.json").read_text()) == serving
    repository = storage / PIPELINES / "root" / "model_repository" / serving["model"]
    assert sorted(p.name for p in repository.iterdir() if p.name.isdigit()) == ["1"]
