"""The catalog of deploy targets: every module in this package is imported here, and those that
are targets register themselves (see `deploy.registry`); the others are their helpers."""

from __future__ import annotations

import importlib
import pkgutil

from torchship.components.deploy.registry import DeployTarget, registered_targets
from torchship.components.errors import UserInputError

__all__ = ["get_target", "target_names"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def target_names() -> tuple[str, ...]:
    return tuple(sorted(registered_targets()))


def get_target(name: str) -> DeployTarget:
    """The registered target `name`; a ``UserInputError`` listing the others if there is none."""
    targets = registered_targets()
    if name not in targets:
        raise UserInputError(
            f"deploy target '{name}' is unknown; pass one of {', '.join(target_names())}")
    return targets[name]
