"""The registry of compression variants and of the options they read.

A variant is one module under `variants/` that calls `register(Variant(...))` when imported, and
declares each option it reads with `option(...)`; `variants/__init__.py` imports every module
there, so adding a variant is adding its module. Nothing else lists the variants: the stage makes
what is registered, the pipeline and the command line check names and options against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from torchship.components.compress.context import Context

__all__ = ["Made", "Option", "Variant", "option", "register", "registered_options",
           "registered_variants"]

FORMATS = ("torch", "onnx")
PARITY_CRITERIA = ("max_abs_diff", "top1_agreement")


@dataclass
class Made:
    """What a variant's `make` returns. A torch variant gives its `model` (saved as a checkpoint
    by the stage); an ONNX variant has written `ctx.onnx_target(name)` itself."""

    settings: dict[str, Any] = field(default_factory=dict)  # how it was made, in its record
    model: nn.Module | None = None
    model_name: str | None = None  # when it is another kind of model than the teacher (a student)
    model_options: dict[str, Any] | None = None  # build_model's options (a student's width)
    resized: bool = False  # layers physically shrunk: loading takes shapes from the tensors
    # An ONNX variant made from weights of its own (QAT's fine-tuned model): saved beside it as
    # model.pt, the PyTorch model export checks its parity against.
    reference: nn.Module | None = None
    skipped: str | None = None  # why nothing was made (no layer to prune, say)
    kind: str | None = None  # what it is for this model, where that is not the variant's kind


@dataclass(frozen=True)
class Variant:
    """One way to make a smaller or faster model from the trained fp32 one."""

    name: str
    # Its row in the variant table: the baseline first, the PyTorch variants, then those made
    # on the ONNX graph (by tens, so a new one fits between).
    order: int
    kind: str  # what it is, as the table and its record say: "unstructured_pruning", ...
    format: str  # "torch": a checkpoint that export turns into ONNX; "onnx": made on the graph
    make: Callable[[Context], Made]
    precision: str = "fp32"  # int8 / fp16 variants are dropped when quantize is off
    # How export checks it against its PyTorch source: the logits themselves
    # (max_abs_diff <= atol), or, where the numbers move by design, the decision (top-1).
    parity: str = "max_abs_diff"
    options: tuple[str, ...] = ()  # the options it reads (declared with `option`)
    default: bool = True  # made when no variants are named
    # Checks that need the trained model (a student's spec, a library), run before any work.
    prepare: Callable[[Context], None] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS or self.parity not in PARITY_CRITERIA:
            raise ValueError(f"variant {self.name!r}: format {self.format!r} / parity "
                             f"{self.parity!r}; use one of {FORMATS} / {PARITY_CRITERIA}")


@dataclass(frozen=True)
class Option:
    """A setting of one or more variants, with its default and its check."""

    name: str
    default: Any
    # The problem with a value ("is not in [0, 1)"), or None when it is fine.
    problem: Callable[[Any], str | None]
    fix: str  # what to pass instead: "pass e.g. 0.8"
    help: str = ""

    def refusal(self, value: Any, subject: str) -> str | None:
        """The one-line error for `value` (None when it is fine), e.g. `--prune-steps 0 is not a
        whole number >= 1; pass e.g. 3` with `subject` `--prune-steps 0`."""
        problem = self.problem(value)
        return None if problem is None else f"{subject} {problem}; {self.fix}"


_VARIANTS: dict[str, Variant] = {}
_OPTIONS: dict[str, Option] = {}


def register(variant: Variant) -> Variant:
    """Add `variant` to the registry (at import of its module); a name is registered once."""
    if variant.name in _VARIANTS and _VARIANTS[variant.name] != variant:
        raise ValueError(f"variant {variant.name!r} is registered twice")
    missing = [name for name in variant.options if name not in _OPTIONS]
    if missing:
        raise ValueError(f"variant {variant.name!r} reads undeclared options {missing}")
    _VARIANTS[variant.name] = variant
    return variant


def option(name: str, default: Any, problem: Callable[[Any], str | None], fix: str,
           help: str = "") -> Option:
    """Declare an option (at import of a variant module); variants that share one declare it in
    a module they share, so it has one default."""
    declared = Option(name, default, problem, fix, help)
    if name in _OPTIONS and _OPTIONS[name].default != default:
        raise ValueError(f"option {name!r} is declared twice with different defaults")
    _OPTIONS.setdefault(name, declared)
    return _OPTIONS[name]


def registered_variants() -> dict[str, Variant]:
    return dict(_VARIANTS)


def registered_options() -> dict[str, Option]:
    return dict(_OPTIONS)


# Checks shared by option declarations.


def whole_at_least(least: int) -> Callable[[Any], str | None]:
    def problem(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
        return None if ok else f"is not a whole number >= {least}"
    return problem


def within(low: float, high: float, closed: str = "[)") -> Callable[[Any], str | None]:
    """In the interval from `low` to `high`, `closed` saying which ends belong (`[)`, `()`...)."""
    def problem(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not a number"
        above = value >= low if closed[0] == "[" else value > low
        below = value <= high if closed[1] == "]" else value < high
        return None if above and below else f"is not in {closed[0]}{low:g}, {high:g}{closed[1]}"
    return problem


def positive(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "is not a number"
    return None if value > 0 else "is not positive"


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def problem(value: Any) -> str | None:
        return None if value in choices else "is unknown"
    return problem
