"""Open-source Kubeflow Pipelines: runs and recurring runs through `kfp.Client`.

Every call takes the API endpoint `host`, the Kubernetes `namespace` of a multi-user cluster
(None: the client's own) and a bearer `token` (e.g. a service account's, or `gcloud auth
print-access-token` behind IAP; None: none sent)."""

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from torchship.components.errors import UserInputError
from torchship.pipelines.spec import with_every_task


def _client(host: str, namespace: str | None, token: str | None = None):
    import kfp

    return kfp.Client(host=host, namespace=namespace, existing_token=token)


@contextmanager
def _caching_set(pipeline_yaml: str, enable_caching: bool | None) -> Iterator[str]:
    """The compiled pipeline with every task's caching set as asked, nested DAGs' (a condition's
    tasks) included: kfp.Client's enable_caching rewrites only the root DAG's tasks (Vertex AI's
    SDK rewrites them all). None, or a package other than YAML: the file as compiled."""
    if enable_caching is None or not pipeline_yaml.endswith((".yaml", ".yml")):
        yield pipeline_yaml
        return
    text = with_every_task(pipeline_yaml, lambda task: task.update(
        cachingOptions={"enableCache": enable_caching}))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pipeline.yaml"
        path.write_text(text)
        yield str(path)


def submit(host: str, pipeline_yaml: str, parameters: dict[str, Any],
           run_name: str = "torchship", experiment: str = "torchship",
           enable_caching: bool | None = None, service_account: str | None = None,
           namespace: str | None = None, pipeline_root: str | None = None,
           token: str | None = None) -> str:
    """Start one run of the compiled pipeline on a KFP cluster (its artifacts under
    `pipeline_root`, or the cluster's default) in `experiment`, made if missing; return the run
    ID."""
    with _caching_set(pipeline_yaml, enable_caching) as path:
        run = _client(host, namespace, token).create_run_from_pipeline_package(
            path, arguments=parameters, run_name=run_name, experiment_name=experiment,
            namespace=namespace, enable_caching=enable_caching,
            service_account=service_account, pipeline_root=pipeline_root,
        )
    return run.run_id


def check_cron(cron: str) -> str:
    """KFP's cron has six fields, seconds first; a five-field cron gets '0 ' put in front."""
    fields = cron.split()
    if len(fields) == 5:
        return "0 " + cron
    if len(fields) != 6:
        raise UserInputError(
            f"cron {cron!r} has {len(fields)} fields; Kubeflow takes 6 (second minute hour day "
            "month weekday), e.g. '0 0 3 * * *'"
        )
    return cron


def schedule(host: str, pipeline_yaml: str, parameters: dict[str, Any], name: str, cron: str,
             max_concurrent_runs: int = 1, start_time: str | None = None,
             end_time: str | None = None, experiment: str = "torchship",
             enable_caching: bool | None = None, namespace: str | None = None,
             pipeline_root: str | None = None, token: str | None = None) -> str:
    """A recurring run of the compiled pipeline in `experiment`, made if missing; return its
    ID."""
    client = _client(host, namespace, token)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    with _caching_set(pipeline_yaml, enable_caching) as path:
        recurring = client.create_recurring_run(
            experiment_id=experiment_id, job_name=name, cron_expression=check_cron(cron),
            max_concurrency=max_concurrent_runs, start_time=start_time, end_time=end_time,
            pipeline_package_path=path, params=parameters, enable_caching=enable_caching,
            pipeline_root=pipeline_root,
        )
    return recurring.recurring_run_id



def _experiment_id(client: Any, host: str, experiment: str, namespace: str | None) -> str:
    try:
        return client.get_experiment(experiment_name=experiment,
                                     namespace=namespace).experiment_id
    except ValueError:  # kfp's way of saying there is none of that name
        where = f"{host} (namespace {namespace})" if namespace else host
        raise UserInputError(
            f"experiment {experiment!r} not found on {where}; pass --experiment with the one "
            "the runs went to") from None


def _when(moment: datetime | None) -> str:
    """A KFP time; the API's zero time (1970) means not yet."""
    if moment is None or moment.year <= 1970:
        return "-"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def runs(host: str, experiment: str = "torchship", limit: int = 20,
         namespace: str | None = None, token: str | None = None) -> list[dict[str, str]]:
    """The newest `limit` runs of `experiment`, newest first: ID, state, creation time, name."""
    client = _client(host, namespace, token)
    response = client.list_runs(experiment_id=_experiment_id(client, host, experiment, namespace),
                                sort_by="created_at desc", page_size=limit)
    return [{"name": run.run_id, "state": str(run.state or ""), "created": _when(run.created_at),
             "display_name": run.display_name} for run in response.runs or []]


def run_details(host: str, run_id: str, namespace: str | None = None,
                token: str | None = None) -> dict[str, Any]:
    """One run: what `torchship runs get` shows."""
    client = _client(host, namespace, token)
    run = client.get_run(run_id)
    config = run.runtime_config
    return {"name": run.run_id, "display_name": run.display_name, "state": str(run.state or ""),
            "created": _when(run.created_at), "started": _when(run.scheduled_at),
            "ended": _when(run.finished_at),
            "parameters": dict((config.parameters if config else None) or {}),
            "link": f"{client._get_url_prefix().rstrip('/')}/#/runs/details/{run.run_id}"}


def cancel_run(host: str, run_id: str, namespace: str | None = None,
               token: str | None = None) -> None:
    """Terminate a run: its running tasks are stopped, the run ends CANCELED."""
    _client(host, namespace, token).terminate_run(run_id)


def recurring_runs(host: str, experiment: str = "torchship", namespace: str | None = None,
                   token: str | None = None) -> list[dict[str, str]]:
    """The recurring runs of `experiment`: ID, status, cron, name."""
    client = _client(host, namespace, token)
    response = client.list_recurring_runs(
        experiment_id=_experiment_id(client, host, experiment, namespace), page_size=100)
    rows = []
    for recurring in response.recurring_runs or []:
        trigger = recurring.trigger
        cron = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else None
        interval = (trigger.periodic_schedule.interval_second
                    if trigger and trigger.periodic_schedule else None)
        rows.append({"name": recurring.recurring_run_id, "state": str(recurring.status or ""),
                     "cron": cron or (f"every {interval}s" if interval else "-"),
                     "display_name": recurring.display_name})
    return rows


# `torchship schedule ACTION` -> the kfp.Client method that does it to a recurring run.
RECURRING_ACTIONS = {"pause": "disable_recurring_run", "resume": "enable_recurring_run",
                     "delete": "delete_recurring_run"}


def change_recurring_run(host: str, recurring_run_id: str, action: str,
                         namespace: str | None = None, token: str | None = None) -> None:
    """Pause (disable), resume (enable) or delete one recurring run by ID."""
    if action not in RECURRING_ACTIONS:
        raise UserInputError(f"schedule action {action!r} is unknown; pass one of "
                             f"{', '.join(RECURRING_ACTIONS)}")
    getattr(_client(host, namespace, token), RECURRING_ACTIONS[action])(recurring_run_id)
