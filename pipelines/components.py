"""The KFP components, one per stage: thin wrappers whose bodies import and call a stage function.

Each body runs inside the project's image on Vertex AI / Kubeflow, and in the local environment
under `kfp.local.SubprocessRunner`; the image is chosen when the pipeline is compiled. The
gate, the serving search and the deploy are in pipelines/components_release.py.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import (
    Artifact,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

from torchship.pipelines.components_release import deploy, gate, tune_serving

# The stages that measure on Triton: in the serving image, on Vertex AI on the serving machine.
MEASURING = ("benchmark", "tune-serving")


def stage_image(stage: str, image: str, gpu_image: str = "", gpus: dict[str, int] | None = None,
                serving_image: str = "") -> str:
    """The image `stage` runs: the serving image for the Triton measurements where there is one,
    else `gpu_image` (default: `image`) when the stage has GPUs, else `image`."""
    if stage in MEASURING and serving_image:
        return serving_image
    return (gpu_image or image) if (gpus or {}).get(stage) else image


def prepare_data(
    data_source: str,
    label_column: str,
    image_size: int,
    text_column: str,
    tokenizer: str,
    max_length: int,
    model_name: str,
    seed: int,
    statistics_uri: str,
    # Where its Beam pipeline runs (`BeamRunner`); the image is the pipeline's, for the workers.
    data_runner: str, dataflow_project: str, dataflow_region: str, dataflow_service_account: str,
    dataflow_temp_location: str, dataflow_max_workers: int, dataflow_machine_type: str,
    dataflow_subnetwork: str, beam_job_endpoint: str, sdk_container_image: str,
    train: Output[Dataset],
    val: Output[Dataset],
    test: Output[Dataset],
    statistics: Output[Artifact],
):
    """Split and standardise the data; schema and class counts go into each split's metadata.

    The training statistics are kept as an artifact and, when `statistics_uri` is set, also
    written there for the drift trigger to compare new data with.
    """
    from torchship.components.data.runners import BeamRunner
    from torchship.components.data.stage import prepare_data as run
    from torchship.components.data.stage import write_statistics

    runner = BeamRunner(
        runner=data_runner, project=dataflow_project, region=dataflow_region,
        service_account=dataflow_service_account, temp_location=dataflow_temp_location,
        max_workers=dataflow_max_workers, machine_type=dataflow_machine_type,
        subnetwork=dataflow_subnetwork, job_endpoint=beam_job_endpoint,
        sdk_container_image=sdk_container_image)
    meta = run(data_source, label_column, train.path, val.path, test.path, seed=seed,
               image_size=image_size, text_column=text_column, tokenizer=tokenizer,
               max_length=max_length, model_name=model_name, runner=runner)
    from torchship.components.progress import report

    for warning in meta["warnings"]:  # kept in the splits' metadata too
        report(f"data warning: {warning}")
    write_statistics(meta["statistics"], statistics.path)
    if statistics_uri:
        write_statistics(meta["statistics"], statistics_uri)
    shared = {key: meta[key] for key in ("source", "contract", "n_features", "n_classes",
                                         "schema", "warnings")}
    for split, artifact in (("train", train), ("val", val), ("test", test)):
        artifact.metadata.update({**shared, "n_rows": meta["n_rows"][split],
                                  "class_counts": meta["class_counts"][split]})


def train(
    train: Input[Dataset],
    val: Input[Dataset],
    model_name: str,
    model_options: dict,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    num_workers: int,
    seed: int,
    checkpoint_every_steps: int,
    shuffle_buffer: int,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """DDP training over `num_workers` processes; validation accuracy and samples/s as Metrics.
    Checkpoints every `checkpoint_every_steps` optimizer steps too (0: epoch ends only)."""
    from torchship.components.progress import report
    from torchship.components.train.stage import train_model

    result = train_model(
        train.path, val.path, model.path, model_name=model_name,
        model_options=model_options or None, epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, num_workers=num_workers,
        seed=seed, checkpoint_every_steps=checkpoint_every_steps, shuffle_buffer=shuffle_buffer,
        progress=report,
    )
    model.metadata.update({"framework": "pytorch", **result})
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)


def compress(
    model: Input[Model],
    train: Input[Dataset],
    val: Input[Dataset],
    test: Input[Dataset],
    target_sparsity: float,
    finetune_epochs: int,
    quantize: bool,
    seed: int,
    variant_names: list[str],
    calibration_method: str,
    variants: Output[Artifact],
    metrics: Output[Metrics],
):
    """The variants a serving team weighs (pruned, structured, distilled, int8, fp16, ...)."""
    import json

    from torchship.components.compress.stage import compress_model
    from torchship.components.progress import report

    rows = compress_model(
        model.path, train.path, val.path, test.path, variants.path,
        target_sparsity=target_sparsity, finetune_epochs=finetune_epochs, quantize=quantize,
        seed=seed, progress=report, variants=list(variant_names),
        calibration_method=calibration_method,
    )
    variants.metadata["variants"] = [row["name"] for row in rows]
    with open(f"{variants.path}/skipped.json") as handle:  # asked for, but not for this model
        variants.metadata["skipped"] = json.load(handle)
    for row in rows:
        metrics.log_metric(f"{row['name']}_test_accuracy", row["test_accuracy"])
        metrics.log_metric(f"{row['name']}_size_bytes", row["size_bytes"])
        metrics.log_metric(f"{row['name']}_sparsity", row["sparsity"])


def export(
    variants: Input[Artifact],
    test: Input[Dataset],
    onnx_models: Output[Model],
    metrics: Output[Metrics],
):
    """ONNX files that passed onnx.checker and parity with PyTorch, each measured (accuracy,
    size, ONNX Runtime latency at batch 1 and 64, agreement with fp32)."""
    from torchship.components.export.stage import export_variants
    from torchship.components.export.table import format_variant_table, variant_metrics
    from torchship.components.progress import report

    rows = export_variants(variants.path, test.path, onnx_models.path, progress=report)
    onnx_models.metadata.update({"framework": "onnx", "variants": [row["name"] for row in rows]})
    for line in format_variant_table(rows).splitlines():
        report(line)
    for key, value in variant_metrics(rows).items():
        metrics.log_metric(key, value)


def benchmark(
    onnx_models: Input[Model],
    test: Input[Dataset],
    concurrency: list[int],
    batch_size: int,
    duration_s: float,
    warmup_s: float,
    window_s: float,
    min_windows: int,
    max_windows: int,
    stability_pct: float,
    engine: str,
    knee: bool,
    serving_backend: str,
    results: Output[Artifact],
    results_csv: Output[Dataset],
    metrics: Output[Metrics],
    summary: Output[Markdown],
):
    """Every variant on a real Triton launched over a candidate repository (as Model Analyzer's
    local mode does): latency percentiles, throughput, server queue/compute time. Each level
    runs `min_windows` to `max_windows` windows of `window_s` (0: `duration_s / min_windows`)
    after `warmup_s`, until they agree within `stability_pct`; measured by `engine`
    (perf_analyzer where present), `knee`: doubling concurrency until throughput stops rising.
    `serving_backend` auto: Triton's onnxruntime backend where the tritonserver has it (the
    Triton serving image), else the python backend (nvidia-pytriton's, locally)."""
    from torchship.components.benchmark.results import metrics_for_kfp, write_csv
    from torchship.components.benchmark.stage import benchmark_repository
    from torchship.components.progress import report
    from torchship.components.report.summary import build_summary, write_summary
    from torchship.components.scratch import scratch_dir
    from torchship.components.triton.binary import find_tritonserver, measurement_backend
    from torchship.components.triton.repository import build_model_repository

    backend = measurement_backend(serving_backend)
    report(f"measuring on {find_tritonserver().describe()} with Triton's {backend} backend")
    with scratch_dir("candidates") as scratch:
        repository = f"{scratch}/repository"
        build_model_repository(onnx_models.path, repository, backend, warmup_path=test.path)
        measured = benchmark_repository(
            repository, test.path, concurrency=[int(level) for level in concurrency],
            batch_size=batch_size, duration_s=duration_s, warmup_s=warmup_s, window_s=window_s,
            min_windows=min_windows, max_windows=max_windows, stability_pct=stability_pct,
            engine=engine, knee=knee, progress=report,
        )
    table = build_summary(onnx_models.path, measured)
    write_summary(table, results.path, summary.path)
    write_csv(measured, results_csv.path)
    for key, value in metrics_for_kfp(measured).items():
        metrics.log_metric(key, value)


def vertex_worker_pools(
    template: str,
    replica_count: int,
    machine_type: str,
    accelerator_type: str,
    accelerator_count: int,
    cpu_image: str,
    gpu_image: str,
) -> list:
    """Vertex AI worker pool specs for the train custom job, sized by pipeline parameters: the
    GPU image on machines with accelerators, the CPU image otherwise (decided at run time)."""
    from torchship.pipelines.vertex import worker_pool_specs

    return worker_pool_specs(template, replica_count, machine_type, accelerator_type,
                             accelerator_count, cpu_image=cpu_image, gpu_image=gpu_image)


def vertex_serving_pools(
    template: str,
    deploy_settings: dict,
    image: str,
    gpus: int,
    gpu_type: str,
) -> list:
    """Vertex AI worker pool specs for a Triton measurement's custom job: one machine like the
    deploy's (`deploy_settings` machine_type and accelerator), running the Triton serving image."""
    from torchship.pipelines.vertex import serving_pool_specs

    return serving_pool_specs(template, deploy_settings, image, gpus=gpus, gpu_type=gpu_type)


def vertex_job_settings(
    location: str,
    service_account: str,
    network: str,
    encryption_spec_key_name: str,
    pipeline_location: str,
    pipeline_service_account: str,
    pipeline_network: str,
    pipeline_encryption_spec_key_name: str,
) -> NamedTuple("CustomJobSettings", location=str, service_account=str,
                network=str, encryption_spec_key_name=str):
    """Where and as whom the train custom job runs: a setting left empty is the pipeline job's
    own (`pipeline_*`, which Vertex AI fills in at run time). Left empty on the CustomJob
    itself, the service account would be Vertex AI's Custom Code Service Agent instead."""
    from collections import namedtuple

    settings = namedtuple("CustomJobSettings",
                          "location service_account network encryption_spec_key_name")
    return settings(location or pipeline_location,
                    service_account or pipeline_service_account, network or pipeline_network,
                    encryption_spec_key_name or pipeline_encryption_spec_key_name)


@dataclass(frozen=True)
class Components:
    """The stages as KFP components built for the images (and, for Vertex AI, the custom job)."""

    image: str  # the base image of every component, and the data step's Dataflow workers'
    prepare_data: Callable
    train: Callable
    compress: Callable
    export: Callable
    deploy: Callable
    benchmark: Callable
    gate: Callable
    tune_serving: Callable
    vertex_worker_pools: Callable
    vertex_serving_pools: Callable
    vertex_job_settings: Callable
    # The train stage's image on machines with GPUs (the Vertex AI custom job's worker pools).
    gpu_image: str = ""
    # The GPUs each stage's task asks for when compiled (compile --train-gpus, --compress-gpus,
    # --benchmark-gpus), of `gpu_type`; such a task runs `gpu_image`.
    gpus: dict[str, int] = field(default_factory=dict)
    gpu_type: str = ""
    # The image of the Triton measurements, benchmark and serving search: the Triton serving
    # image (its native onnxruntime backend; empty: `image`, or `gpu_image` on GPUs).
    serving_image: str = ""
    # The train component wrapped as a Vertex AI custom job, and its container as JSON.
    train_custom_job: Callable | None = None
    train_custom_job_template: str = ""
    # Vertex AI: benchmark and tune-serving as custom jobs on the deploy's machine (stage ->
    # (job, its container as JSON)).
    serving_jobs: dict[str, tuple[Callable, str]] = field(default_factory=dict)


def build_components(image: str, vertex: bool = False, gpu_image: str = "",
                     gpus: dict[str, int] | None = None, gpu_type: str = "",
                     serving_image: str = "") -> Components:
    """Make the components with `image` as their base image (the image has torchship and kfp);
    `gpu_image` (default: `image`) is the image of a stage on machines with accelerators: the
    Vertex AI train job's, chosen at run time, and that of every stage given GPUs in `gpus`
    (stage name -> count of `gpu_type`) when compiled; `serving_image` that of the benchmark
    and the serving search (on Vertex AI, custom jobs on the deploy's machine)."""
    gpus = {stage: count for stage, count in (gpus or {}).items() if count}

    def make(func: Callable, stage: str = "") -> Callable:
        return dsl.component(func, base_image=stage_image(stage, image, gpu_image, gpus,
                                                          serving_image),
                             install_kfp_package=False)

    ops = Components(
        image=image,
        gpu_image=gpu_image or image,
        gpus=gpus,
        gpu_type=gpu_type,
        prepare_data=make(prepare_data),
        train=make(train, "train"),
        compress=make(compress, "compress"),
        export=make(export),
        deploy=make(deploy),
        benchmark=make(benchmark, "benchmark"),
        gate=make(gate),
        tune_serving=make(tune_serving, "tune-serving"),
        vertex_worker_pools=make(vertex_worker_pools),
        vertex_serving_pools=make(vertex_serving_pools),
        vertex_job_settings=make(vertex_job_settings),
        serving_image=serving_image,
    )
    if not vertex:
        return ops
    from torchship.pipelines.vertex import custom_training_job

    job, template = custom_training_job(ops.train)
    serving_jobs = {stage: custom_training_job(getattr(ops, stage.replace("-", "_")), stage)
                    for stage in MEASURING}
    return replace(ops, train_custom_job=job, train_custom_job_template=template,
                   serving_jobs=serving_jobs)

