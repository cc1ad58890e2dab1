"""The data step's Beam runner: the options each runner gets, and the settings each refuses."""

import re

import pytest
from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)

from torchship.components.data.runners import RUNNERS, BeamRunner, dataflow_job_name
from torchship.components.errors import UserInputError

IMAGE = "europe-west4-docker.pkg.dev/acme-ml/ml/torchship-cpu:0.1.0"
DATAFLOW = BeamRunner(
    runner="DataflowRunner", project="acme-ml", region="europe-west4",
    service_account="dataflow@acme-ml.iam.gserviceaccount.com",
    temp_location="gs://acme-dataflow/temp", max_workers=16, machine_type="n2-highmem-8",
    sdk_container_image=IMAGE, network="ml-vpc",
    subnetwork="regions/europe-west4/subnetworks/ml-europe",
)


def test_the_default_runs_here_in_one_process():
    runner = BeamRunner()
    assert runner.local and runner.runner == RUNNERS[0] == "DirectRunner"
    options = runner.options("torchship-data")
    # Beam's FnApiRunner, not its DirectRunner, which would download and start Prism first.
    assert options.view_as(StandardOptions).runner.endswith(".FnApiRunner")
    assert options.view_as(DirectOptions).direct_num_workers == 1
    assert options.view_as(DirectOptions).direct_running_mode == "in_memory"
    assert options.view_as(SetupOptions).save_main_session is False


@pytest.mark.parametrize("workers", [4, 0])
def test_direct_workers_are_processes(workers):
    direct = BeamRunner(direct_num_workers=workers).options("x").view_as(DirectOptions)
    assert direct.direct_num_workers == workers
    assert direct.direct_running_mode == "multi_processing"


def test_dataflow_options_carry_every_setting_given():
    options = DATAFLOW.options("torchship-data-run-42")
    cloud = options.view_as(GoogleCloudOptions)
    worker = options.view_as(WorkerOptions)
    assert not DATAFLOW.local
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    assert (cloud.project, cloud.region, cloud.temp_location, cloud.job_name) == (
        "acme-ml", "europe-west4", "gs://acme-dataflow/temp", "torchship-data-run-42")
    assert cloud.service_account_email == "dataflow@acme-ml.iam.gserviceaccount.com"
    assert (worker.max_num_workers, worker.machine_type) == (16, "n2-highmem-8")
    assert worker.sdk_container_image == IMAGE
    assert (worker.network, worker.subnetwork) == (
        "ml-vpc", "regions/europe-west4/subnetworks/ml-europe")
    assert options.view_as(SetupOptions).save_main_session is False


def test_dataflow_leaves_what_is_not_given_to_dataflow():
    runner = BeamRunner(runner="DataflowRunner", project="p-1", region="us-east1",
                        temp_location="gs://b/t", sdk_container_image=IMAGE)
    options = runner.options("j")
    worker = options.view_as(WorkerOptions)
    assert worker.max_num_workers is None and worker.machine_type is None
    assert worker.network is None and worker.subnetwork is None
    assert options.view_as(GoogleCloudOptions).service_account_email is None


