"""The torchship DAG (data -> train -> compress -> export -> benchmark -> gate -> tune-serving ->
deploy) and its compiler."""

import inspect
import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from kfp import compiler, dsl
from kfp.dsl import HTML, Artifact, Markdown

from torchship.components.errors import UserInputError
from torchship.pipelines.components import Components, build_components

PIPELINE_NAME = "torchship"
IMAGE_ENV = "TORCHSHIP_IMAGE"
STAGES = ("prepare-data", "train", "compress", "export", "benchmark", "gate", "tune-serving",
          "deploy")


def default_image() -> str:
    """The component image: $TORCHSHIP_IMAGE, else the tag `make images` gives the local build."""
    return os.environ.get(IMAGE_ENV) or f"torchship-cpu:{version('torchship')}"


Outputs = NamedTuple(  # noqa: UP014 - KFP's form
    "Outputs", summary=Markdown, results=Artifact, gate_record=Artifact, report=HTML)
TARGETS = ("local", "vertex")
# Variants the pipeline makes by default: fp16 and dynamic int8 are for GPU serving and for
# comparison; ask for them with the `variants` parameter.
DEFAULT_VARIANTS = ["fp32", "pruned", "structured", "distilled", "int8"]


def _after_training(ops: Components, data: dsl.PipelineTask, trained: dsl.PipelineTask,
                    params: dict[str, Any]) -> Outputs:
    """compress -> export -> benchmark -> gate -> (if it passed) tune-serving -> deploy, on every
    target."""
    variants = ops.compress(
        model=trained.outputs["model"], train=data.outputs["train"],
        val=data.outputs["val"], test=data.outputs["test"],
        target_sparsity=params["target_sparsity"], finetune_epochs=params["finetune_epochs"],
        quantize=params["quantize"], seed=params["seed"], variant_names=params["variants"],
        calibration_method=params["calibration_method"],
    )
    exported = ops.export(variants=variants.outputs["variants"], test=data.outputs["test"])
    measured = ops.benchmark(
        onnx_models=exported.outputs["onnx_models"], test=data.outputs["test"],
        concurrency=params["benchmark_concurrency"], **_measurement(params),
    )
    decided = ops.gate(
        onnx_models=exported.outputs["onnx_models"], results=measured.outputs["results"],
        test=data.outputs["test"],
        max_accuracy_drop_pt=params["max_accuracy_drop_pt"],
        max_size_bytes=params["max_size_bytes"], optimise=params["optimise"],
        accuracy_floor=params["accuracy_floor"], baseline_uri=params["baseline_uri"],
        latency_budget_p99_ms=params["latency_budget_p99_ms"],
        target_concurrency=params["target_concurrency"],
        previous_results_uri=params["previous_results_uri"],
        max_p99_regression_pct=params["max_p99_regression_pct"],
    )
    with dsl.If(decided.outputs["Output"] == True, name="gate-passed"):
        tuned = ops.tune_serving(
            chosen_model=decided.outputs["chosen_model"], test=data.outputs["test"],
            instance_counts=params["serving_instance_counts"],
            queue_delays_us=params["serving_queue_delays_us"], optimise=params["optimise"],
            latency_budget_p99_ms=params["latency_budget_p99_ms"],
            target_concurrency=params["target_concurrency"], **_measurement(params),
        )
        ops.deploy(
            chosen_model=decided.outputs["chosen_model"], test=data.outputs["test"],
            serving_record=tuned.outputs["record"],
            target=params["deploy_target"], local_repository=params["local_repository"],
            settings=params["deploy_settings"],
        )
    return Outputs(summary=measured.outputs["summary"], results=measured.outputs["results"],
                   gate_record=decided.outputs["record"], report=decided.outputs["report_html"])


DESCRIPTION = "PyTorch model from raw data to a benchmarked NVIDIA Triton deployment."

