"""Data sanity, as TFX's ExampleValidator does it: what a table says about itself before any model
learns from it. Each check refuses (``UserInputError``, one line with the fix) what would make a
wrong model, and returns as warnings what is only worth knowing.

* a CSV header with one column holding ``;``, tab or ``|``: written with another separator;
* a column name twice (pandas would rename the copy ``label.1`` and train on it);
* an index-like column: ``Unnamed: 0`` (a pandas index written with the rows) or whole numbers
  equal to the row number, which let a model learn the row order instead of the data;
* a label that looks continuous: regression is not supported;
* features that never change: refused when every one is constant (the model could learn class
  frequencies only), a warning naming them otherwise.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

import numpy as np

from torchship.components.errors import UserInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["check_columns", "check_features", "check_header", "check_label", "check_numeric",
           "check_spread", "listed", "read_header"]

# Rows read to check a table's columns and label: enough to see a pattern, seconds at most.
SAMPLE_ROWS = 10_000
SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe"}
INDEX_PREFIX = "Unnamed: "
# A label with more distinct values than this, some not whole numbers, is a measurement.
MAX_FLOAT_CLASSES = 20
# A label with more distinct values than this share of the rows (and at least MIN_ID_VALUES)
# is an identifier or a count, not a class.
MAX_CLASS_SHARE = 0.5
MIN_ID_VALUES = 50
# Fewer rows than this say nothing about an index-like column.
MIN_INDEX_ROWS = 10
SHOWN = 5


# Long column lists would break the one-line error rule; show this many and count the rest.
MAX_LISTED = 12


def listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _listed(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def read_header(source: str, handle: io.BufferedIOBase) -> list[str]:
    """The first line of a CSV as written (pandas renames duplicate names before anyone sees
    them); `handle` is left at its start."""
    first = handle.readline()
    handle.seek(0)
    text = first.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    return next(csv.reader([text]), [])


def check_header(source: str, header: list[str]) -> None:
    """A CSV's raw header: the separator and names given twice."""
    if len(header) == 1:
        for separator, name in SEPARATORS.items():
            if separator in header[0]:
                shown = header[0] if len(header[0]) <= 60 else header[0][:60] + " ..."
                raise UserInputError(
                    f"data source '{source}' looks {name}-separated (its header {shown!r} reads "
                    "as one column); write it with commas, e.g. pandas "
                    "read_csv(path, sep=...).to_csv(path, index=False)")
    seen: dict[str, int] = {}
    for position, name in enumerate(header, 1):
        if name in seen:
            raise UserInputError(
                f"data source '{source}' has the column '{name}' twice (columns {seen[name]} and "
                f"{position}); a copy of a column, the label above all, must not be a feature: "
                "drop or rename the copy")
        seen[name] = position


def check_columns(source: str, table: pd.DataFrame, label_column: str) -> None:
    """Index-like columns (refused): a pandas index written as a column, or the row number."""
    import pandas as pd

    for name in table.columns:
        if name == label_column:
            continue
        if str(name).startswith(INDEX_PREFIX):
            raise UserInputError(
                f"data source '{source}' has the column '{name}', a pandas index written with "
                "the rows; write the file with to_csv(path, index=False) or drop the column")
        column = table[name]
        if len(column) < MIN_INDEX_ROWS or not pd.api.types.is_integer_dtype(column):
            continue
        values = column.to_numpy()
        for start in (0, 1):
            if np.array_equal(values, np.arange(start, start + len(values))):
                raise UserInputError(
                    f"data source '{source}' column '{name}' is the row number ({start}, "
                    f"{start + 1}, {start + 2}, ...): a model would learn the row order, not the "
                    "data; drop the column (or shuffle the rows if it is a real feature)")


def check_numeric(source: str, table: pd.DataFrame, columns: list[str]) -> None:
    """Feature columns hold real numbers."""
    import pandas as pd

    non_numeric = [c for c in columns if not pd.api.types.is_numeric_dtype(table[c])
                   or pd.api.types.is_complex_dtype(table[c])]
    if non_numeric:
        raise UserInputError(
            f"data source '{source}' has non-numeric feature columns {listed(non_numeric)}; "
            "encode them as numbers or drop them")


def check_label(source: str, label: pd.Series, label_column: str) -> None:
    """A label column of classes, not of measurements or identifiers."""
    import pandas as pd

    values = label.dropna()
    distinct = int(values.nunique())
    fractional = (pd.api.types.is_float_dtype(values)
                  and not np.all(np.mod(values.to_numpy(dtype=np.float64), 1) == 0))
    if fractional and distinct > MAX_FLOAT_CLASSES:
        example = ", ".join(f"{v:g}" for v in values.unique()[:3])
        raise UserInputError(
            f"data source '{source}' label column '{label_column}' looks continuous ({distinct} "
            f"distinct values such as {example}); regression is not supported: pass a column of "
            "classes")
    if (pd.api.types.is_numeric_dtype(values) and distinct >= MIN_ID_VALUES
            and distinct > MAX_CLASS_SHARE * len(values)):
        raise UserInputError(
            f"data source '{source}' label column '{label_column}' has {distinct} distinct values "
            f"in {len(values)} rows, like a measurement or an identifier rather than classes; "
            "regression is not supported: pass a column of classes")


def check_features(source: str, features: np.ndarray, names: list[str]) -> list[str]:
    """Constant features: refused when all are, else one warning naming them."""
    if len(features) < 2:
        return []
    return check_spread(source, np.ptp(features, axis=0), names)


def check_spread(source: str, spread: np.ndarray, names: list[str]) -> list[str]:
    """`check_features` from each feature's range (max - min) over the rows, which a data step
    that streams its rows merges chunk by chunk."""
    constant = [name for name, value in zip(names, spread) if value == 0]
    if constant and len(constant) == len(names):
        raise UserInputError(
            f"data source '{source}': every feature column is constant ({_listed(constant)}), so "
            "a model could only learn how often each class occurs; pass features that vary")
    if not constant:
        return []
    return [(f"{len(constant)} of {len(names)} feature columns never change "
             f"({_listed(constant)}); they carry no information and could be dropped")]
