"""Vertex AI specifics: the train stage as a multi-replica custom job sized at run time, and the
Triton measurements as custom jobs on the serving machine."""

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchship.components.errors import UserInputError

# Where runs go, and the training custom job runs, unless told otherwise.
DEFAULT_REGION = "us-central1"


def custom_training_job(component: Callable, display_name: str = "train") -> tuple[Callable, str]:
    """Wrap `component` as a Vertex AI CustomJob (gcpc) and return it with its pool template.

    gcpc bakes the worker pools in at compile time; the template (one pool: the container with
    its executor placeholders) lets `worker_pool_specs` size the job from pipeline parameters.
    """
    from google_cloud_pipeline_components.v1.custom_job import (
        create_custom_training_job_from_component,
    )

    job = create_custom_training_job_from_component(component, display_name=display_name)
    pools = job.component_spec.inputs["worker_pool_specs"].default
    return job, json.dumps(pools[0])


# The machine a Vertex AI deploy serves on unless its settings say otherwise
# (components/deploy/targets/vertex.py `deploy_vertex`).
SERVING_MACHINE_TYPE = "n1-standard-4"


def serving_pool_specs(template: str, deploy_settings: dict[str, Any], image: str,
                       gpus: int = 0, gpu_type: str = "") -> list[dict[str, Any]]:
    """One machine like the deploy's for a Triton measurement (benchmark, serving search): the
    deploy settings' `machine_type` (default SERVING_MACHINE_TYPE) and accelerator, else the
    `gpus` x `gpu_type` it was compiled with, running `image` (the Triton serving image)."""
    settings = deploy_settings or {}
    accelerator = settings.get("accelerator_type") or ""
    count = int(settings.get("accelerator_count") or 0) if accelerator else int(gpus)
    return worker_pool_specs(template, 1, settings.get("machine_type") or SERVING_MACHINE_TYPE,
                             accelerator or (gpu_type if count else ""), count,
                             cpu_image=image, gpu_image=image)


def worker_pool_specs(
    template: str,
    replica_count: int,
    machine_type: str,
    accelerator_type: str = "",
    accelerator_count: int = 0,
    cpu_image: str = "",
    gpu_image: str = "",
) -> list[dict[str, Any]]:
    """Pool 0 holds the chief (node 0), pool 1 the other `replica_count - 1` nodes, as Vertex
    sets them in CLUSTER_SPEC; every node has the same machine and accelerators, and runs
    `gpu_image` when it has accelerators, `cpu_image` otherwise (empty: the template's image)."""
    if int(replica_count) < 1:
        raise UserInputError(
            f"train_replica_count {replica_count} is below 1; pass the number of machines (>= 1)"
        )
    if accelerator_type and int(accelerator_count) < 1:
        raise UserInputError(
            f"train_accelerator_type {accelerator_type!r} needs train_accelerator_count >= 1 "
            f"(got {accelerator_count}); pass the GPUs per machine"
        )
    if int(accelerator_count) > 0 and not accelerator_type:
        raise UserInputError(
            f"train_accelerator_count {accelerator_count} needs train_accelerator_type; pass "
            "one, e.g. NVIDIA_L4 or NVIDIA_TESLA_A100, or 0 GPUs"
        )
    chief = json.loads(template)
    chief["replica_count"] = 1
    chief["machine_spec"] = {"machine_type": machine_type}
    if accelerator_type:
        chief["machine_spec"].update(
            accelerator_type=accelerator_type, accelerator_count=int(accelerator_count)
        )
    image = gpu_image if accelerator_type else cpu_image
    if image:
        chief["container_spec"]["image_uri"] = image
    pools = [chief]
    if int(replica_count) > 1:
        workers = copy.deepcopy(chief)
        workers["replica_count"] = int(replica_count) - 1
        pools.append(workers)
    return pools


