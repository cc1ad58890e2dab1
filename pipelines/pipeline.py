"""The torchship DAG (data -> train -> compress -> export -> benchmark -> gate -> tune-serving ->
deploy) and its compiler."""

import inspect
import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

from kfp import compiler, dsl
from kfp.dsl import HTML, Artifact, Markdown

from torchship.components.errors import UserInputError
from torchship.components.files import atomic_path
from torchship.pipelines.components import Components, build_components
from torchship.pipelines.parameters import (
    MEASUREMENT_PARAMETERS,
    MODEL_OPTIONS,
    PARAMETERS,
    RUNNER_PARAMETERS,
    TRAINING_PARAMETERS,
    VERTEX_PARAMETERS,
    Parameters,
)

PIPELINE_NAME = "torchship"
IMAGE_ENV = "TORCHSHIP_IMAGE"
STAGES = ("prepare-data", "train", "compress", "export", "benchmark", "gate", "tune-serving",
          "deploy")


def default_image() -> str:
    """The component image: $TORCHSHIP_IMAGE, else the tag `make images` gives the local build."""
    return os.environ.get(IMAGE_ENV) or f"torchship-cpu:{version('torchship')}"


Outputs = NamedTuple(  # noqa: UP014 - KFP's form
    "Outputs", summary=Markdown, results=Artifact, gate_record=Artifact, report=HTML)
# Where the compiled pipeline runs. `kfp`: kfp.local and Kubeflow Pipelines, training as N
# processes in one task; `vertex`: Vertex AI Pipelines, training as a multi-replica custom job.
PLATFORMS = ("kfp", "vertex")


def _after_training(ops: Components, data: dsl.PipelineTask, trained: dsl.PipelineTask,
                    params: dict[str, Any]) -> Outputs:
    """compress -> export -> benchmark -> gate -> (if it passed) tune-serving -> deploy, on every
    platform."""
    variants = ops.compress(
        model=trained.outputs["model"], train=data.outputs["train"],
        val=data.outputs["val"], test=data.outputs["test"],
        target_sparsity=params["target_sparsity"], finetune_epochs=params["finetune_epochs"],
        quantize=params["quantize"], seed=params["seed"], variant_names=params["variants"],
        calibration_method=params["calibration_method"],
    )
    exported = ops.export(variants=variants.outputs["variants"], test=data.outputs["test"])
    measured = ops.benchmark(
        onnx_models=exported.outputs["onnx_models"], test=data.outputs["test"],
        concurrency=params["benchmark_concurrency"], **_measurement(params),
    )
    decided = ops.gate(
        onnx_models=exported.outputs["onnx_models"], results=measured.outputs["results"],
        test=data.outputs["test"],
        max_accuracy_drop_pt=params["max_accuracy_drop_pt"],
        max_size_bytes=params["max_size_bytes"], optimise=params["optimise"],
        accuracy_floor=params["accuracy_floor"], baseline_uri=params["baseline_uri"],
        reference_uri=params["reference_uri"],
        latency_budget_p99_ms=params["latency_budget_p99_ms"],
        target_concurrency=params["target_concurrency"],
        previous_results_uri=params["previous_results_uri"],
        max_p99_regression_pct=params["max_p99_regression_pct"],
        deploy_target=params["deploy_target"], local_repository=params["local_repository"],
    )
    with dsl.If(decided.outputs["Output"] == True, name="gate-passed"):
        tuned = ops.tune_serving(
            chosen_model=decided.outputs["chosen_model"], test=data.outputs["test"],
            instance_counts=params["serving_instance_counts"],
            queue_delays_us=params["serving_queue_delays_us"], optimise=params["optimise"],
            latency_budget_p99_ms=params["latency_budget_p99_ms"],
            target_concurrency=params["target_concurrency"], **_measurement(params),
        )
        ops.deploy(
            chosen_model=decided.outputs["chosen_model"], test=data.outputs["test"],
            serving_record=tuned.outputs["record"], statistics=data.outputs["statistics"],
            gate_record=decided.outputs["record"],
            target=params["deploy_target"], local_repository=params["local_repository"],
            settings=params["deploy_settings"], reference_uri=params["reference_uri"],
            serving_model_name=params["serving_model_name"],
        )
    return Outputs(summary=measured.outputs["summary"], results=measured.outputs["results"],
                   gate_record=decided.outputs["record"], report=decided.outputs["report_html"])


