"""`torchship compile` writes a KFP v2 PipelineSpec with one task per stage and the given image."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from torchship.components.errors import UserInputError
from torchship.pipelines.parameters import check_parameters, compiled_defaults
from torchship.pipelines.pipeline import STAGES, compile_pipeline

TORCHSHIP = [sys.executable, "-m", "torchship.pipelines.cli"]


@pytest.fixture(scope="module")
def compiled_local(tmp_path_factory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml", image="img:1")


def compile_spec(tmp_path: Path, *args: str, env: dict | None = None) -> pipeline_spec_pb2.PipelineSpec:
    output = tmp_path / "pipeline.yaml"
    subprocess.run([*TORCHSHIP, "compile", "--output", str(output), *args], check=True,
                   capture_output=True, text=True, env={**os.environ, **(env or {})})
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(yaml.safe_load(output.read_text()), spec)
    return spec


def executors(spec: pipeline_spec_pb2.PipelineSpec) -> list:
    deployment = pipeline_spec_pb2.PipelineDeploymentConfig()
    json_format.ParseDict(json_format.MessageToDict(spec.deployment_spec), deployment)
    return list(deployment.executors.values())


def test_compiled_yaml_is_a_pipeline_spec_with_one_task_per_stage(tmp_path):
    spec = compile_spec(tmp_path, "--image", "registry.example/team/torchship-cpu:1.2.3")
    assert spec.pipeline_info.name == "torchship"
    # Every stage runs at the top level but tune-serving and deploy, which run only under the
    # gate's condition, in that order.
    root = spec.root.dag.tasks
    [condition] = [name for name in root if name.startswith("condition")]
    gated = {"tune-serving", "deploy"}
    assert sorted(set(root) - {condition}) == sorted(set(STAGES) - gated)
    assert "gate" in root[condition].dependent_tasks
    assert root[condition].trigger_policy.condition == (
        "inputs.parameter_values['pipelinechannel--gate-Output'] == true")
    branch = spec.components[root[condition].component_ref.name].dag.tasks
    assert set(branch) == gated
    assert "tune-serving" in branch["deploy"].dependent_tasks
    record = branch["deploy"].inputs.artifacts["serving_record"].task_output_artifact
    assert (record.producer_task, record.output_artifact_key) == ("tune-serving", "record")
    # Deploy serves the variant the serving search chose, not the gate's first pick.
    model = branch["deploy"].inputs.artifacts["chosen_model"].task_output_artifact
    assert (model.producer_task, model.output_artifact_key) == ("tune-serving", "chosen_model")
    deployment = pipeline_spec_pb2.PipelineDeploymentConfig()
    json_format.ParseDict(json_format.MessageToDict(spec.deployment_spec), deployment)
    images = {name: executor.container.image for name, executor in deployment.executors.items()}
    # Triton's measurements run in the serving image (the same tag scheme), the rest in the CPU one.
    assert {name: image for name, image in images.items()
            if image != "registry.example/team/torchship-cpu:1.2.3"} == {
        "exec-benchmark": "registry.example/team/torchship-tritonserver:1.2.3",
        "exec-tune-serving": "registry.example/team/torchship-tritonserver:1.2.3"}
    parameters = set(spec.root.input_definitions.parameters)
    for name in ("data_source", "label_column", "model_name", "epochs", "num_workers",
                 "target_sparsity", "quantize", "benchmark_concurrency"):
        assert name in parameters
    # The DAG order: each stage consumes the previous one's artifacts.
    tasks = spec.root.dag.tasks
    assert "train" in tasks["compress"].dependent_tasks
    assert "export" in tasks["benchmark"].dependent_tasks
    assert "benchmark" in tasks["gate"].dependent_tasks
    # The data is read afresh every run (a new generation under the same name is new data); the
    # gate reads what serves now from the reference a deploying run keeps.
    assert tasks["prepare-data"].caching_options.enable_cache is False
    assert tasks["train"].caching_options.enable_cache is True
    assert tasks["gate"].inputs.parameters["reference_uri"].component_input_parameter == (
        "reference_uri")
    # Metrics and reports as the Vertex AI and Kubeflow UIs show them.
    gate_outputs = spec.components[tasks["gate"].component_ref.name].output_definitions.artifacts
    assert gate_outputs["confusion"].artifact_type.schema_title == "system.ClassificationMetrics"
    assert gate_outputs["metrics"].artifact_type.schema_title == "system.Metrics"
    assert gate_outputs["report_html"].artifact_type.schema_title == "system.HTML"


def test_compile_takes_image_from_environment_and_embeds_no_pip_install(tmp_path):
    spec = compile_spec(tmp_path, env={"TORCHSHIP_IMAGE": "example.local/torchship:test"})
    assert len(executors(spec)) == len(STAGES)
    for executor in executors(spec):
        assert executor.container.image == "example.local/torchship:test"
        # The image carries torchship and kfp: nothing is installed at run time.
        assert "pip install" not in " ".join(executor.container.command)


def test_vertex_yaml_runs_train_as_custom_job_sized_by_pipeline_parameters(tmp_path):
    spec = compile_spec(tmp_path, "--target", "vertex", "--image", "example.local/torchship:v")
    tasks = spec.root.dag.tasks
    parameters = spec.root.input_definitions.parameters
    for name in ("train_replica_count", "train_machine_type", "train_accelerator_type",
                 "train_accelerator_count"):
        assert name in parameters
    pools = tasks["vertex-worker-pools"].inputs.parameters
    assert pools["replica_count"].component_input_parameter == "train_replica_count"
    assert pools["machine_type"].component_input_parameter == "train_machine_type"
    # Each replica runs our train component in our image, with KFP's executor placeholders.
    template = pools["template"].runtime_value.constant.string_value
    assert '"image_uri": "example.local/torchship:v"' in template
    assert "{{$.json_escape[1]}}" in template and "train_model" in template
    # The custom-job task takes its worker pools from that task, at run time.
    job = tasks["train"]
    assert job.inputs.parameters["worker_pool_specs"].task_output_parameter.producer_task == (
        "vertex-worker-pools")
    job_images = [e.container.image for e in executors(spec)
                  if "custom_job.launcher" in " ".join(e.container.command)]
    assert job_images and all("google-cloud-pipeline-components" in i for i in job_images)


def test_worker_pool_specs_put_the_chief_in_pool_0_and_the_rest_in_pool_1():
    import json

    import pytest

    from torchship.components.errors import UserInputError
    from torchship.pipelines.vertex import worker_pool_specs

    template = json.dumps({"container_spec": {"image_uri": "img", "args": ["{{$.json_escape[1]}}"]}})
    assert len(worker_pool_specs(template, 1, "n1-standard-8")) == 1
    chief, workers = worker_pool_specs(template, 4, "a2-highgpu-2g", "NVIDIA_TESLA_A100", 2)
    assert chief["replica_count"] == 1 and workers["replica_count"] == 3
    assert workers["machine_spec"] == {"machine_type": "a2-highgpu-2g",
                                       "accelerator_type": "NVIDIA_TESLA_A100",
                                       "accelerator_count": 2}
    assert workers["container_spec"]["args"] == ["{{$.json_escape[1]}}"]
    with pytest.raises(UserInputError, match="train_replica_count 0"):
        worker_pool_specs(template, 0, "n1-standard-8")
    with pytest.raises(UserInputError, match="train_accelerator_count"):
        worker_pool_specs(template, 2, "n1-standard-8", "NVIDIA_L4", 0)
    with pytest.raises(UserInputError, match="train_accelerator_count 2 needs train_acc"):
        worker_pool_specs(template, 2, "n1-standard-8", "", 2)
    # Every node runs the GPU image on machines with accelerators, the CPU image otherwise.
    images = {"cpu_image": "r/torchship-cpu:1", "gpu_image": "r/torchship-cuda:1"}
    on_gpus = worker_pool_specs(template, 3, "g2-standard-8", "NVIDIA_L4", 1, **images)
    assert {pool["container_spec"]["image_uri"] for pool in on_gpus} == {"r/torchship-cuda:1"}
    on_cpus = worker_pool_specs(template, 3, "n1-standard-8", "", 0, **images)
    assert {pool["container_spec"]["image_uri"] for pool in on_cpus} == {"r/torchship-cpu:1"}


def declared(spec: pipeline_spec_pb2.PipelineSpec, names) -> dict[str, tuple]:
    """(type, default) of each named pipeline parameter, as the compiled spec declares it."""
    parameters = spec.root.input_definitions.parameters
    return {name: (pipeline_spec_pb2.ParameterType.ParameterTypeEnum.Name(
                       parameters[name].parameter_type),
                   json_format.MessageToDict(parameters[name].default_value))
            for name in names}


# The benchmark sweep's parameters and their defaults: what the benchmark did before they existed.
BENCHMARK_SWEEP = {
    "benchmark_concurrency": ("LIST", [1, 4]),
    "benchmark_duration_s": ("NUMBER_DOUBLE", 3.0),
    "benchmark_warmup_s": ("NUMBER_DOUBLE", 1.0),
    "benchmark_window_s": ("NUMBER_DOUBLE", 0.0),
    "benchmark_min_windows": ("NUMBER_INTEGER", 3),
    "benchmark_max_windows": ("NUMBER_INTEGER", 10),
    "benchmark_stability_pct": ("NUMBER_DOUBLE", 15.0),
}


@pytest.mark.parametrize("target", ["local", "vertex"])
def test_benchmark_sweep_is_set_by_pipeline_parameters_that_default_to_todays_sweep(
        tmp_path, target):
    spec = compile_spec(tmp_path, "--target", target)
    assert declared(spec, BENCHMARK_SWEEP) == BENCHMARK_SWEEP
    assert check_parameters({}, compiled_defaults(tmp_path / "pipeline.yaml")) is None
    # The benchmark task takes each one, under its own name without the `benchmark_` prefix.
    inputs = spec.root.dag.tasks["benchmark"].inputs.parameters
    for name in BENCHMARK_SWEEP:
        assert inputs[name.removeprefix("benchmark_")].component_input_parameter == name


def test_both_targets_take_the_same_parameters_but_vertex_adds_the_custom_job_size(tmp_path):
    local = compile_spec(tmp_path / "local", "--target", "local").root.input_definitions
    vertex = compile_spec(tmp_path / "vertex", "--target", "vertex").root.input_definitions
    added = set(vertex.parameters) - set(local.parameters)
    assert added == {"train_replica_count", "train_machine_type", "train_accelerator_type",
                     "train_accelerator_count", "vertex_location", "train_service_account",
                     "train_network", "train_encryption_spec_key_name", "train_tensorboard",
                     "train_base_output_directory"}
    assert set(local.parameters) <= set(vertex.parameters)
    for name, parameter in local.parameters.items():
        if name != "num_workers":  # one process per replica on Vertex AI
            assert vertex.parameters[name] == parameter, name
    assert local.parameters["num_workers"].default_value.number_value == 2
    assert vertex.parameters["num_workers"].default_value.number_value == 1


@pytest.mark.parametrize(("arguments", "expected"), [
    ({"benchmark_concurrency": []},
     ("parameter benchmark_concurrency=[] is not a list of positive integers; "
      "pass the levels to measure, e.g. [1, 4]")),
    ({"benchmark_concurrency": [1, 0]}, "benchmark_concurrency=[1, 0] is not a list of positive"),
    ({"benchmark_concurrency": "1,4"}, "benchmark_concurrency='1,4' is not a list of positive"),
    ({"benchmark_batch_size": 0}, "benchmark_batch_size=0 is not a positive integer; pass 1"),
    ({"benchmark_min_windows": 2.5}, "benchmark_min_windows=2.5 is not a positive integer"),
    ({"benchmark_max_windows": 2},
     ("parameter benchmark_max_windows=2 is below benchmark_min_windows=3; "
      "pass a maximum at least the minimum")),
    ({"benchmark_duration_s": 0}, "benchmark_duration_s=0 is not positive; pass the seconds"),
    ({"benchmark_stability_pct": -1}, "benchmark_stability_pct=-1 is not positive; pass the %"),
    ({"benchmark_warmup_s": -0.5}, "benchmark_warmup_s=-0.5 is negative; pass 0 for no warm-up"),
    ({"benchmark_window_s": -1}, "benchmark_window_s=-1 is negative; pass a window in seconds"),
    ({"benchmark_window_s": "long"}, "benchmark_window_s='long' is not a number; pass a number"),
    ({"benchmark_engine": "locust"},
     "parameter benchmark_engine='locust' is unknown; pass one of auto, perf_analyzer, python"),
    ({"benchmark_backend": "tensorrt"},
     "parameter benchmark_backend='tensorrt' is unknown; pass one of auto, onnxruntime, python"),
    ({"throughput_target_rps": -5.0},
     "parameter throughput_target_rps=-5.0 is negative; pass 0 for no limit or a positive value"),
])
def test_bad_benchmark_sweep_is_refused_in_one_line_naming_the_parameter(
        compiled_local, arguments, expected):
    with pytest.raises(UserInputError) as error:
        check_parameters(arguments, compiled_defaults(compiled_local))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_run_refuses_a_bad_benchmark_sweep_before_anything_runs(compiled_local, tmp_path):
    done = subprocess.run([*TORCHSHIP, "run", str(compiled_local), "--pipeline-root",
                           str(tmp_path / "runs"), "-p", "benchmark_max_windows=2"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        ("error: parameter benchmark_max_windows=2 is below benchmark_min_windows=3; "
         "pass a maximum at least the minimum")]
    assert not (tmp_path / "runs").exists()


# The serving search's grid and its defaults: 2 instance counts x 2 queue delays.
SERVING_SEARCH = {
    "serving_instance_counts": ("LIST", [1, 2]),
    "serving_queue_delays_us": ("LIST", [100, 2000]),
    "serving_max_batch_sizes": ("LIST", [64]),
}


@pytest.mark.parametrize("target", ["local", "vertex"])
def test_serving_search_is_set_by_pipeline_parameters_and_reads_the_gates_objective(
        tmp_path, target):
    spec = compile_spec(tmp_path, "--target", target)
    assert declared(spec, SERVING_SEARCH) == SERVING_SEARCH
    [condition] = [name for name in spec.root.dag.tasks if name.startswith("condition")]
    branch = spec.components[spec.root.dag.tasks[condition].component_ref.name].dag.tasks
    inputs = branch["tune-serving"].inputs.parameters
    expected = {"instance_counts": "serving_instance_counts",
                "queue_delays_us": "serving_queue_delays_us",
                "max_batch_sizes": "serving_max_batch_sizes", "optimise": "optimise",
                "latency_budget_p99_ms": "latency_budget_p99_ms",
                "target_concurrency": "target_concurrency",
                "duration_s": "benchmark_duration_s", "min_windows": "benchmark_min_windows"}
    for name, parameter in expected.items():
        assert inputs[name].component_input_parameter == f"pipelinechannel--{parameter}", name
    outputs = spec.components[branch["tune-serving"].component_ref.name].output_definitions
    assert {name: a.artifact_type.schema_title for name, a in outputs.artifacts.items()} == {
        "record": "system.Artifact", "chosen_model": "system.Model",
        "report_html": "system.HTML", "metrics": "system.Metrics", "table": "system.Markdown"}


@pytest.mark.parametrize(("arguments", "expected"), [
    ({"serving_instance_counts": [0, 2]},
     ("parameter serving_instance_counts=[0, 2] is not a list of integers >= 1; pass instance "
      "counts of 1 or more, e.g. [1, 2], or [] to keep the default")),
    ({"serving_instance_counts": "1,2"}, "serving_instance_counts='1,2' is not a list"),
    ({"serving_queue_delays_us": [-100]},
     "serving_queue_delays_us=[-100] is not a list of integers >= 0; pass delays in microseconds"),
    ({"serving_queue_delays_us": [0.5]}, "serving_queue_delays_us=[0.5] is not a list"),
    ({"serving_max_batch_sizes": [0, 64]},
     ("parameter serving_max_batch_sizes=[0, 64] is not a list of integers >= 1; pass max batch "
      "sizes of 1 or more, e.g. [8, 64], or [] to keep the default")),
])
def test_bad_serving_search_grid_is_refused_in_one_line(compiled_local, arguments, expected):
    with pytest.raises(UserInputError) as error:
        check_parameters(arguments, compiled_defaults(compiled_local))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_empty_serving_search_axes_are_accepted(compiled_local):
    defaults = compiled_defaults(compiled_local)
    assert check_parameters({"serving_instance_counts": [], "serving_queue_delays_us": [],
                             "serving_max_batch_sizes": []}, defaults) is None