@dataclass(frozen=True)
class VertexProject:
    """Where and as whom a pipeline runs on Vertex AI; nothing here is compiled into the YAML."""

    project: str
    location: str
    pipeline_root: str = ""
    service_account: str | None = None
    network: str | None = None
    api_endpoint: str | None = None  # tests point the real SDK at a local fake
    credentials: Any = None

    def init(self) -> None:
        from google.cloud import aiplatform

        aiplatform.init(
            project=self.project, location=self.location, credentials=self.credentials,
            api_endpoint=self.api_endpoint, api_transport="rest" if self.api_endpoint else None,
        )


def console_link(resource_name: str) -> str:
    """The Google Cloud console page of a pipeline job."""
    _, project, _, location, _, job_id = resource_name.split("/")
    return (f"https://console.cloud.google.com/vertex-ai/locations/{location}/pipelines/runs/"
            f"{job_id}?project={project}")


def pipeline_job(project: VertexProject, template: str, parameters: dict[str, Any],
                 enable_caching: bool | None, labels: dict[str, str],
                 job_id: str | None = None, display_name: str = "torchship",
                 encryption_spec_key_name: str | None = None):
    """An `aiplatform.PipelineJob` for a compiled YAML or an Artifact Registry template URI;
    `encryption_spec_key_name`, a Cloud KMS key, encrypts what the job makes (CMEK)."""
    from google.cloud import aiplatform

    if not (project.pipeline_root or "").startswith("gs://"):
        raise UserInputError(
            f"pipeline root {project.pipeline_root!r} is not a gs:// URI; pass "
            "--pipeline-root gs://BUCKET/PATH"
        )
    project.init()
    return aiplatform.PipelineJob(
        display_name=display_name, template_path=template, job_id=job_id,
        pipeline_root=project.pipeline_root, parameter_values=parameters,
        enable_caching=enable_caching, labels=labels or None,
        encryption_spec_key_name=encryption_spec_key_name,
    )


def submit(project: VertexProject, template: str, parameters: dict[str, Any],
           enable_caching: bool | None = None, labels: dict[str, str] | None = None,
           job_id: str | None = None, wait: bool = False,
           progress: Callable[[str], None] = print, display_name: str = "torchship",
           experiment: str | None = None, encryption_spec_key_name: str | None = None) -> str:
    """Submit the pipeline to Vertex AI Pipelines; return the job's resource name.

    With `experiment`, the job is a run of that Vertex AI Experiment (made if missing). With
    `wait`, follow the run to its end and raise if it did not succeed.
    """
    job = pipeline_job(project, template, parameters, enable_caching, labels or {}, job_id,
                       display_name, encryption_spec_key_name)
    try:
        job.submit(service_account=project.service_account, network=project.network,
                   experiment=experiment)
    except RuntimeError as exc:  # the SDK's own line on the experiment; the cause says why
        raise RuntimeError(f"{exc}: {exc.__cause__}" if exc.__cause__ else str(exc)) from exc
    progress(f"submitted {job.resource_name}")
    if experiment:
        progress(f"experiment: {experiment}")
    progress(f"console: {console_link(job.resource_name)}")
    if wait:
        job.wait()
        state = job.state.name if job.state is not None else "UNKNOWN"
        progress(f"finished: {state}")
        if state != "PIPELINE_STATE_SUCCEEDED":
            raise RuntimeError(f"pipeline job {job.resource_name} ended in {state}")
    return job.resource_name


