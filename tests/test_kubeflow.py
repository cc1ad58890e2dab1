"""The retraining loop on open-source Kubeflow Pipelines: `torchship submit` / `schedule create
--kfp-host` and the trigger with KFP_HOST, through the real kfp SDK (kfp.Client) against a local
stand-in for the KFP API server (tests/fake_kfp.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from fake_kfp import FakeKFP
from functions_framework import create_app

from torchship.pipelines import kubeflow
from torchship.pipelines.cli import main

TRIGGER = Path(__file__).resolve().parents[1] / "infra" / "trigger" / "main.py"
ROOT = "gs://acme-pipelines/root"
REFERENCE = f"{ROOT}/torchship-reference/torchship/kserve/"
KSERVE = {"name": "digits", "namespace": "ml-team"}


@pytest.fixture
def kfp_server():
    with FakeKFP() as server:
        yield server


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def root_tasks(spec: dict) -> dict:
    return spec["root"]["dag"]["tasks"]


def all_tasks(spec: dict) -> dict:
    """Every task of the pipeline: the root DAG's and those of nested DAGs (conditions)."""
    return {name: task for component in [spec["root"], *spec["components"].values()]
            for name, task in component.get("dag", {}).get("tasks", {}).items()}


def test_submit_and_schedule_reach_kubeflow_with_their_parameters(kfp_server, pipeline_yaml):
    run_id = kubeflow.submit(kfp_server.endpoint, str(pipeline_yaml),
                             {"data_source": "gs://acme-data/incoming/a.csv", "epochs": 3},
                             run_name="by-hand", enable_caching=False)
    run = kfp_server.runs[run_id]
    assert run["display_name"] == "by-hand"
    assert run["runtime_config"]["parameters"] == {
        "data_source": "gs://acme-data/incoming/a.csv", "epochs": 3}
    # --no-caching reaches every task, a condition's too (kfp's own override stops at the root).
    assert {"prepare-data", "deploy"} <= set(all_tasks(run["pipeline_spec"]))
    assert not [name for name, task in all_tasks(run["pipeline_spec"]).items()
                if task.get("cachingOptions", {}).get("enableCache")]
    [experiment] = kfp_server.experiments.values()
    assert experiment["display_name"] == "torchship" and run["experiment_id"] == (
        experiment["experiment_id"])

    recurring_id = kubeflow.schedule(
        kfp_server.endpoint, str(pipeline_yaml),
        {"data_source": "gs://acme-data/incoming/", "reference_uri": REFERENCE}, "nightly",
        "0 3 * * *", max_concurrent_runs=2)
    recurring = kfp_server.recurring_runs[recurring_id]
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert recurring["max_concurrency"] in (2, "2") and recurring["mode"] == "ENABLE"
    assert recurring["runtime_config"]["parameters"] == {
        "data_source": "gs://acme-data/incoming/", "reference_uri": REFERENCE}
    assert recurring["experiment_id"] == experiment["experiment_id"]  # found, not made again
    assert len(kfp_server.experiments) == 1
    # Caching not asked for: each task caches as compiled.
    compiled = yaml.safe_load(pipeline_yaml.read_text())
    assert {name: bool(task.get("cachingOptions", {}).get("enableCache"))
            for name, task in all_tasks(recurring["pipeline_spec"]).items()} == {
        name: bool(task.get("cachingOptions", {}).get("enableCache"))
        for name, task in all_tasks(compiled).items()}


def test_cli_schedule_create_on_kubeflow_keeps_the_reference(kfp_server, pipeline_yaml):
    """`torchship schedule create --kfp-host`: the recurring run of the retraining loop, the cron
    with seconds first, the reference under the pipeline root."""
    output = cli("schedule", "create", str(pipeline_yaml), "--kfp-host", kfp_server.endpoint,
                 "--name", "nightly-retrain", "--cron", "0 3 * * *", "--max-concurrent-runs", "1",
                 "--pipeline-root", ROOT, "-p", "data_source=gs://acme-data/incoming/",
                 "-p", "deploy_target=kserve", "-p", f"deploy_settings={json.dumps(KSERVE)}",
                 "-p", "epochs=5")
    [recurring] = kfp_server.recurring_runs.values()
    assert f"created recurring run {recurring['recurring_run_id']}" in output
    assert recurring["display_name"] == "nightly-retrain"
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert recurring["max_concurrency"] in (1, "1")
    assert recurring["runtime_config"]["pipeline_root"] == ROOT
    parameters = recurring["runtime_config"]["parameters"]
    assert parameters["data_source"] == "gs://acme-data/incoming/"
    assert parameters["reference_uri"] == REFERENCE
    assert parameters["deploy_target"] == "kserve" and parameters["epochs"] == 5
    assert parameters["deploy_settings"] == KSERVE
    # prepare-data is compiled uncached: every scheduled run reads the data present then.
    assert not root_tasks(recurring["pipeline_spec"])["prepare-data"].get(
        "cachingOptions", {}).get("enableCache")

    output = cli("submit", str(pipeline_yaml), "--kfp-host", kfp_server.endpoint,
                 "-p", "data_source=gs://acme-data/incoming/b.csv", "--no-caching")
    [run] = kfp_server.runs.values()
    assert f"submitted run {run['run_id']}" in output
    assert run["runtime_config"]["parameters"]["data_source"] == "gs://acme-data/incoming/b.csv"


