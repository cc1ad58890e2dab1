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
    assert sorted(spec.root.dag.tasks) == sorted(STAGES)
    images = {executor.container.image for executor in executors(spec)}
    assert images == {"registry.example/team/torchship-cpu:1.2.3"}
    parameters = set(spec.root.input_definitions.parameters)
    for name in ("data_source", "label_column", "model_name", "epochs", "num_workers",
                 "target_sparsity", "quantize", "benchmark_concurrency"):
        assert name in parameters
    # The DAG order: each stage consumes the previous one's artifacts.
    tasks = spec.root.dag.tasks
    assert "train" in tasks["compress"].dependent_tasks
    assert "deploy" in tasks["benchmark"].dependent_tasks


def test_compile_takes_image_from_environment_and_embeds_no_pip_install(tmp_path):
    spec = compile_spec(tmp_path, env={"TORCHSHIP_IMAGE": "example.local/torchship:test"})
    assert len(executors(spec)) == len(STAGES)
    for executor in executors(spec):
        assert executor.container.image == "example.local/torchship:test"
        # The image carries torchship and kfp: nothing is installed at run time.
        assert "pip install" not in " ".join(executor.container.command)
