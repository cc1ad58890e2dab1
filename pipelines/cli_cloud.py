"""`torchship submit`, `schedule create` and `publish`: the compiled pipeline on Vertex AI
Pipelines or a Kubeflow Pipelines cluster; `cli_runs` follows what they started."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from torchship.components.data.runners import RUNNERS
from torchship.components.errors import UserInputError
from torchship.pipelines.arguments import fail, key_values
from torchship.pipelines.vertex import DEFAULT_REGION

__all__ = ["cloud_errors", "data_runner_options", "kubeflow_options", "publish", "schedule",
           "submit", "vertex_project"]


def vertex_project(project: str | None, region: str, pipeline_root: str | None,
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


def kubeflow_options(func: Any) -> Any:
    """Options saying which Kubeflow Pipelines cluster, namespace and identity; without
    --kfp-host the command acts on Vertex AI."""
    for decorator in reversed([
        click.option("--kfp-host", help="Kubeflow Pipelines API endpoint: act there instead of "
                     "on Vertex AI."),
        click.option("--namespace", help="Kubeflow: the profile namespace of a multi-user "
                     "cluster."),
        click.option("--kfp-token", envvar="KFP_TOKEN", help="Kubeflow: bearer token sent with "
                     "every call [env KFP_TOKEN]."),
    ]):
        func = decorator(func)
    return func


def run_options(func: Any) -> Any:
    """Options giving a pipeline run its parameters, labels, caching, experiment and key."""
    for decorator in reversed([
        click.option("--param", "-p", "params", multiple=True,
                     help="Pipeline parameter NAME=VALUE (JSON values typed), repeatable; wins "
                          "over --param-file."),
        click.option("--param-file", help="YAML or JSON mapping of pipeline parameter values."),
        click.option("--label", "labels", multiple=True, help="Run label KEY=VALUE, repeatable."),
        click.option("--caching/--no-caching", default=None,
                     help="Reuse earlier task results (default: the backend's)."),
        click.option("--experiment", help="Vertex AI Experiment the run belongs to (made if "
                     "missing); Kubeflow: the KFP experiment [default: torchship]."),
        click.option("--encryption-spec-key-name", "kms_key", help="Vertex AI: Cloud KMS key "
                     "(projects/P/locations/L/keyRings/R/cryptoKeys/K) encrypting the run."),
    ]):
        func = decorator(func)
    return func


@contextmanager
def cloud_errors(kfp_host: str | None) -> Iterator[None]:
    """What the input or the service refused, as the one `error:` line (exit status 2)."""
    try:
        yield
    except (UserInputError, RuntimeError) as exc:
        fail(str(exc))
    except Exception as exc:
        from google.api_core.exceptions import GoogleAPICallError

        if isinstance(exc, GoogleAPICallError):
            fail(f"Vertex AI answered {exc.code}: {exc.message}")
        if kfp_host and type(exc).__name__ == "ApiException":  # kfp_server_api's
            try:
                message = json.loads(exc.body).get("message", exc.body)
            except (TypeError, ValueError):
                message = exc.body
            fail(f"Kubeflow Pipelines at {kfp_host} answered {exc.status} {exc.reason}: "
                 f"{message}")
        raise


def _param_file(path: str) -> dict[str, Any]:
    """The parameter values in a YAML or JSON file (JSON is YAML)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        fail(f"--param-file {path}: cannot read it ({exc.strerror}); pass a YAML or JSON file")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        fail(f"--param-file {path} does not parse as YAML or JSON{where}; fix it or pass the "
             "values with -p NAME=VALUE")
    if not isinstance(values, dict):
        fail(f"--param-file {path} holds a {type(values).__name__}, not a mapping; write one "
             "NAME: VALUE per line")
    return {str(name): value for name, value in values.items()}


def _platform_check(kfp_host: str | None, namespace: str | None, kms_key: str | None) -> None:
    """Options that would do nothing where the command acts are refused, not dropped."""
    if kfp_host and kms_key:
        fail("--encryption-spec-key-name is for Vertex AI; a Kubeflow cluster encrypts its "
             "storage itself: leave it out with --kfp-host")
    if namespace and not kfp_host:
        fail("--namespace is a Kubeflow namespace; pass --kfp-host too, or leave it out for "
             "Vertex AI")


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
                    pipeline_root: str | None = None,
                    param_file: str | None = None) -> dict[str, Any]:
    """The run's parameters: --param-file, then the data runner's options, then each -p
    NAME=VALUE. On Vertex AI, a Dataflow data step runs in the pipeline's project and region
    unless told otherwise."""
    parameters = _param_file(param_file) if param_file else {}
    parameters.update({name: value for name, value in runner_settings.items()
                       if value is not None})
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
@kubeflow_options
@click.option("--display-name", help="The run's display name [default: torchship].")
@click.option("--job-id", help="Vertex AI: the pipeline job ID [default: torchship-TIMESTAMP]; "
              "Kubeflow: the run name.")
