"""A look at a data source in the first seconds, before any stage runs: the checks that a header
or a sample can answer (`sanity`), the number of classes and, for a table, of features. The
prepare-data stage checks every row again as it reads them."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from torchship.components.data.sanity import check_columns, check_label
from torchship.components.errors import UserInputError

__all__ = ["Preview", "preview_source"]

# A table up to this size has its whole label column read (a class seen only late counts too).
WHOLE_LABELS_BYTES = 256 << 20
DIGITS_CLASSES, DIGITS_FEATURES = 10, 64


@dataclass(frozen=True)
class Preview:
    """What the model will be asked to learn: `n_classes`, and `n_features` for a table (None
    for images and text, whose input shape the data stage settles)."""

    source: str
    n_classes: int
    n_features: int | None


def preview_source(source: str, label_column: str, text_column: str = "") -> Preview | None:
    """The preview of a local source or a built-in one; None for a remote one (its credentials
    and size are the data stage's business) or one the data stage alone can judge."""
    from torchship.components.data.sources import TABLE_SUFFIXES
    from torchship.components.data.stage import DEFAULT_SOURCE, DIGITS_IMAGES

    if source == DEFAULT_SOURCE:
        return Preview(source, DIGITS_CLASSES, DIGITS_FEATURES)
    if source == DIGITS_IMAGES:
        return Preview(source, DIGITS_CLASSES, None)
    if not source or "://" in source:
        return None
    path = Path(source)
    if not path.exists():
        raise UserInputError(f"data source '{source}' does not exist; pass a path to a CSV, "
                             "Parquet or .npz file, an image folder, or 'digits'")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES and path.is_file():
        import fsspec

        from torchship.components.data.plan import sample_table

        fs, fs_path = fsspec.core.url_to_fs(source)
        sample = sample_table(source, fs, fs_path, TABLE_SUFFIXES[suffix])[0]
        sample.columns = [str(c) for c in sample.columns]
        if label_column not in sample.columns:
            return None  # the data stage names the columns there are
        check_columns(source, sample, label_column)
        # The whole label column where it is cheap to read; a large file's first rows.
        labels = (_label_column(source, TABLE_SUFFIXES[suffix], label_column)
                  if path.stat().st_size <= WHOLE_LABELS_BYTES else sample[label_column])
        check_label(source, labels, label_column)
        features = None if text_column else sample.shape[1] - 1
        return Preview(source, int(labels.nunique()), features)
    if suffix == ".npz" and path.is_file():
        return _npz_preview(source)
    if path.is_dir():
        classes = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return Preview(source, len(classes), None) if len(classes) >= 2 else None
    return None


def _label_column(source: str, kind: str, label_column: str):
    """The whole label column, read alone (a class seen only late in the file counts too)."""
    import pandas as pd

    if kind == "csv":
        return pd.read_csv(source, usecols=[label_column])[label_column]
    return pd.read_parquet(source, columns=[label_column])[label_column]


def _npz_preview(source: str) -> Preview | None:
    """Classes from `class_names` or `y`; features from `x`'s header, without reading its rows."""
    try:
        with zipfile.ZipFile(source) as archive, np.load(source, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                return None
            with archive.open("x.npy") as member:
                read = (np.lib.format.read_array_header_1_0
                        if np.lib.format.read_magic(member) == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape = read(member)[0]
            classes = (len(npz["class_names"]) if "class_names" in npz.files
                       else len(np.unique(npz["y"])))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # the data stage says what
        return None
    return Preview(source, classes, int(np.prod(shape[1:])) if len(shape) > 1 else None)
