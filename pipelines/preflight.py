"""Preflight: what `torchship run`, `submit` and `schedule create` check before any stage runs, so
that input at fault fails in the first seconds, in one line (exit status 2), with nothing written.

* the pipeline file is a compiled pipeline, and each parameter is one of its parameters, of its
  type (``-p epochs=ten`` names the type) and in range (`parameters.check_parameters`, the
  training settings' own checks);
* defaults that depend on each other follow each other: ``target_concurrency`` defaults to a
  measured level when only the levels are given;
* a local run's folders are folders and writable; the baseline and previous results exist and
  are what they should be;
* the model spec can be built; the data's header or a sample passes data sanity, and its classes
  (and a table's features) match what the target repository serves;
* a run on Vertex AI or Kubeflow reads no path of this machine.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchship.components.errors import UserInputError, one_line
from torchship.pipelines.parameters import (
    TRAINING_PARAMETERS,
    check_parameters,
    pipeline_parameters,
)

if TYPE_CHECKING:
    from torchship.components.data.preview import Preview

__all__ = ["preflight_cloud", "preflight_run"]

# How a compiled pipeline's parameter types read in an error, and an example of each.
_TYPES: dict[str, tuple[str, str]] = {
    "NUMBER_INTEGER": ("a whole number", "10"),
    "NUMBER_DOUBLE": ("a number", "0.5"),
    "STRING": ("a string", "'text'"),
    "BOOLEAN": ("true or false", "true"),
    "LIST": ("a JSON list", "[1, 4]"),
    "STRUCT": ("a JSON object", '\'{"key": 1}\''),
}
# Parameters naming something to read: a run elsewhere cannot read a path of this machine.
_READ_PATHS = ("data_source", "tokenizer", "baseline_uri", "previous_results_uri",
               "statistics_uri")
_BUILT_IN_SOURCES = ("digits", "digits-images")


def preflight_run(pipeline_yaml: str, pipeline_root: str, arguments: dict[str, Any],
                  flags: dict[str, str]) -> list[str]:
    """Check a local run; `arguments` gain the defaults that follow others. `flags` name a
    parameter's command-line option (``num_workers`` -> ``--workers``). Returns notes to print."""
    definitions = pipeline_parameters(pipeline_yaml)
    values, notes = _checked_values(arguments, definitions, flags)
    _check_runner_image(pipeline_yaml, values)
    _check_folder(pipeline_root, "--pipeline-root")
    if values.get("local_repository"):
        _check_folder(values["local_repository"],
                      flags.get("local_repository", "-p local_repository"))
    _check_record(values.get("baseline_uri"), flags.get("baseline_uri", "baseline_uri"),
                  _is_gate_record, "a gate record (with 'variants')",
                  "the gate.json of the run whose model serves now")
    _check_record(values.get("previous_results_uri"),
                  flags.get("previous_results_uri", "previous_results_uri"), _is_results,
                  "benchmark results (with 'results')", "the results.json a previous run wrote")
    from torchship.components.data.preview import preview_source

    preview = preview_source(str(values.get("data_source", "")),
                             str(values.get("label_column", "")),
                             str(values.get("text_column", "")))
    _check_model(values, preview)
    _check_data(values, preview, flags)
    return notes


def preflight_cloud(template: str, arguments: dict[str, Any], where: str) -> list[str]:
    """Check a run for Vertex AI or Kubeflow (`where`): the parameters, against the template's
    own when it is a local file, and no path of this machine among them."""
    if "://" in template:  # an Artifact Registry template: its parameters are there
        check_parameters(arguments)
        values, notes = arguments, []
    else:
        values, notes = _checked_values(arguments, pipeline_parameters(template), {})
        _check_runner_image(template, values)
    for name in _READ_PATHS:
        value = values.get(name)
        if isinstance(value, str) and value and "://" not in value \
                and value not in _BUILT_IN_SOURCES:
            raise UserInputError(
                f"parameter {name}={value!r} is a path on this machine, which {where} cannot "
                "read; upload it (gcloud storage cp) and pass its gs:// URI")
    model = values.get("model_name", "")
    if isinstance(model, str) and model.startswith("hf:") and "://" not in model:
        raise UserInputError(
            f"parameter model_name={model!r} is a directory on this machine, which {where} "
            "cannot read; upload it and pass hf:gs://BUCKET/DIR")
    return notes


