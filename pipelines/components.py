"""The six KFP components: thin wrappers whose bodies import and call a stage function.

Each body runs inside the project's image on Vertex AI / Kubeflow, and in the local environment
under `kfp.local.SubprocessRunner`; the image is chosen when the pipeline is compiled.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def prepare_data(
    data_source: str,
    label_column: str,
    seed: int,
    statistics_uri: str,
    train: Output[Dataset],
    val: Output[Dataset],
    test: Output[Dataset],
    statistics: Output[Artifact],
):
    """Split and standardise the data; schema and class counts go into each split's metadata.

    The training statistics are kept as an artifact and, when `statistics_uri` is set, also
    written there for the drift trigger to compare new data with.
    """
    from torchship.components.data import prepare_data as run
    from torchship.components.data import write_statistics

    meta = run(data_source, label_column, train.path, val.path, test.path, seed=seed)
    write_statistics(meta["statistics"], statistics.path)
    if statistics_uri:
        write_statistics(meta["statistics"], statistics_uri)
    for split, artifact in (("train", train), ("val", val), ("test", test)):
        artifact.metadata.update(
            {
                "source": meta["source"],
                "n_features": meta["n_features"],
                "n_classes": meta["n_classes"],
                "n_rows": meta["n_rows"][split],
                "class_counts": meta["class_counts"][split],
                "schema": meta["schema"],
            }
        )


def train(
    train: Input[Dataset],
    val: Input[Dataset],
    model_name: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    num_workers: int,
    seed: int,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """DDP training over `num_workers` processes; validation accuracy and samples/s as Metrics."""
    from torchship.components.progress import report
    from torchship.components.train import train_model

    result = train_model(
        train.path, val.path, model.path, model_name=model_name, epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, num_workers=num_workers,
        seed=seed, progress=report,
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
    variants: Output[Artifact],
    metrics: Output[Metrics],
):
    """Pruned and int8 variants of the trained model, each with accuracy and size."""
    from torchship.components.compress import compress_model
    from torchship.components.progress import report

    rows = compress_model(
        model.path, train.path, val.path, test.path, variants.path,
        target_sparsity=target_sparsity, finetune_epochs=finetune_epochs, quantize=quantize,
        seed=seed, progress=report,
    )
    variants.metadata["variants"] = [row["name"] for row in rows]
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
    """ONNX files that passed onnx.checker and a parity check against PyTorch."""
    from torchship.components.export import export_variants
    from torchship.components.progress import report

    rows = export_variants(variants.path, test.path, onnx_models.path, progress=report)
    onnx_models.metadata.update({"framework": "onnx", "variants": [row["name"] for row in rows]})
    for row in rows:
        metrics.log_metric(f"{row['name']}_onnx_size_bytes", row["onnx_size_bytes"])
        metrics.log_metric(f"{row['name']}_parity_max_abs_diff", row["parity"]["max_abs_diff"])
        metrics.log_metric(f"{row['name']}_parity_top1_agreement", row["parity"]["top1_agreement"])


def deploy(
    onnx_models: Input[Model],
    test: Input[Dataset],
    target: str,
    model_repository: Output[Artifact],
):
    """A Triton model repository, served and smoke-tested against ONNX Runtime."""
    if target != "local":
        raise ValueError(f"deploy target {target!r} is not supported yet; pass target='local'")
    from torchship.components.deploy import deploy_local
    from torchship.components.progress import report

    smoke = deploy_local(onnx_models.path, model_repository.path, test.path, progress=report)
    model_repository.metadata.update({"target": target, "smoke": smoke})


def benchmark(
    model_repository: Input[Artifact],
    onnx_models: Input[Model],
    test: Input[Dataset],
    concurrency: list[int],
    batch_size: int,
    duration_s: float,
    results: Output[Artifact],
    metrics: Output[Metrics],
    summary: Output[Markdown],
):
    """Latency and throughput of each model on a real Triton server, plus the run summary."""
    from torchship.components.benchmark import benchmark_repository
    from torchship.components.progress import report
    from torchship.components.report import build_summary, write_summary

    measured = benchmark_repository(
        model_repository.path, test.path, concurrency=tuple(int(level) for level in concurrency),
        batch_size=batch_size, duration_s=duration_s, progress=report,
    )
    table = build_summary(onnx_models.path, measured)
    write_summary(table, results.path, summary.path)
    for row in table["rows"]:
        for key, value in row.items():
            if key != "variant" and isinstance(value, (int, float)):
                metrics.log_metric(f"{row['variant']}_{key}", value)


def vertex_worker_pools(
    template: str,
    replica_count: int,
    machine_type: str,
    accelerator_type: str,
    accelerator_count: int,
) -> list:
    """Vertex AI worker pool specs for the train custom job, sized by pipeline parameters."""
    from torchship.pipelines.vertex import worker_pool_specs

    return worker_pool_specs(template, replica_count, machine_type, accelerator_type,
                             accelerator_count)


@dataclass(frozen=True)
class Components:
    """The stages as KFP components built for one image (and, for Vertex AI, the custom job)."""

    prepare_data: Callable
    train: Callable
    compress: Callable
    export: Callable
    deploy: Callable
    benchmark: Callable
    vertex_worker_pools: Callable
    # The train component wrapped as a Vertex AI custom job, and its container as JSON.
    train_custom_job: Callable | None = None
    train_custom_job_template: str = ""


def build_components(image: str, vertex: bool = False) -> Components:
    """Make the components with `image` as their base image (the image has torchship and kfp)."""

    def make(func: Callable) -> Callable:
        return dsl.component(func, base_image=image, install_kfp_package=False)

    ops = Components(
        prepare_data=make(prepare_data),
        train=make(train),
        compress=make(compress),
        export=make(export),
        deploy=make(deploy),
        benchmark=make(benchmark),
        vertex_worker_pools=make(vertex_worker_pools),
    )
    if not vertex:
        return ops
    from torchship.pipelines.vertex import custom_training_job

    job, template = custom_training_job(ops.train)
    return replace(ops, train_custom_job=job, train_custom_job_template=template)
