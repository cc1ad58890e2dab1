"""deploy_to: the deploy stage. It routes the gate's chosen model to a registered target (see
`targets/`) with Triton's serving settings, under one stable model name whichever variant was
chosen, and checks a target's settings and that name up front."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torchship.components.contracts import ServingSettings
from torchship.components.deploy.reference import PIPELINE
from torchship.components.deploy.registry import DeployRequest
from torchship.components.deploy.targets import get_target
from torchship.components.errors import UserInputError
from torchship.components.triton.repository import is_model_name, onnx_variants

__all__ = ["DEFAULT_SERVING_NAME", "DEFAULT_TARGET", "check_deploy_settings",
           "check_serving_model_name", "deploy_to"]

# The embedded default: a new version in a local Triton repository.
DEFAULT_TARGET = "local"
# The name clients call, whichever variant a run chose: the pipeline's name, which does not
# change when new data arrives under another file name (a data source's stem would).
DEFAULT_SERVING_NAME = PIPELINE


def deploy_to(
    target: str,
    onnx_dir: str | os.PathLike,
    repository_dir: str | os.PathLike,
    repository_uri: str,
    test_path: str | os.PathLike,
    *,
    local_repository: str = "",
    settings: Mapping[str, Any] | None = None,
    serving: Mapping[str, Any] | None = None,
    model_name: str = DEFAULT_SERVING_NAME,
    progress: Callable[[str], None] = print,
) -> dict:
    """Deploy `onnx_dir` to `target`, building its repository at `repository_dir` (the stage's
    artifact, at `repository_uri`). `settings` are the target's own (pipeline parameter
    `deploy_settings`); `local_repository` is the persistent repository a local deploy adds a
    version to. `serving` holds the Triton settings the serving search chose (`instance_count`,
    `max_queue_delay_us`); a serving setting also given in `settings` wins. `model_name` is the
    Triton model's name whichever variant `onnx_dir` holds (and the default Vertex AI model
    display name and InferenceService name). Returns the target's result with a one-line
    `summary`, `serving_model_name` and `variant`."""
    entry = get_target(target)
    settings = dict(settings or {})
    check_deploy_settings(target, settings)
    check_serving_model_name(model_name, target, settings)
    variants = [path.name for path in onnx_variants(Path(onnx_dir))]
    overrides = {key: settings.pop(key) for key in list(settings)
                 if key in ServingSettings.names()}
    if entry.name_setting:
        settings[entry.name_setting] = settings.get(entry.name_setting) or model_name
    request = DeployRequest(
        onnx_dir=str(onnx_dir), repository_dir=str(repository_dir),
        repository_uri=repository_uri, test_path=str(test_path),
        local_repository=local_repository, settings=settings,
        serving=ServingSettings().with_values(serving).with_values(overrides),
        progress=progress, model_name=model_name,
    )
    result = entry.deploy(request)
    variant = variants[0] if len(variants) == 1 else None
    result.update({"serving_model_name": model_name, "variant": variant})
    return result


def check_serving_model_name(name: str, target: str = DEFAULT_TARGET,
                             settings: Mapping[str, Any] | None = None) -> None:
    """Refuse a serving model name Triton (or the target, where the name is its default) would
    refuse, before a run starts."""
    if not is_model_name(name):
        raise UserInputError(
            f"parameter serving_model_name={name!r} is not a valid Triton model name; pass up to "
            "128 letters, digits, '_', '-' or '.', not starting with '.' or '-', e.g. "
            f"'{DEFAULT_SERVING_NAME}'")
    entry = get_target(target)
    if entry.name_rule is None or (settings or {}).get(entry.name_setting):
        return
    passes, fix = entry.name_rule
    if not passes(name):
        raise UserInputError(
            f"parameter serving_model_name={name!r} also names the {target} target's "
            f"{entry.name_setting}, which must be {fix}; pass such a name, or give "
            f"deploy_settings {entry.name_setting}")


def check_deploy_settings(target: str, settings: Mapping[str, Any] | None) -> None:
    """Refuse a deploy target or settings the deploy stage would refuse, hours into a run:
    `torchship run`, `submit` and `schedule create` call this before anything starts."""
    entry = get_target(target)
    settings = dict(settings or {})
    missing = [key for key in entry.required_settings if not settings.get(key)]
    if missing:
        raise UserInputError(
            f"deploy target '{target}' needs deploy_settings {', '.join(missing)}; pass them as "
            f"-p deploy_settings='{{\"{missing[0]}\": ...}}'")
    if entry.settings_of is None:
        if settings:
            raise UserInputError(
                f"deploy_settings {sorted(settings)} are for remote targets; the {target} target "
                "takes local_repository only")
        return
    accepted = (set(inspect.signature(entry.settings_of).parameters)
                - set(entry.filled_by_stage)) | set(ServingSettings.names())
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise UserInputError(
            f"deploy_settings {', '.join(unknown)} are not settings of the '{target}' target; "
            f"use any of {', '.join(sorted(accepted))}")