# The trigger with KFP_HOST.


@pytest.fixture
def kfp_trigger(kfp_server, monkeypatch, pipeline_yaml, gcs):
    """The trigger's settings for Kubeflow: no PROJECT or REGION; the template kept in gs://."""
    import fsspec

    template = "gs://acme-pipelines/templates/torchship.yaml"
    with fsspec.open(template, "w") as handle:
        handle.write(pipeline_yaml.read_text())
    for key in ("PROJECT", "REGION", "VERTEX_API_ENDPOINT", "LABEL_COLUMN", "KFP_NAMESPACE",
                "KFP_EXPERIMENT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"KFP_HOST": kfp_server.endpoint, "PIPELINE_TEMPLATE": template,
                       "PIPELINE_ROOT": ROOT, "DATA_PREFIX": "gs://acme-data/incoming/",
                       "REFERENCE_URI": REFERENCE,
                       "PARAMETER_VALUES": json.dumps({"deploy_target": "kserve",
                                                       "deploy_settings": KSERVE,
                                                       "epochs": 4})}.items():
        monkeypatch.setenv(key, value)
    return kfp_server


def storage_event(client, name: str, generation: str, event_id: str = "1") -> None:
    headers = {"ce-id": event_id, "ce-specversion": "1.0",
               "ce-type": "google.cloud.storage.object.v1.finalized",
               "ce-source": "//storage.googleapis.com/projects/_/buckets/acme-data",
               "Content-Type": "application/json"}
    body = {"bucket": "acme-data", "name": name, "generation": generation}
    response = client.post("/", headers=headers, data=json.dumps(body))
    assert response.status_code == 200, response.data


def decisions() -> list[dict]:
    import fsspec

    fs = fsspec.filesystem("gs")
    return [json.loads(fs.cat_file(path))
            for path in sorted(fs.ls(REFERENCE + "decisions", detail=False))
            if not path.endswith("latest.json")]


def test_trigger_creates_one_uncached_run_per_object_generation_on_kubeflow(kfp_trigger):
    fake = kfp_trigger
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    storage_event(client, "incoming/2026-12-01.csv", "1700000000000001")

    [run] = fake.runs.values()
    [decision] = decisions()
    assert decision["status"] == "submitted" and decision["platform"] == "kubeflow"
    assert decision["run_id"] == run["run_id"] and decision["job_id"] == run["display_name"]
    assert decision["reason"] == "first run: no reference yet"
    assert run["display_name"].startswith("torchship-data-")
    assert run["runtime_config"] == {"pipeline_root": ROOT, "parameters": {
        "deploy_target": "kserve", "deploy_settings": KSERVE, "epochs": 4, "label_column": "label",
        "data_source": "gs://acme-data/incoming/2026-12-01.csv", "reference_uri": REFERENCE}}
    assert decision["parameters"] == run["runtime_config"]["parameters"]
    # Caching off for every task, nested DAGs' too (kfp's enable_caching=False reaches only the
    # root DAG's; the trigger turns the rest off itself).
    tasks = all_tasks(run["pipeline_spec"])
    assert {"prepare-data", "train", "deploy"} <= set(tasks)
    assert not [name for name, task in tasks.items()
                if task.get("cachingOptions", {}).get("enableCache")]
    [experiment] = fake.experiments.values()
    assert experiment["display_name"] == "torchship"
    assert run["experiment_id"] == experiment["experiment_id"]
    # Before creating, the trigger looked for a run of that name in the experiment.
    [lookup] = [r for r in fake.calls("GET", r"/runs$") if "filter" in r.query]
    assert lookup.query["experiment_id"] == [experiment["experiment_id"]]
    assert json.loads(lookup.query["filter"][0])["predicates"] == [
        {"operation": "EQUALS", "key": "display_name", "stringValue": run["display_name"]}]

    # Eventarc delivers at least once: the same generation again creates nothing.
    for delivery in ("2", "3"):
        storage_event(client, "incoming/2026-12-01.csv", "1700000000000001", event_id=delivery)
    assert len(fake.runs) == 1 and len(fake.calls("POST", r"/runs$")) == 1
    duplicate = decisions()[-1]
    assert duplicate["status"] == "duplicate" and duplicate["platform"] == "kubeflow"
    assert duplicate["run_id"] == run["run_id"] and duplicate["job_id"] == run["display_name"]

    # A new generation of the same object is new data: a second run.
    storage_event(client, "incoming/2026-12-01.csv", "1700000000000002")
    assert len(fake.runs) == 2
    second = decisions()[-1]
    assert second["status"] == "submitted" and second["run_id"] != run["run_id"]
    assert [d["status"] for d in decisions()] == ["submitted", "duplicate", "duplicate",
                                                  "submitted"]
    assert len(fake.experiments) == 1


