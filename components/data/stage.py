"""prepare_data: turn a data source into standardised, stratified train/val/test `.npz` splits."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from torchship.components.contracts import (
    BATCH,
    HF_PREFIX,
    INPUT_NAME,
    SPLITS,
    TensorContract,
    TensorSpec,
)
from torchship.components.data.images import digits_images, load_image_folder
from torchship.components.data.sources import (
    TABLE_SUFFIXES,
    LoadedSource,
    listed,
    load_npz,
    load_table,
    read_table,
    table_source,
)
from torchship.components.data.splits import save_split
from torchship.components.data.text import (
    DEFAULT_MAX_LENGTH,
    check_model_vocabulary,
    text_source,
)
from torchship.components.errors import UserInputError, one_line
from torchship.components.files import write_json

# fsspec, scikit-learn and the Google SDK are imported inside the functions that use them:
# training workers import the data package only to read splits.

# What a user may pass as the source, and its default: the built-in data set.
DEFAULT_SOURCE = "digits"
DEFAULT_LABEL_COLUMN = "label"
# The built-in data read as images: 1 x 8 x 8.
DIGITS_IMAGES = "digits-images"
# image_size 0 keeps the images' own size (they must all have one).
KEEP_IMAGE_SIZE = 0
SOURCE_KINDS = ("a path to a CSV, Parquet or .npz file, a folder of images with one sub-folder "
                "per class, 'digits' or 'digits-images'")
# A feature whose training std is below this is (near) constant: dividing by it would blow up
# rounding noise, so it is left unscaled (std 1) instead.
STD_FLOOR = 1e-6


def prepare_data(
    source: str,
    label_column: str,
    train_path: str,
    val_path: str,
    test_path: str,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    image_size: int = KEEP_IMAGE_SIZE,
    text_column: str = "",
    tokenizer: str = "",
    max_length: int = DEFAULT_MAX_LENGTH,
    model_name: str = "",
) -> dict:
    """Split `source` into standardised train/val/test splits and return its metadata, with the
    tensor contract the splits hold.

    `source` is `digits` (a table of 64 pixels), `digits-images` (1 x 8 x 8 images), a
    CSV/Parquet table with a `label_column`, an `.npz` with arrays `x` and `y`, or a folder of
    images with one sub-folder per class (local or any fsspec URL), resized to `image_size` x
    `image_size` when it is set (0: all must be one size). A table is one float input
    [batch, n_features] standardised per column; images are [batch, C, H, W] standardised per
    channel. With a `text_column` a table is text: tokenised by the `tokenizer` directory (default:
    an `hf:DIR` model's own) to `max_length`, as int64 `input_ids` and `attention_mask`
    [batch, sequence]. Every check on the input runs before the first file is written, so a bad source
    leaves nothing behind.
    """
    _check_fractions(val_fraction, test_fraction)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 0:
        raise UserInputError(f"image_size {image_size!r} is not a whole number >= 0; pass e.g. "
                             "32 to resize images to 32 x 32, or 0 to keep their size")
    if text_column and not tokenizer and model_name.startswith(HF_PREFIX):
        tokenizer = model_name[len(HF_PREFIX):]  # the model's own, saved beside it
    data = load_source(source, label_column, image_size, text_column, tokenizer, max_length)
    if data.text and model_name.startswith(HF_PREFIX):
        check_model_vocabulary(model_name[len(HF_PREFIX):], model_name, data)
    if image_size and not data.images:
        raise UserInputError(f"image_size {image_size} is for image folders and digits-images; "
                             f"data source '{source}' is a table, so leave it out")
    split_index = _stratified_split(source, data, seed, val_fraction, test_fraction)

    class_names = data.class_names
    paths = {"train": train_path, "val": val_path, "test": test_path}
    if data.text:
        contract, statistics = _write_text_splits(data, split_index, paths)
    else:
        contract, statistics = _write_numeric_splits(data, split_index, paths)

    return {
        "source": source,
        "contract": contract.to_dict(),
        "n_features": contract.n_features,
        "n_classes": len(class_names),
        "class_names": list(class_names),
        "feature_names": list(data.feature_names),
        "schema": data.schema,
        "class_counts": {
            split: {
                name: int(count)
                for name, count in zip(
                    class_names,
                    np.bincount(data.labels[split_index[split]], minlength=len(class_names)),
                )
            }
            for split in SPLITS
        },
        "n_rows": {split: len(split_index[split]) for split in SPLITS},
        "warnings": list(data.warnings),
        # Raw training statistics: the drift trigger (infra/trigger) compares new data with them.
        "statistics": {"source": source, "n_rows": len(split_index["train"]), **statistics},
    }


def write_statistics(statistics: dict, uri: str) -> None:
    """Write the training statistics as JSON to a path or any fsspec URI (gs:// included)."""
    write_json(statistics, uri)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserInputError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must each be between "
            "0 and 1 and sum to less than 1; pass e.g. val_fraction=0.15, test_fraction=0.15"
        )


def _check_google_credentials(source: str) -> None:
    """Fail at once, in one line, where Cloud Storage would otherwise retry for a minute."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError as error:
        raise UserInputError(
            f"data source '{source}' needs Google credentials and none were found "
            f"({one_line(error, 160, with_type=True)}); run 'gcloud auth application-default login' or set "
            "GOOGLE_APPLICATION_CREDENTIALS"
        ) from error


def load_source(source: str, label_column: str, image_size: int = 0, text_column: str = "",
                tokenizer: str = "", max_length: int = DEFAULT_MAX_LENGTH) -> LoadedSource:
    """Find out what kind of source `source` is and load it with that kind's loader."""
    import fsspec

    if source == DEFAULT_SOURCE:
        from sklearn.datasets import load_digits

        digits = load_digits(as_frame=True)
        return table_source(source, digits.frame, "target")  # 64 pixel columns plus "target"
    if source == DIGITS_IMAGES:
        return digits_images()

    if not isinstance(source, str) or not source:
        raise UserInputError(f"data source {source!r} is empty; pass {SOURCE_KINDS}")
    if source.startswith(("gs://", "gcs://")):
        _check_google_credentials(source)
    try:
        fs, fs_path = fsspec.core.url_to_fs(source)
    except ValueError as error:  # an unknown protocol; a missing gcsfs/s3fs is an ImportError
        raise UserInputError(
            f"data source '{source}' has an unknown protocol ({one_line(error, 200, with_type=True)}); pass a local "
            "path or a gs://, s3://, https:// URL"
        ) from error
    if not fs.exists(fs_path):
        raise UserInputError(f"data source '{source}' does not exist; pass {SOURCE_KINDS}")
    # The suffix decides before the kind of path does: a directory named like a table is read as
    # one and fails as one, which says more than "not an image folder".
    suffix = Path(fs_path.rstrip("/")).suffix.lower()
    if suffix in TABLE_SUFFIXES and text_column:
        return text_source(source, read_table(source, TABLE_SUFFIXES[suffix]), label_column,
                           text_column, tokenizer, max_length)
    if suffix in TABLE_SUFFIXES:
        return load_table(source, TABLE_SUFFIXES[suffix], label_column)
    if suffix == ".npz":
        return load_npz(source)
    if fs.isdir(fs_path):
        return load_image_folder(source, fs, fs_path, image_size)
    raise UserInputError(
        f"data source '{source}' has unsupported suffix '{suffix}'; "
        f"pass a {', '.join(TABLE_SUFFIXES)} or .npz file, an image folder, or 'digits'"
    )



def _stratified_split(
    source: str,
    data: LoadedSource,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> dict[str, np.ndarray]:
    """Row indices for each split, stratified by class; every class must land in every split."""
    from sklearn.model_selection import train_test_split

    labels, class_names, unit = data.labels, data.class_names, data.row_noun
    # The smallest split must still get one row of each class: sklearn's stratified allocation
    # gives a class floor(count * fraction) rows of a split at least.
    smallest = min(val_fraction, test_fraction, 1 - val_fraction - test_fraction)
    needed = math.ceil(1 / smallest - 1e-9)
    counts = np.bincount(labels, minlength=len(class_names))
    too_few = [f"'{class_names[i]}' ({counts[i]})" for i in np.flatnonzero(counts < needed)]

    def too_few_error() -> UserInputError:
        named = listed(too_few) if too_few else "some classes"
        where = f" {data.labels_from}" if data.labels_from else ""
        return UserInputError(
            f"data source '{source}'{where} has too few {unit} for {len(too_few) or 'some'} of "
            f"its {len(class_names)} classes ({named}); each class needs at least {needed} "
            f"{unit} to appear in train, val and test: add {unit} or drop rare classes"
        )

    if too_few:
        raise too_few_error()
    rows = np.arange(len(labels))
    try:
        rest, test = train_test_split(
            rows, test_size=test_fraction, stratify=labels, random_state=seed
        )
        train, val = train_test_split(
            rest,
            test_size=val_fraction / (1 - test_fraction),
            stratify=labels[rest],
            random_state=seed,
        )
    except ValueError as error:
        raise too_few_error() from error
    split_index = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    if any(len(np.unique(labels[idx])) < len(class_names) for idx in split_index.values()):
        raise too_few_error()
    # Sorted indices keep the original row order inside a split; shuffle the order seeded too so
    # readers that do not shuffle (calibration samples, quick evals) see mixed classes.
    rng = np.random.default_rng(seed)
    return {split: rng.permutation(idx) for split, idx in split_index.items()}


def _write_numeric_splits(data: LoadedSource, split_index: dict[str, np.ndarray],
                          paths: dict[str, str]) -> tuple[TensorContract, dict]:
    """A table (one float input [batch, n_features], standardised per column) or images
    ([batch, C, H, W], per channel); statistics from the training rows only, so val/test stay
    unseen data. Returns the contract and the raw training statistics."""
    axes = (0, 2, 3) if data.images else (0,)
    train_x = data.features[split_index["train"]]
    mean = train_x.mean(axis=axes, dtype=np.float64)
    std = train_x.std(axis=axes, dtype=np.float64)
    std = np.where(std < STD_FLOOR, 1.0, std)
    lowest, highest = train_x.min(axis=axes), train_x.max(axis=axes)
    per_row = (slice(None), None, None) if data.images else (slice(None),)
    spec = TensorSpec(INPUT_NAME, "float32", (BATCH, *data.features.shape[1:]))
    contract = TensorContract.classifier([spec], len(data.class_names))
    for split, path in paths.items():
        rows = split_index[split]
        save_split(
            path, {INPUT_NAME: ((data.features[rows] - mean[per_row]) / std[per_row])
                   .astype(np.float32)},
            data.labels[rows], data.class_names, contract,
            mean=mean.astype(np.float32), std=std.astype(np.float32),
            feature_names=np.array(data.feature_names),
        )
    # Raw training statistics: the drift trigger (infra/trigger) compares new data with them.
    return contract, {"features": {
        name: {"mean": float(m), "std": float(sd), "min": float(lo), "max": float(hi)}
        for name, m, sd, lo, hi in zip(data.feature_names, mean, std, lowest, highest)}}


def _write_text_splits(data: LoadedSource, split_index: dict[str, np.ndarray],
                       paths: dict[str, str]) -> tuple[TensorContract, dict]:
    """Token ids and attention masks, int64 [batch, sequence], as the tokenizer gave them."""
    assert data.tokens is not None
    specs = [TensorSpec(name, "int64", (BATCH, "sequence")) for name in data.tokens]
    contract = TensorContract.classifier(specs, len(data.class_names))
    for split, path in paths.items():
        rows = split_index[split]
        save_split(path, {name: array[rows] for name, array in data.tokens.items()},
                   data.labels[rows], data.class_names, contract, **data.extra)
    lengths = data.tokens["attention_mask"][split_index["train"]].sum(axis=1)
    return contract, {"features": {"tokens": {
        "mean": float(lengths.mean()), "std": float(lengths.std()),
        "min": float(lengths.min()), "max": float(lengths.max())}}}
