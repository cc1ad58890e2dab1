"""`torchship submit`, `schedule` and `publish`: the compiled pipeline on Vertex AI Pipelines or
a Kubeflow Pipelines cluster."""

from __future__ import annotations

import os
from typing import Any

import click

from torchship.components.data.runners import RUNNERS
from torchship.components.errors import UserInputError
from torchship.pipelines.arguments import fail, key_values
from torchship.pipelines.vertex import DEFAULT_REGION

__all__ = ["data_runner_options", "publish", "schedule", "submit"]


def _vertex_project(project: str | None, region: str, pipeline_root: str | None,
                   service_account: str | None, network: str | None) -> Any:
    from torchship.pipelines.vertex import VertexProject

    if not project:
        fail("no Google Cloud project; pass --project or set GOOGLE_CLOUD_PROJECT")
    # A private or local API endpoint; a plain-http one (a local test double) gets no credentials,
    # since a token must never travel unencrypted.
    api_endpoint = os.environ.get("TORCHSHIP_VERTEX_API_ENDPOINT")
    credentials = None
    if api_endpoint and api_endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        credentials = AnonymousCredentials()
    return VertexProject(project=project, location=region, pipeline_root=pipeline_root or "",
                        service_account=service_account, network=network,
                        api_endpoint=api_endpoint, credentials=credentials)


def _preflight(template: str, parameters: dict[str, Any], kfp_host: str | None) -> None:
    """What `preflight_cloud` refuses, before anything is sent; its notes are printed."""
    from torchship.pipelines.preflight import preflight_cloud

    where = f"Kubeflow Pipelines at {kfp_host}" if kfp_host else "Vertex AI"
    for note in preflight_cloud(template, parameters, where):
        click.echo(note)


