"""deploy_to: the deploy stage. It routes the gate's chosen model to a registered target (see
`targets/`) with Triton's serving settings, and checks a target's settings up front."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

from torchship.components.contracts import ServingSettings
from torchship.components.deploy.registry import DeployRequest
from torchship.components.deploy.targets import get_target
from torchship.components.errors import UserInputError

__all__ = ["DEFAULT_TARGET", "check_deploy_settings", "deploy_to"]

# The embedded default: a new version in a local Triton repository.
DEFAULT_TARGET = "local"


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
    progress: Callable[[str], None] = print,
) -> dict:
    """Deploy `onnx_dir` to `target`, building its repository at `repository_dir` (the stage's
    artifact, at `repository_uri`). `settings` are the target's own (pipeline parameter
    `deploy_settings`); `local_repository` is the persistent repository a local deploy adds a
    version to. `serving` holds the Triton settings the serving search chose (`instance_count`,
    `max_queue_delay_us`); a serving setting also given in `settings` wins. Returns the target's
    result with a one-line `summary`."""
    entry = get_target(target)
    settings = dict(settings or {})
    check_deploy_settings(target, settings)
    overrides = {key: settings.pop(key) for key in list(settings)
                 if key in ServingSettings.names()}
    request = DeployRequest(
        onnx_dir=str(onnx_dir), repository_dir=str(repository_dir),
        repository_uri=repository_uri, test_path=str(test_path),
        local_repository=local_repository, settings=settings,
        serving=ServingSettings().with_values(serving).with_values(overrides),
        progress=progress,
    )
    return entry.deploy(request)


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
