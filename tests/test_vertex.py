"""Submit, schedule and publish with the real google-cloud-aiplatform SDK against a local fake."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from torchship.pipelines.cli import main

PROJECT, REGION = "acme-ml-prod", "europe-west4"
ROOT = "gs://acme-pipelines/torchship"
# Where a deploying run keeps the retraining reference (the submit CLI fills it in).
REFERENCE = f"{ROOT}/torchship-reference/torchship/local/"
SERVICE_ACCOUNT = "pipelines@acme-ml-prod.iam.gserviceaccount.com"
NETWORK = "projects/123456/global/networks/ml-vpc"


@pytest.fixture(scope="module")
def pipeline_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compiled") / "torchship.yaml"
    subprocess.run([sys.executable, "-m", "torchship.pipelines.cli", "compile", "-o", str(path),
                    "--image", "europe-west4-docker.pkg.dev/acme/ml/torchship-cpu:0.1.0"],
                   check=True, capture_output=True)
    return path




def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


WHERE = ["--project", PROJECT, "--region", REGION, "--pipeline-root", ROOT,
         "--service-account", SERVICE_ACCOUNT, "--network", NETWORK]


def test_submit_sends_spec_parameters_root_account_network_and_labels(fake, pipeline_yaml):
    output = cli("submit", str(pipeline_yaml), *WHERE, "-p", "epochs=20", "-p",
                 "benchmark_concurrency=[1,8]", "-p", "data_source=gs://acme-data/new.csv",
                 "--label", "team=ml", "--label", "trigger=manual", "--no-caching", "--wait")

    [create] = fake.calls("POST", rf"^/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs$")
    job = create.body
    compiled = yaml.safe_load(pipeline_yaml.read_text())
    # The compiled spec, as compiled (the SDK only sets caching options on each DAG's tasks).
    def executed(components: dict) -> dict:
        return {name: c for name, c in components.items() if "executorLabel" in c}

    assert executed(job["pipelineSpec"]["components"]) == executed(compiled["components"])
    assert job["pipelineSpec"]["deploymentSpec"] == compiled["deploymentSpec"]
    assert job["pipelineSpec"]["root"]["dag"]["tasks"].keys() == compiled["root"]["dag"]["tasks"].keys()
    runtime = job["runtimeConfig"]
    assert runtime["gcsOutputDirectory"] == ROOT
    # The gate's target concurrency follows the levels given (4 is not among them).
    assert runtime["parameterValues"] == {"epochs": 20, "benchmark_concurrency": [1, 8],
                                          "data_source": "gs://acme-data/new.csv",
                                          "target_concurrency": 1, "reference_uri": REFERENCE}
    assert "target concurrency 1: the largest measured level up to the default 4" in output
    assert job["serviceAccount"] == SERVICE_ACCOUNT and job["network"] == NETWORK
    assert job["labels"]["team"] == "ml" and job["labels"]["trigger"] == "manual"
    # Caching off reaches every task.
    tasks = job["pipelineSpec"]["root"]["dag"]["tasks"]
    assert all(t.get("cachingOptions", {}).get("enableCache") in (False, None) for t in tasks.values())
    assert "console.cloud.google.com/vertex-ai/locations/europe-west4/pipelines/runs/" in output
    assert "finished: PIPELINE_STATE_SUCCEEDED" in output


KEY = f"projects/{PROJECT}/locations/{REGION}/keyRings/ml/cryptoKeys/pipelines"
STORE = f"projects/{PROJECT}/locations/{REGION}/metadataStores/default"


def test_submit_with_a_parameter_file_an_experiment_and_a_key(fake, pipeline_yaml, tmp_path):
    values = tmp_path / "p.yaml"
    values.write_text("epochs: 7\nbenchmark_concurrency: [1, 2]\n"
                      "data_source: gs://acme-data/a.csv\n")
    output = cli("submit", str(pipeline_yaml), *WHERE, "--param-file", str(values),
                 "-p", "epochs=9", "--experiment", "digits-tuning",
                 "--encryption-spec-key-name", KEY, "--display-name", "tuning-by-hand",
                 "--job-id", "digits-run-1")

    [create] = fake.calls("POST", rf"^/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs$")
    assert create.query["pipelineJobId"] == ["digits-run-1"]
    job = create.body
    assert job["displayName"] == "tuning-by-hand"
    assert job["encryptionSpec"] == {"kmsKeyName": KEY}
    # The file's values, -p winning over it; typed as the file wrote them.
    assert job["runtimeConfig"]["parameterValues"] == {
        "epochs": 9, "benchmark_concurrency": [1, 2], "data_source": "gs://acme-data/a.csv",
        "target_concurrency": 2, "reference_uri": REFERENCE}
    # The experiment is a metadata context the SDK made, and the job's run context is its child.
    experiment = fake.resources[f"{STORE}/contexts/digits-tuning"]
    assert experiment["schemaTitle"] == "system.Experiment"
    run_context = fake.resources[f"{STORE}/contexts/digits-run-1"]
    assert run_context["schemaTitle"] == "system.PipelineRun"
    assert run_context["parentContexts"] == [experiment["name"]]
    [add] = fake.calls("POST", r"/contexts/digits-tuning:addContextChildren$")
    assert add.body == {"childContexts": [run_context["name"]]}
    assert "experiment: digits-tuning" in output

    # A second run joins the same experiment; the experiment is not made again.
    cli("submit", str(pipeline_yaml), *WHERE, "--experiment", "digits-tuning",
        "--job-id", "digits-run-2")
    assert len(fake.calls("POST", r"/metadataStores/default/contexts$")) == 1
    assert fake.resources[f"{STORE}/contexts/digits-run-2"]["parentContexts"] == [
        experiment["name"]]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("list.yaml", "- epochs\n- 3\n", "holds a list, not a mapping"),
    ("broken.json", '{"epochs": 3,', "does not parse as YAML or JSON at line 1"),
    ("missing.yaml", None, "cannot read it (No such file or directory)"),
])
@pytest.mark.parametrize("command", [["submit"], ["schedule", "create", "--cron", "0 3 * * *"]])
def test_a_parameter_file_that_is_not_a_mapping_is_one_error_line(fake, pipeline_yaml, tmp_path,
                                                                  command, name, content,
                                                                  message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = CliRunner().invoke(main, [*command[:2], str(pipeline_yaml), *WHERE, *command[2:],
                                       "--param-file", str(path)])
    assert result.exit_code == 2, result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"error: --param-file {path}") and message in line
    assert not fake.calls("POST", "pipelineJobs") and not fake.calls("POST", "schedules")


def test_schedule_takes_a_json_parameter_file_and_a_key_but_no_experiment(fake, pipeline_yaml,
                                                                         tmp_path):
    values = tmp_path / "p.json"
    values.write_text(json.dumps({"epochs": 30, "max_accuracy_drop_pt": 0.5}))
    cli("schedule", "create", str(pipeline_yaml), *WHERE, "--display-name", "nightly",
        "--cron", "0 3 * * *", "--param-file", str(values), "--encryption-spec-key-name", KEY)
    [create] = fake.calls("POST", rf"^/v1/projects/{PROJECT}/locations/{REGION}/schedules$")
    assert create.body["displayName"] == "nightly"
    job = create.body["createPipelineJobRequest"]["pipelineJob"]
    assert job["encryptionSpec"] == {"kmsKeyName": KEY}
    assert job["runtimeConfig"]["parameterValues"] == {
        "epochs": 30, "max_accuracy_drop_pt": 0.5, "reference_uri": REFERENCE}

    result = CliRunner().invoke(main, ["schedule", "create", str(pipeline_yaml), *WHERE,
                                       "--cron", "0 3 * * *", "--experiment", "nightly"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --experiment: a Vertex AI schedule's runs cannot")
    assert len(fake.calls("POST", "schedules")) == 1


def test_options_of_the_other_platform_are_refused(fake, pipeline_yaml):
    for extra, message in [(["--namespace", "ml-team"], "--namespace is a Kubeflow namespace"),
                           (["--kfp-host", "http://127.0.0.1:1", "--encryption-spec-key-name",
                             KEY], "--encryption-spec-key-name is for Vertex AI")]:
        result = CliRunner().invoke(main, ["submit", str(pipeline_yaml), *WHERE, *extra])
        assert result.exit_code == 2 and result.output.startswith(f"error: {message}")
    assert not fake.requests


def test_submit_fails_clearly_on_a_root_that_is_not_gcs(fake, pipeline_yaml):
    result = CliRunner().invoke(main, ["submit", str(pipeline_yaml), "--project", PROJECT,
                                       "--pipeline-root", "/tmp/root"])
    assert result.exit_code == 2
    assert "error: pipeline root '/tmp/root' is not a gs:// URI" in result.output
    assert not fake.calls("POST", "pipelineJobs")


def test_schedule_sends_cron_with_zone_and_limits_then_lists_pauses_resumes_deletes(
        fake, pipeline_yaml):
    output = cli("schedule", "create", str(pipeline_yaml), *WHERE, "--name", "nightly",
                 "--cron", "0 3 * * *", "--time-zone", "Europe/Amsterdam",
                 "--max-concurrent-runs", "2", "--start-time", "2027-01-01T00:00:00Z",
                 "--end-time", "2027-12-31T00:00:00Z", "-p", "epochs=30")
    [create] = fake.calls("POST", rf"^/v1/projects/{PROJECT}/locations/{REGION}/schedules$")
    body = create.body
    assert body["cron"] == "TZ=Europe/Amsterdam 0 3 * * *"
    assert body["maxConcurrentRunCount"] == "2" or body["maxConcurrentRunCount"] == 2
    assert body["startTime"].startswith("2027-01-01") and body["endTime"].startswith("2027-12-31")
    request = body["createPipelineJobRequest"]
    assert request["pipelineJob"]["runtimeConfig"]["parameterValues"] == {
        "epochs": 30, "reference_uri": REFERENCE}
    assert request["pipelineJob"]["serviceAccount"] == SERVICE_ACCOUNT
    name = re.search(r"created schedule (\S+)", output).group(1)

    assert "nightly" in cli("schedule", "list", "--project", PROJECT, "--region", REGION)
    cli("schedule", "pause", name, "--project", PROJECT, "--region", REGION)
    assert fake.resources[name]["state"] == "PAUSED"
    cli("schedule", "resume", name, "--project", PROJECT, "--region", REGION)
    assert fake.resources[name]["state"] == "ACTIVE"
    cli("schedule", "delete", name, "--project", PROJECT, "--region", REGION)
    assert name not in fake.resources


def test_schedule_refuses_a_cron_vertex_cannot_read(fake, pipeline_yaml):
    result = CliRunner().invoke(main, ["schedule", "create", str(pipeline_yaml), *WHERE,
                                       "--cron", "0 0 3 * * *"])
    assert result.exit_code == 2 and "does not have 5 fields" in result.output
    assert not fake.calls("POST", "schedules")


VERTEX_DEPLOY = {"project": PROJECT, "location": REGION, "model_display_name": "digits",
                 "serving_image_uri": "us-docker.pkg.dev/acme/serving/tritonserver:24.09"}


@pytest.mark.parametrize(("parameters", "message"), [
    (["deploy_target=vertex"],
     "needs deploy_settings project, location, serving_image_uri"),
    (["deploy_target=vertex", "deploy_settings=" + json.dumps({**VERTEX_DEPLOY, "replicas": 2})],
     "deploy_settings replicas are not settings of the 'vertex' target; use any of "),
    (["deploy_settings={\"name\": \"digits\"}"], "are for remote targets"),
    (["deploy_target=cloudrun"], "deploy target 'cloudrun' is unknown"),
    (["deploy_target=kserve", "deploy_settings=[1]"], "deploy_settings=[1] is not a JSON object"),
])
@pytest.mark.parametrize("command", [["submit"], ["schedule", "create", "--cron", "0 3 * * *"]])
def test_deploy_settings_the_deploy_stage_would_refuse_are_refused_before_submitting(
        fake, pipeline_yaml, command, parameters, message):
    # The deploy stage runs last: a mistake here would otherwise surface hours into the run,
    # and on a schedule, in every run.
    result = CliRunner().invoke(main, [*command[:2], str(pipeline_yaml), *WHERE, *command[2:],
                                       *(arg for p in parameters for arg in ("-p", p))])
    assert result.exit_code == 2, result.output
    [line] = result.output.splitlines()
    assert line.startswith("error: ") and message in line
    assert not fake.calls("POST", "pipelineJobs") and not fake.calls("POST", "schedules")


def test_complete_vertex_deploy_settings_are_submitted(fake, pipeline_yaml):
    cli("submit", str(pipeline_yaml), *WHERE, "-p", "deploy_target=vertex",
        "-p", "deploy_settings=" + json.dumps({**VERTEX_DEPLOY, "min_replicas": 2}))
    [create] = fake.calls("POST", "pipelineJobs")
    values = create.body["runtimeConfig"]["parameterValues"]
    assert values["deploy_settings"] == {**VERTEX_DEPLOY, "min_replicas": 2}


def test_kubeflow_cron_takes_six_fields_seconds_first():
    from torchship.components.errors import UserInputError
    from torchship.pipelines.kubeflow import check_cron

    assert check_cron("0 3 * * *") == "0 0 3 * * *"
    assert check_cron("30 0 3 * * *") == "30 0 3 * * *"
    with pytest.raises(UserInputError, match="Kubeflow takes 6"):
        check_cron("3 * *")


def test_publish_pushes_the_yaml_with_tags_to_the_template_registry(fake, pipeline_yaml):
    host = f"{fake.endpoint}/v1/projects/{PROJECT}/locations/{REGION}/repositories/pipelines"
    output = cli("publish", str(pipeline_yaml), "--host", host, "--tag", "v0.1.0",
                 "--tag", "latest")
    [stored] = [r for key, r in fake.resources.items() if "repositories/pipelines" in key]
    assert stored["package"] == "torchship" and stored["tags"] == ["v0.1.0", "latest"]
    assert pipeline_yaml.read_text() in stored["content"]
    assert f"template URI: {host}/torchship/v0.1.0" in output


def test_compiled_yaml_holds_no_project_bucket_or_credential(tmp_path):
    for target in ("local", "vertex"):
        path = tmp_path / f"{target}.yaml"
        cli("compile", "-o", str(path), "--target", target, "--image", "registry.local/ts:1")
        text = path.read_text()
        assert "gs://" not in text
        assert not re.search(r"projects/[\w-]+/", text)
        assert not re.search(r"(?i)(api[_-]?key|secret|password|bearer|private_key)", text)
