"""The `torchship` command: compile the pipeline, run it locally, serve and benchmark a repository."""

import json
import os
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
    "variants": "variants",
    "max_accuracy_drop": "max_accuracy_drop_pt",
    "latency_budget_ms": "latency_budget_p99_ms",
    "target_concurrency": "target_concurrency",
    "baseline": "baseline_uri",
    "previous_results": "previous_results_uri",
    "local_repository": "local_repository",
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
@click.option("--data-source", help="'digits', a CSV/Parquet file with a label column, an .npz "
              "with arrays x and y, or a folder of images with one sub-folder per class; a local "
              "path or a gs:// URL.")
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
@click.option("--variants", help="Variants to make, e.g. fp32,pruned,int8 (also structured, "
              "distilled, int8_dynamic, fp16).")
@click.option("--max-accuracy-drop", type=float, help="Points of accuracy a variant may lose.")
@click.option("--latency-budget-ms", type=float, help="Gate: p99 budget on Triton (0: none).")
@click.option("--target-concurrency", type=int, help="Gate: concurrency the budget applies at.")
@click.option("--baseline", help="Gate record of the serving model (path or gs://).")
@click.option("--previous-results", help="Previous run's results (path or gs://) for regressions.")
@click.option("--local-repository",
              help="Persistent Triton repository the deploy adds a version to "
                   "[default: PIPELINE_ROOT/model_repository].")
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
    from torchship.pipelines.pipeline import check_parameters, compile_pipeline, compiled_defaults

    if keep_runs is not None and keep_runs < 1:
        _fail(f"--keep-runs {keep_runs} would remove the run being made; pass 1 or more, or "
              "leave it out to keep every run")
    if pipeline_yaml is None:
        pipeline_yaml = str(compile_pipeline(DEFAULT_PIPELINE))
    elif not Path(pipeline_yaml).is_file():
        _fail(f"pipeline file {pipeline_yaml!r} does not exist; run 'torchship compile' first")
    arguments: dict[str, Any] = {}
    for option, value in options.items():
        if value is None:
            continue
        if option == "concurrency":
            value = _concurrency_levels(value)
        elif option == "variants":
            value = [name.strip() for name in value.split(",") if name.strip()]
        arguments[RUN_PARAMETERS[option]] = value
    arguments.update(_key_values(params, "--param", parse_json=True))
    # Each local run adds a version to one repository that `torchship serve` can serve.
    arguments.setdefault("local_repository", str(Path(pipeline_root, "model_repository").resolve()))
    defaults = compiled_defaults(pipeline_yaml)
    try:
        check_parameters(arguments, defaults)
    except UserInputError as exc:
        _fail(str(exc))
    click.echo(f"running {pipeline_yaml} locally (artifacts under {pipeline_root}/)")
    try:
        summary = run_pipeline(pipeline_yaml, pipeline_root, arguments, verbose=verbose)
    except PipelineFailed as exc:
        _fail(str(exc))
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
    click.echo(_deployed_line(gate["variant"], arguments, defaults))


def _deployed_line(variant: str, arguments: dict[str, Any], defaults: dict[str, Any]) -> str:
    """What was deployed; for the local target, which version of which repository, with which
    serving settings, and how to serve it."""
    from torchship.components.triton.versions import served_versions, version_dirs
    from torchship.components.triton.config import read_model_config

    target = arguments.get("deploy_target", defaults.get("deploy_target", "local"))
    if target != "local":
        return f"deployed: {variant} ({target})"
    repository = Path(arguments["local_repository"])
    model_dir = repository / variant
    config = read_model_config(model_dir / "config.pbtxt")
    version = served_versions(config, version_dirs(model_dir))[-1]
    instances = sum(group.count for group in config.instance_group)
    delay = config.dynamic_batching.max_queue_delay_microseconds
    return (f"deployed: {variant} as version {version} of {repository} ({instances} "
            f"instance{'s' if instances != 1 else ''}, dynamic batching delay {delay} us); "
            f"serve it with: torchship serve {repository}")


def _key_values(pairs: tuple[str, ...], option: str, parse_json: bool) -> dict[str, Any]:
    """NAME=VALUE pairs; with `parse_json`, values that read as JSON (3, 0.5, [1,4]) are typed."""
    result: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            _fail(f"{option} {pair!r} is not NAME=VALUE; pass e.g. {option} epochs=20")
        if parse_json:
            try:
                value = json.loads(value)
            except ValueError:
                pass  # a plain string
        result[name] = value
    return result