@click.option("--wait", is_flag=True, help="Follow the run to its end (Vertex AI).")
def submit(template: str, project: str | None, region: str, pipeline_root: str | None,
           service_account: str | None, network: str | None, params: tuple[str, ...],
           param_file: str | None, labels: tuple[str, ...], caching: bool | None,
           experiment: str | None, kms_key: str | None, kfp_host: str | None,
           namespace: str | None, kfp_token: str | None, display_name: str | None,
           job_id: str | None, wait: bool, **runner_settings: Any) -> None:
    """Submit TEMPLATE (a compiled YAML or an Artifact Registry URI) as a pipeline run."""
    _platform_check(kfp_host, namespace, kms_key)
    parameters = _run_parameters(params, runner_settings, project, region, kfp_host,
                                 pipeline_root, param_file)
    with cloud_errors(kfp_host):
        _preflight(template, parameters, kfp_host)
        if kfp_host:
            from torchship.pipelines import kubeflow

            if job_id and display_name and job_id != display_name:
                fail("on Kubeflow --job-id and --display-name both name the run; pass one")
            run_id = kubeflow.submit(kfp_host, template, parameters,
                                     run_name=job_id or display_name or "torchship",
                                     experiment=experiment or "torchship",
                                     enable_caching=caching, service_account=service_account,
                                     namespace=namespace, pipeline_root=pipeline_root,
                                     token=kfp_token)
            click.echo(f"submitted run {run_id} to {kfp_host}")
            return
        from torchship.pipelines import vertex

        where = vertex_project(project, region, pipeline_root, service_account, network)
        vertex.submit(where, template, parameters, enable_caching=caching,
                      labels=key_values(labels, "--label", parse_json=False), job_id=job_id,
                      wait=wait, progress=click.echo, display_name=display_name or "torchship",
                      experiment=experiment, encryption_spec_key_name=kms_key)


@click.group()
def schedule() -> None:
    """Run the pipeline on a cron: Vertex AI schedules, or Kubeflow recurring runs."""


@schedule.command("create")
@click.argument("template")
@click.option("--display-name", "--name", "display_name", default="torchship", show_default=True,
              help="The schedule's name (Kubeflow: the recurring run's).")
@click.option("--cron", required=True, help="'0 3 * * *' (Vertex AI); Kubeflow also takes 6 fields.")
@click.option("--time-zone", help="IANA zone for the cron, e.g. Europe/Paris (Vertex AI).")
@click.option("--max-concurrent-runs", default=1, show_default=True)
@click.option("--start-time", help="RFC 3339 time of the first run.")
@click.option("--end-time", help="RFC 3339 time after which no run starts.")
@vertex_options
@run_options
@data_runner_options
@kubeflow_options
def schedule_create(template: str, display_name: str, cron: str, time_zone: str | None,
                    max_concurrent_runs: int, start_time: str | None, end_time: str | None,
                    project: str | None, region: str, pipeline_root: str | None,
                    service_account: str | None, network: str | None, params: tuple[str, ...],
                    param_file: str | None, labels: tuple[str, ...], caching: bool | None,
                    experiment: str | None, kms_key: str | None, kfp_host: str | None,
                    namespace: str | None, kfp_token: str | None,
                    **runner_settings: Any) -> None:
    """Create a schedule that runs TEMPLATE on CRON."""
    _platform_check(kfp_host, namespace, kms_key)
    if experiment and not kfp_host:
        # The SDK puts a job in an experiment after submitting it; a schedule's runs are
        # created by Vertex AI itself, so nothing would.
        fail("--experiment: a Vertex AI schedule's runs cannot join an experiment; leave it out, "
             "or submit runs with `torchship submit --experiment`")
    parameters = _run_parameters(params, runner_settings, project, region, kfp_host,
                                 pipeline_root, param_file)
    with cloud_errors(kfp_host):
        _preflight(template, parameters, kfp_host)  # or every scheduled run fails the same way
        if kfp_host:
            from torchship.pipelines import kubeflow

            recurring = kubeflow.schedule(kfp_host, template, parameters, display_name, cron,
                                          max_concurrent_runs, start_time, end_time,
                                          experiment=experiment or "torchship",
                                          enable_caching=caching, namespace=namespace,
                                          pipeline_root=pipeline_root, token=kfp_token)
            click.echo(f"created recurring run {recurring} on {kfp_host}")
            return
        from torchship.pipelines import vertex

        where = vertex_project(project, region, pipeline_root, service_account, network)
        name = vertex.create_schedule(
            where, template, parameters, display_name, cron, time_zone=time_zone,
            max_concurrent_runs=max_concurrent_runs, start_time=start_time, end_time=end_time,
            enable_caching=caching, labels=key_values(labels, "--label", parse_json=False),
            encryption_spec_key_name=kms_key,
        )
    click.echo(f"created schedule {name}")


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

