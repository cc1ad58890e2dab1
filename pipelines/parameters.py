"""The pipeline's parameters: each one's name, type and default, read from the stage that owns
it, and the checks `torchship run`, `submit` and `schedule create` make before anything runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from torchship.components.benchmark import method as measurement
from torchship.components.benchmark.engine import ENGINES
from torchship.components.compress import variants as catalog
from torchship.components.contracts import NOT_SET, TARGET_CONCURRENCY
from torchship.components.data.runners import PIPELINE_PARAMETERS as RUNNER_FIELDS
from torchship.components.data.runners import BeamRunner, from_parameters
from torchship.components.data.stage import (
    DEFAULT_LABEL_COLUMN,
    DEFAULT_SOURCE,
    KEEP_IMAGE_SIZE,
)
from torchship.components.data.text import DEFAULT_MAX_LENGTH
from torchship.components.deploy.stage import (
    DEFAULT_SERVING_NAME,
    DEFAULT_TARGET,
    check_deploy_settings,
    check_serving_model_name,
)
from torchship.components.errors import UserInputError
from torchship.components.gate.checks import ACCURACY_FLOOR, MAX_ACCURACY_DROP_PT
from torchship.components.gate.choice import OPTIMISE, optimise_metric
from torchship.components.gate.regression import MAX_P99_REGRESSION_PCT
from torchship.components.train.config import default as training_default
from torchship.components.triton.binary import MEASUREMENT_BACKENDS
from torchship.components.tune_serving.stage import (
    INSTANCE_COUNTS,
    MAX_BATCH_SIZES,
    QUEUE_DELAYS_US,
)

__all__ = ["MEASUREMENT_PARAMETERS", "PARAMETERS", "RUNNER_PARAMETERS", "TRAINING_PARAMETERS",
           "VERTEX_PARAMETERS", "Parameters", "check_parameters", "compiled_defaults",
           "pipeline_parameters"]

# A pipeline's parameters as (name, type, default). KFP reads them from the pipeline function's
# signature, so each platform's signature is built from one of these.
Parameters = tuple[tuple[str, Any, Any], ...]

# Pipeline parameters the train component takes under the same names, on every platform.
TRAINING_PARAMETERS = ("model_name", "epochs", "batch_size", "learning_rate", "num_workers", "seed",
                       "checkpoint_every_steps", "shuffle_buffer")
# A dict parameter (KFP takes {} where the stage's None means "the model's own defaults").
MODEL_OPTIONS = "model_options"
# Where the data step's Beam pipeline runs (components/data/runners.py): DirectRunner in the
# step itself, DataflowRunner or PortableRunner (a Flink or Spark job server).
RUNNER_PARAMETERS = tuple(RUNNER_FIELDS)
# Compression options that are pipeline parameters (the others keep their defaults).
COMPRESSION_PARAMETERS = ("target_sparsity", "finetune_epochs", "calibration_method")
# How the benchmark and tune-serving stages measure a level: pipeline parameter
# `benchmark_<name>` is their argument `<name>`.
MEASUREMENT_PARAMETERS = measurement.PIPELINE_SETTINGS

_options = catalog.options()
_runner = BeamRunner()  # its defaults: DirectRunner, and nothing set for the others
# The parameters of every platform.
PARAMETERS: Parameters = (
    ("data_source", str, DEFAULT_SOURCE),
    ("label_column", str, DEFAULT_LABEL_COLUMN),
    ("image_size", int, KEEP_IMAGE_SIZE),
    # Text tables: the text column, its tokenizer directory ("": an hf:DIR model's own), length.
    ("text_column", str, ""),
    ("tokenizer", str, ""),
    ("max_length", int, DEFAULT_MAX_LENGTH),
    ("statistics_uri", str, ""),
    *((name, type(getattr(_runner, field)), getattr(_runner, field))
      for name, field in RUNNER_FIELDS.items()),
    *((name, type(training_default(name)), training_default(name))
      for name in TRAINING_PARAMETERS),
    (MODEL_OPTIONS, dict, {}),
    *((name, type(_options[name].default), _options[name].default)
      for name in COMPRESSION_PARAMETERS[:2]),
    ("quantize", bool, True),
    ("variants", list[str], catalog.default_names()),
    (COMPRESSION_PARAMETERS[2], str, _options[COMPRESSION_PARAMETERS[2]].default),
    ("benchmark_concurrency", list[int], list(measurement.PIPELINE_CONCURRENCY)),
    # Each level runs min to max windows, until its windows agree within stability_pct;
    # window_s 0: benchmark_duration_s / benchmark_min_windows.
    *((f"benchmark_{name}", type(measurement.default(name)), measurement.default(name))
      for name in MEASUREMENT_PARAMETERS),
    # The benchmark also doubles concurrency from the lowest level until throughput stops rising.
    ("benchmark_knee", bool, measurement.default("knee")),
    # The Triton backend benchmark and tune-serving measure with (auto: onnxruntime where the
    # tritonserver has it, as in the Triton serving image; else python, as locally).
    ("benchmark_backend", str, MEASUREMENT_BACKENDS[0]),
    ("max_accuracy_drop_pt", float, MAX_ACCURACY_DROP_PT),
    ("max_size_bytes", int, NOT_SET),
    ("optimise", str, OPTIMISE),
    ("accuracy_floor", float, ACCURACY_FLOOR),
    ("baseline_uri", str, ""),
    ("latency_budget_p99_ms", float, float(NOT_SET)),
    ("target_concurrency", int, TARGET_CONCURRENCY),
    # The serving search's other constraint: at least this throughput at target_concurrency.
    ("throughput_target_rps", float, float(NOT_SET)),
    ("previous_results_uri", str, ""),
    ("max_p99_regression_pct", float, MAX_P99_REGRESSION_PCT),
    # The serving search's grid (Triton settings, with every variant the gate found eligible);
    # [] keeps that setting's default.
    ("serving_instance_counts", list[int], list(INSTANCE_COUNTS)),
    ("serving_queue_delays_us", list[int], list(QUEUE_DELAYS_US)),
    ("serving_max_batch_sizes", list[int], list(MAX_BATCH_SIZES)),
    ("deploy_target", str, DEFAULT_TARGET),
    ("local_repository", str, ""),
    ("deploy_settings", dict, {}),
    # Where a deploying run keeps the retraining reference (components/deploy/reference.py);
    # `torchship run` and `submit` fill in <pipeline root>/torchship-reference/torchship/<target>/.
    ("reference_uri", str, ""),
    # The one name clients call whichever variant a run deploys (the Triton model, and the default
    # Vertex AI model display name and InferenceService name); versions accumulate under it.
    ("serving_model_name", str, DEFAULT_SERVING_NAME),
)
# The vertex platform scales training out over replicas (one process each by default), sized by
# the parameters it adds.
VERTEX_PARAMETERS: Parameters = (
    *((name, kind, 1 if name == "num_workers" else default) for name, kind, default in PARAMETERS),
    ("train_replica_count", int, 2),
    ("train_machine_type", str, "n1-standard-8"),
    ("train_accelerator_type", str, ""),
    ("train_accelerator_count", int, 0),
    # The custom job's CustomJobSpec: where it runs and as whom. Empty location, service account,
    # network and CMEK key: the pipeline job's own (not the CustomJob API's defaults); empty
    # TensorBoard (a Vertex AI TensorBoard resource) and output directory (gs://): none.
    ("vertex_location", str, ""),
    ("train_service_account", str, ""),
    ("train_network", str, ""),
    ("train_encryption_spec_key_name", str, ""),
    ("train_tensorboard", str, ""),
    ("train_base_output_directory", str, ""),
)


def check_parameters(arguments: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Refuse, before anything runs, parameter values that would fail only hours later at the
    compress stage or the gate. `defaults` fill in what `arguments` leave out."""
    values = {**(defaults or {}), **arguments}

    def refuse(name: str, problem: str, fix: str) -> NoReturn:
        raise UserInputError(f"parameter {name}={values[name]!r} {problem}; {fix}")

    for name in ("latency_budget_p99_ms", "max_accuracy_drop_pt", "max_size_bytes",
                 "max_p99_regression_pct", "accuracy_floor", "throughput_target_rps"):
        if name in values and float(values[name]) < 0:
            refuse(name, "is negative", "pass 0 for no limit or a positive value")
    if "variants" in values:
        known = catalog.names()
        unknown = [v for v in values["variants"] if v not in known]
        if unknown or not values["variants"]:
            refuse("variants", f"names no variant or unknown ones ({', '.join(unknown)})",
                   f"pass some of {', '.join(known)}")
    for name in COMPRESSION_PARAMETERS:
        if name in values:
            refusal = _options[name].refusal(values[name], f"parameter {name}={values[name]!r}")
            if refusal:
                raise UserInputError(refusal)
    if "optimise" in values:
        optimise_metric(values["optimise"])
    _check_benchmark_sweep(values, refuse)
    if "deploy_target" in values or "deploy_settings" in values:
        settings = values.get("deploy_settings") or {}
        if not isinstance(settings, dict):
            refuse("deploy_settings", "is not a JSON object",
                   "pass e.g. -p deploy_settings='{\"project\": \"my-project\"}'")
        check_deploy_settings(values.get("deploy_target", DEFAULT_TARGET), settings)
    if "serving_model_name" in values:
        check_serving_model_name(values["serving_model_name"],
                                 values.get("deploy_target", DEFAULT_TARGET),
                                 values.get("deploy_settings") or {})
    if "target_concurrency" in values and "benchmark_concurrency" in values:
        levels = [int(level) for level in values["benchmark_concurrency"]]
        if int(values["target_concurrency"]) not in levels:
            refuse("target_concurrency", f"is not a measured level ({levels})",
                   "pass one of the benchmark concurrency levels, or add it to them")
    _check_serving_search(values, refuse)
    if any(name in values for name in RUNNER_PARAMETERS):
        from_parameters(values).check()