def _vertex_target(project: str | None, region: str, pipeline_root: str | None,
                   service_account: str | None, network: str | None) -> Any:
    from torchship.pipelines.vertex import VertexTarget

    if not project:
        _fail("no Google Cloud project; pass --project or set GOOGLE_CLOUD_PROJECT")
    # A private or local API endpoint; a plain-http one (a local test double) gets no credentials,
    # since a token must never travel unencrypted.
    api_endpoint = os.environ.get("TORCHSHIP_VERTEX_API_ENDPOINT")
    credentials = None
    if api_endpoint and api_endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        credentials = AnonymousCredentials()
    return VertexTarget(project=project, location=region, pipeline_root=pipeline_root or "",
                        service_account=service_account, network=network,
                        api_endpoint=api_endpoint, credentials=credentials)


def vertex_options(func: Any) -> Any:
    """Options saying where a Vertex AI run goes and as whom."""
    for decorator in reversed([
        click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", help="Google Cloud project."),
        click.option("--region", envvar="GOOGLE_CLOUD_REGION", default="us-central1",
                     show_default=True),
        click.option("--pipeline-root", help="gs://BUCKET/PATH for the run's artifacts."),
        click.option("--service-account", help="Service account the pipeline runs as."),
        click.option("--network", help="VPC network: projects/NUMBER/global/networks/NAME."),
    ]):
        func = decorator(func)
    return func


def run_options(func: Any) -> Any:
    """Options giving a pipeline run its parameters, labels and caching."""
    for decorator in reversed([
        click.option("--param", "-p", "params", multiple=True,
                     help="Pipeline parameter NAME=VALUE (JSON values typed), repeatable."),
        click.option("--label", "labels", multiple=True, help="Run label KEY=VALUE, repeatable."),
        click.option("--caching/--no-caching", default=None,
                     help="Reuse earlier task results (default: the backend's)."),
    ]):
        func = decorator(func)
    return func


@main.command()
@click.argument("template")
@vertex_options
@run_options
@click.option("--kfp-host", help="Submit to this Kubeflow Pipelines endpoint instead of Vertex AI.")
@click.option("--wait", is_flag=True, help="Follow the run to its end (Vertex AI).")
def submit(template: str, project: str | None, region: str, pipeline_root: str | None,
           service_account: str | None, network: str | None, params: tuple[str, ...],
           labels: tuple[str, ...], caching: bool | None, kfp_host: str | None,
           wait: bool) -> None:
    """Submit TEMPLATE (a compiled YAML or an Artifact Registry URI) as a pipeline run."""
    parameters = _key_values(params, "--param", parse_json=True)
    try:
        from torchship.pipelines.pipeline import check_parameters

        check_parameters(parameters)
        if kfp_host:
            from torchship.pipelines import kubeflow

            run_id = kubeflow.submit(kfp_host, template, parameters, enable_caching=caching,
                                     service_account=service_account)
            click.echo(f"submitted run {run_id} to {kfp_host}")
            return
        from torchship.pipelines import vertex

        target = _vertex_target(project, region, pipeline_root, service_account, network)
        vertex.submit(target, template, parameters, enable_caching=caching,
                      labels=_key_values(labels, "--label", parse_json=False), wait=wait,
                      progress=click.echo)
    except (UserInputError, RuntimeError) as exc:
        _fail(str(exc))


@main.group()
def schedule() -> None:
    """Run the pipeline on a cron: Vertex AI schedules, or Kubeflow recurring runs."""


@schedule.command("create")
@click.argument("template")
@click.option("--name", "display_name", default="torchship", show_default=True)
@click.option("--cron", required=True, help="'0 3 * * *' (Vertex AI); Kubeflow also takes 6 fields.")
@click.option("--time-zone", help="IANA zone for the cron, e.g. Europe/Paris (Vertex AI).")
@click.option("--max-concurrent-runs", default=1, show_default=True)
@click.option("--start-time", help="RFC 3339 time of the first run.")
@click.option("--end-time", help="RFC 3339 time after which no run starts.")
@vertex_options
@run_options
@click.option("--kfp-host", help="Create a Kubeflow recurring run on this endpoint instead.")
def schedule_create(template: str, display_name: str, cron: str, time_zone: str | None,
                    max_concurrent_runs: int, start_time: str | None, end_time: str | None,
                    project: str | None, region: str, pipeline_root: str | None,
                    service_account: str | None, network: str | None, params: tuple[str, ...],
                    labels: tuple[str, ...], caching: bool | None, kfp_host: str | None) -> None:
    """Create a schedule that runs TEMPLATE on CRON."""
    parameters = _key_values(params, "--param", parse_json=True)
    try:
        from torchship.pipelines.pipeline import check_parameters

        check_parameters(parameters)  # or every scheduled run fails the same way
        if kfp_host:
            from torchship.pipelines import kubeflow

            recurring = kubeflow.schedule(kfp_host, template, parameters, display_name, cron,
                                          max_concurrent_runs, start_time, end_time,
                                          enable_caching=caching)
            click.echo(f"created recurring run {recurring} on {kfp_host}")
            return
        from torchship.pipelines import vertex

        target = _vertex_target(project, region, pipeline_root, service_account, network)
        name = vertex.create_schedule(
            target, template, parameters, display_name, cron, time_zone=time_zone,
            max_concurrent_runs=max_concurrent_runs, start_time=start_time, end_time=end_time,
            enable_caching=caching, labels=_key_values(labels, "--label", parse_json=False),
        )
    except (UserInputError, RuntimeError) as exc:
        _fail(str(exc))
    click.echo(f"created schedule {name}")