def test_trigger_uses_the_named_experiment_and_namespace(kfp_trigger, monkeypatch,
                                                         pipeline_yaml):
    monkeypatch.setenv("KFP_EXPERIMENT", "retraining")
    monkeypatch.setenv("KFP_NAMESPACE", "ml-team")
    monkeypatch.setenv("PIPELINE_TEMPLATE", str(pipeline_yaml))  # a local path works too
    monkeypatch.setenv("SERVICE_ACCOUNT", "pipeline-runner")
    client = create_app("on_new_data", str(TRIGGER), "cloudevent").test_client()
    storage_event(client, "incoming/x.parquet", "7")
    [experiment] = kfp_trigger.experiments.values()
    assert experiment["display_name"] == "retraining" and experiment["namespace"] == "ml-team"
    [run] = kfp_trigger.runs.values()
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["service_account"] == "pipeline-runner"


def test_trigger_on_kubeflow_needs_a_compiled_yaml(kfp_trigger, monkeypatch):
    import importlib.util

    monkeypatch.setenv("PIPELINE_TEMPLATE",
                       "https://us-central1-kfp.pkg.dev/acme/pipelines/torchship/latest")
    monkeypatch.syspath_prepend(str(TRIGGER.parent))
    spec = importlib.util.spec_from_file_location("trigger_main", TRIGGER)
    trigger = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trigger)
    with pytest.raises(RuntimeError, match=r"^PIPELINE_TEMPLATE .* KFP_HOST") as raised:
        trigger.Settings.from_env()
    assert "\n" not in str(raised.value)


def test_the_function_on_kubeflow_imports_neither_torch_nor_torchship(kfp_server, pipeline_yaml):
    """The function's runtime has neither: submitting through kfp must not need them."""
    script = f"""
import json, sys
sys.path.insert(0, {str(TRIGGER.parent)!r})
import main
decision = main.handle({{"bucket": "acme-data", "name": "incoming/y.csv", "generation": "3"}},
                       main.Settings.from_env())
assert decision["status"] == "submitted", decision
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "torchship"}})
print(json.dumps(loaded))
"""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PROJECT", "REGION", "REFERENCE_URI", "PARAMETER_VALUES")}
    env.update(KFP_HOST=kfp_server.endpoint, PIPELINE_TEMPLATE=str(pipeline_yaml),
               PIPELINE_ROOT=ROOT, DATA_PREFIX="gs://acme-data/incoming/")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert len(kfp_server.runs) == 1


# Multi-user clusters: namespaces, experiments, a bearer token; following and stopping runs.

TOKEN = "kfp-token-of-ml-team"


@pytest.fixture
def kfp_cluster(monkeypatch):
    """A multi-user cluster's API server that takes only calls carrying TOKEN."""
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    with FakeKFP(multi_user=True, token=TOKEN) as server:
        yield server


def on(cluster: FakeKFP) -> list[str]:
    return ["--kfp-host", cluster.endpoint, "--namespace", "ml-team"]


