"""`torchship runs list|get|cancel` and `torchship schedule list|pause|resume|delete`: following
and stopping what `submit` and `schedule create` started, on Vertex AI or, with --kfp-host, on
Kubeflow Pipelines."""

from __future__ import annotations

import json
from typing import Any

import click

from torchship.pipelines.cli_cloud import (
    cloud_errors,
    kubeflow_options,
    schedule,
    vertex_project,
)
from torchship.pipelines.vertex import DEFAULT_REGION

__all__ = ["runs"]


def _where_options(func: Any) -> Any:
    """Where the runs are: a Vertex AI project and region, or a Kubeflow cluster."""
    for decorator in reversed([
        click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", help="Google Cloud project."),
        click.option("--region", envvar="GOOGLE_CLOUD_REGION", default=DEFAULT_REGION,
                     show_default=True),
        kubeflow_options,
        click.option("--experiment", default="torchship", show_default=True,
                     help="Kubeflow: the KFP experiment the runs went to."),
    ]):
        func = decorator(func)
    return func


def _vertex(project: str | None, region: str) -> Any:
    return vertex_project(project, region, None, None, None)


def _row(row: dict[str, str], *keys: str) -> str:
    return "  ".join(row[key] or "-" for key in keys)


@click.group()
def runs() -> None:
    """Pipeline runs: Vertex AI pipeline jobs, or Kubeflow runs with --kfp-host."""


@runs.command("list")
@_where_options
@click.option("--limit", default=20, show_default=True, help="How many of the newest runs.")
def runs_list(project: str | None, region: str, kfp_host: str | None, namespace: str | None,
              kfp_token: str | None, experiment: str, limit: int) -> None:
    """List the pipeline's runs, newest first: ID, state, created, display name.

    Vertex AI: the project's jobs of the torchship pipeline; Kubeflow: the experiment's runs."""
    with cloud_errors(kfp_host):
        if kfp_host:
            from torchship.pipelines import kubeflow

            rows = kubeflow.runs(kfp_host, experiment, limit, namespace, kfp_token)
        else:
            from torchship.pipelines import vertex
            from torchship.pipelines.pipeline import PIPELINE_NAME

            rows = vertex.runs(_vertex(project, region), PIPELINE_NAME, limit)
    for row in rows:
        click.echo(_row(row, "name", "state", "created", "display_name"))
    if not rows:
        click.echo("no runs")


@runs.command("get")
@click.argument("run")
@_where_options
def runs_get(run: str, project: str | None, region: str, kfp_host: str | None,
             namespace: str | None, kfp_token: str | None, experiment: str) -> None:
    """Show RUN: state, times, parameter values, link.

    RUN is a pipeline job's ID or resource name, or a Kubeflow run ID."""
    with cloud_errors(kfp_host):
        if kfp_host:
            from torchship.pipelines import kubeflow

            details = kubeflow.run_details(kfp_host, run, namespace, kfp_token)
        else:
            from torchship.pipelines import vertex

            details = vertex.run_details(_vertex(project, region), run)
    click.echo(f"{details['name']}  {details['state']}  {details['display_name']}")
    click.echo(f"  created {details['created']}  started {details['started']}  "
               f"ended {details['ended']}")
    click.echo("  parameters:" if details["parameters"] else "  parameters: compiled defaults")
    for name, value in sorted(details["parameters"].items()):
        click.echo(f"    {name} = {json.dumps(value)}")
    click.echo(f"  {details['link']}")


@runs.command("cancel")
@click.argument("run")
@_where_options
def runs_cancel(run: str, project: str | None, region: str, kfp_host: str | None,
                namespace: str | None, kfp_token: str | None, experiment: str) -> None:
    """Stop RUN (Vertex AI: cancel the job; Kubeflow: terminate the run)."""
    with cloud_errors(kfp_host):
        if kfp_host:
            from torchship.pipelines import kubeflow

            kubeflow.cancel_run(kfp_host, run, namespace, kfp_token)
            click.echo(f"terminating run {run} on {kfp_host}")
            return
        from torchship.pipelines import vertex

        name = vertex.cancel_run(_vertex(project, region), run)
    click.echo(f"cancelling {name}")


@schedule.command("list")
@_where_options
def schedule_list(project: str | None, region: str, kfp_host: str | None,
                  namespace: str | None, kfp_token: str | None, experiment: str) -> None:
    """List schedules: name, state, cron, display name.

    Vertex AI: the project's pipeline schedules; Kubeflow: the experiment's recurring runs."""
    with cloud_errors(kfp_host):
        if kfp_host:
            from torchship.pipelines import kubeflow

            rows = kubeflow.recurring_runs(kfp_host, experiment, namespace, kfp_token)
        else:
            from torchship.pipelines import vertex

            rows = vertex.schedules(_vertex(project, region))
    for row in rows:
        click.echo(_row(row, "name", "state", "cron", "display_name"))


def _schedule_action(action: str) -> None:
    done = {"pause": "paused", "resume": "resumed", "delete": "deleted"}[action]

    @click.argument("name")
    @_where_options
    def command(name: str, project: str | None, region: str, kfp_host: str | None,
                namespace: str | None, kfp_token: str | None, experiment: str) -> None:
        with cloud_errors(kfp_host):
            if kfp_host:
                from torchship.pipelines import kubeflow

                kubeflow.change_recurring_run(kfp_host, name, action, namespace, kfp_token)
            else:
                from torchship.pipelines import vertex

                vertex.change_schedule(_vertex(project, region), name, action)
        click.echo(f"{done} {name}")

    command.__doc__ = (f"{action.capitalize()} the schedule NAME.\n\nNAME: a Vertex AI "
                       "schedule's resource name or ID, or a Kubeflow recurring run ID.")
    schedule.command(action)(command)


for _action in ("pause", "resume", "delete"):
    _schedule_action(_action)
