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
from torchship.pipelines.components import Components, build_components, stage_image
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
GPU_IMAGE_ENV = "TORCHSHIP_GPU_IMAGE"
SERVING_IMAGE_ENV = "TORCHSHIP_SERVING_IMAGE"
STAGES = ("prepare-data", "train", "compress", "export", "benchmark", "gate", "tune-serving",
          "deploy")


def default_image() -> str:
    """The component image: $TORCHSHIP_IMAGE, else the tag `make images` gives the local build."""
    return os.environ.get(IMAGE_ENV) or f"torchship-cpu:{version('torchship')}"


def default_gpu_image(image: str) -> str:
    """The train stage's image on machines with GPUs: $TORCHSHIP_GPU_IMAGE, else the CPU `image`
    by the images' tag scheme, REGISTRY/torchship-cpu:VERSION -> REGISTRY/torchship-cuda:VERSION
    (Makefile `images`, containers/cloudbuild.yaml). An image named otherwise, or pinned by
    digest, is its own GPU image: pass --gpu-image."""
    return os.environ.get(GPU_IMAGE_ENV) or _by_scheme(image, "torchship-cuda") or image


def default_serving_image(image: str) -> str:
    """The image the benchmark and the serving search run in on Vertex AI and Kubeflow: the
    Triton serving image (NGC's tritonserver, its onnxruntime backend, torchship and
    perf_analyzer; containers/Dockerfile.triton): $TORCHSHIP_SERVING_IMAGE, else by the tag
    scheme REGISTRY/torchship-cpu:VERSION -> REGISTRY/torchship-tritonserver:VERSION; empty for
    an image named otherwise (they then run in the component image, on Triton's python
    backend): pass --serving-image."""
    return os.environ.get(SERVING_IMAGE_ENV) or _by_scheme(image, "torchship-tritonserver")


def _by_scheme(image: str, name: str) -> str:
    """`image` (REGISTRY/torchship-cpu:VERSION) as the image `name` of the same scheme; empty
    for an image named otherwise, or pinned by digest."""
    registry, slash, own = image.rpartition("/")
    if "@" in own or own.partition(":")[0] != "torchship-cpu":
        return ""
    return registry + slash + name + own.removeprefix("torchship-cpu")


Outputs = NamedTuple(  # noqa: UP014 - KFP's form
    "Outputs", summary=Markdown, results=Artifact, gate_record=Artifact, report=HTML)
# Where the compiled pipeline runs. `kfp`: kfp.local and Kubeflow Pipelines, training as N
# processes in one task; `vertex`: Vertex AI Pipelines, training as a multi-replica custom job.
PLATFORMS = ("kfp", "vertex")
# What each task asks of its node: (CPU request, CPU limit, memory request, memory limit).
# Vertex AI picks a task's machine by its limits; Kubernetes schedules by the requests, which
# fit a 4-CPU, 16 GB node. The benchmark and the serving search ask for all they may use, so
# that what they measure does not depend on their neighbours. kfp.local ignores the resources, and
# `torchship run` drops the retries (pipelines/local.py).
RESOURCES = {
    "prepare-data": ("1", "4", "4G", "16G"),
    "train": ("2", "8", "8G", "32G"),  # the kfp platform's one task (on Vertex AI: the job's)
    "compress": ("2", "4", "4G", "16G"),
    "export": ("1", "4", "4G", "16G"),
    "benchmark": ("3", "3", "8G", "8G"),
    "gate": ("1", "2", "2G", "8G"),
    "tune-serving": ("3", "3", "8G", "8G"),
    "deploy": ("0.5", "1", "1G", "4G"),
    "vertex-job-setup": ("0.5", "1", "512M", "1G"),  # the custom job's pools and settings
}
# Retries of a failed task, where a failure is often passing (storage or Dataflow hiccups, a
# Triton port taken, a node reclaimed) and a retry redoes little. Not train (hours, and the
# custom job restarts its own workers), not gate (it decides from what it reads), not deploy
# (it changes what serves).
RETRIES = {"prepare-data": 2, "benchmark": 2, "tune-serving": 1, "vertex-job-setup": 2}