def fails(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, result.output
    [line] = result.output.splitlines()
    assert line.startswith("error: ")
    return line


def test_cli_submit_to_a_namespace_and_experiment_with_a_token(kfp_cluster, pipeline_yaml,
                                                               tmp_path):
    values = tmp_path / "p.yaml"
    values.write_text("epochs: 4\ndata_source: gs://acme-data/incoming/a.csv\n")
    output = cli("submit", str(pipeline_yaml), *on(kfp_cluster), "--experiment", "tuning",
                 "--job-id", "digits-by-hand", "--param-file", str(values), "-p", "epochs=6")
    [experiment] = kfp_cluster.experiments.values()
    assert experiment["display_name"] == "tuning" and experiment["namespace"] == "ml-team"
    [run] = kfp_cluster.runs.values()
    assert f"submitted run {run['run_id']}" in output
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["display_name"] == "digits-by-hand"
    assert run["runtime_config"]["parameters"] == {
        "epochs": 6, "data_source": "gs://acme-data/incoming/a.csv"}
    assert {r.header("Authorization") for r in kfp_cluster.requests} == {f"Bearer {TOKEN}"}

    # Without the namespace the multi-user server refuses to look the experiment up; without
    # the token, everything: one line each, nothing made.
    line = fails("submit", str(pipeline_yaml), "--kfp-host", kfp_cluster.endpoint)
    assert line == (f"error: Kubeflow Pipelines at {kfp_cluster.endpoint} answered 400 Bad "
                    "Request: in multi-user mode, list by namespace or experiment")
    line = fails("submit", str(pipeline_yaml), *on(kfp_cluster), "--kfp-token", "stale")
    assert " answered 401 Unauthorized: " in line
    assert len(kfp_cluster.runs) == 1 and len(kfp_cluster.experiments) == 1


def test_cli_runs_list_get_and_cancel_on_kubeflow(kfp_cluster, pipeline_yaml):
    run_ids = []
    for name in ("first", "second"):
        cli("submit", str(pipeline_yaml), *on(kfp_cluster), "--job-id", name, "-p", "epochs=2")
        run_ids.append(next(r["run_id"] for r in kfp_cluster.runs.values()
                            if r["display_name"] == name))
    first, second = run_ids
    cli("submit", str(pipeline_yaml), *on(kfp_cluster), "--experiment", "elsewhere")

    lines = cli("runs", "list", *on(kfp_cluster)).splitlines()
    # The experiment's runs (default: torchship), newest first: ID, state, created, name.
    assert [line.split()[0] for line in lines] == [second, first]
    assert re.fullmatch(rf"{second}  PENDING  2026-01-01T00:00:\d\dZ  second", lines[0])
    listed = kfp_cluster.calls("GET", r"/runs$")[-1]
    torchship = next(e["experiment_id"] for e in kfp_cluster.experiments.values()
                     if e["display_name"] == "torchship")
    assert listed.query["experiment_id"] == [torchship]
    assert listed.query["sort_by"] == ["created_at desc"]
    assert cli("runs", "list", *on(kfp_cluster), "--experiment", "elsewhere").count("\n") == 1

    shown = cli("runs", "get", first, *on(kfp_cluster))
    assert shown.splitlines()[0] == f"{first}  PENDING  first"
    assert "    epochs = 2\n" in shown and "ended -" in shown
    assert shown.rstrip().endswith(f"{kfp_cluster.endpoint}/#/runs/details/{first}")

    assert cli("runs", "cancel", first, *on(kfp_cluster)) == (
        f"terminating run {first} on {kfp_cluster.endpoint}\n")
    assert len(kfp_cluster.calls("POST", rf"/runs/{first}:terminate$")) == 1
    assert kfp_cluster.runs[first]["state"] == "CANCELING"
    assert kfp_cluster.runs[second]["state"] == "PENDING"
    line = fails("runs", "get", "no-such-run", *on(kfp_cluster))
    assert " answered 404 Not Found: run no-such-run not found" in line


def test_cli_recurring_runs_in_a_namespace_and_experiment_paused_resumed_deleted(
        kfp_cluster, pipeline_yaml):
    where = [*on(kfp_cluster), "--experiment", "retraining"]
    cli("schedule", "create", str(pipeline_yaml), *where, "--display-name", "nightly",
        "--cron", "0 3 * * *", "-p", "epochs=5")
    [experiment] = kfp_cluster.experiments.values()
    assert experiment["display_name"] == "retraining" and experiment["namespace"] == "ml-team"
    [recurring] = kfp_cluster.recurring_runs.values()
    assert recurring["experiment_id"] == experiment["experiment_id"]
    assert recurring["runtime_config"]["parameters"] == {"epochs": 5}
    recurring_id = recurring["recurring_run_id"]

    assert cli("schedule", "list", *where) == f"{recurring_id}  ENABLED  0 0 3 * * *  nightly\n"
    assert cli("schedule", "pause", recurring_id, *where) == f"paused {recurring_id}\n"
    assert kfp_cluster.recurring_runs[recurring_id]["status"] == "DISABLED"
    assert len(kfp_cluster.calls("POST", rf"/recurringruns/{recurring_id}:disable$")) == 1
    assert "  DISABLED  " in cli("schedule", "list", *where)
    cli("schedule", "resume", recurring_id, *where)
    assert kfp_cluster.recurring_runs[recurring_id]["status"] == "ENABLED"
    cli("schedule", "delete", recurring_id, *where)
    assert len(kfp_cluster.calls("DELETE", rf"/recurringruns/{recurring_id}$")) == 1
    assert not kfp_cluster.recurring_runs and cli("schedule", "list", *where) == ""
    # Another experiment, or one that does not exist: said in one line.
    line = fails("schedule", "list", *on(kfp_cluster))
    assert line == (f"error: experiment 'torchship' not found on {kfp_cluster.endpoint} "
                    "(namespace ml-team); pass --experiment with the one the runs went to")