def _check_benchmark_sweep(values: dict[str, Any],
                           refuse: Callable[[str, str, str], NoReturn]) -> None:
    """The benchmark's levels and measurement windows, which it would refuse only after training."""

    def number(name: str) -> float:
        try:
            return float(values[name])
        except (TypeError, ValueError):
            refuse(name, "is not a number", "pass a number")

    def whole(value: Any) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and float(value).is_integer() and value >= 1)

    if "benchmark_concurrency" in values:
        levels = values["benchmark_concurrency"]
        if not isinstance(levels, list) or not levels or not all(map(whole, levels)):
            refuse("benchmark_concurrency", "is not a list of positive integers",
                   "pass the levels to measure, e.g. [1, 4]")
    for name in ("benchmark_batch_size", "benchmark_min_windows", "benchmark_max_windows"):
        if name in values and not whole(values[name]):
            refuse(name, "is not a positive integer", "pass 1 or more")
    if "benchmark_min_windows" in values and "benchmark_max_windows" in values:
        least = values["benchmark_min_windows"]
        if values["benchmark_max_windows"] < least:
            refuse("benchmark_max_windows", f"is below benchmark_min_windows={least:g}",
                   "pass a maximum at least the minimum")
    for name, fix in (
        ("benchmark_duration_s", "pass the seconds measured per level, e.g. 3"),
        ("benchmark_stability_pct", "pass the % a level's windows must agree within, e.g. 15"),
    ):
        if name in values and not number(name) > 0:
            refuse(name, "is not positive", fix)
    for name, known in (("benchmark_engine", ENGINES), ("benchmark_backend", MEASUREMENT_BACKENDS)):
        if name in values and values[name] not in known:
            refuse(name, "is unknown", f"pass one of {', '.join(known)}")
    for name, fix in (
        ("benchmark_warmup_s", "pass 0 for no warm-up, or the seconds to warm up each level"),
        ("benchmark_window_s", "pass a window in seconds, or 0 for duration / min windows"),
    ):
        if name in values and not number(name) >= 0:
            refuse(name, "is negative", fix)


