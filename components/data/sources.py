"""The data sources prepare_data reads, each one loader into one `LoadedSource`: tables (CSV,
Parquet, the built-in `digits`) and `.npz` files here, image folders in `images`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from torchship.components.data.sanity import (
    check_features,
    check_header,
    listed,
    read_header,
)
from torchship.components.errors import UserInputError, one_line

if TYPE_CHECKING:
    import pandas as pd

# pandas is imported inside the functions that use it: training workers import the data package
# only to read splits, and each of them would pay seconds for it.

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

@dataclass(frozen=True)
class LoadedSource:
    """What every kind of source loads to, before the one split / standardise / write path."""

    # Finite numbers: a table's rows [rows, n_features] (float64), or images [rows, C, H, W]
    # (float32 pixels).
    features: np.ndarray
    labels: np.ndarray  # int64 class index per row: class i is class_names[i]
    class_names: list[str]
    # What the standardisation statistics are per: a table's columns, an image's channels.
    feature_names: list[str]
    schema: dict[str, str]
    # For the too-few-rows error: where the labels come from ("label column 'species'"; empty
    # where the source itself says it) and what a row is.
    labels_from: str = ""
    row_noun: str = "rows"

    # Text: the tokenizer's int64 inputs by name ([rows, max_length] each); `features` is then
    # empty.
    tokens: dict[str, np.ndarray] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # kept in the splits
    # What data sanity found worth knowing but not worth refusing (constant features, say).
    warnings: list[str] = field(default_factory=list)

    @property
    def images(self) -> bool:
        """Images [rows, C, H, W], standardised per channel; else a table, per column."""
        return self.features.ndim == 4

    @property
    def text(self) -> bool:
        return self.tokens is not None


def read_table(source: str, kind: str, nrows: int | None = None) -> pd.DataFrame:
    """A CSV or Parquet file (its first `nrows` rows of a CSV, when given) as a DataFrame with at
    least one row and column; a CSV's header as written is checked first (`sanity`)."""
    import fsspec
    import pandas as pd

    header = None
    try:
        with fsspec.open(source, "rb") as handle:
            if kind == "csv":
                header = read_header(source, handle)
                table = pd.read_csv(handle, nrows=nrows)
            else:
                table = pd.read_parquet(handle)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    except ImportError:  # a missing parquet engine is this environment's fault, not the file's
        raise
    except Exception as error:  # any parser failure means a bad file from the user
        raise UserInputError(
            f"data source '{source}' could not be read as {kind}: {one_line(error, 200, with_type=True)}; "
            f"pass a valid {kind} file"
        ) from error
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise UserInputError(
            f"data source '{source}' is empty (no rows); pass a table with a header and rows"
        )
    if header is not None:
        check_header(source, header)
    elif len(set(map(str, table.columns))) != table.shape[1]:  # Parquet keeps names as written
        check_header(source, [str(c) for c in table.columns])
    return table


