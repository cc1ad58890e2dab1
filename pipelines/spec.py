"""A compiled pipeline YAML rewritten task by task, before a runner gets it."""

from collections.abc import Callable
from pathlib import Path
from typing import Any


def with_every_task(pipeline_yaml: str | Path, change: Callable[[dict[str, Any]], None]) -> str:
    """The YAML of `pipeline_yaml` with `change` applied to every task of every DAG: the root's
    and each component's (a condition's tasks are in its own)."""
    import yaml

    documents = list(yaml.safe_load_all(Path(pipeline_yaml).read_text()))
    spec = documents[0]
    for component in [spec.get("root", {}), *spec.get("components", {}).values()]:
        for task in component.get("dag", {}).get("tasks", {}).values():
            change(task)
    return yaml.safe_dump_all(documents, sort_keys=False)
