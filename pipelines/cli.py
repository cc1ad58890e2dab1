"""The `torchship` command: compile the pipeline, run it locally, serve and benchmark a repository;
`cli_cloud` adds submit, schedule and publish."""

import sys
from pathlib import Path
from typing import Any

import click

from torchship.components.benchmark.engine import ENGINES
from torchship.components.benchmark.method import DEFAULT_CONCURRENCY
from torchship.components.benchmark.method import default as measurement_default
from torchship.components.data.runners import PIPELINE_PARAMETERS as RUNNER_PARAMETERS
from torchship.components.deploy.reference import default_reference_uri
from torchship.components.deploy.stage import DEFAULT_SERVING_NAME, DEFAULT_TARGET
from torchship.components.errors import ParityError, ServingError, UserInputError
from torchship.pipelines.arguments import concurrency_levels, fail, key_values
from torchship.pipelines.cli_cloud import data_runner_options, publish, schedule, submit
from torchship.pipelines.cli_runs import runs  # and schedule list|pause|resume|delete

# `compile --platform`: the two pipelines (pipelines/pipeline.py PLATFORMS), the kfp one also by
# where it runs.
PLATFORM_NAMES = {"kfp": "kfp", "local": "kfp", "kubeflow": "kfp", "vertex": "vertex"}

DEFAULT_PIPELINE = "out/torchship-pipeline.yaml"

# `torchship run` options that set pipeline parameters: option -> pipeline parameter.
RUN_PARAMETERS = {
    "data_source": "data_source",
    "label_column": "label_column",
    "image_size": "image_size",
    "text_column": "text_column",
    "tokenizer": "tokenizer",
    "max_length": "max_length",
    "model": "model_name",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "workers": "num_workers",
    "seed": "seed",
    "target_sparsity": "target_sparsity",
    "finetune_epochs": "finetune_epochs",
    "quantize": "quantize",
    "concurrency": "benchmark_concurrency",
    "bench_batch_size": "benchmark_batch_size",
    "bench_duration": "benchmark_duration_s",
    "variants": "variants",
    "max_accuracy_drop": "max_accuracy_drop_pt",
    "latency_budget_ms": "latency_budget_p99_ms",
    "target_concurrency": "target_concurrency",
    "baseline": "baseline_uri",
    "previous_results": "previous_results_uri",
    "local_repository": "local_repository",
    "serving_model_name": "serving_model_name",
    **{name: name for name in RUNNER_PARAMETERS},  # --data-runner, --dataflow-region, ...
}

# How `torchship run` spells each pipeline parameter it has an option for, in error messages.
RUN_FLAGS = {parameter: "--" + option.replace("_", "-")
             for option, parameter in RUN_PARAMETERS.items()}


@click.group()
@click.version_option(package_name="torchship")
def main() -> None:
    """torchship: a PyTorch model from raw data to a live, benchmarked Triton endpoint."""


@main.command()
@click.option("--output", "-o", default=DEFAULT_PIPELINE, show_default=True,
              help="Where to write the pipeline YAML.")
@click.option("--image", default=None,
              help="Component image URI (default: $TORCHSHIP_IMAGE, else torchship-cpu:VERSION).")
@click.option("--gpu-image", default=None,
              help="The image of stages on GPUs (default: $TORCHSHIP_GPU_IMAGE, else --image "
                   "with torchship-cpu made torchship-cuda).")
@click.option("--serving-image", default=None,
              help="The image benchmark and tune-serving run in (default: "
                   "$TORCHSHIP_SERVING_IMAGE, else --image with torchship-cpu made "
                   "torchship-tritonserver: Triton's onnxruntime backend, as it serves).")
@click.option("--platform", type=click.Choice(list(PLATFORM_NAMES)), default=None,
              help="kfp [default]: kfp.local and Kubeflow Pipelines, training as N processes in "
                   "one task (`local` and `kubeflow` name it by where it runs: the same YAML); "
                   "vertex: Vertex AI Pipelines, training as a multi-replica custom job.")
@click.option("--train-gpus", type=click.IntRange(min=0), default=0, show_default=True,
              help="kfp platform: train in the GPU image on this many GPUs (nvidia.com/gpu); "
                   "on Vertex AI GPUs are the run parameters train_accelerator_type/count.")
