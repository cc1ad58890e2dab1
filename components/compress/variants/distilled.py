"""Knowledge distillation: a smaller student of the teacher's kind trained on the fp32 model's
logits softened at a temperature (Hinton et al. 2015)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchship.components.compress.context import Context
from torchship.components.compress.registry import (
    Made,
    Variant,
    option,
    positive,
    register,
    whole_at_least,
    within,
)
from torchship.components.compress.training import fit, logits_of
from torchship.components.data.splits import Split
from torchship.components.models import (
    BUILTIN_MODELS,
    build_model,
    check_model_output,
    count_parameters,
)
from torchship.components.models.huggingface import HF_PREFIX, encoder_layers
from torchship.components.models.specs import Inputs

# A distilled student is the teacher's kind of model, narrower; a user's own model gets an mlp.
DEFAULT_STUDENT_OPTIONS = {"mlp": {"hidden": 256}, "cnn": {"channels": 4},
                           "resnet": {"width": 8, "blocks": [1, 1, 1]}}


def _optional(check):
    return lambda value: None if value is None else check(value)


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "is not a model name"


def _mapping(value: Any) -> str | None:
    return None if isinstance(value, dict) else "is not a mapping of model options"


OPTIONS = (
    option("student_model", None, _optional(_text), "pass mlp, cnn or module:factory",
           "the student's model (default: the teacher's built-in kind, else mlp)"),
    option("student_hidden", None, _optional(whole_at_least(1)), "pass e.g. 256",
           "the student mlp's hidden width"),
    option("student_options", None, _optional(_mapping), 'pass e.g. {"hidden": 256}',
           "build_model options of the student"),
    option("distill_temperature", 4.0, positive, "pass e.g. 4",
           "temperature that softens the teacher's logits"),
    option("distill_alpha", 0.7, within(0, 1, "[]"), "pass e.g. 0.7",
           "weight of the soft targets against the labels"),
    option("distill_epochs", 15, whole_at_least(1), "pass e.g. 15",
           "epochs the student learns for"),
)


def student_spec(teacher_name: str, student_model: str | None, student_hidden: int | None,
                 student_options: dict[str, Any] | None,
                 teacher_layers: int | None = None) -> tuple[str, dict[str, Any]]:
    """The student's model name and build options: by default the teacher's kind of model,
    narrower (a built-in) or with half its encoder layers (an `hf:` model, started from the
    teacher's lower layers); a user's own model gets an mlp."""
    same_family = teacher_name in BUILTIN_MODELS or teacher_name.startswith(HF_PREFIX)
    name = student_model or (teacher_name if same_family else "mlp")
    if student_options is not None:
        options = dict(student_options)
    elif name.startswith(HF_PREFIX):
        options = {"layers": max(1, (teacher_layers or 2) // 2)}
    else:
        options = dict(DEFAULT_STUDENT_OPTIONS.get(name, {}))
    if student_hidden is not None:
        options["hidden"] = student_hidden
    return name, options


def _spec(ctx: Context) -> tuple[str, dict[str, Any]]:
    layers = encoder_layers(getattr(ctx.fp32, "model", ctx.fp32))
    return student_spec(ctx.spec["model_name"], ctx.options["student_model"],
                        ctx.options["student_hidden"], ctx.options["student_options"],
                        len(layers) if layers is not None else None)


def prepare(ctx: Context) -> None:
    """A bad student spec fails before any work, not after pruning."""
    name, options = _spec(ctx)
    contract, n_classes = ctx.contract, ctx.contract.n_classes
    check_model_output(build_model(name, contract, n_classes, options), contract, n_classes,
                       name=name)


def distill(
    teacher: nn.Module, train: Split, student_model: str,
    student_options: dict[str, Any], inputs: Inputs, n_classes: int, temperature: float,
    alpha: float, epochs: int, training: dict[str, Any],
) -> nn.Module:
    """Train a fresh `student_model` on the teacher's soft targets (Hinton et al. 2015).

    Loss: alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * cross-entropy
    with the labels; T^2 keeps the soft term's gradients on the scale of the hard one.
    """
    torch.manual_seed(training["seed"])
    student = build_model(student_model, inputs, n_classes, student_options)
    if student_model.startswith(HF_PREFIX):
        # Fewer layers of the teacher's kind start from the trained teacher's lower layers.
        own = student.state_dict()
        student.load_state_dict({key: value for key, value in teacher.state_dict().items()
                                 if key in own and own[key].shape == value.shape}, strict=False)
    check_model_output(student, inputs, n_classes, name=student_model)
    soft_targets = logits_of(teacher, train)

    def loss(model_logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor
             ) -> torch.Tensor:
        soft = F.kl_div(F.log_softmax(model_logits / temperature, dim=1),
                        F.log_softmax(teacher_logits / temperature, dim=1),
                        reduction="batchmean", log_target=True)
        return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(model_logits, y)

    fit(student, train, epochs, loss, extra=soft_targets, **training)
    return student.eval()



def make(ctx: Context) -> Made:
    name, options = _spec(ctx)
    temperature, alpha, epochs = (ctx.options[key] for key in (
        "distill_temperature", "distill_alpha", "distill_epochs"))
    student = distill(ctx.fp32, ctx.splits["train"], name, options, ctx.contract,
                      ctx.contract.n_classes, temperature, alpha, epochs, ctx.training)
    return Made(model=student, model_name=name, model_options=options, settings={
        "student_model": name, "student_options": options, "temperature": temperature,
        "alpha": alpha, "epochs": epochs, "teacher_parameters": count_parameters(ctx.fp32)[0]})


VARIANT = register(Variant(
    name="distilled", order=30, kind="distillation", format="torch", make=make, prepare=prepare,
    options=tuple(opt.name for opt in OPTIONS),
    description="a smaller student trained on the fp32 model's soft targets at a temperature",
))