@schedule.command("list")
@vertex_options
def schedule_list(project: str | None, region: str, pipeline_root: str | None,
                  service_account: str | None, network: str | None) -> None:
    """List the Vertex AI pipeline schedules of the project."""
    from torchship.pipelines import vertex

    target = _vertex_target(project, region, pipeline_root, service_account, network)
    for row in vertex.schedules(target):
        click.echo(f"{row['name']}  {row['state']}  {row['cron']}  {row['display_name']}")


def _schedule_action(action: str) -> Any:
    @click.argument("name")
    @vertex_options
    def command(name: str, project: str | None, region: str, pipeline_root: str | None,
                service_account: str | None, network: str | None) -> None:
        from torchship.pipelines import vertex

        target = _vertex_target(project, region, pipeline_root, service_account, network)
        vertex.change_schedule(target, name, action)
        click.echo(f"{action}d {name}" if action.endswith("e") else f"{action}ed {name}")

    command.__doc__ = f"{action.capitalize()} the schedule NAME (resource name or ID)."
    return schedule.command(action)(command)


for _action in ("pause", "resume", "delete"):
    _schedule_action(_action)


@main.command()
@click.argument("pipeline_yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", required=True,
              help="https://REGION-kfp.pkg.dev/PROJECT/REPOSITORY (an Artifact Registry KFP repo).")
@click.option("--tag", "tags", multiple=True, help="Version tag, repeatable (e.g. v1, latest).")
def publish(pipeline_yaml: str, host: str, tags: tuple[str, ...]) -> None:
    """Push PIPELINE_YAML to a KFP template registry; `submit` takes the resulting URI."""
    from torchship.pipelines.vertex import publish as push

    package, version_name = push(host, pipeline_yaml, list(tags))
    click.echo(f"published {package} version {version_name} (tags: {', '.join(tags) or '-'})")
    click.echo(f"template URI: {host.rstrip('/')}/{package}/{tags[0] if tags else version_name}")


@main.command()
@click.argument("target")
@click.option("--test-data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="An .npz split from prepare_data whose rows the requests carry.")
@click.option("--concurrency", default="1,2,4,8,16", show_default=True)
@click.option("--batch-size", default=1, show_default=True)
@click.option("--duration", default=3.0, show_default=True, help="Measured seconds per level.")
@click.option("--max-windows", default=10, show_default=True,
              help="Windows a level may take to become stable before it is reported unstable.")
@click.option("--protocol", type=click.Choice(["grpc", "http", "vertex"]), default="grpc",
              show_default=True, help="vertex: KServe v2 JSON to a Vertex AI rawPredict URL.")
@click.option("--model", "models", multiple=True, help="Model to measure (default: all).")
@click.option("--output", "-o", default=None, help="Write the JSON result here (path or gs://).")
@click.option("--csv", "csv_path", default=None, help="Write the levels as CSV here.")
@click.option("--html", "html_path", default=None, help="Write the HTML report here.")
def bench(target: str, test_data: str, concurrency: str, batch_size: int, duration: float,
          max_windows: int, protocol: str, models: tuple[str, ...], output: str | None,
          csv_path: str | None, html_path: str | None) -> None:
    """Measure TARGET: a model repository (a local Triton is launched over it, as Model
    Analyzer's local mode does) or the URL of a running endpoint."""
    from torchship.components.benchmark.stage import ProgressBar, benchmark_endpoint, benchmark_repository
    from torchship.components.benchmark.results import write_csv, write_json
    from torchship.components.report.html_report import write_html_report

    levels = _concurrency_levels(concurrency)
    common: dict[str, Any] = {
        "concurrency": levels, "batch_size": batch_size, "duration_s": duration,
        "max_windows": max_windows, "models": list(models) or None, "progress": click.echo,
        "on_window": ProgressBar(),
    }
    try:
        if Path(target).is_dir():
            if protocol == "vertex":
                _fail("--protocol vertex measures a URL, not a repository; pass the endpoint URL")
            result = benchmark_repository(target, test_data, protocol=protocol, **common)
        elif "://" in target or ":" in target:
            result = benchmark_endpoint(target, protocol, test_path=test_data, **common)
        else:
            _fail(f"bench target {target!r} is neither a model repository nor a URL; pass a "
                  "folder made by the deploy stage or e.g. 127.0.0.1:8001")
    except (UserInputError, ServingError, ParityError) as exc:
        _fail(str(exc))
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
        _fail(str(exc))


if __name__ == "__main__":
    main()