def _checked_values(arguments: dict[str, Any], definitions: dict[str, dict],
                    flags: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Names, types, ranges and the defaults that follow others; `arguments` are updated."""
    for name, value in list(arguments.items()):
        arguments[name] = _typed(name, value, definitions)
    defaults = {name: d["defaultValue"] for name, d in definitions.items() if "defaultValue" in d}
    defaults = {name: _typed(name, value, definitions) for name, value in defaults.items()}
    notes = _follow_levels(arguments, defaults)
    values = {**defaults, **arguments}
    check_parameters(arguments, defaults)
    _check_training(values, flags)
    return values, notes


def _typed(name: str, value: Any, definitions: dict[str, dict]) -> Any:
    """`value` as the parameter's type (a whole float as an integer, a number as a string where a
    string is wanted), or a ``UserInputError`` naming the type."""
    if name not in definitions:
        close = difflib.get_close_matches(name, definitions, n=1)
        if close:
            raise UserInputError(f"parameter '{name}' is not a parameter of this pipeline; did "
                                 f"you mean '{close[0]}'?")
        raise UserInputError(f"parameter '{name}' is not a parameter of this pipeline; pass one "
                             f"of {', '.join(sorted(definitions))}")
    kind = definitions[name].get("parameterType", "STRING")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "NUMBER_INTEGER" and number and float(value).is_integer():
        return int(value)
    if kind == "NUMBER_DOUBLE" and number:
        return float(value)
    if kind == "STRING" and (isinstance(value, str) or number):
        return str(value)
    if (kind == "BOOLEAN" and isinstance(value, bool)) or (
            kind == "LIST" and isinstance(value, list)) or (
            kind == "STRUCT" and isinstance(value, dict)):
        return value
    noun, example = _TYPES.get(kind, (kind, "a value"))
    raise UserInputError(f"parameter {name}={value!r} is not {noun}; pass e.g. "
                         f"-p {name}={example}")


def _follow_levels(arguments: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """Measured levels given without a target concurrency: the target follows them (the
    largest level up to the default, else the smallest)."""
    if "benchmark_concurrency" not in arguments or "target_concurrency" in arguments:
        return []
    levels = [int(level) for level in arguments["benchmark_concurrency"]
              if isinstance(level, (int, float)) and not isinstance(level, bool)]
    default = defaults.get("target_concurrency")
    if not levels or default is None or default in levels:
        return []
    below = [level for level in levels if level <= default]
    target = max(below) if below else min(levels)
    arguments["target_concurrency"] = target
    which = "largest measured level up to" if below else "smallest measured level above"
    return [f"target concurrency {target}: the {which} the default {default}"]


def _check_runner_image(pipeline_yaml: str, values: dict[str, Any]) -> None:
    """A Dataflow data step's workers run the pipeline's image, so it must be in a registry."""
    from torchship.components.data.runners import DATAFLOW, from_parameters

    if values.get("data_runner") != DATAFLOW:
        return
    import yaml

    executors = yaml.safe_load(Path(pipeline_yaml).read_text())["deploymentSpec"]["executors"]
    image = next((e["container"]["image"] for name, e in executors.items()
                  if "prepare-data" in name and "container" in e), "")
    replace(from_parameters(values), sdk_container_image=image).check()


def _check_training(values: dict[str, Any], flags: dict[str, str]) -> None:
    from torchship.components.train.config import TrainConfig

    settings = {name: values[name] for name in TRAINING_PARAMETERS if name in values}
    TrainConfig("", "", "", **settings).check(
        lambda name: flags.get(name, f"parameter {name}"))


def _check_folder(path: str, option: str) -> None:
    """`path` is a folder this process may write in, or can be made as one."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{option} '{path}' is a file, not a folder; pass a folder (it is "
                             "made when missing)")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{option} '{path}' cannot be made: '{existing}' is a file; pass "
                             "another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} '{path}': '{existing}' is not writable by this user; "
                             "pass a folder you can write in")


def _is_gate_record(document: Any) -> bool:
    return isinstance(document, dict) and isinstance(document.get("variants"), dict)


def _is_results(document: Any) -> bool:
    document = document.get("benchmark", document) if isinstance(document, dict) else None
    return isinstance(document, dict) and isinstance(document.get("results"), list)


def _check_record(uri: str | None, option: str, is_kind: Callable[[Any], bool], kind: str,
                  fix: str) -> None:
    """A local JSON record exists and is of its kind (a remote one is read by its stage)."""
    if not uri or "://" in uri:
        return
    path = Path(uri)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise UserInputError(f"{option} '{uri}' {problem}; pass {fix}")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserInputError(f"{option} '{uri}' is not JSON ({one_line(error, 80)}); pass "
                             f"{fix}") from error
    if not is_kind(document):
        raise UserInputError(f"{option} '{uri}' is not {kind}; pass {fix}")


def _check_model(values: dict[str, Any], preview: Preview | None) -> None:
    """The model spec; for a table, the model itself, built and called once as training would."""
    from torchship.components.models import build_model, check_model_output, check_model_spec

    name, options = values.get("model_name", "mlp"), values.get("model_options") or None
    check_model_spec(name, options)
    if preview is not None and preview.n_features is not None and not name.startswith("hf:"):
        model = build_model(name, preview.n_features, preview.n_classes, options)
        check_model_output(model, preview.n_features, preview.n_classes, name=name)


def _check_data(values: dict[str, Any], preview: Preview | None, flags: dict[str, str]) -> None:
    """The data's classes and features against the repository it goes to (data sanity on a
    sample ran in `preview_source`)."""
    repository = values.get("local_repository")
    if preview is None or not repository or values.get("deploy_target", "local") != "local":
        return
    from torchship.components.triton.config import describe_config, read_model_config

    for config_path in sorted(Path(repository).glob("*/config.pbtxt")):
        config = describe_config(read_model_config(config_path))
        outputs, inputs, model = config["outputs"], config["inputs"], config["name"]
        served = outputs[0]["dims"][-1] if outputs and outputs[0]["dims"] else None
        takes = inputs[0]["dims"] if len(inputs) == 1 else []
        problem = None
        if served not in (None, -1) and served != preview.n_classes:
            problem = f"{preview.n_classes} classes, but model '{model}' there answers {served}"
        elif (preview.n_features is not None and len(takes) == 1
              and takes[0] not in (-1, preview.n_features)):
            problem = f"{preview.n_features} features, but model '{model}' there takes {takes[0]}"
        if problem:
            option = flags.get("local_repository", "-p local_repository")
            raise UserInputError(
                f"data source '{preview.source}' has {problem} in {repository}; deploy to a new "
                f"repository ({option} DIR) or pass data of the same shape")
