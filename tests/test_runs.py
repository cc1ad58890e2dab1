"""`torchship runs list|get|cancel` on Vertex AI: the real aiplatform SDK against the recording
fake (Kubeflow's are in test_kubeflow.py)."""

import re

from click.testing import CliRunner
from test_vertex import PROJECT, REFERENCE, REGION, WHERE, cli

from torchship.pipelines.cli import main

JOBS = f"projects/{PROJECT}/locations/{REGION}/pipelineJobs"
PLACE = ["--project", PROJECT, "--region", REGION]


def test_runs_list_get_and_cancel_the_pipelines_jobs(fake, pipeline_yaml):
    cli("submit", str(pipeline_yaml), *WHERE, "--job-id", "first", "-p", "epochs=3")
    cli("submit", str(pipeline_yaml), *WHERE, "--job-id", "second", "--display-name", "retry")
    # A job of another pipeline in the same project is not one of this pipeline's runs.
    fake.resources[f"{JOBS}/other"] = {
        "name": f"{JOBS}/other", "displayName": "other", "state": "PIPELINE_STATE_RUNNING",
        "createTime": "2030-01-01T00:00:00Z", "pipelineSpec": {"pipelineInfo": {"name": "etl"}}}

    lines = cli("runs", "list", *PLACE).splitlines()
    [listed] = fake.calls("GET", rf"^/v1/{JOBS}$")
    assert listed.query["filter"] == ['pipeline_name="torchship"']
    # Newest first, one line each: ID, state, creation time, display name.
    assert [line.split()[0] for line in lines] == ["second", "first"]
    assert re.fullmatch(r"second  PENDING  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  retry", lines[0])
    assert cli("runs", "list", *PLACE, "--limit", "1").splitlines() == lines[:1]

    shown = cli("runs", "get", "first", *PLACE)
    assert fake.calls("GET", rf"^/v1/{JOBS}/first$")
    assert shown.splitlines()[0] == "first  RUNNING  torchship"
    assert re.search(r"created \S+Z  started \S+Z  ended -", shown)
    assert "    epochs = 3\n" in shown and f'    reference_uri = "{REFERENCE}"\n' in shown
    assert shown.rstrip().endswith(
        f"https://console.cloud.google.com/vertex-ai/locations/{REGION}/pipelines/runs/first"
        f"?project={PROJECT}")

    assert cli("runs", "cancel", "first", *PLACE) == f"cancelling {JOBS}/first\n"
    assert len(fake.calls("POST", rf"^/v1/{JOBS}/first:cancel$")) == 1
    assert not fake.calls("POST", rf"{JOBS}/second:cancel")
    shown = cli("runs", "get", "first", *PLACE)
    assert shown.startswith("first  CANCELLED  torchship")
    assert re.search(r"ended \d{4}-\S+Z", shown)


def test_runs_get_of_an_unknown_job_is_one_error_line(fake):
    result = CliRunner().invoke(main, ["runs", "get", "nope", *PLACE])
    assert result.exit_code == 2
    [line] = result.output.splitlines()
    assert line.startswith("error: Vertex AI answered 404") and f"{JOBS}/nope" in line


def test_runs_without_a_project_say_how_to_give_one(monkeypatch):
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    result = CliRunner().invoke(main, ["runs", "list"])
    assert result.exit_code == 2
    assert result.output == "error: no Google Cloud project; pass --project or set " \
                            "GOOGLE_CLOUD_PROJECT\n"