@click.option("--compress-gpus", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fine-tune the compressed variants in the GPU image on this many GPUs.")
@click.option("--benchmark-gpus", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run the Triton benchmark and serving search in the GPU image on this many "
                   "GPUs (KIND_GPU instances).")
@click.option("--gpu-type", default="",
              help="The GPU those tasks ask for: kfp default nvidia.com/gpu; on Vertex AI the "
                   "chip, e.g. NVIDIA_L4 (required there with --compress/--benchmark-gpus).")
@click.option("--target", "old_platform", type=click.Choice(["local", "vertex"]), default=None,
              hidden=True)  # the earlier name of --platform (local: kfp)
def compile(output: str, image: str | None, gpu_image: str | None, serving_image: str | None,
            platform: str | None, train_gpus: int, compress_gpus: int, benchmark_gpus: int,
            gpu_type: str, old_platform: str | None) -> None:
    """Compile the pipeline to a KFP v2 YAML: the file every runner executes."""
    from torchship.pipelines.components import stage_image
    from torchship.pipelines.pipeline import (
        compile_pipeline,
        default_gpu_image,
        default_image,
        default_serving_image,
    )

    if platform and old_platform:
        fail("--target is the earlier name of --platform; pass only --platform")
    named = platform or {"local": "local", "vertex": "vertex", None: "kfp"}[old_platform]
    platform = PLATFORM_NAMES[named]
    try:
        path = compile_pipeline(output, image=image, platform=platform, gpu_image=gpu_image,
                                train_gpus=train_gpus, compress_gpus=compress_gpus,
                                benchmark_gpus=benchmark_gpus, gpu_type=gpu_type,
                                serving_image=serving_image)
    except UserInputError as exc:
        fail(str(exc))
    image = image or default_image()
    serving_image = default_serving_image(image) if serving_image is None else serving_image

    def on(count: int) -> str:
        return f"{count} GPU{'s' if count != 1 else ''}"

    on_gpus = [f"{stage} on {on(count)}" for stage, count in
               (("train", train_gpus), ("compress", compress_gpus)) if count]
    gpus = f" ({', '.join(on_gpus)})" if on_gpus else ""
    gpu_image = gpu_image or default_gpu_image(image)
    gpu_line = f", GPU image {gpu_image}{gpus}" if platform == "vertex" or on_gpus else ""
    where = f" on {on(benchmark_gpus)}" if benchmark_gpus else ""
    measured_in = stage_image("benchmark", image, gpu_image, {"benchmark": benchmark_gpus},
                              serving_image)
    measured = (f"; benchmark and tune-serving in {measured_in}{where}"
                + ("" if serving_image else ", on Triton's python backend"))
    alias = f" (the {platform} pipeline)" if named != platform else ""
    click.echo(f"wrote {path} (platform {named}{alias}, image {image}{gpu_line}{measured})")


@main.command()
@click.argument("pipeline_yaml", required=False)
@click.option("--pipeline-root", default="runs", show_default=True,
              help="Folder for the run's artifacts.")
@click.option("--data-source", help="'digits', 'digits-images', a CSV/Parquet file with a label "
              "column, an .npz with arrays x and y, or a folder of images with one sub-folder "
              "per class; a local path or a gs:// URL.")
@click.option("--label-column", help="Name of the label column in a CSV/Parquet source.")
@click.option("--image-size", type=int,
              help="Resize every image of an image folder to N x N [default: keep their size].")
@click.option("--text-column", help="A CSV/Parquet source is text: the column to tokenise.")
@click.option("--tokenizer", help="Tokenizer directory (local or gs://) for --text-column "
              "[default: the --model hf:DIR directory].")
@click.option("--max-length", type=int, help="Tokens per text: longer ones are cut, shorter padded.")
@click.option("--model", help="Built-in model (mlp, cnn, resnet), hf:DIR (a Hugging Face model "
              "directory, local or gs://), or your own as module:factory.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--learning-rate", type=float)
@click.option("--workers", type=int, help="DDP worker processes for training.")
@click.option("--seed", type=int)
@click.option("--target-sparsity", type=float, help="Fraction of weights the pruned variant zeroes.")
@click.option("--finetune-epochs", type=int, help="Fine-tuning epochs after pruning.")
@click.option("--quantize/--no-quantize", default=None, help="Make the int8 variant.")
@click.option("--concurrency", help="Benchmark concurrency levels, e.g. 1,4.")
@click.option("--bench-batch-size", type=int, help="Rows per benchmark request.")
@click.option("--bench-duration", type=float, help="Seconds measured per concurrency level.")
@click.option("--variants", help="Variants to make, e.g. fp32,pruned,int8 (also structured, "
              "distilled, qat, int8_dynamic, fp16).")
@click.option("--max-accuracy-drop", type=float, help="Points of accuracy a variant may lose.")
@click.option("--latency-budget-ms", type=float,
              help="Gate: p99 budget on Triton in ms [default: none; 0 also means none].")
@click.option("--target-concurrency", type=int, help="Gate: concurrency the budget applies at.")
@click.option("--baseline", help="Gate record of the serving model (path or gs://).")
@click.option("--previous-results", help="Previous run's results (path or gs://) for regressions.")
@click.option("--local-repository",
              help="Persistent Triton repository the deploy adds a version to "
                   "[default: PIPELINE_ROOT/model_repository].")
@click.option("--serving-model-name",
              help="The model name clients call, whichever variant a run deploys; each run adds "
                   "a version under it [default: torchship].")
@data_runner_options
@click.option("--param", "-p", "params", multiple=True,
              help="Any pipeline parameter NAME=VALUE (JSON values typed), repeatable.")
@click.option("--keep-runs", type=int,
              help="After the run, keep only the newest N run folders under PIPELINE_ROOT "
                   "[default: keep all].")
@click.option("--verbose", is_flag=True, help="Show kfp.local's full logs.")
def run(pipeline_yaml: str | None, pipeline_root: str, verbose: bool, params: tuple[str, ...],
        keep_runs: int | None, **options: Any) -> None:
    """Execute the compiled pipeline locally (kfp.local) and print the variant table.

    Without PIPELINE_YAML the pipeline is compiled first to out/torchship-pipeline.yaml.
    """
    from torchship.components.report.summary import format_table
    from torchship.pipelines.local import PipelineFailed, prune_runs, run_pipeline
    from torchship.pipelines.parameters import compiled_defaults
    from torchship.pipelines.pipeline import compile_pipeline
    from torchship.pipelines.preflight import preflight_run

    if keep_runs is not None and keep_runs < 1:
        fail(f"--keep-runs {keep_runs} would remove the run being made; pass 1 or more, or "
              "leave it out to keep every run")
    if pipeline_yaml is None:
        pipeline_yaml = str(compile_pipeline(DEFAULT_PIPELINE))
    arguments: dict[str, Any] = {}
    for option, value in options.items():
        if value is None:
            continue
        if option == "concurrency":
            value = concurrency_levels(value)
        elif option == "variants":
            value = [name.strip() for name in value.split(",") if name.strip()]
        arguments[RUN_PARAMETERS[option]] = value
    arguments.update(key_values(params, "--param", parse_json=True))
    # Each local run adds a version to one repository that `torchship serve` can serve.
    arguments.setdefault("local_repository", str(Path(pipeline_root, "model_repository").resolve()))
    # A deploying run keeps the retraining reference under the pipeline root.
    arguments.setdefault("reference_uri", default_reference_uri(
        str(Path(pipeline_root).resolve()), arguments.get("deploy_target", DEFAULT_TARGET)))
    try:  # everything the input decides is refused here, before any stage runs
        notes = preflight_run(pipeline_yaml, pipeline_root, arguments, RUN_FLAGS)
    except UserInputError as exc:
        fail(str(exc))
    defaults = compiled_defaults(pipeline_yaml)
    click.echo(f"running {pipeline_yaml} locally (artifacts under {pipeline_root}/)")
    for note in notes:
        click.echo(note)
    try:
        summary = run_pipeline(pipeline_yaml, pipeline_root, arguments, verbose=verbose)
    except PipelineFailed as exc:
        fail(str(exc))
    click.echo("")
    click.echo(format_table(summary))
    click.echo("")
    gate = summary["gate"]
    for name, path in summary["paths"].items():
        click.echo(f"{name}: {path}")
    if keep_runs is not None:
        removed = prune_runs(pipeline_root, keep_runs)
        click.echo(f"removed {len(removed)} older run folder{'s' if len(removed) != 1 else ''} "
                   f"under {pipeline_root}/ (--keep-runs {keep_runs})")
    if not gate["passed"]:
        click.echo("not deployed: the serving version is unchanged", err=True)
        sys.exit(1)
    click.echo(_deployed_line(gate["variant"], arguments, defaults,
                              Path(summary["paths"]["gate"]).parents[1]))


def _deployed_variant(run_dir: Path) -> str | None:
    """The variant the deploy task served (the serving search's choice, which may not be the
    gate's): its model_repository artifact's metadata, as kfp.local keeps it."""
    from torchship.components.files import read_json

    output = read_json(run_dir / "deploy" / "executor_output.json") or {}
    found = (output.get("artifacts") or {}).get("model_repository", {}).get("artifacts", [])
    return next((a["metadata"]["variant"] for a in found
                 if (a.get("metadata") or {}).get("variant")), None)


def _deployed_line(gate_variant: str, arguments: dict[str, Any], defaults: dict[str, Any],
                   run_dir: Path) -> str:
    """What was deployed under which model name; for the local target, which version of which
    repository, with which serving settings, and how to serve it."""
    from torchship.components.triton.config import read_model_config
    from torchship.components.triton.versions import served_versions, version_dirs, version_variant

    target = arguments.get("deploy_target", defaults.get("deploy_target", "local"))
    name = arguments.get("serving_model_name",
                         defaults.get("serving_model_name", DEFAULT_SERVING_NAME))
    variant = _deployed_variant(run_dir) or gate_variant
    if target != "local":
        return f"deployed: {variant} as model '{name}' ({target})"
    repository = Path(arguments["local_repository"])
    model_dir = repository / name
    config = read_model_config(model_dir / "config.pbtxt")
    version = served_versions(config, version_dirs(model_dir))[-1]
    # The variant the serving search chose and deploy served, as the version records it.
    variant = version_variant(model_dir, version) or variant
    instances = sum(group.count for group in config.instance_group)
    delay = config.dynamic_batching.max_queue_delay_microseconds
    return (f"deployed: {variant} as version {version} of model '{name}' in {repository} "
            f"({instances} instance{'s' if instances != 1 else ''}, dynamic batching delay "
            f"{delay} us); "
            f"serve it with: torchship serve {repository}")



@main.command(name="retrain-status")
@click.option("--reference", "reference_uri", default="runs/torchship-reference/torchship/local/",
              show_default=True, help="The reference a deploying run keeps (reference_uri).")
@click.option("--data", help="New data to measure against it: a .csv or .parquet table, an "
              "image folder (a sample of its images) or a folder of tables (its newest).")
@click.option("--decisions", "newest", default=5, show_default=True,
              help="How many of the trigger's newest decisions to show.")
def retrain_status(reference_uri: str, data: str | None, newest: int) -> None:
    """What serves now, the last retraining decisions, and the drift of --data from the data
    what serves was trained on."""
    from torchship.pipelines.retrain import status_lines

    try:
        click.echo("\n".join(status_lines(reference_uri, data, newest)))
    except UserInputError as exc:
        fail(str(exc))


@main.command()
@click.argument("repository_or_url")
@click.option("--test-data", required=True, type=click.Path(exists=True),
              help="A split from prepare_data (its folder of shards, or an older .npz) whose "
                   "rows the requests carry.")
@click.option("--concurrency", default=",".join(map(str, DEFAULT_CONCURRENCY)),
              show_default=True)
@click.option("--batch-size", default=measurement_default("batch_size"), show_default=True)
@click.option("--duration", default=measurement_default("duration_s"), show_default=True,
              help="Measured seconds per level.")
@click.option("--max-windows", default=measurement_default("max_windows"), show_default=True,
              help="Windows a level may take to become stable before it is reported unstable.")
@click.option("--protocol", type=click.Choice(["grpc", "http", "vertex"]), default="grpc",
              show_default=True, help="vertex: KServe v2 JSON to a Vertex AI rawPredict URL.")
@click.option("--model", "models", multiple=True, help="Model to measure (default: all).")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="auto", show_default=True,
              help="Who measures: NVIDIA's perf_analyzer (auto: where installed) or the Python "
                   "client.")
