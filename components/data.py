"""prepare_data: turn a data source into standardised, stratified train/val/test `.npz` splits."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from torchship.components.errors import UserInputError

if TYPE_CHECKING:
    import pandas as pd

# pandas, fsspec and scikit-learn are imported inside the functions that use them: training
# workers import this module only for load_split, and each of them would pay seconds for these.

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SPLITS = ("train", "val", "test")
# A feature whose training std is below this is (near) constant: dividing by it would blow up
# rounding noise, so it is left unscaled (std 1) instead.
STD_FLOOR = 1e-6
# Long column lists would break the one-line error rule; show this many and count the rest.
MAX_LISTED = 12


def prepare_data(
    source: str,
    label_column: str,
    train_path: str,
    val_path: str,
    test_path: str,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> dict:
    """Split `source` into standardised train/val/test `.npz` files and return its metadata.

    Every check on the input runs before the first file is written, so a bad source leaves
    nothing behind.
    """
    _check_fractions(val_fraction, test_fraction)
    table, feature_columns, label_column = _load_table(source, label_column)
    features, labels, class_names = _features_and_labels(source, table, feature_columns,
                                                         label_column)
    split_index = _stratified_split(source, label_column, labels, class_names, seed,
                                    val_fraction, test_fraction)

    # Statistics come from the training rows only, so val/test stay unseen data.
    train_x = features[split_index["train"]]
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std = np.where(std < STD_FLOOR, 1.0, std)

    feature_names = np.array([str(c) for c in feature_columns])
    class_names_array = np.array(class_names)
    paths = {"train": train_path, "val": val_path, "test": test_path}
    for split in SPLITS:
        rows = split_index[split]
        _write_npz(
            paths[split],
            x=((features[rows] - mean) / std).astype(np.float32),
            y=labels[rows].astype(np.int64),
            mean=mean.astype(np.float32),
            std=std.astype(np.float32),
            feature_names=feature_names,
            class_names=class_names_array,
        )

    return {
        "source": source,
        "n_features": len(feature_columns),
        "n_classes": len(class_names),
        "class_names": list(class_names),
        "feature_names": [str(c) for c in feature_columns],
        "schema": {str(col): str(dtype) for col, dtype in table.dtypes.items()},
        "class_counts": {
            split: {
                name: int(count)
                for name, count in zip(
                    class_names, np.bincount(labels[split_index[split]], minlength=len(class_names))
                )
            }
            for split in SPLITS
        },
        "n_rows": {split: len(split_index[split]) for split in SPLITS},
        # Raw training statistics: the drift trigger (infra/trigger) compares new data with them.
        "statistics": {
            "source": source,
            "n_rows": len(split_index["train"]),
            "features": {
                str(name): {"mean": float(m), "std": float(sd), "min": float(lo), "max": float(hi)}
                for name, m, sd, lo, hi in zip(feature_columns, mean, std, train_x.min(axis=0),
                                               train_x.max(axis=0))
            },
        },
    }


def write_statistics(statistics: dict, uri: str) -> None:
    """Write the training statistics as JSON to a path or any fsspec URI (gs:// included)."""
    import fsspec

    text = json.dumps(statistics, indent=2)
    if "://" in uri:
        with fsspec.open(uri, "w") as handle:  # object stores write whole objects
            handle.write(text)
        return
    tmp = f"{uri}.tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, uri)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserInputError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must each be between "
            "0 and 1 and sum to less than 1; pass e.g. --val-fraction 0.15 --test-fraction 0.15"
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
            f"({_one_line(error)[:160]}); run 'gcloud auth application-default login' or set "
            "GOOGLE_APPLICATION_CREDENTIALS"
        ) from error


