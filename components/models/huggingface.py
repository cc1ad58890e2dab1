"""`hf:PATH` models: a Hugging Face sequence-classification model saved with `save_pretrained`
(config and weights; a local directory or `gs://`), loaded offline, called with the contract's
token inputs and giving logits. Its tokenizer is, by default, the one saved beside it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchship.components.contracts import HF_PREFIX, TensorContract
from torchship.components.errors import UserInputError, one_line
from torchship.components.files import local_directory

__all__ = ["HF_PREFIX", "HuggingFaceClassifier", "build_huggingface", "check_directory",
           "check_vocabulary",
           "encoder_layers"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never ask a hub for anything
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's list of transformer layers (BERT, RoBERTa, ELECTRA: `encoder.layer`)."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    return layers if isinstance(layers, nn.ModuleList) else None


class HuggingFaceClassifier(nn.Module):
    """The model, called positionally with the contract's inputs (in its order), returning the
    logits alone: what export, Triton and the stages expect of every model."""

    def __init__(self, model: nn.Module, input_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs))).logits


def check_directory(name: str, uri: str, directory: Path) -> None:
    """A model directory as save_pretrained writes one: its config and its weights."""
    if not directory.is_dir():
        raise UserInputError(
            f"model {name!r}: '{uri}' is not a directory; pass the directory a model was "
            "saved to with save_pretrained")
    if not (directory / "config.json").is_file():
        raise UserInputError(
            f"model {name!r}: '{uri}' has no config.json; pass a directory written by "
            "save_pretrained")
    if not any((directory / file).is_file() for file in WEIGHT_FILES):
        raise UserInputError(
            f"model {name!r}: '{uri}' has no weights ({' or '.join(WEIGHT_FILES[::2])}); "
            "save the model with save_pretrained, or pass the directory that has them")


def build_huggingface(name: str, contract: TensorContract,
                      options: dict[str, Any]) -> HuggingFaceClassifier:
    """`hf:PATH` for `contract`, with `n_classes` outputs (a head of another size is made anew)
    and, with option `layers`, only the first that many encoder layers (a distilled student,
    started from the teacher's own lower layers)."""
    uri = name[len(HF_PREFIX):]
    unknown = sorted(set(options) - {"layers"})
    if unknown:
        raise UserInputError(f"model {name!r} does not take options {unknown}; pass only layers")
    if not all(spec.integer for spec in contract.inputs):
        shown = ", ".join(f"{s.name} {s.dtype}" for s in contract.inputs)
        raise UserInputError(
            f"model {name!r} takes token inputs (input_ids, attention_mask), got {shown}; pass "
            "a text table with --text-column, or a model for these inputs")
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    with local_directory(uri) as directory:
        check_directory(name, uri, directory)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(directory), num_labels=contract.n_classes, ignore_mismatched_sizes=True,
                local_files_only=True)
        except Exception as error:  # transformers raises many kinds for a bad directory
            raise UserInputError(
                f"model {name!r} could not be loaded ({one_line(error, 200, with_type=True)}); "
                "pass a directory written by a model's save_pretrained") from error
    layers = options.get("layers")
    if layers is not None:
        kept = encoder_layers(model)
        if kept is None or not isinstance(layers, int) or not 1 <= layers <= len(kept):
            total = "?" if kept is None else len(kept)
            raise UserInputError(
                f"model {name!r}: option layers={layers!r} must keep 1 to {total} of its "
                "encoder layers (encoder.layer)")
        del kept[layers:]
        model.config.num_hidden_layers = layers
    return HuggingFaceClassifier(model, contract.input_names)


def check_vocabulary(model: nn.Module, name: str, tokenizer: str, vocab_size: int,
                     largest_id: int, length: int = 0) -> None:
    """A tokenizer whose ids the model's embedding does not have is refused (its ids would be
    out of range, or mean other words), and so are sequences of `length` tokens longer than the
    model's position embeddings."""
    config = getattr(getattr(model, "model", None), "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise UserInputError(
            f"the splits' sequences are {length} tokens but model {name!r} takes at most "
            f"{positions} (max_position_embeddings); run prepare-data with max_length {positions} "
            "or less")
    size = getattr(config, "vocab_size", None)
    if size is None:
        return
    if vocab_size != size or largest_id >= size:
        raise UserInputError(
            f"tokenizer '{tokenizer}' has a vocabulary of {vocab_size} tokens (ids up to "
            f"{largest_id}) but model {name!r} embeds {size}; pass the tokenizer saved with the "
            "model (--tokenizer, or leave it out to use the model directory's own)")