def load_npz(source: str) -> LoadedSource:
    """An `.npz` with `x` [rows, ...] features and `y` labels (text or integers), and optionally
    `class_names` (then `y` holds indices into it) and `feature_names`."""
    import io

    import fsspec

    try:
        with fsspec.open(source, "rb") as handle:
            payload = io.BytesIO(handle.read())
        # allow_pickle=False: an object array would run the user's pickled code on loading.
        with np.load(payload, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as error:  # a bad zip, a bad member, an object (pickled) array
        raise UserInputError(
            f"data source '{source}' could not be read as npz: {one_line(error, 200, with_type=True)}; pass a file "
            "written by np.savez(path, x=..., y=...) with plain numeric or text arrays"
        ) from error
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise UserInputError(
            f"data source '{source}' has no array {' or '.join(repr(k) for k in missing)} "
            f"(arrays: {listed(sorted(arrays)) or 'none'}); save the features as x and the "
            "labels as y: np.savez(path, x=features, y=labels)"
        )
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 2 or x.shape[0] == 0 or x[0].size == 0:
        raise UserInputError(
            f"data source '{source}' array 'x' has shape {x.shape}; store x as [rows, features] "
            "(or [rows, ...], flattened per row) with at least one row and one feature"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise UserInputError(
            f"data source '{source}' has {len(x)} rows in x but y has shape {y.shape}; "
            "store one label per row of x in a 1-D y"
        )
    if x.dtype.kind not in "biuf":
        raise UserInputError(
            f"data source '{source}' array 'x' holds {x.dtype} values, not numbers; "
            "encode the features as numbers"
        )
    feature_shape = x.shape[1:]
    features = x.reshape(len(x), -1).astype(np.float64)
    if "feature_names" in arrays:
        feature_names = [str(n) for n in arrays["feature_names"].astype(str).ravel()]
        if len(feature_names) != features.shape[1] or len(set(feature_names)) != len(feature_names):
            raise UserInputError(
                f"data source '{source}' array 'feature_names' has {len(feature_names)} names "
                f"({len(set(feature_names))} distinct) for {features.shape[1]} features; store "
                "one distinct name per feature, or leave feature_names out"
            )
    else:  # x3 for [rows, features]; x0_3 (row 0, column 3 of each sample) for [rows, h, w]
        feature_names = ["x" + "_".join(map(str, index)) for index in np.ndindex(*feature_shape)]
    _check_finite(source, features, feature_names)

    labels, class_names = _npz_labels(source, y, arrays.get("class_names"))
    schema = {"x": f"{x.dtype} {'x'.join(map(str, feature_shape))}",
              "y": f"{y.dtype} index into class_names" if "class_names" in arrays
              else str(y.dtype)}
    return LoadedSource(features, labels, class_names, feature_names, schema,
                        labels_from="array 'y'",
                        warnings=check_features(source, features, feature_names))


def _npz_labels(
    source: str, y: np.ndarray, given_names: np.ndarray | None
) -> tuple[np.ndarray, list[str]]:
    """Class indices and names: `y` indexes `given_names`, or its own values are the classes."""
    import pandas as pd

    if given_names is None:
        if y.dtype.kind not in "biuUS":
            raise UserInputError(
                f"data source '{source}' array 'y' holds {y.dtype} values; store the labels as "
                "integers or text"
            )
        text_or_numbers = y.astype(str) if y.dtype.kind == "S" else y  # bytes print as b'..'
        return class_indices(source, pd.Series(text_or_numbers), "array 'y'", "labels y")
    class_names = [str(n) for n in given_names.astype(str).ravel()]
    _check_class_names(source, class_names, "array 'class_names'", "class_names")
    if y.dtype.kind not in "iu":
        raise UserInputError(
            f"data source '{source}' array 'y' holds {y.dtype} values but class_names is "
            "given; store y as integer indices into class_names, or leave class_names out"
        )
    outside = np.unique(y[(y < 0) | (y >= len(class_names))]).tolist()
    if outside:
        raise UserInputError(
            f"data source '{source}' array 'y' has values {listed([str(v) for v in outside])} "
            f"outside class_names' indices 0..{len(class_names) - 1}; store y as indices "
            "into class_names"
        )
    return y.astype(np.int64), class_names



def _check_finite(source: str, features: np.ndarray, feature_names: list[str]) -> None:
    bad = [name for name, ok in zip(feature_names, np.isfinite(features).all(axis=0)) if not ok]
    if bad:
        raise UserInputError(
            f"data source '{source}' has missing or infinite values in feature columns "
            f"{listed(bad)}; fill or drop those rows"
        )


def class_indices(
    source: str, label: pd.Series, origin: str, labels_noun: str
) -> tuple[np.ndarray, list[str]]:
    """Int64 class indices and the class names (index i is name i), from label values."""
    import pandas as pd

    try:
        # sort=True keeps numeric labels in numeric order (2 before 10), so class index i is stable.
        codes, uniques = pd.factorize(label, sort=True)
    except TypeError:  # mixed types cannot be ordered; order them by their text instead
        codes, uniques = pd.factorize(label.astype(str), sort=True)
    class_names = [str(v) for v in uniques]
    _check_class_names(source, class_names, origin, labels_noun)
    return codes.astype(np.int64), class_names


def _check_class_names(source: str, class_names: list[str], origin: str, labels_noun: str) -> None:
    if len(set(class_names)) != len(class_names):
        raise UserInputError(
            f"data source '{source}' {origin} has distinct values that print "
            f"the same ({listed(class_names)}); make the labels unambiguous"
        )
    if len(class_names) < 2:
        raise UserInputError(
            f"data source '{source}' {origin} has a single class "
            f"'{class_names[0] if class_names else ''}'; pass {labels_noun} with at least two "
            "classes"
        )