DESCRIPTION = "PyTorch model from raw data to a benchmarked NVIDIA Triton deployment."


def _measurement(params: dict[str, Any]) -> dict[str, Any]:
    """The measurement method's arguments, as benchmark and tune-serving both take them."""
    return {name: params[f"benchmark_{name}"] for name in MEASUREMENT_PARAMETERS}


def build_pipeline(image: str, platform: str = "kfp") -> Callable:
    """The pipeline function for `platform` (see PLATFORMS), with every component's base image
    set to `image`."""
    if platform not in PLATFORMS:
        raise UserInputError(
            f"platform {platform!r} is unknown; pass one of {', '.join(PLATFORMS)}")
    ops = build_components(image, vertex=platform == "vertex")
    if platform == "kfp":
        return _pipeline(ops, PARAMETERS, _train_in_one_task)
    return _pipeline(ops, VERTEX_PARAMETERS, _train_as_vertex_job)


TrainStep = Callable[[Components, dsl.PipelineTask, dict[str, Any]], dsl.PipelineTask]


def _pipeline(ops: Components, parameters: Parameters, train: TrainStep) -> Callable:
    """The pipeline taking `parameters`: prepare-data, then `train`, then every later stage."""
    signature = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                           annotation=kind) for name, kind, default in parameters],
        return_annotation=Outputs,
    )

    def torchship_pipeline(*args: Any, **kwargs: Any) -> Outputs:
        bound = signature.bind(*args, **kwargs)  # KFP passes one channel a parameter, in order
        bound.apply_defaults()
        params = bound.arguments
        data = ops.prepare_data(data_source=params["data_source"],
                                label_column=params["label_column"],
                                image_size=params["image_size"],
                                text_column=params["text_column"],
                                tokenizer=params["tokenizer"], max_length=params["max_length"],
                                model_name=params["model_name"], seed=params["seed"],
                                statistics_uri=params["statistics_uri"],
                                **{name: params[name] for name in RUNNER_PARAMETERS},
                                sdk_container_image=ops.image)
        # The data under a name changes (a new object generation, the newest file under a
        # prefix): every run reads it afresh. Its outputs are then new artifacts, so no task
        # after it matches an earlier run's cache entry either.
        data.set_caching_options(False)
        return _after_training(ops, data, train(ops, data, params), params)

    torchship_pipeline.__signature__ = signature  # what KFP's compiler reads
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(torchship_pipeline)


def _train_in_one_task(ops: Components, data: dsl.PipelineTask,
                       params: dict[str, Any]) -> dsl.PipelineTask:
    """DDP over `num_workers` processes in one task (kfp.local, one Kubeflow pod)."""
    return ops.train(train=data.outputs["train"], val=data.outputs["val"],
                     model_options=params[MODEL_OPTIONS],
                     **{name: params[name] for name in TRAINING_PARAMETERS})


def _train_as_vertex_job(ops: Components, data: dsl.PipelineTask,
                         params: dict[str, Any]) -> dsl.PipelineTask:
    """A Vertex AI custom job of `train_replica_count` machines, sized at run time."""
    pools = ops.vertex_worker_pools(
        template=ops.train_custom_job_template, replica_count=params["train_replica_count"],
        machine_type=params["train_machine_type"],
        accelerator_type=params["train_accelerator_type"],
        accelerator_count=params["train_accelerator_count"],
    )
    return ops.train_custom_job(
        train=data.outputs["train"], val=data.outputs["val"],
        **{name: params[name] for name in TRAINING_PARAMETERS},
        model_options=params[MODEL_OPTIONS],
        worker_pool_specs=pools.output, location=params["vertex_location"],
    )


def compile_pipeline(output: str | Path, image: str | None = None,
                     platform: str = "kfp") -> Path:
    """Write the pipeline YAML (the contract every runner executes) and return its path."""
    with atomic_path(output) as tmp:  # the temporary name keeps .yaml, which kfp checks
        compiler.Compiler().compile(build_pipeline(image or default_image(), platform), str(tmp))
    return Path(output)
