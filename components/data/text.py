"""Text tables as a data source: a CSV/Parquet with a text column and a label column, tokenised by
a tokenizer directory (local or `gs://`, loaded offline with `transformers`), truncated and padded
to `max_length`. The model inputs are `input_ids` and `attention_mask`, int64 [batch, sequence]."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from torchship.components.data.sanity import check_label
from torchship.components.data.sources import LoadedSource, class_indices, listed
from torchship.components.errors import UserInputError, one_line
from torchship.components.files import local_directory, read_json

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TEXT_INPUTS", "check_model_vocabulary", "load_tokenizer", "text_source"]

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


def text_source(source: str, table: pd.DataFrame, label_column: str, text_column: str,
                tokenizer_uri: str, max_length: int = DEFAULT_MAX_LENGTH) -> LoadedSource:
    """Tokenise `text_column` of `table`; labels from `label_column`."""
    columns = [str(c) for c in table.columns]
    table.columns = columns
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in columns:
            raise UserInputError(
                f"data source '{source}' has no column '{column}' (columns: {listed(columns)}); "
                f"pass {flag}")
    if not tokenizer_uri:
        raise UserInputError(
            f"data source '{source}' is text (column '{text_column}') and needs a tokenizer; "
            "pass --tokenizer DIR, or --model hf:DIR whose directory holds one")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise UserInputError(f"max_length {max_length!r} is not a whole number >= 2; pass e.g. "
                             f"{DEFAULT_MAX_LENGTH}")
    label = table[label_column]
    if label.isna().any():
        raise UserInputError(
            f"data source '{source}' has {int(label.isna().sum())} rows with no value in label "
            f"column '{label_column}'; fill or drop those rows")
    text = table[text_column]
    if text.isna().any():
        raise UserInputError(
            f"data source '{source}' has {int(text.isna().sum())} rows with no text in column "
            f"'{text_column}'; fill or drop those rows")
    origin = f"label column '{label_column}'"
    check_label(source, label, label_column)
    labels, class_names = class_indices(source, label, origin, "a label column")
    tokenizer = load_tokenizer(tokenizer_uri)
    encoded = tokenizer([str(t) for t in text], max_length=max_length, truncation=True,
                        padding="max_length", return_tensors="np")
    missing = [name for name in TEXT_INPUTS if name not in encoded]
    if missing:
        raise UserInputError(
            f"tokenizer '{tokenizer_uri}' gives no {', '.join(missing)}; pass a tokenizer that "
            "returns input_ids and attention_mask")
    tokens = {name: np.ascontiguousarray(encoded[name], dtype=np.int64) for name in TEXT_INPUTS}
    return LoadedSource(
        np.empty((len(labels), 0), dtype=np.float64), labels, class_names, ["tokens"],
        {text_column: "text", label_column: str(label.dtype)}, labels_from=origin,
        tokens=tokens,
        extra={"vocab_size": np.array(len(tokenizer)), "max_length": np.array(max_length),
               "tokenizer": np.array(str(tokenizer_uri))})


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
