"""The `torchship` command: compile the pipeline, run it locally, serve and benchmark a repository."""

import json
import sys
from pathlib import Path
from typing import Any

import click

from torchship.components.errors import ParityError, ServingError, UserInputError

DEFAULT_PIPELINE = "out/torchship-pipeline.yaml"

# `torchship run` options that set pipeline parameters: option -> pipeline parameter.
RUN_PARAMETERS = {
    "data_source": "data_source",
    "label_column": "label_column",
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
}


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _concurrency_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        _fail(f"--concurrency {text!r} is not a list of positive integers; pass e.g. 1,4,8")
    return levels


@click.group()
@click.version_option(package_name="torchship")
def main() -> None:
    """torchship: a PyTorch model from raw data to a live, benchmarked Triton endpoint."""


@main.command()
@click.option("--output", "-o", default=DEFAULT_PIPELINE, show_default=True,
              help="Where to write the pipeline YAML.")
@click.option("--image", default=None,
              help="Component image URI (default: $TORCHSHIP_IMAGE, else torchship-cpu:VERSION).")
@click.option("--target", type=click.Choice(["local", "vertex"]), default="local",
              show_default=True,
              help="local: N training processes in one task (kfp.local, Kubeflow); vertex: "
                   "training as a Vertex AI multi-replica custom job.")
def compile(output: str, image: str | None, target: str) -> None:
    """Compile the pipeline to a KFP v2 YAML: the file every runner executes."""
    from torchship.pipelines.pipeline import compile_pipeline, default_image

    path = compile_pipeline(output, image=image, target=target)
    click.echo(f"wrote {path} (target {target}, image {image or default_image()})")


@main.command()
@click.argument("pipeline_yaml", required=False)
@click.option("--pipeline-root", default="runs", show_default=True,
              help="Folder for the run's artifacts.")
@click.option("--data-source", help="'digits', or a CSV/Parquet file with a label column.")
@click.option("--label-column", help="Name of the label column in a CSV/Parquet source.")
@click.option("--model", help="Built-in model (mlp, cnn) or your own as module:factory.")
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
@click.option("--verbose", is_flag=True, help="Show kfp.local's full logs.")
def run(pipeline_yaml: str | None, pipeline_root: str, verbose: bool, **options: Any) -> None:
    """Execute the compiled pipeline locally (kfp.local) and print the variant table.

    Without PIPELINE_YAML the pipeline is compiled first to out/torchship-pipeline.yaml.
    """
    from torchship.components.report import format_table
    from torchship.pipelines.local import PipelineFailed, run_pipeline
    from torchship.pipelines.pipeline import compile_pipeline

    if pipeline_yaml is None:
        pipeline_yaml = str(compile_pipeline(DEFAULT_PIPELINE))
    elif not Path(pipeline_yaml).is_file():
        _fail(f"pipeline file {pipeline_yaml!r} does not exist; run 'torchship compile' first")
    arguments: dict[str, Any] = {}
    for option, value in options.items():
        if value is None:
            continue
        arguments[RUN_PARAMETERS[option]] = _concurrency_levels(value) if option == "concurrency" else value
    click.echo(f"running {pipeline_yaml} locally (artifacts under {pipeline_root}/)")
    try:
        summary = run_pipeline(pipeline_yaml, pipeline_root, arguments, verbose=verbose)
    except PipelineFailed as exc:
        _fail(str(exc))
    click.echo("")
    click.echo(format_table(summary))
    click.echo("")
    click.echo(f"summary: {summary['summary_markdown']}")
    click.echo(f"results: {summary['results_json']}")


@main.command()
@click.argument("repository", type=click.Path(exists=True, file_okay=False))
@click.option("--test-data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="An .npz split from prepare_data whose rows the requests carry.")
@click.option("--concurrency", default="1,4", show_default=True)
@click.option("--batch-size", default=1, show_default=True)
@click.option("--duration", default=3.0, show_default=True, help="Seconds per level.")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--output", "-o", default=None, help="Write the JSON result here.")
def bench(repository: str, test_data: str, concurrency: str, batch_size: int, duration: float,
          protocol: str, output: str | None) -> None:
    """Launch a local Triton over REPOSITORY and measure every model in it."""
    from torchship.components.benchmark import benchmark_repository, write_json
    from torchship.components.progress import report

    try:
        result = benchmark_repository(
            repository, test_data, concurrency=tuple(_concurrency_levels(concurrency)),
            batch_size=batch_size, duration_s=duration, protocol=protocol, progress=report,
        )
    except (UserInputError, ServingError, ParityError) as exc:
        _fail(str(exc))
    if output:
        write_json(result, output)
    click.echo(json.dumps(result["results"], indent=2))


@main.command()
@click.argument("repository", type=click.Path(exists=True, file_okay=False))
def serve(repository: str) -> None:
    """Serve REPOSITORY on the bundled tritonserver (127.0.0.1) until Ctrl-C or SIGTERM."""
    import signal

    from torchship.components.triton import TritonServer

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        with TritonServer(repository) as server:
            click.echo(f"serving {repository}: grpc {server.grpc_url}, http {server.http_url}")
            click.echo("Ctrl-C to stop")
            signal.pause()
    except KeyboardInterrupt:
        click.echo("stopped")
    except ServingError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