@pytest.mark.parametrize("variable", ["GOOGLE_CLOUD_PROJECT", "CLOUD_ML_PROJECT_ID"])
def test_dataflow_project_comes_from_the_environment_when_not_given(monkeypatch, variable):
    for name in ("GOOGLE_CLOUD_PROJECT", "CLOUD_ML_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "from-vertex")
    runner = BeamRunner(runner="DataflowRunner", region="europe-west4",
                        temp_location="gs://b/t", sdk_container_image=IMAGE)
    assert runner.options("j").view_as(GoogleCloudOptions).project == "from-vertex"
    given = BeamRunner(**{**runner.__dict__, "project": "given"})
    assert given.options("j").view_as(GoogleCloudOptions).project == "given"


def test_dataflow_without_a_project_anywhere_is_refused(monkeypatch):
    for name in ("GOOGLE_CLOUD_PROJECT", "CLOUD_ML_PROJECT_ID"):
        monkeypatch.delenv(name, raising=False)
    runner = BeamRunner(runner="DataflowRunner", region="europe-west4",
                        temp_location="gs://b/t", sdk_container_image=IMAGE)
    runner.check()  # the submitting machine need not know the project Vertex AI runs in
    with pytest.raises(UserInputError, match=r"dataflow_project is empty .*GOOGLE_CLOUD_PROJECT"):
        runner.options("j")


def test_dataflow_without_an_image_is_refused_when_its_options_are_built():
    runner = BeamRunner(runner="DataflowRunner", project="p-1", region="us-east1",
                        temp_location="gs://b/t")
    runner.check()
    with pytest.raises(UserInputError, match="no sdk_container_image"):
        runner.options("j")


def test_portable_runner_submits_to_the_job_server_with_the_image_as_workers():
    options = BeamRunner(runner="PortableRunner", job_endpoint="flink-jobserver:8099",
                         sdk_container_image=IMAGE).options("torchship-data")
    portable = options.view_as(PortableOptions)
    assert options.view_as(StandardOptions).runner == "PortableRunner"
    assert portable.job_endpoint == "flink-jobserver:8099"
    assert (portable.environment_type, portable.environment_config) == ("DOCKER", IMAGE)
    loopback = BeamRunner(runner="PortableRunner", job_endpoint="localhost:8099").options("j")
    assert loopback.view_as(PortableOptions).environment_type == "LOOPBACK"


@pytest.mark.parametrize("runner, message", [
    (BeamRunner(runner="Dataflow"),
     "parameter data_runner='Dataflow' is not a Beam runner torchship runs on; did you mean 'Da"),
    (BeamRunner(runner="SparkRunner"), "pass one of DirectRunner, DataflowRunner, PortableRunner"),
    (BeamRunner(runner="DataflowRunner", temp_location="gs://b/t"),
     "parameter dataflow_region='' is empty; pass the region"),
    (BeamRunner(runner="DataflowRunner", region="europe-west4"),
     "parameter dataflow_temp_location='' is empty, and Dataflow needs one"),
    (BeamRunner(runner="DataflowRunner", region="Europe West", temp_location="gs://b/t"),
     "parameter dataflow_region='Europe West' is not a Google Cloud region"),
    (BeamRunner(runner="DataflowRunner", region="europe-west4", temp_location="/tmp/beam"),
     "parameter dataflow_temp_location='/tmp/beam' is not a gs:// folder"),
    (BeamRunner(runner="DataflowRunner", region="europe-west4", temp_location="gs://b/t",
                service_account="dataflow-sa"),
     "parameter dataflow_service_account='dataflow-sa' is not a service account email"),
    (BeamRunner(runner="DataflowRunner", region="europe-west4", temp_location="gs://b/t",
                sdk_container_image="torchship-cpu:0.1.0"),
     "the component image 'torchship-cpu:0.1.0' is not in a registry"),
    (BeamRunner(max_workers=-2), "parameter dataflow_max_workers=-2 is negative"),
    (BeamRunner(direct_num_workers=-1), "direct_num_workers=-1 is negative"),
    (BeamRunner(runner="PortableRunner"),
     "parameter beam_job_endpoint='' is not the HOST:PORT of a job server"),
    (BeamRunner(runner="PortableRunner", job_endpoint="http://flink:8099"),
     "parameter beam_job_endpoint='http://flink:8099' is not the HOST:PORT"),
])
def test_each_refusal_is_one_line_naming_the_setting_and_the_fix(runner, message):
    with pytest.raises(UserInputError) as refused:
        runner.check()
    text = str(refused.value)
    assert message in text and "; " in text and "\n" not in text
    with pytest.raises(UserInputError):  # the options are never built from such settings
        runner.options("j")


def test_settings_of_other_runners_are_not_checked():
    BeamRunner(temp_location="/tmp", region="mars").check()
    BeamRunner(runner="PortableRunner", job_endpoint="[::1]:8099", region="x").check()


@pytest.mark.parametrize("text, name", [
    ("torchship-data", "torchship-data"),
    ("Torchship Data/Run_2025.01", "torchship-data-run-2025-01"),
    ("--a--b--", "a-b"),
    ("42-run", "torchship-42-run"),
    ("", "torchship"),
    ("Ünïcode", "n-code"),
])
def test_job_names_follow_dataflows_rule(text, name):
    assert dataflow_job_name(text) == name


def test_a_long_job_name_keeps_its_start_and_its_end():
    name = dataflow_job_name("torchship-data-" + "x" * 2000 + "-run-7f3a")
    assert len(name) <= 1024
    assert name.startswith("torchship-data-") and name.endswith("-run-7f3a")
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,1022}[a-z0-9])?", name)