def create_schedule(project: VertexProject, template: str, parameters: dict[str, Any],
                    display_name: str, cron: str, time_zone: str | None = None,
                    max_concurrent_runs: int = 1, start_time: str | None = None,
                    end_time: str | None = None, max_runs: int | None = None,
                    enable_caching: bool | None = None,
                    labels: dict[str, str] | None = None,
                    encryption_spec_key_name: str | None = None) -> str:
    """A `PipelineJobSchedule` running the pipeline on a cron (5 fields, optional time zone)."""
    from google.cloud import aiplatform

    if len(cron.split()) != 5:
        raise UserInputError(
            f"cron {cron!r} does not have 5 fields (minute hour day month weekday); "
            "pass e.g. '0 3 * * *' and the zone with --time-zone"
        )
    job = pipeline_job(project, template, parameters, enable_caching, labels or {},
                       display_name=display_name,
                       encryption_spec_key_name=encryption_spec_key_name)
    schedule = aiplatform.PipelineJobSchedule(pipeline_job=job, display_name=display_name)
    schedule.create(
        cron=f"TZ={time_zone} {cron}" if time_zone else cron,
        max_concurrent_run_count=max_concurrent_runs, start_time=start_time,
        end_time=end_time, max_run_count=max_runs,
        service_account=project.service_account, network=project.network,
    )
    return schedule.resource_name


def schedules(project: VertexProject) -> list[dict[str, str]]:
    """The project's pipeline schedules: name, display name, state, cron."""
    from google.cloud import aiplatform

    project.init()
    return [
        {"name": s.resource_name, "display_name": s.display_name,
         "state": s.state.name if s.state is not None else "", "cron": s.cron}
        for s in aiplatform.PipelineJobSchedule.list()
    ]


def _when(moment: Any) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else "-"


def _state(job: Any) -> str:
    return job.state.name.removeprefix("PIPELINE_STATE_") if job.state is not None else "UNKNOWN"


def _plain(value: Any) -> Any:
    """A parameter value as it was given: Vertex AI keeps numbers as doubles (3 reads 3.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def runs(project: VertexProject, pipeline_name: str, limit: int = 20) -> list[dict[str, str]]:
    """The newest `limit` jobs of the pipeline named `pipeline_name`, newest first: ID, state,
    creation time, display name."""
    from google.cloud import aiplatform

    project.init()
    jobs = aiplatform.PipelineJob.list(filter=f'pipeline_name="{pipeline_name}"',
                                       order_by="create_time desc")
    # The listed resources as they came: an SDK job's `state` would ask for each job again.
    listed = [job.gca_resource for job in jobs[:limit]]
    return [{"name": job.name.rsplit("/", 1)[-1], "state": _state(job),
             "created": _when(job.create_time), "display_name": job.display_name}
            for job in listed]


def run_details(project: VertexProject, name: str) -> dict[str, Any]:
    """One pipeline job by resource name or ID: what `torchship runs get` shows."""
    from google.cloud import aiplatform

    project.init()
    job = aiplatform.PipelineJob.get(name).gca_resource
    return {"name": job.name.rsplit("/", 1)[-1], "display_name": job.display_name,
            "state": _state(job),
            "created": _when(job.create_time), "started": _when(job.start_time),
            "ended": _when(job.end_time),
            "parameters": _plain(type(job.runtime_config).to_dict(job.runtime_config).get(
                "parameter_values", {})),
            "link": console_link(job.name)}


def cancel_run(project: VertexProject, name: str) -> str:
    """Ask Vertex AI to cancel one pipeline job; return its resource name."""
    from google.cloud import aiplatform

    project.init()
    job = aiplatform.PipelineJob.get(name)
    job.cancel()
    return job.resource_name


def change_schedule(project: VertexProject, name: str, action: str) -> None:
    """Pause, resume or delete one schedule by resource name or ID."""
    from google.cloud import aiplatform

    actions = ("pause", "resume", "delete")
    if action not in actions:
        raise UserInputError(f"schedule action {action!r} is unknown; pass one of {actions}")
    project.init()
    getattr(aiplatform.PipelineJobSchedule.get(name), action)()


def publish(host: str, pipeline_yaml: str, tags: list[str]) -> tuple[str, str]:
    """Push the compiled pipeline to an Artifact Registry KFP repository.

    `host` is `https://REGION-kfp.pkg.dev/PROJECT/REPOSITORY`; returns (package name, version).
    """
    from kfp.registry import RegistryClient

    return RegistryClient(host=host).upload_pipeline(file_name=pipeline_yaml, tags=tags)
