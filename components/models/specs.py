"""Model specs: a built-in (`mlp`, `cnn`, `resnet`) or a user's `module:factory`, built for a
tensor contract, checked on a batch of the contract's inputs; and those inputs as tensors."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torchship.components.contracts import TensorContract, TensorSpec
from torchship.components.errors import UserInputError, one_line
from torchship.components.models.builtin import CNN, MLP, ResNet, image_shape
from torchship.components.models.huggingface import (
    HF_PREFIX,
    build_huggingface,
    check_directory,
)

__all__ = ["BUILTIN_MODELS", "as_contract", "build_model", "check_model_output",
           "count_parameters", "example_inputs", "shape_text"]

BUILTIN_MODELS = ("mlp", "cnn", "resnet")
# A sequence axis, where a dummy batch needs a length.
DUMMY_SEQUENCE = 8

Inputs = int | TensorContract | Sequence[TensorSpec]


def as_contract(inputs: Inputs, n_classes: int) -> TensorContract:
    """The contract of a model of `n_classes` over `inputs`: a number of table features, the
    input specs, or a whole contract."""
    if isinstance(inputs, TensorContract):
        return inputs
    if isinstance(inputs, int):
        return TensorContract.table(inputs, n_classes)
    return TensorContract.classifier(list(inputs), n_classes)


def shape_text(spec: TensorSpec, batch: int | str = "batch") -> str:
    return "[" + ", ".join(str(d) for d in (batch, *spec.sample_shape)) + "]"


def _one_fixed_input(contract: TensorContract, model: str) -> TensorSpec:
    spec = contract.inputs[0]
    if len(contract.inputs) != 1 or not spec.fixed or spec.integer:
        shown = ", ".join(f"{s.name} {s.dtype} {shape_text(s)}" for s in contract.inputs)
        raise UserInputError(
            f"model '{model}' takes one float input of fixed shape, got {shown}; pass a model "
            "for these inputs (hf:PATH, or a module:factory of your own)"
        )
    return spec


def _mlp(contract: TensorContract, **options: Any) -> nn.Module:
    spec = _one_fixed_input(contract, "mlp")
    return MLP(spec.size, contract.n_classes, **options)


def _cnn(contract: TensorContract, **options: Any) -> nn.Module:
    spec = _one_fixed_input(contract, "cnn")
    shape = spec.sample_shape if len(spec.sample_shape) == 3 else spec.size
    return CNN(image_shape(shape, "cnn"), contract.n_classes, **options)


def _resnet(contract: TensorContract, **options: Any) -> nn.Module:
    spec = _one_fixed_input(contract, "resnet")
    if len(spec.sample_shape) != 3:
        raise UserInputError(
            f"model 'resnet' needs images [C, H, W], got input '{spec.name}' "
            f"{shape_text(spec)}; pass an image folder or digits-images as the data source, or "
            "--model mlp"
        )
    return ResNet(tuple(spec.sample_shape), contract.n_classes, **options)


_BUILDERS = {"mlp": (_mlp, MLP), "cnn": (_cnn, CNN), "resnet": (_resnet, ResNet)}


def build_model(
    name: str, inputs: Inputs, n_classes: int, options: dict[str, Any] | None = None
) -> nn.Module:
    """Build a fresh, untrained model from its spec: `mlp`, `cnn`, `resnet` or
    `module:factory`, for `inputs` (a number of table features, or the contract's input specs)
    and `n_classes`.

    `options` are keyword arguments for the model (`hidden`, `depth`, `dropout` for the mlp,
    `channels` for the cnn, `width` and `blocks` for the resnet, anything the factory takes): a
    distilled student is the same kind of model, only narrower.
    """
    options = whole_numbers(dict(options or {}))
    contract = as_contract(inputs, n_classes)
    if name in _BUILDERS:
        check_model_spec(name, options)
        builder, module = _BUILDERS[name]
        accepted = [p for p in inspect.signature(module).parameters
                    if p not in ("n_features", "in_shape", "n_classes")]
        try:
            return builder(contract, **options)
        except UserInputError:
            raise  # the builder's own message already names the input and the fix
        except (TypeError, ValueError) as error:  # a width of "wide", blocks of 2.5, ...
            raise UserInputError(
                f"model {name!r} could not be built with options {options} "
                f"({one_line(error, 160, with_type=True)}); pass numbers for "
                f"{', '.join(accepted)} (lists of whole numbers where it takes several)") from error
    if isinstance(name, str) and name.startswith(HF_PREFIX):
        return build_huggingface(name, contract, options)
    if isinstance(name, str) and ":" in name:
        return _build_from_factory(name, contract, options)
    raise UserInputError(
        f"model {name!r} is unknown; pass one of {', '.join(BUILTIN_MODELS)}, hf:DIR (a Hugging "
        "Face model directory), or 'module:factory' for your own (called as factory(inputs=..., n_classes=...), or "
        "factory(n_features=..., n_classes=...) for a table)"
    )


def whole_numbers(value: Any) -> Any:
    """`value` with every float that is a whole number made an int, in lists and dicts too.

    Options reach a component through the pipeline as a protobuf Struct, which holds numbers
    as doubles only: `{"width": 16}` arrives as `{"width": 16.0}`, which no layer size takes."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [whole_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: whole_numbers(item) for key, item in value.items()}
    return value


def _factory_arguments(factory: Any, contract: TensorContract) -> dict[str, Any]:
    """What a factory is called with: `n_classes`, and the input spec as `inputs` (a tuple of
    TensorSpec) or, for one fixed float input that it asks for by name, `n_features`."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        parameters = {}
    arguments: dict[str, Any] = {}
    takes_inputs = "inputs" in parameters
    takes_features = "n_features" in parameters
    if not takes_inputs and not takes_features:
        # Neither named: a table gets the call it always got, anything else the input spec.
        takes_features, takes_inputs = contract.n_features is not None, \
            contract.n_features is None
    if takes_inputs:
        arguments["inputs"] = contract.inputs
    if takes_features:
        arguments["n_features"] = contract.n_features
    arguments["n_classes"] = contract.n_classes
    return arguments


def check_model_spec(name: str, options: dict[str, Any] | None = None) -> None:
    """What can be known of a model spec without data: a built-in's name and options, an
    importable factory, a local hf:DIR with a config.json. ``UserInputError`` otherwise."""
    options = dict(options or {})
    if name in _BUILDERS:
        accepted = [p for p in inspect.signature(_BUILDERS[name][1]).parameters
                    if p not in ("n_features", "in_shape", "n_classes")]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise UserInputError(
                f"model {name!r} does not take options {sorted(options)} (unknown: "
                f"{', '.join(unknown)}); pass only {', '.join(accepted)}")
    elif isinstance(name, str) and name.startswith(HF_PREFIX):
        directory = name[len(HF_PREFIX):]
        if "://" not in directory:  # a remote one is read by the stages that use it
            check_directory(name, directory, Path(directory))
    elif isinstance(name, str) and ":" in name:
        _factory(name)
    else:
        build_model(name, 1, 2)  # its own unknown-model error


def _factory(spec: str) -> tuple[str, Any]:
    """The factory a 'module:factory' spec names: (its attribute name, the callable)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserInputError(
            f"model {spec!r} is not of the form 'module:factory'; pass e.g. 'my_models:make_net'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a user module can fail to import in any way
        raise UserInputError(
            f"model {spec!r}: module '{module_name}' could not be imported "
            f"({one_line(error, 200, with_type=True)}); make it importable (on PYTHONPATH) or pass "
            f"{' or '.join(BUILTIN_MODELS)}"
        ) from error
    factory = getattr(module, attribute, None)
    if factory is None:
        raise UserInputError(
            f"model {spec!r}: module '{module_name}' has no attribute '{attribute}'; "
            "pass the name of a function that builds the model"
        )
    if not callable(factory):
        raise UserInputError(
            f"model {spec!r}: '{attribute}' is not callable (type {type(factory).__name__}); "
            "pass a function called as factory(inputs=..., n_classes=...)"
        )
    return attribute, factory


def _build_from_factory(
    spec: str, contract: TensorContract, options: dict[str, Any]
) -> nn.Module:
    attribute, factory = _factory(spec)
    arguments = {**_factory_arguments(factory, contract), **options}
    try:
        inspect.signature(factory).bind(**arguments)
    except TypeError as error:
        shown = ", ".join(f"{key}=..." for key in arguments)
        raise UserInputError(
            f"model {spec!r}: '{attribute}' cannot be called as {attribute}({shown}) ({error}); "
            "change its signature"
        ) from error
    except ValueError:  # some builtins have no signature; let the call itself decide
        pass
    model = factory(**arguments)
    if not isinstance(model, nn.Module):
        raise UserInputError(
            f"model {spec!r}: '{attribute}' returned a {type(model).__name__}, not a "
            "torch.nn.Module; return the model from the factory"
        )
    return model


def example_inputs(contract: TensorContract, batch_size: int = 2,
                   rows: Mapping[str, np.ndarray] | None = None,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """A batch of every input in contract order: the first `batch_size` of `rows` (real
    samples) where given, else zeros (ones for integer inputs, a valid token and a full mask),
    with sequence axes of DUMMY_SEQUENCE."""
    tensors = []
    for spec in contract.inputs:
        if rows is not None and spec.name in rows:
            array = np.asarray(rows[spec.name][:batch_size])
            if len(array) < batch_size:  # repeat rows for a batch larger than the sample
                array = np.resize(array, (batch_size, *array.shape[1:]))
        else:
            shape = [batch_size] + [d if isinstance(d, int) else DUMMY_SEQUENCE
                                    for d in spec.sample_shape]
            array = (np.ones if spec.integer else np.zeros)(shape, dtype=spec.dtype)
        tensors.append(torch.from_numpy(np.ascontiguousarray(array, dtype=spec.dtype)).to(device))
    return tuple(tensors)


def check_model_output(
    model: nn.Module, inputs: Inputs, n_classes: int, name: str = "model", batch_size: int = 3
) -> None:
    """Run a dummy batch of the contract's inputs and make sure the model maps it to logits
    [batch, n_classes]."""
    contract = as_contract(inputs, n_classes)
    batch = example_inputs(contract, batch_size)
    if len(contract.inputs) == 1:
        only = contract.inputs[0]
        described = f"{only.dtype} batch of shape {shape_text(only, batch_size)}"
    else:
        described = "batch of " + ", ".join(f"{s.name} {s.dtype} {shape_text(s, batch_size)}"
                                            for s in contract.inputs)
    takes = ", ".join(f"{s.name} {shape_text(s)}" for s in contract.inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(*batch)
    except Exception as error:  # the user's forward can fail in any way
        raise UserInputError(
            f"model '{name}' failed on a {described} "
            f"({one_line(error, 200, with_type=True)}); its forward must take {takes}"
        ) from error
    finally:
        model.train(was_training)
    shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != [batch_size, n_classes]:
        shown = ", ".join(shape_text(s, batch_size) for s in contract.inputs)
        raise UserInputError(
            f"model '{name}' returned {shape} for input {shown}, expected logits "
            f"[{batch_size}, {n_classes}]; make forward return one tensor [batch, n_classes]"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (all parameters, non-zero parameters)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return total, nonzero