def vertex_options(func: Any) -> Any:
    """Options saying where a Vertex AI run goes and as whom."""
    for decorator in reversed([
        click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", help="Google Cloud project."),
        click.option("--region", envvar="GOOGLE_CLOUD_REGION", default=DEFAULT_REGION,
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


def data_runner_options(func: Any) -> Any:
    """Options choosing where the data step's Beam pipeline runs: each sets the pipeline
    parameter of its name (--dataflow-region: dataflow_region)."""
    for decorator in reversed([
        click.option("--data-runner", help=f"Where the data step runs: {', '.join(RUNNERS)} (a "
                     "Flink or Spark job server) [default: DirectRunner, in the step itself]."),
        click.option("--dataflow-project",
                     help="Dataflow's project [default: --project on Vertex AI, else the step's "
                          "$GOOGLE_CLOUD_PROJECT]."),
        click.option("--dataflow-region", help="Dataflow's region [default: --region on Vertex AI]."),
        click.option("--dataflow-service-account",
                     help="Service account email the Dataflow workers run as [default: "
                          "Dataflow's, the Compute Engine default]."),
        click.option("--dataflow-temp-location",
                     help="gs://BUCKET/PATH where Dataflow stages and keeps temporary files."),
        click.option("--dataflow-max-workers", type=int,
                     help="Most workers Dataflow may scale to [default: Dataflow's]."),
        click.option("--dataflow-machine-type", help="Dataflow worker machine type, e.g. "
                     "n2-standard-4 [default: Dataflow's]."),
        click.option("--dataflow-subnetwork",
                     help="Dataflow workers' subnetwork: regions/REGION/subnetworks/NAME."),
        click.option("--beam-job-endpoint",
                     help="PortableRunner: HOST:PORT of a Flink or Spark job server."),
    ]):
        func = decorator(func)
    return func


def _run_parameters(params: tuple[str, ...], runner_settings: dict[str, Any],
                    project: str | None, region: str, kfp_host: str | None,
                    pipeline_root: str | None = None) -> dict[str, Any]:
    """The run's parameters: the data runner's options, then each -p NAME=VALUE. On Vertex AI, a
    Dataflow data step runs in the pipeline's project and region unless told otherwise."""
    parameters = {name: value for name, value in runner_settings.items() if value is not None}
    parameters.update(key_values(params, "--param", parse_json=True))
    if parameters.get("data_runner") == "DataflowRunner" and not kfp_host:
        parameters.setdefault("dataflow_region", region)
        if project:
            parameters.setdefault("dataflow_project", project)
    if pipeline_root:  # a deploying run keeps the retraining reference under the root
        from torchship.components.deploy.reference import default_reference_uri
        from torchship.components.deploy.stage import DEFAULT_TARGET

        parameters.setdefault("reference_uri", default_reference_uri(
            pipeline_root, parameters.get("deploy_target", DEFAULT_TARGET)))
    return parameters


@click.command()
@click.argument("template")
@vertex_options
@run_options
@data_runner_options
@click.option("--kfp-host", help="Submit to this Kubeflow Pipelines endpoint instead of Vertex AI.")
@click.option("--wait", is_flag=True, help="Follow the run to its end (Vertex AI).")
def submit(template: str, project: str | None, region: str, pipeline_root: str | None,
           service_account: str | None, network: str | None, params: tuple[str, ...],
           labels: tuple[str, ...], caching: bool | None, kfp_host: str | None,
           wait: bool, **runner_settings: Any) -> None:
    """Submit TEMPLATE (a compiled YAML or an Artifact Registry URI) as a pipeline run."""
    parameters = _run_parameters(params, runner_settings, project, region, kfp_host,
                                 pipeline_root)
    try:
        _preflight(template, parameters, kfp_host)
        if kfp_host:
            from torchship.pipelines import kubeflow

            run_id = kubeflow.submit(kfp_host, template, parameters, enable_caching=caching,
                                     service_account=service_account, pipeline_root=pipeline_root)
            click.echo(f"submitted run {run_id} to {kfp_host}")
            return
        from torchship.pipelines import vertex

        where = _vertex_project(project, region, pipeline_root, service_account, network)
        vertex.submit(where, template, parameters, enable_caching=caching,
                      labels=key_values(labels, "--label", parse_json=False), wait=wait,
                      progress=click.echo)
    except (UserInputError, RuntimeError) as exc:
        fail(str(exc))


@click.group()
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
@data_runner_options
@click.option("--kfp-host", help="Create a Kubeflow recurring run on this endpoint instead.")
def schedule_create(template: str, display_name: str, cron: str, time_zone: str | None,
                    max_concurrent_runs: int, start_time: str | None, end_time: str | None,
                    project: str | None, region: str, pipeline_root: str | None,
                    service_account: str | None, network: str | None, params: tuple[str, ...],
                    labels: tuple[str, ...], caching: bool | None, kfp_host: str | None,
                    **runner_settings: Any) -> None:
    """Create a schedule that runs TEMPLATE on CRON."""
    parameters = _run_parameters(params, runner_settings, project, region, kfp_host,
                                 pipeline_root)
    try:
        _preflight(template, parameters, kfp_host)  # or every scheduled run fails the same way
        if kfp_host:
            from torchship.pipelines import kubeflow

            recurring = kubeflow.schedule(kfp_host, template, parameters, display_name, cron,
                                          max_concurrent_runs, start_time, end_time,
                                          enable_caching=caching, pipeline_root=pipeline_root)
            click.echo(f"created recurring run {recurring} on {kfp_host}")
            return
        from torchship.pipelines import vertex

        where = _vertex_project(project, region, pipeline_root, service_account, network)
        name = vertex.create_schedule(
            where, template, parameters, display_name, cron, time_zone=time_zone,
            max_concurrent_runs=max_concurrent_runs, start_time=start_time, end_time=end_time,
            enable_caching=caching, labels=key_values(labels, "--label", parse_json=False),
        )
    except (UserInputError, RuntimeError) as exc:
        fail(str(exc))
    click.echo(f"created schedule {name}")


@schedule.command("list")
@vertex_options
def schedule_list(project: str | None, region: str, pipeline_root: str | None,
                  service_account: str | None, network: str | None) -> None:
    """List the Vertex AI pipeline schedules of the project."""
    from torchship.pipelines import vertex

    where = _vertex_project(project, region, pipeline_root, service_account, network)
    for row in vertex.schedules(where):
        click.echo(f"{row['name']}  {row['state']}  {row['cron']}  {row['display_name']}")


def _schedule_action(action: str) -> Any:
    @click.argument("name")
    @vertex_options
    def command(name: str, project: str | None, region: str, pipeline_root: str | None,
                service_account: str | None, network: str | None) -> None:
        from torchship.pipelines import vertex

        where = _vertex_project(project, region, pipeline_root, service_account, network)
        vertex.change_schedule(where, name, action)
        click.echo(f"{action}d {name}" if action.endswith("e") else f"{action}ed {name}")

    command.__doc__ = f"{action.capitalize()} the schedule NAME (resource name or ID)."
    return schedule.command(action)(command)


for _action in ("pause", "resume", "delete"):
    _schedule_action(_action)


@click.command()
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

