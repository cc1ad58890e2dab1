"""`torchship compile` writes a KFP v2 PipelineSpec with one task per stage and the given image."""

import os
import subprocess
import sys
from pathlib import Path

import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from torchship.pipelines.pipeline import STAGES

TORCHSHIP = [sys.executable, "-m", "torchship.pipelines.cli"]


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
    # Every stage runs at the top level but deploy, which runs only under the gate's condition.
    root = spec.root.dag.tasks
    [condition] = [name for name in root if name.startswith("condition")]
    assert sorted(set(root) - {condition}) == sorted(set(STAGES) - {"deploy"})
    assert "gate" in root[condition].dependent_tasks
    assert root[condition].trigger_policy.condition == (
        "inputs.parameter_values['pipelinechannel--gate-Output'] == true")
    assert list(spec.components[root[condition].component_ref.name].dag.tasks) == ["deploy"]
    images = {executor.container.image for executor in executors(spec)}
    assert images == {"registry.example/team/torchship-cpu:1.2.3"}
    parameters = set(spec.root.input_definitions.parameters)
    for name in ("data_source", "label_column", "model_name", "epochs", "num_workers",
                 "target_sparsity", "quantize", "benchmark_concurrency"):
        assert name in parameters
    # The DAG order: each stage consumes the previous one's artifacts.
    tasks = spec.root.dag.tasks
    assert "train" in tasks["compress"].dependent_tasks
    assert "export" in tasks["benchmark"].dependent_tasks
    assert "benchmark" in tasks["gate"].dependent_tasks


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
