"""Text tables as a data source: a CSV/Parquet with a text column and a label column, tokenised by
a tokenizer directory (local or `gs://`, loaded offline with `transformers`), truncated and padded
to `max_length`. The model inputs are `input_ids` and `attention_mask`, int64 [batch, sequence]."""

from __future__ import annotations

import os
from typing import Any

from torchship.components.errors import UserInputError, one_line
from torchship.components.files import local_directory, read_json

__all__ = ["TEXT_INPUTS", "check_model_vocabulary", "load_tokenizer"]

TEXT_INPUTS = ("input_ids", "attention_mask")
DEFAULT_MAX_LENGTH = 128


def load_tokenizer(uri: str, what: str = "tokenizer") -> Any:
    """A tokenizer saved with `save_pretrained` in directory `uri` (local or any fsspec URL),
    loaded offline: nothing is fetched from a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    with local_directory(uri) as directory:
        if not directory.is_dir():
            raise UserInputError(
                f"{what} '{uri}' is not a directory; pass the directory a tokenizer was saved "
                "to with save_pretrained (tokenizer.json, tokenizer_config.json)")
        try:
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as error:  # transformers raises many kinds for a bad directory
            raise UserInputError(
                f"{what} '{uri}' could not be loaded ({one_line(error, 200, with_type=True)}); "
                "pass a directory written by a tokenizer's save_pretrained") from error


def check_model_vocabulary(model_name: str, tokens: dict[str, Any], length: int,
                           largest: int) -> None:
    """Refuse, before any split is published, tokens an `hf:DIR` model's embedding does not have
    and sequences longer than its position embeddings. `tokens` says what tokenised the data
    (vocab_size, tokenizer), `length` is the sequence length and `largest` the largest token id
    seen. The model directory's `config.json` alone is read (not the weights)."""
    from torchship.components.contracts import HF_PREFIX

    if not model_name.startswith(HF_PREFIX):
        return
    try:
        config = read_json(f"{model_name[len(HF_PREFIX):].rstrip('/')}/config.json")
    except (OSError, ValueError):
        return  # no readable config: building the model says what is wrong with the directory
    if not isinstance(config, dict):
        return
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and length > positions:
        raise UserInputError(
            f"max_length {length} is longer than model {model_name!r} takes "
            f"(max_position_embeddings {positions}); pass --max-length {positions} or less")
    size = config.get("vocab_size")
    if not isinstance(size, int):
        return
    vocab_size = int(tokens["vocab_size"])
    if vocab_size != size or largest >= size:
        raise UserInputError(
            f"tokenizer '{tokens['tokenizer']}' has a vocabulary of {vocab_size} tokens (ids "
            f"up to {largest}) but model {model_name!r} embeds {size}; pass the tokenizer saved "
            "with the model (--tokenizer, or leave it out to use the model directory's own)")
