"""The data step's Beam runner in the compiled pipeline: pipeline parameters the prepare-data task
takes at run time, the flags that set them, and what `submit` sends Vertex AI."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from apache_beam.options.pipeline_options import GoogleCloudOptions, WorkerOptions
from click.testing import CliRunner

from torchship.components.data.runners import PIPELINE_PARAMETERS, BeamRunner
from torchship.pipelines.cli import RUN_FLAGS, main
from torchship.pipelines.cli_cloud import _run_parameters

IMAGE = "europe-west4-docker.pkg.dev/acme-ml/ml/torchship-cpu:0.1.0"
PROJECT, REGION, ROOT = "acme-ml", "europe-west4", "gs://acme-pipelines/torchship"
DATAFLOW_FLAGS = ["--data-runner", "DataflowRunner",
                  "--dataflow-temp-location", "gs://acme-dataflow/temp",
                  "--dataflow-service-account", "dataflow@acme-ml.iam.gserviceaccount.com",
                  "--dataflow-max-workers", "32", "--dataflow-machine-type", "n2-standard-8"]


def compile_yaml(path: Path, platform: str, image: str = IMAGE) -> dict:
    subprocess.run([sys.executable, "-m", "torchship.pipelines.cli", "compile", "-o", str(path),
                    "--platform", platform, "--image", image], check=True, capture_output=True)
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module", params=["kfp", "vertex"])
def compiled(request, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp(request.param) / "pipeline.yaml"
    return path, compile_yaml(path, request.param)


def test_prepare_data_takes_its_runner_from_pipeline_parameters(compiled):
    _, spec = compiled
    declared = spec["root"]["inputDefinitions"]["parameters"]
    inputs = spec["root"]["dag"]["tasks"]["prepare-data"]["inputs"]["parameters"]
    for name in PIPELINE_PARAMETERS:
        # Bound to the run's parameter, not a constant compiled in.
        assert inputs[name] == {"componentInputParameter": name}, name
        assert declared[name]["isOptional"] is True
    assert declared["data_runner"]["defaultValue"] == "DirectRunner"
    for name in ("dataflow_region", "dataflow_service_account", "dataflow_temp_location",
                 "dataflow_project", "beam_job_endpoint"):
        assert declared[name] == {"defaultValue": "", "isOptional": True,
                                  "parameterType": "STRING"}, name
    assert declared["dataflow_max_workers"]["parameterType"] == "NUMBER_INTEGER"
    # The Dataflow workers run the image the pipeline was compiled with.
    assert inputs["sdk_container_image"] == {"runtimeValue": {"constant": IMAGE}}


def test_the_prepare_data_executor_builds_a_beam_runner_for_the_stage(compiled):
    _, spec = compiled
    container = spec["deploymentSpec"]["executors"]["exec-prepare-data"]["container"]
    source = " ".join(container["command"])
    assert "from torchship.components.data.runners import BeamRunner" in source
    assert "runner=data_runner, project=dataflow_project, region=dataflow_region" in source
    assert "temp_location=dataflow_temp_location" in source
    assert "service_account=dataflow_service_account" in source
    assert "model_name=model_name, runner=runner)" in source
    assert container["image"] == IMAGE


def test_every_runner_parameter_has_a_run_flag():
    for name in PIPELINE_PARAMETERS:
        assert RUN_FLAGS[name] == "--" + name.replace("_", "-")




@pytest.fixture(scope="module")
def vertex_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vertex") / "pipeline.yaml"
    compile_yaml(path, "vertex")
    return path


def submit(*args: str):
    return CliRunner().invoke(main, ["submit", *args])


def test_submit_sends_the_dataflow_flags_as_parameter_values(fake, vertex_yaml):
    result = submit(str(vertex_yaml), "--project", PROJECT, "--region", REGION,
                    "--pipeline-root", ROOT, *DATAFLOW_FLAGS,
                    "--dataflow-region", "europe-west1", "--dataflow-subnetwork",
                    "regions/europe-west1/subnetworks/ml")
    assert result.exit_code == 0, result.output
    [create] = fake.calls("POST", rf"^/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs$")
    assert create.body["runtimeConfig"]["parameterValues"] == {
        "data_runner": "DataflowRunner", "dataflow_region": "europe-west1",
        "dataflow_project": PROJECT, "dataflow_temp_location": "gs://acme-dataflow/temp",
        "dataflow_service_account": "dataflow@acme-ml.iam.gserviceaccount.com",
        "dataflow_max_workers": 32, "dataflow_machine_type": "n2-standard-8",
        "dataflow_subnetwork": "regions/europe-west1/subnetworks/ml",
        "reference_uri": f"{ROOT}/torchship-reference/torchship/local/",
    }


def test_on_vertex_dataflow_runs_in_the_pipelines_project_and_region(fake, vertex_yaml):
    result = submit(str(vertex_yaml), "--project", PROJECT, "--region", REGION,
                    "--pipeline-root", ROOT, *DATAFLOW_FLAGS)
    assert result.exit_code == 0, result.output
    [create] = fake.calls("POST", "pipelineJobs$")
    values = create.body["runtimeConfig"]["parameterValues"]
    assert (values["dataflow_region"], values["dataflow_project"]) == (REGION, PROJECT)


def test_a_param_wins_over_the_flag_of_the_same_parameter(fake, vertex_yaml):
    result = submit(str(vertex_yaml), "--project", PROJECT, "--region", REGION,
                    "--pipeline-root", ROOT, *DATAFLOW_FLAGS, "-p", "dataflow_max_workers=4")
    assert result.exit_code == 0, result.output
    assert fake.calls("POST", "pipelineJobs$")[-1].body["runtimeConfig"][
        "parameterValues"]["dataflow_max_workers"] == 4


def test_a_direct_runner_run_sends_no_dataflow_parameters(fake, vertex_yaml):
    result = submit(str(vertex_yaml), "--project", PROJECT, "--region", REGION,
                    "--pipeline-root", ROOT, "-p", "epochs=3")
    assert result.exit_code == 0, result.output
    [create] = fake.calls("POST", "pipelineJobs$")
    assert create.body["runtimeConfig"]["parameterValues"] == {
        "epochs": 3, "reference_uri": f"{ROOT}/torchship-reference/torchship/local/"}


def test_kubeflow_gets_no_vertex_region_for_dataflow():
    parameters = _run_parameters(("dataflow_region=us-east1",), {"data_runner": "DataflowRunner"},
                                 PROJECT, "us-central1", kfp_host="http://kfp")
    assert parameters == {"data_runner": "DataflowRunner", "dataflow_region": "us-east1"}
    assert "dataflow_region" not in _run_parameters((), {"data_runner": "DataflowRunner"},
                                                    PROJECT, "us-central1", "http://kfp")


@pytest.mark.parametrize("flags, message", [
    (["--data-runner", "Dataflow"], "did you mean 'DataflowRunner'?"),
    (["--data-runner", "DataflowRunner"], "parameter dataflow_temp_location='' is empty"),
    ([*DATAFLOW_FLAGS, "--dataflow-temp-location", "/tmp/beam"],
     "parameter dataflow_temp_location='/tmp/beam' is not a gs:// folder"),
    (["--data-runner", "PortableRunner"], "parameter beam_job_endpoint='' is not the HOST:PORT"),
    (["--dataflow-max-workers", "-1"], "parameter dataflow_max_workers=-1 is negative"),
])
def test_submit_refuses_a_runner_that_cannot_start_before_sending(fake, vertex_yaml, flags,
                                                                  message):
    result = submit(str(vertex_yaml), "--project", PROJECT, "--region", REGION,
                    "--pipeline-root", ROOT, *flags)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not fake.calls("POST", "pipelineJobs")


def test_dataflow_workers_need_the_pipeline_image_in_a_registry(fake, tmp_path):
    local = tmp_path / "local-image.yaml"
    compile_yaml(local, "vertex", image="torchship-cpu:0.1.0")
    result = submit(str(local), "--project", PROJECT, "--region", REGION,
                    "--pipeline-root", ROOT, *DATAFLOW_FLAGS)
    assert result.exit_code == 2, result.output
    assert "the component image 'torchship-cpu:0.1.0' is not in a registry" in result.output
    assert not fake.calls("POST", "pipelineJobs")


def test_a_local_run_refuses_dataflow_without_its_settings(tmp_path):
    path = tmp_path / "kfp.yaml"
    compile_yaml(path, "kfp")
    result = CliRunner().invoke(main, ["run", str(path), "--pipeline-root",
                                       str(tmp_path / "runs"), "--data-runner", "DataflowRunner",
                                       "--dataflow-temp-location", "gs://b/t"])
    assert result.exit_code == 2
    assert "error: parameter dataflow_region='' is empty" in result.output
    assert not (tmp_path / "runs").exists()


def test_dataflow_options_carry_the_values_the_pipeline_gives():
    runner = BeamRunner(runner="DataflowRunner", project=PROJECT, region="europe-west1",
                        service_account="dataflow@acme-ml.iam.gserviceaccount.com",
                        temp_location="gs://acme-dataflow/temp", max_workers=32,
                        machine_type="n2-standard-8", sdk_container_image=IMAGE,
                        subnetwork="regions/europe-west1/subnetworks/ml")
    options = runner.options("torchship-data-run-1")
    cloud, worker = options.view_as(GoogleCloudOptions), options.view_as(WorkerOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == (
        PROJECT, "europe-west1", "gs://acme-dataflow/temp")
    assert cloud.service_account_email == "dataflow@acme-ml.iam.gserviceaccount.com"
    assert (worker.max_num_workers, worker.machine_type, worker.sdk_container_image) == (
        32, "n2-standard-8", IMAGE)
    assert worker.subnetwork == "regions/europe-west1/subnetworks/ml"
