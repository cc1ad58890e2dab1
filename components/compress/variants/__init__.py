"""The catalog of compression variants: every module in this package is imported here, and each
registers its variant (see `compress.registry`). Read the catalog through these functions."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping, Sequence
from typing import Any

from torchship.components.compress.registry import (
    Option,
    Variant,
    registered_options,
    registered_variants,
)
from torchship.components.contracts import BASELINE
from torchship.components.errors import UserInputError

__all__ = ["BASELINE", "all_variants", "check_request", "default_names", "names", "options"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def all_variants() -> list[Variant]:
    """Every registered variant, in table order."""
    return sorted(registered_variants().values(), key=lambda variant: (variant.order, variant.name))


def names() -> tuple[str, ...]:
    return tuple(variant.name for variant in all_variants())


def default_names() -> list[str]:
    """The variants made when none are named (the pipeline's default)."""
    return [variant.name for variant in all_variants() if variant.default]


def options() -> dict[str, Option]:
    return registered_options()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_request(requested: Sequence[str] | None, quantize: bool = True,
                  given: Mapping[str, Any] | None = None) -> tuple[list[Variant], dict[str, Any]]:
    """The variants to make, in order and with the baseline first, and every option's value
    (given, else its default); a bad name or value is a ``UserInputError`` naming it, before
    any work. ``quantize=False`` drops the reduced-precision (int8, fp16) variants."""
    catalog = registered_variants()
    wanted = default_names() if requested is None else list(requested)
    unknown = [name for name in wanted if name not in catalog]
    if unknown:
        raise UserInputError(
            f"--variants names unknown variants {', '.join(map(repr, unknown))}; pass some of "
            f"{', '.join(names())}")
    declared = registered_options()
    given = dict(given or {})
    extra = sorted(set(given) - set(declared))
    if extra:
        raise UserInputError(
            f"compression options {', '.join(extra)} are unknown; use any of "
            f"{', '.join(sorted(declared))}")
    values = {name: given.get(name, opt.default) for name, opt in declared.items()}
    for name, value in values.items():
        refusal = declared[name].refusal(value, f"{flag(name)} {value!r}")
        if refusal:
            raise UserInputError(refusal)
    chosen = [catalog[name] for name in {BASELINE, *wanted}
              if quantize or catalog[name].precision == "fp32"]
    return sorted(chosen, key=lambda variant: (variant.order, variant.name)), values