# A pipeline's parameters as (name, type, default). KFP reads them from the pipeline function's
# signature, so each target's signature is built from one of these.
Parameters = tuple[tuple[str, Any, Any], ...]
# The parameters of every target.
PARAMETERS: Parameters = (
    ("data_source", str, "digits"),
    ("label_column", str, "label"),
    ("statistics_uri", str, ""),
    ("model_name", str, "mlp"),
    ("epochs", int, 10),
    ("batch_size", int, 64),
    ("learning_rate", float, 0.001),
    ("num_workers", int, 2),
    ("seed", int, 0),
    ("target_sparsity", float, 0.8),
    ("finetune_epochs", int, 2),
    ("quantize", bool, True),
    ("variants", list[str], DEFAULT_VARIANTS),
    ("calibration_method", str, "minmax"),
    ("benchmark_concurrency", list[int], [1, 4]),
    ("benchmark_batch_size", int, 1),
    ("benchmark_duration_s", float, 3.0),
    # Each level runs min to max windows, until its windows agree within stability_pct.
    ("benchmark_warmup_s", float, 1.0),
    ("benchmark_window_s", float, 0.0),  # 0: benchmark_duration_s / benchmark_min_windows
    ("benchmark_min_windows", int, 3),
    ("benchmark_max_windows", int, 10),
    ("benchmark_stability_pct", float, 15.0),
    ("max_accuracy_drop_pt", float, 1.0),
    ("max_size_bytes", int, 0),
    ("optimise", str, "latency"),
    ("accuracy_floor", float, 0.0),
    ("baseline_uri", str, ""),
    ("latency_budget_p99_ms", float, 0.0),
    ("target_concurrency", int, 4),
    ("previous_results_uri", str, ""),
    ("max_p99_regression_pct", float, 10.0),
    # The serving search's grid (Triton settings of the chosen model); [] keeps that default.
    ("serving_instance_counts", list[int], [1, 2]),
    ("serving_queue_delays_us", list[int], [100, 2000]),
    ("deploy_target", str, "local"),
    ("local_repository", str, ""),
    ("deploy_settings", dict, {}),
)
# The vertex target scales training out over replicas (one process each by default), sized by
# the parameters it adds.
VERTEX_PARAMETERS: Parameters = (
    *((name, kind, 1 if name == "num_workers" else default) for name, kind, default in PARAMETERS),
    ("train_replica_count", int, 2),
    ("train_machine_type", str, "n1-standard-8"),
    ("train_accelerator_type", str, ""),
    ("train_accelerator_count", int, 0),
    ("vertex_location", str, "us-central1"),
)
# How the benchmark and tune-serving stages measure a level: pipeline parameter
# `benchmark_<name>` is their argument `<name>`.
MEASUREMENT_PARAMETERS = ("batch_size", "duration_s", "warmup_s", "window_s", "min_windows",
                          "max_windows", "stability_pct")
# Pipeline parameters the train component takes under the same names, on every target.
TRAINING_PARAMETERS = ("model_name", "epochs", "batch_size", "learning_rate", "num_workers", "seed")


def _measurement(params: dict[str, Any]) -> dict[str, Any]:
    """The measurement method's arguments, as benchmark and tune-serving both take them."""
    return {name: params[f"benchmark_{name}"] for name in MEASUREMENT_PARAMETERS}


def build_pipeline(image: str, target: str = "local") -> Callable:
    """The pipeline function for `target`, with every component's base image set to `image`.

    `local` trains with N processes on one machine (kfp.local, one Kubeflow pod); `vertex` runs
    the train task as a Vertex AI multi-replica custom job whose size is a pipeline parameter.
    """
    if target not in TARGETS:
        raise UserInputError(f"target {target!r} is unknown; pass one of {', '.join(TARGETS)}")
    ops = build_components(image, vertex=target == "vertex")
    if target == "local":
        return _pipeline(ops, PARAMETERS, _train_in_one_task)
    return _pipeline(ops, VERTEX_PARAMETERS, _train_as_vertex_job)


TrainStep = Callable[[Components, dsl.PipelineTask, dict[str, Any]], dsl.PipelineTask]


def _pipeline(ops: Components, parameters: Parameters, train: TrainStep) -> Callable:
    """The pipeline taking `parameters`: prepare-data, then `train`, then every later stage."""
    signature = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                           annotation=kind) for name, kind, default in parameters],
        return_annotation=Outputs,
    )

    def torchship_pipeline(*args: Any, **kwargs: Any) -> Outputs:
        bound = signature.bind(*args, **kwargs)  # KFP passes one channel a parameter, in order
        bound.apply_defaults()
        params = bound.arguments
        data = ops.prepare_data(data_source=params["data_source"],
                                label_column=params["label_column"], seed=params["seed"],
                                statistics_uri=params["statistics_uri"])
        return _after_training(ops, data, train(ops, data, params), params)

    torchship_pipeline.__signature__ = signature  # what KFP's compiler reads
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(torchship_pipeline)


