"""Vertex AI specifics: the train stage as a multi-replica custom job sized at run time."""

import copy
import json
from collections.abc import Callable
from typing import Any

from torchship.components.errors import UserInputError


def custom_training_job(train_component: Callable) -> tuple[Callable, str]:
    """Wrap `train_component` as a Vertex AI CustomJob (gcpc) and return it with its pool template.

    gcpc bakes the worker pools in at compile time; the template (one pool: the container with
    its executor placeholders) lets `worker_pool_specs` size the job from pipeline parameters.
    """
    from google_cloud_pipeline_components.v1.custom_job import (
        create_custom_training_job_from_component,
    )

    job = create_custom_training_job_from_component(train_component, display_name="train")
    pools = job.component_spec.inputs["worker_pool_specs"].default
    return job, json.dumps(pools[0])


def worker_pool_specs(
    template: str,
    replica_count: int,
    machine_type: str,
    accelerator_type: str = "",
    accelerator_count: int = 0,
) -> list[dict[str, Any]]:
    """Pool 0 holds the chief (node 0), pool 1 the other `replica_count - 1` nodes, as Vertex
    sets them in CLUSTER_SPEC; every node has the same machine and accelerators."""
    if int(replica_count) < 1:
        raise UserInputError(
            f"train_replica_count {replica_count} is below 1; pass the number of machines (>= 1)"
        )
    if accelerator_type and int(accelerator_count) < 1:
        raise UserInputError(
            f"train_accelerator_type {accelerator_type!r} needs train_accelerator_count >= 1 "
            f"(got {accelerator_count}); pass the GPUs per machine"
        )
    chief = json.loads(template)
    chief["replica_count"] = 1
    chief["machine_spec"] = {"machine_type": machine_type}
    if accelerator_type:
        chief["machine_spec"].update(
            accelerator_type=accelerator_type, accelerator_count=int(accelerator_count)
        )
    pools = [chief]
    if int(replica_count) > 1:
        workers = copy.deepcopy(chief)
        workers["replica_count"] = int(replica_count) - 1
        pools.append(workers)
    return pools