def _settle(task: dsl.PipelineTask, stage: str, requests: bool = True,
            ops: Components | None = None) -> dsl.PipelineTask:
    """Set the task's resources (`requests`: the Kubernetes requests too; `ops`: the GPUs it was
    compiled with) and retries."""
    cpu_request, cpu_limit, memory_request, memory_limit = RESOURCES[stage]
    task.set_cpu_limit(cpu_limit).set_memory_limit(memory_limit)
    if ops is not None and ops.gpus.get(stage):
        task.set_accelerator_type(ops.gpu_type).set_accelerator_limit(ops.gpus[stage])
    if requests:
        task.set_cpu_request(cpu_request).set_memory_request(memory_request)
    if RETRIES.get(stage):
        task.set_retry(RETRIES[stage], backoff_duration="30s", backoff_factor=2.0)
    return task


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
    measure = _measuring(ops, params)
    measured = measure(
        "benchmark", onnx_models=exported.outputs["onnx_models"], test=data.outputs["test"],
        concurrency=params["benchmark_concurrency"], knee=params["benchmark_knee"],
        serving_backend=params["benchmark_backend"], **_measurement(params),
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
        # One search over the variants the gate found eligible x the serving settings; deploy
        # takes the variant it chose (in the gate's chosen_model layout) and its settings.
        tuned = measure(
            "tune-serving", onnx_models=exported.outputs["onnx_models"],
            gate_record=decided.outputs["record"], test=data.outputs["test"], instance_counts=params["serving_instance_counts"],
            queue_delays_us=params["serving_queue_delays_us"],
            max_batch_sizes=params["serving_max_batch_sizes"], optimise=params["optimise"],
            latency_budget_p99_ms=params["latency_budget_p99_ms"],
            target_concurrency=params["target_concurrency"],
            throughput_target_rps=params["throughput_target_rps"],
            serving_backend=params["benchmark_backend"], **_measurement(params),
        )
        deployed = ops.deploy(
            chosen_model=tuned.outputs["chosen_model"], test=data.outputs["test"],
            serving_record=tuned.outputs["record"], statistics=data.outputs["statistics"],
            gate_record=decided.outputs["record"],
            target=params["deploy_target"], local_repository=params["local_repository"],
            settings=params["deploy_settings"], reference_uri=params["reference_uri"],
            serving_model_name=params["serving_model_name"],
        )
        # Deploying changes what serves: never skipped for an earlier run's cached result.
        deployed.set_caching_options(False)
    for stage, task in (("compress", variants), ("export", exported), ("benchmark", measured),
                        ("gate", decided), ("tune-serving", tuned), ("deploy", deployed)):
        if stage in ops.serving_jobs:  # a custom job's launcher: its machine is the job's
            task.set_retry(RETRIES[stage], backoff_duration="30s", backoff_factor=2.0)
        else:
            _settle(task, stage, requests=ops.train_custom_job is None, ops=ops)
    return Outputs(summary=measured.outputs["summary"], results=measured.outputs["results"],
                   gate_record=decided.outputs["record"], report=decided.outputs["report_html"])


def _measuring(ops: Components, params: dict[str, Any]) -> Callable[..., dsl.PipelineTask]:
    """What runs a Triton measurement (benchmark, tune-serving) of `ops`: its component's task,
    or on Vertex AI a custom job on one machine like the deploy's (`deploy_settings`
    machine_type and accelerator; the compiled GPUs when they name none) in the serving image,
    where and as whom the pipeline job runs (in `vertex_location` when set)."""
    settings = None

    def measure(stage: str, **arguments: Any) -> dsl.PipelineTask:
        nonlocal settings
        if stage not in ops.serving_jobs:
            return getattr(ops, stage.replace("-", "_"))(**arguments)
        job, template = ops.serving_jobs[stage]
        gpus = ops.gpus.get(stage, 0)
        pools = ops.vertex_serving_pools(
            template=template, deploy_settings=params["deploy_settings"],
            image=stage_image(stage, ops.image, ops.gpu_image, ops.gpus, ops.serving_image),
            gpus=gpus,
            gpu_type=ops.gpu_type if gpus else "").set_display_name(f"{stage}-machine")
        _settle(pools, "vertex-job-setup", requests=False)
        if settings is None:
            settings = _job_settings(ops, params["vertex_location"], "", "", "")
        return job(**arguments, worker_pool_specs=pools.output,
                   **{name: settings.outputs[name] for name in
                      ("location", "service_account", "network", "encryption_spec_key_name")})

    return measure


def _job_settings(ops: Components, location: Any, service_account: Any, network: Any,
                  encryption_spec_key_name: Any) -> dsl.PipelineTask:
    """A custom job's CustomJobSpec settings: a setting left empty is the pipeline job's own."""
    from google_cloud_pipeline_components import _placeholders as pipeline_job

    settings = ops.vertex_job_settings(
        location=location, service_account=service_account, network=network,
        encryption_spec_key_name=encryption_spec_key_name,
        # Vertex AI's placeholders for the running pipeline job's own settings.
        pipeline_location=pipeline_job.LOCATION_PLACEHOLDER,
        pipeline_service_account=pipeline_job.SERVICE_ACCOUNT_PLACEHOLDER,
        pipeline_network=pipeline_job.NETWORK_PLACEHOLDER,
        pipeline_encryption_spec_key_name=pipeline_job.ENCRYPTION_SPEC_KMS_KEY_NAME_PLACEHOLDER,
    )
    _settle(settings, "vertex-job-setup", requests=False)
    # Its inputs are placeholders that each run fills in: a cached result is another run's.
    settings.set_caching_options(False)
    return settings


DESCRIPTION = "PyTorch model from raw data to a benchmarked NVIDIA Triton deployment."


def _measurement(params: dict[str, Any]) -> dict[str, Any]:
    """The measurement method's arguments, as benchmark and tune-serving both take them."""
    return {name: params[f"benchmark_{name}"] for name in MEASUREMENT_PARAMETERS}


# The accelerator a task compiled with GPUs asks for on the kfp platform (Kubernetes' resource);
# Vertex AI names the chip (NVIDIA_L4, NVIDIA_TESLA_T4, ...): compile --gpu-type.
KFP_GPU_TYPE = "nvidia.com/gpu"


def build_pipeline(image: str, platform: str = "kfp", gpu_image: str | None = None,
                   train_gpus: int = 0, compress_gpus: int = 0, benchmark_gpus: int = 0,
                   gpu_type: str = "", serving_image: str | None = None) -> Callable:
    """The pipeline function for `platform` (see PLATFORMS), with every component's base image
    set to `image`; a stage on GPUs runs `gpu_image` (default: `default_gpu_image(image)`).
    Training: on Vertex AI on machines with accelerators (run parameters), on the kfp platform,
    which trains in one task whose image is fixed when compiled, when `train_gpus` (that task's
    GPU limit) is set. Compression's fine-tuning (`compress_gpus`) and the Triton measurements,
    benchmark and serving search (`benchmark_gpus`), on both platforms, each task asking for
    that many GPUs of `gpu_type` (kfp default: nvidia.com/gpu; Vertex AI: required). Those two
    run in `serving_image` (default: `default_serving_image(image)`), on Vertex AI as custom
    jobs on the deploy's machine type and accelerator."""
    if platform not in PLATFORMS:
        raise UserInputError(
            f"platform {platform!r} is unknown; pass one of {', '.join(PLATFORMS)}")
    for name, value in (("train_gpus", train_gpus), ("compress_gpus", compress_gpus),
                        ("benchmark_gpus", benchmark_gpus)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserInputError(f"{name} {value!r} is not a whole number >= 0; pass a count of "
                                 "GPUs, e.g. 1, or 0 for CPUs")
    if train_gpus and platform == "vertex":
        raise UserInputError(
            "train_gpus is for the kfp platform; on Vertex AI pass the run parameters "
            "train_accelerator_type and train_accelerator_count instead")
    if (compress_gpus or benchmark_gpus) and platform == "vertex" and not gpu_type:
        raise UserInputError(
            "gpu_type is not set; Vertex AI tasks with GPUs need the chip, e.g. --gpu-type "
            "NVIDIA_L4 (or NVIDIA_TESLA_T4)")
    gpus = {"compress": compress_gpus, "benchmark": benchmark_gpus,
            "tune-serving": benchmark_gpus}
    if platform == "kfp":
        gpus["train"] = train_gpus
    ops = build_components(image, vertex=platform == "vertex",
                           gpu_image=gpu_image or default_gpu_image(image), gpus=gpus,
                           gpu_type=gpu_type or KFP_GPU_TYPE,
                           serving_image=default_serving_image(image)
                           if serving_image is None else serving_image)
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
        _settle(data, "prepare-data", requests=ops.train_custom_job is None)
        return _after_training(ops, data, train(ops, data, params), params)

    torchship_pipeline.__signature__ = signature  # what KFP's compiler reads
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(torchship_pipeline)


def _train_in_one_task(ops: Components, data: dsl.PipelineTask,
                       params: dict[str, Any]) -> dsl.PipelineTask:
    """DDP in one task (kfp.local, one Kubeflow pod): `num_workers` processes of the CPU image
    or, compiled with train GPUs, one per GPU of the GPU image, which asks for that many
    nvidia.com/gpu (kfp.local runs it on this machine as it is)."""
    trained = ops.train(train=data.outputs["train"], val=data.outputs["val"],
                        model_options=params[MODEL_OPTIONS],
                        **{name: params[name] for name in TRAINING_PARAMETERS})
    return _settle(trained, "train", ops=ops)


def _train_as_vertex_job(ops: Components, data: dsl.PipelineTask,
                         params: dict[str, Any]) -> dsl.PipelineTask:
    """A Vertex AI custom job of `train_replica_count` machines, sized at run time, in the GPU
    image on machines with accelerators; where and as whom it runs, from pipeline parameters."""
    pools = ops.vertex_worker_pools(
        template=ops.train_custom_job_template, replica_count=params["train_replica_count"],
        machine_type=params["train_machine_type"],
        accelerator_type=params["train_accelerator_type"],
        accelerator_count=params["train_accelerator_count"],
        cpu_image=ops.image, gpu_image=ops.gpu_image,
    )
    _settle(pools, "vertex-job-setup", requests=False)
    settings = _job_settings(ops, params["vertex_location"], params["train_service_account"],
                             params["train_network"], params["train_encryption_spec_key_name"])
    return ops.train_custom_job(
        train=data.outputs["train"], val=data.outputs["val"],
        **{name: params[name] for name in TRAINING_PARAMETERS},
        model_options=params[MODEL_OPTIONS], worker_pool_specs=pools.output,
        **{name: settings.outputs[name] for name in
           ("location", "service_account", "network", "encryption_spec_key_name")},
        tensorboard=params["train_tensorboard"],
        base_output_directory=params["train_base_output_directory"],
    )


def compile_pipeline(output: str | Path, image: str | None = None,
                     platform: str = "kfp", gpu_image: str | None = None,
                     train_gpus: int = 0, compress_gpus: int = 0, benchmark_gpus: int = 0,
                     gpu_type: str = "", serving_image: str | None = None) -> Path:
    """Write the pipeline YAML (the contract every runner executes) and return its path."""
    pipeline = build_pipeline(image or default_image(), platform, gpu_image, train_gpus,
                              compress_gpus, benchmark_gpus, gpu_type, serving_image)
    with atomic_path(output) as tmp:  # the temporary name keeps .yaml, which kfp checks
        compiler.Compiler().compile(pipeline, str(tmp))
    return Path(output)