def _train_in_one_task(ops: Components, data: dsl.PipelineTask,
                       params: dict[str, Any]) -> dsl.PipelineTask:
    """DDP over `num_workers` processes in one task (kfp.local, one Kubeflow pod)."""
    return ops.train(train=data.outputs["train"], val=data.outputs["val"],
                     **{name: params[name] for name in TRAINING_PARAMETERS})


def _train_as_vertex_job(ops: Components, data: dsl.PipelineTask,
                         params: dict[str, Any]) -> dsl.PipelineTask:
    """A Vertex AI custom job of `train_replica_count` machines, sized at run time."""
    pools = ops.vertex_worker_pools(
        template=ops.train_custom_job_template, replica_count=params["train_replica_count"],
        machine_type=params["train_machine_type"],
        accelerator_type=params["train_accelerator_type"],
        accelerator_count=params["train_accelerator_count"],
    )
    return ops.train_custom_job(
        train=data.outputs["train"], val=data.outputs["val"],
        **{name: params[name] for name in TRAINING_PARAMETERS},
        worker_pool_specs=pools.output, location=params["vertex_location"],
    )


def compile_pipeline(output: str | Path, image: str | None = None, target: str = "local") -> Path:
    """Write the pipeline YAML (the contract every runner executes) and return its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp{output.suffix}")  # kfp checks the suffix
    compiler.Compiler().compile(build_pipeline(image or default_image(), target), str(tmp))
    tmp.replace(output)
    return output


def check_parameters(arguments: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
    """Refuse, before anything runs, parameter values that would fail only hours later at the
    compress stage or the gate. `defaults` fill in what `arguments` leave out."""
    from torchship.components.compress.stage import ONNX_VARIANTS, TORCH_VARIANTS
    from torchship.components.compress.variants.int8 import CALIBRATION_METHODS

    values = {**(defaults or {}), **arguments}

    def refuse(name: str, problem: str, fix: str) -> NoReturn:
        raise UserInputError(f"parameter {name}={values[name]!r} {problem}; {fix}")

    if "latency_budget_p99_ms" in arguments and float(arguments["latency_budget_p99_ms"]) == 0:
        refuse("latency_budget_p99_ms", "is a p99 budget no server can meet",
               "pass a positive budget in ms, or leave it out for none")
    for name in ("latency_budget_p99_ms", "max_accuracy_drop_pt", "max_size_bytes",
                 "max_p99_regression_pct", "accuracy_floor"):
        if name in values and float(values[name]) < 0:
            refuse(name, "is negative", "pass 0 for no limit or a positive value")
    known = (*TORCH_VARIANTS, *ONNX_VARIANTS)
    if "variants" in values:
        unknown = [v for v in values["variants"] if v not in known]
        if unknown or not values["variants"]:
            refuse("variants", f"names no variant or unknown ones ({', '.join(unknown)})",
                   f"pass some of {', '.join(known)}")
    if "calibration_method" in values and values["calibration_method"] not in CALIBRATION_METHODS:
        refuse("calibration_method", "is unknown", f"pass one of {', '.join(CALIBRATION_METHODS)}")
    _check_benchmark_sweep(values, refuse)
    if "deploy_target" in values or "deploy_settings" in values:
        from torchship.components.deploy.targets.local import check_deploy_settings

        settings = values.get("deploy_settings") or {}
        if not isinstance(settings, dict):
            refuse("deploy_settings", "is not a JSON object",
                   "pass e.g. -p deploy_settings='{\"project\": \"my-project\"}'")
        check_deploy_settings(values.get("deploy_target", "local"), settings)
    if "target_concurrency" in values and "benchmark_concurrency" in values:
        levels = [int(level) for level in values["benchmark_concurrency"]]
        if int(values["target_concurrency"]) not in levels:
            refuse("target_concurrency", f"is not a measured level ({levels})",
                   "pass one of the benchmark concurrency levels, or add it to them")
    _check_serving_search(values, refuse)


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
    ):
        grid = values.get(name, [])
        if not isinstance(grid, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool)
                and float(v).is_integer() and v >= least for v in grid):  # YAML gives 1.0
            refuse(name, f"is not a list of integers >= {least}", fix + " to keep the default")


def compiled_defaults(pipeline_yaml: str | Path) -> dict[str, Any]:
    """The parameter defaults a compiled pipeline YAML declares."""
    import yaml

    spec = yaml.safe_load(Path(pipeline_yaml).read_text())
    parameters = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    return {name: p["defaultValue"] for name, p in parameters.items() if "defaultValue" in p}
