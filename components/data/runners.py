"""Where the data step's Beam pipeline runs: this process (DirectRunner), Dataflow on Google Cloud,
or a Flink or Spark job server (PortableRunner), and the Beam options each one needs."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from torchship.components.errors import UserInputError

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions

__all__ = ["PIPELINE_PARAMETERS", "RUNNERS", "BeamRunner", "dataflow_job_name", "from_parameters"]

DIRECT, DATAFLOW, PORTABLE = "DirectRunner", "DataflowRunner", "PortableRunner"
RUNNERS = (DIRECT, DATAFLOW, PORTABLE)
# What DirectRunner means here: Beam's own DirectRunner first tries its Prism runner, a Go binary
# it downloads from GitHub at run time (no download here: it falls back, leaving a temporary
# folder behind each time); a batch pipeline like ours runs on the FnApiRunner it falls back to.
FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.fn_runner.FnApiRunner"
# The pipeline parameters that set a runner: parameter -> BeamRunner field. The image is the
# pipeline's own, set when it is compiled.
PIPELINE_PARAMETERS = {
    "data_runner": "runner",
    "dataflow_project": "project",
    "dataflow_region": "region",
    "dataflow_service_account": "service_account",
    "dataflow_temp_location": "temp_location",
    "dataflow_max_workers": "max_workers",
    "dataflow_machine_type": "machine_type",
    "dataflow_subnetwork": "subnetwork",
    "beam_job_endpoint": "job_endpoint",
}
# Where a Dataflow job's project comes from when none is given: Google's client libraries read
# the first, Vertex AI sets the second in the containers it runs.
PROJECT_ENV = ("GOOGLE_CLOUD_PROJECT", "CLOUD_ML_PROJECT_ID")
# The Dataflow API's rule for a job name: [a-z]([-a-z0-9]{0,1022}[a-z0-9])?
_JOB_NAME_MAX = 1024
_HOST_PORT = re.compile(r"^[\w.-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


def dataflow_job_name(text: str) -> str:
    """`text` as a Dataflow job name: lower case, runs of other characters as one '-', starting
    with a letter; a long name keeps its start and its end (where a run's unique part goes)."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"torchship-{name}".rstrip("-")
    if len(name) > _JOB_NAME_MAX:
        half = _JOB_NAME_MAX // 2
        name = f"{name[:half - 1].rstrip('-')}-{name[-half:].lstrip('-')}"
    return name


@dataclass(frozen=True)
class BeamRunner:
    """The runner of the data step's Beam pipeline and its settings; only those of the chosen
    runner are used. The pipeline parameters `data_runner`, `dataflow_*` and `beam_job_endpoint`
    make one (see `pipelines/components.py`)."""

    runner: str = DIRECT  # DirectRunner (here), DataflowRunner, PortableRunner (Flink, Spark)
    project: str = ""  # Dataflow; empty: $GOOGLE_CLOUD_PROJECT or $CLOUD_ML_PROJECT_ID
    region: str = ""  # Dataflow, required
    service_account: str = ""  # the Dataflow workers' service account email
    temp_location: str = ""  # Dataflow, required: gs:// folder for staging and temporary files
    max_workers: int = 0  # Dataflow autoscaling's ceiling; 0: Dataflow's default
    machine_type: str = ""  # Dataflow worker machine type; empty: Dataflow's default
    # The image the workers run: the project's CPU image, so they import torchship.
    sdk_container_image: str = ""
    network: str = ""  # Dataflow: the VPC network's name
    subnetwork: str = ""  # Dataflow: regions/REGION/subnetworks/NAME or its full URL
    job_endpoint: str = ""  # PortableRunner, required: HOST:PORT of the job server
    direct_num_workers: int = 1  # DirectRunner processes; 0: one per CPU

    @property
    def local(self) -> bool:
        """The pipeline runs in this process (and its children), not on a cluster."""
        return self.runner == DIRECT

    def check(self) -> None:
        """Refuse settings the chosen runner cannot start with, in one line naming the pipeline
        parameter and the fix."""

        def refuse(setting: str, value: object, problem: str, fix: str) -> NoReturn:
            raise UserInputError(f"{setting}={value!r} {problem}; {fix}")

        if self.runner not in RUNNERS:
            close = difflib.get_close_matches(self.runner, RUNNERS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            refuse("parameter data_runner", self.runner, "is not a Beam runner torchship runs on",
                   f"{hint}pass one of {', '.join(RUNNERS)}")
        if self.direct_num_workers < 0:
            refuse("direct_num_workers", self.direct_num_workers, "is negative",
                   "pass 1 or more processes, or 0 for one per CPU")
        if self.max_workers < 0:
            refuse("parameter dataflow_max_workers", self.max_workers, "is negative",
                   "pass the most workers Dataflow may scale to, or 0 for its default")
        if self.runner == DATAFLOW:
            self._check_dataflow(refuse)
        if self.runner == PORTABLE and not _HOST_PORT.match(self.job_endpoint):
            refuse("parameter beam_job_endpoint", self.job_endpoint,
                   "is not the HOST:PORT of a job server, which PortableRunner submits to",
                   "pass e.g. flink-jobserver:8099 (a Flink or Spark job server)")

    def _check_dataflow(self, refuse: Callable[[str, object, str, str], NoReturn]) -> None:
        if not re.fullmatch(r"[a-z]+-[a-z]+\d+", self.region):
            refuse("parameter dataflow_region", self.region,
                   "is not a Google Cloud region" if self.region else "is empty",
                   "pass the region Dataflow runs the data step in, e.g. europe-west4")
        if not re.fullmatch(r"gs://[^/\s]+(/\S*)?", self.temp_location):
            refuse("parameter dataflow_temp_location", self.temp_location,
                   f"is {'not a gs:// folder' if self.temp_location else 'empty'}, and Dataflow "
                   "needs one to stage and keep temporary files in",
                   "pass e.g. gs://BUCKET/dataflow-temp")
        if self.service_account and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+",
                                                     self.service_account):
            refuse("parameter dataflow_service_account", self.service_account,
                   "is not a service account email",
                   "pass e.g. dataflow@PROJECT.iam.gserviceaccount.com, or leave it empty")
        # The image is set when the pipeline is compiled, not a parameter (see `options`).
        if self.sdk_container_image and "/" not in self.sdk_container_image.split(":")[0]:
            raise UserInputError(
                f"the component image {self.sdk_container_image!r} is not in a registry, so "
                "Dataflow workers cannot pull it to import torchship; compile the pipeline with "
                "--image REGION-docker.pkg.dev/PROJECT/REPO/torchship-cpu:VERSION")

    def resolved_project(self) -> str:
        """The Dataflow project: the one given, else the environment's (Vertex AI sets it)."""
        return self.project or next(
            (os.environ[name] for name in PROJECT_ENV if os.environ.get(name)), "")

    def options(self, job_name: str) -> PipelineOptions:
        """The Beam options for this runner; `job_name` should be unique among the project's
        running Dataflow jobs (Dataflow hands back a running job of the same name)."""
        quiet_beam_import()
        from apache_beam.options.pipeline_options import PipelineOptions

        self.check()
        flags = [f"--runner={FN_API_RUNNER if self.runner == DIRECT else self.runner}",
                 "--no_save_main_session"]
        if self.runner == DIRECT:
            flags.append(f"--direct_num_workers={self.direct_num_workers}")
            if self.direct_num_workers != 1:  # processes: the steps decode and write in Python
                flags.append("--direct_running_mode=multi_processing")
        elif self.runner == DATAFLOW:
            project = self.resolved_project()
            if not project:
                raise UserInputError(
                    "parameter dataflow_project is empty and neither "
                    f"{' nor '.join('$' + name for name in PROJECT_ENV)} is set; pass the "
                    "Google Cloud project Dataflow runs the data step in")
            if not self.sdk_container_image:  # Dataflow's own image has no torchship
                raise UserInputError(
                    "DataflowRunner has no sdk_container_image; pass the torchship CPU image "
                    "its workers run, e.g. REGION-docker.pkg.dev/PROJECT/REPO/torchship-cpu:VERSION")
            flags += [f"--project={project}", f"--region={self.region}",
                      f"--temp_location={self.temp_location}",
                      f"--job_name={dataflow_job_name(job_name)}",
                      f"--sdk_container_image={self.sdk_container_image}"]
            for flag, value in (("service_account_email", self.service_account),
                                ("max_num_workers", self.max_workers),
                                ("worker_machine_type", self.machine_type),
                                ("network", self.network), ("subnetwork", self.subnetwork)):
                if value:
                    flags.append(f"--{flag}={value}")
        else:
            flags += [f"--job_endpoint={self.job_endpoint}", f"--job_name={job_name}"]
            # The job server's workers start the image's Beam SDK harness in Docker; without an
            # image they call back into this process (a job server on this machine).
            flags += (["--environment_type=DOCKER",
                       f"--environment_config={self.sdk_container_image}"]
                      if self.sdk_container_image else ["--environment_type=LOOPBACK"])
        return PipelineOptions(flags)


def from_parameters(values: dict[str, object]) -> BeamRunner:
    """The runner that pipeline parameter `values` set (see PIPELINE_PARAMETERS); parameters
    left out keep BeamRunner's defaults."""
    return BeamRunner(**{field: values[name] for name, field in PIPELINE_PARAMETERS.items()
                         if name in values})


def quiet_beam_import() -> None:
    """Import Beam with its import-time warning that the gcp extra is missing silenced: the
    DirectRunner needs none of it (the images install the extra for Dataflow), and the line
    would read as a fault in every prepare-data log. Other warnings pass."""
    import logging

    def not_the_extra(record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(not_the_extra)
    try:
        import apache_beam  # noqa: F401 - imported for its side effect, once
    finally:
        root.removeFilter(not_the_extra)