@click.option("--knee", is_flag=True,
              help="Also double concurrency from the lowest level until throughput stops "
                   "rising or p99 passes --latency-budget-ms.")
@click.option("--latency-budget-ms", type=float, default=None, help="The knee sweep's p99 budget.")
@click.option("--output", "-o", default=None, help="Write the JSON result here (path or gs://).")
@click.option("--csv", "csv_path", default=None, help="Write the levels as CSV here.")
@click.option("--html", "html_path", default=None, help="Write the HTML report here.")
def bench(repository_or_url: str, test_data: str, concurrency: str, batch_size: int,
          duration: float, max_windows: int, protocol: str, models: tuple[str, ...],
          engine: str, knee: bool, latency_budget_ms: float | None,
          output: str | None, csv_path: str | None, html_path: str | None) -> None:
    """Measure REPOSITORY_OR_URL: a model repository (a local Triton is launched over it, as
    Model Analyzer's local mode does) or the URL of a running endpoint."""
    from torchship.components.benchmark.display import ProgressBar
    from torchship.components.benchmark.results import write_csv
    from torchship.components.benchmark.stage import benchmark_endpoint, benchmark_repository
    from torchship.components.files import write_json
    from torchship.components.report.html_report import write_html_report

    levels = concurrency_levels(concurrency)
    common: dict[str, Any] = {
        "concurrency": levels, "batch_size": batch_size, "duration_s": duration,
        "max_windows": max_windows, "models": list(models) or None, "progress": click.echo,
        "on_window": ProgressBar(), "engine": engine, "knee": knee,
        "latency_budget_p99_ms": latency_budget_ms,
    }
    try:
        if Path(repository_or_url).is_dir():
            if protocol == "vertex":
                fail("--protocol vertex measures a URL, not a repository; pass the endpoint URL")
            result = benchmark_repository(repository_or_url, test_data, protocol=protocol,
                                          **common)
        elif "://" in repository_or_url or ":" in repository_or_url:
            models = common.pop("models")
            result = benchmark_endpoint(repository_or_url, protocol, models, test_data, **common)
        else:
            fail(f"{repository_or_url!r} is neither a model repository nor a URL; pass a "
                 "folder made by the deploy stage or e.g. 127.0.0.1:8001")
    except (UserInputError, ServingError, ParityError) as exc:
        fail(str(exc))
    if output:
        write_json(result, output)
    if csv_path:
        write_csv(result, csv_path)
    if html_path:
        write_html_report({"rows": [], "benchmark": result, "concurrency": levels,
                           "batch_size": batch_size, "protocol": protocol}, html_path)
    for row in result["results"]:
        click.echo(f"{row['model']} c={row['concurrency']}: p50 {row['p50_ms']:.2f} ms, "
                   f"p99 {row['p99_ms']:.2f} ms, {row['throughput_rps']:.0f} req/s, "
                   f"{row['errors']} errors{'' if row.get('stable', True) else ' (unstable)'}")


@main.command()
@click.argument("repository", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback exposes the server to the network.")
@click.option("--http-port", type=int, help="HTTP port (default: a free one).")
@click.option("--grpc-port", type=int, help="gRPC port (default: a free one).")
def serve(repository: str, host: str, http_port: int | None, grpc_port: int | None) -> None:
    """Serve REPOSITORY on the bundled tritonserver until Ctrl-C or SIGTERM."""
    from torchship.components.triton.serve import serve as run_server

    try:
        run_server(repository, host, http_port, grpc_port, progress=click.echo)
    except (UserInputError, ServingError) as exc:
        fail(str(exc))


for _command in (submit, schedule, runs, publish):
    main.add_command(_command)


if __name__ == "__main__":
    main()