def _check_serving_search(values: dict[str, Any],
                          refuse: Callable[[str, str, str], NoReturn]) -> None:
    """The serving search's grid, which only the tune-serving stage, after the gate, would read."""
    for name, least, fix in (
        ("serving_instance_counts", 1, "pass instance counts of 1 or more, e.g. [1, 2], or []"),
        ("serving_queue_delays_us", 0, "pass delays in microseconds, e.g. [100, 2000], or []"),
        ("serving_max_batch_sizes", 1, "pass max batch sizes of 1 or more, e.g. [8, 64], or []"),
    ):
        grid = values.get(name, [])
        if not isinstance(grid, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool)
                and float(v).is_integer() and v >= least for v in grid):  # YAML gives 1.0
            refuse(name, f"is not a list of integers >= {least}", fix + " to keep the default")


def pipeline_parameters(pipeline_yaml: str | Path) -> dict[str, dict[str, Any]]:
    """A compiled pipeline's parameters, name -> {parameterType, defaultValue}; a file that is
    not a compiled pipeline is a ``UserInputError`` saying which to pass."""
    import yaml

    path = Path(pipeline_yaml)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise UserInputError(f"pipeline file '{pipeline_yaml}' {problem}; run 'torchship "
                             "compile' first, or leave it out to compile one")
    try:
        spec = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        spec = None
    if not isinstance(spec, dict) or not isinstance(spec.get("root"), dict) \
            or "pipelineInfo" not in spec:
        raise UserInputError(f"pipeline file '{pipeline_yaml}' is not a compiled pipeline (no "
                             "pipeline spec in it); pass the YAML 'torchship compile' writes")
    return spec["root"].get("inputDefinitions", {}).get("parameters", {})


def compiled_defaults(pipeline_yaml: str | Path) -> dict[str, Any]:
    """The parameter defaults a compiled pipeline YAML declares, integers as integers (the YAML
    writes every number as a float)."""
    parameters = pipeline_parameters(pipeline_yaml)
    return {name: int(p["defaultValue"]) if p.get("parameterType") == "NUMBER_INTEGER"
            else p["defaultValue"]
            for name, p in parameters.items() if "defaultValue" in p}
