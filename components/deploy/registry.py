"""The registry of deploy targets. A target is one module under `targets/` that calls
`register(DeployTarget(...))` when imported; `targets/__init__.py` imports every module there, so
adding a target is adding its module. The deploy stage routes by name, and `torchship run`,
`submit` and `schedule create` check a target's settings against it before anything runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchship.components.contracts import ServingSettings

__all__ = ["DeployRequest", "DeployTarget", "register", "registered_targets", "remote_deploy"]


@dataclass(frozen=True)
class DeployRequest:
    """What the deploy stage hands every target."""

    onnx_dir: str  # the gate's chosen model: <variant>/model.onnx
    repository_dir: str  # the stage's artifact directory, for the repository it builds
    repository_uri: str  # the same artifact's URI (gs:// on Vertex AI)
    test_path: str  # held-out rows for the smoke test
    local_repository: str  # the persistent repository of the local target ("" : the artifact)
    settings: dict[str, Any]  # the target's own settings (pipeline parameter deploy_settings)
    serving: ServingSettings  # Triton's settings: the serving search's, with settings' overrides
    progress: Callable[[str], None]
    # The stable name clients use whichever variant serves (pipeline parameter
    # serving_model_name): the Triton model's name, and the default of a target's own name.
    model_name: str = ""


@dataclass(frozen=True)
class DeployTarget:
    """Where a chosen model can be deployed."""

    name: str
    # Deploy, smoke-test, and roll back on failure; returns the target's result with a one-line
    # `summary` dict (what was deployed where).
    deploy: Callable[[DeployRequest], dict]
    # The function whose keyword arguments are the target's settings, so that a setting it does
    # not take is refused before the run starts. None: the target takes no settings.
    settings_of: Callable[..., Any] | None = None
    required_settings: tuple[str, ...] = ()
    # Keyword arguments of `settings_of` that the stage fills in, which are not settings.
    filled_by_stage: tuple[str, ...] = ("repository_dir", "test_path", "onnx_dir", "serving",
                                        "progress", "model_name")
    # The setting naming what the target deploys (a Vertex AI model, an InferenceService), which
    # defaults to the serving model name; "" for none.
    name_setting: str = ""
    # The name_setting's rule, when the target's own name can be the serving model name:
    # whether a name passes, and the fix to say when it does not.
    name_rule: tuple[Callable[[str], bool], str] | None = None
    description: str = ""


_TARGETS: dict[str, DeployTarget] = {}


def register(target: DeployTarget) -> DeployTarget:
    """Add `target` to the registry (at import of its module); a name is registered once."""
    if target.name in _TARGETS and _TARGETS[target.name] != target:
        raise ValueError(f"deploy target {target.name!r} is registered twice")
    _TARGETS[target.name] = target
    return target


def registered_targets() -> dict[str, DeployTarget]:
    return dict(_TARGETS)


def remote_deploy(deploy: Callable[..., dict], uri_setting: str,
                  summary_keys: tuple[str, ...]) -> Callable[[DeployRequest], dict]:
    """The `DeployTarget.deploy` of a target that builds its repository from the chosen model and
    serves it from a URI: `deploy(repository_dir, test_path, onnx_dir=..., <uri_setting>=...,
    serving=..., progress=..., model_name=..., **settings)`, the artifact's URI unless the
    settings give `uri_setting`; the result's `summary_keys` are its summary."""

    def run(request: DeployRequest) -> dict:
        settings = dict(request.settings)
        uri = settings.pop(uri_setting, request.repository_uri)
        result = deploy(request.repository_dir, request.test_path, onnx_dir=request.onnx_dir,
                        serving=request.serving, progress=request.progress,
                        model_name=request.model_name or None,
                        **{uri_setting: uri}, **settings)
        result["summary"] = {key: result[key] for key in summary_keys}
        return result

    return run
