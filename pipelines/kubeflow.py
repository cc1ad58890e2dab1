"""Open-source Kubeflow Pipelines: runs and recurring runs through `kfp.Client`."""

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torchship.components.errors import UserInputError


def _client(host: str, namespace: str | None):
    import kfp

    return kfp.Client(host=host, namespace=namespace)


@contextmanager
def _caching_set(pipeline_yaml: str, enable_caching: bool | None) -> Iterator[str]:
    """The compiled pipeline with every task's caching set as asked, nested DAGs' (a condition's
    tasks) included: kfp.Client's enable_caching rewrites only the root DAG's tasks (Vertex AI's
    SDK rewrites them all). None, or a package other than YAML: the file as compiled."""
    if enable_caching is None or not pipeline_yaml.endswith((".yaml", ".yml")):
        yield pipeline_yaml
        return
    import yaml

    documents = list(yaml.safe_load_all(Path(pipeline_yaml).read_text()))
    spec = documents[0]
    for component in [spec["root"], *spec.get("components", {}).values()]:
        for task in component.get("dag", {}).get("tasks", {}).values():
            task["cachingOptions"] = {"enableCache": enable_caching}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pipeline.yaml"
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        yield str(path)


def submit(host: str, pipeline_yaml: str, parameters: dict[str, Any],
           run_name: str = "torchship", experiment: str = "torchship",
           enable_caching: bool | None = None, service_account: str | None = None,
           namespace: str | None = None, pipeline_root: str | None = None) -> str:
    """Start one run of the compiled pipeline on a KFP cluster (its artifacts under
    `pipeline_root`, or the cluster's default); return the run ID."""
    with _caching_set(pipeline_yaml, enable_caching) as path:
        run = _client(host, namespace).create_run_from_pipeline_package(
            path, arguments=parameters, run_name=run_name, experiment_name=experiment,
            enable_caching=enable_caching, service_account=service_account,
            pipeline_root=pipeline_root,
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
             pipeline_root: str | None = None) -> str:
    """A recurring run of the compiled pipeline; return its ID."""
    client = _client(host, namespace)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    with _caching_set(pipeline_yaml, enable_caching) as path:
        recurring = client.create_recurring_run(
            experiment_id=experiment_id, job_name=name, cron_expression=check_cron(cron),
            max_concurrency=max_concurrent_runs, start_time=start_time, end_time=end_time,
            pipeline_package_path=path, params=parameters, enable_caching=enable_caching,
            pipeline_root=pipeline_root,
        )
    return recurring.recurring_run_id