def _load_table(source: str, label_column: str) -> tuple[pd.DataFrame, list[str], str]:
    """Read the source into one DataFrame; returns it with its feature columns and label column."""
    import fsspec
    import pandas as pd

    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits(as_frame=True)
        table = digits.frame  # 64 pixel columns plus "target"
        return table, list(digits.feature_names), "target"

    if not isinstance(source, str) or not source:
        raise UserInputError(
            f"data source {source!r} is empty; pass a path to a CSV or Parquet file, or 'digits'"
        )
    if source.startswith(("gs://", "gcs://")):
        _check_google_credentials(source)
    try:
        fs, fs_path = fsspec.core.url_to_fs(source)
    except ValueError as error:  # an unknown protocol; a missing gcsfs/s3fs is an ImportError
        raise UserInputError(
            f"data source '{source}' has an unknown protocol ({_one_line(error)}); pass a local "
            "path or a gs://, s3://, https:// URL"
        ) from error
    if not fs.exists(fs_path):
        raise UserInputError(
            f"data source '{source}' does not exist; pass a path to a CSV or Parquet file, "
            "or 'digits'"
        )
    suffix = Path(fs_path).suffix.lower()
    kind = TABLE_SUFFIXES.get(suffix)
    if kind is None:
        raise UserInputError(
            f"data source '{source}' has unsupported suffix '{suffix}'; "
            f"pass a {', '.join(TABLE_SUFFIXES)} file, or 'digits'"
        )
    try:
        with fsspec.open(source, "rb") as handle:
            table = pd.read_csv(handle) if kind == "csv" else pd.read_parquet(handle)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    except ImportError:  # a missing parquet engine is this environment's fault, not the file's
        raise
    except Exception as error:  # any parser failure means a bad file from the user
        raise UserInputError(
            f"data source '{source}' could not be read as {kind}: {_one_line(error)}; "
            f"pass a valid {kind} file"
        ) from error

    if table.shape[0] == 0 or table.shape[1] == 0:
        raise UserInputError(
            f"data source '{source}' is empty (no rows); pass a table with a header and rows"
        )
    columns = [str(c) for c in table.columns]
    table.columns = columns
    if label_column not in columns:
        raise UserInputError(
            f"data source '{source}' has no column '{label_column}' "
            f"(columns: {_list(columns)}); pass --label-column"
        )
    feature_columns = [c for c in columns if c != label_column]
    if not feature_columns:
        raise UserInputError(
            f"data source '{source}' has only the label column '{label_column}'; "
            "pass a table with at least one feature column"
        )
    return table, feature_columns, label_column


def _features_and_labels(
    source: str, table: pd.DataFrame, feature_columns: list[str], label_column: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return float64 features, int64 class indices and the class names (index i ↔ name i)."""
    import pandas as pd

    non_numeric = [
        c for c in feature_columns
        if not pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_complex_dtype(table[c])
    ]
    if non_numeric:
        raise UserInputError(
            f"data source '{source}' has non-numeric feature columns {_list(non_numeric)}; "
            "encode them as numbers or drop them"
        )
    features = table[feature_columns].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = [c for c, ok in zip(feature_columns, np.isfinite(features).all(axis=0)) if not ok]
    if bad:
        raise UserInputError(
            f"data source '{source}' has missing or infinite values in feature columns "
            f"{_list(bad)}; fill or drop those rows"
        )

    label = table[label_column]
    if label.isna().any():
        raise UserInputError(
            f"data source '{source}' has {int(label.isna().sum())} rows with no value in label "
            f"column '{label_column}'; fill or drop those rows"
        )
    try:
        # sort=True keeps numeric labels in numeric order (2 before 10), so class index i is stable.
        codes, uniques = pd.factorize(label, sort=True)
    except TypeError:  # mixed types cannot be ordered; order them by their text instead
        codes, uniques = pd.factorize(label.astype(str), sort=True)
    class_names = [str(v) for v in uniques]
    if len(set(class_names)) != len(class_names):
        raise UserInputError(
            f"data source '{source}' label column '{label_column}' has distinct values that print "
            f"the same ({_list(class_names)}); make the labels unambiguous"
        )
    if len(class_names) < 2:
        raise UserInputError(
            f"data source '{source}' label column '{label_column}' has a single class "
            f"'{class_names[0]}'; pass a label column with at least two classes"
        )
    return features, codes.astype(np.int64), class_names


def _stratified_split(
    source: str,
    label_column: str,
    labels: np.ndarray,
    class_names: list[str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> dict[str, np.ndarray]:
    """Row indices for each split, stratified by class; every class must land in every split."""
    from sklearn.model_selection import train_test_split

    # The smallest split must still get one row of each class: sklearn's stratified allocation
    # gives a class floor(count * fraction) rows of a split at least.
    smallest = min(val_fraction, test_fraction, 1 - val_fraction - test_fraction)
    needed = math.ceil(1 / smallest - 1e-9)
    counts = np.bincount(labels, minlength=len(class_names))
    too_few = [f"'{class_names[i]}' ({counts[i]})" for i in np.flatnonzero(counts < needed)]

    def too_few_error() -> UserInputError:
        listed = ", ".join(too_few) if too_few else "some classes"
        return UserInputError(
            f"data source '{source}' label column '{label_column}' has too few rows for classes "
            f"{listed}; each class needs at least {needed} rows to appear in train, val and test"
            " - add rows, drop rare classes or raise --val-fraction/--test-fraction"
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


def _write_npz(path: str, **arrays: np.ndarray) -> None:
    """Write `arrays` to exactly `path` (np.savez would append '.npz' to a name), atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; other steps and users read splits
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_split(path: str) -> dict[str, np.ndarray]:
    """Read a split written by prepare_data into a plain dict of arrays."""
    if not Path(path).exists():
        raise UserInputError(
            f"dataset split '{path}' does not exist; pass a split written by prepare_data"
        )
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _list(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"
