"""prepare_data: turn a data source into standardised, stratified train/val/test `.npz` splits."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from torchship.components.errors import UserInputError, one_line

if TYPE_CHECKING:
    import pandas as pd
    import PIL.Image
    from fsspec import AbstractFileSystem

# pandas, fsspec, scikit-learn and Pillow are imported inside the functions that use them: training
# workers import this module only for load_split, and each of them would pay seconds for these.

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# Single-channel Pillow modes (LA: grey with alpha, which is dropped). A palette image ("P") may
# hold colours, so it counts as colour.
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
SOURCE_KINDS = ("a path to a CSV, Parquet or .npz file, a folder of images with one sub-folder "
                "per class, or 'digits'")
SPLITS = ("train", "val", "test")
# A feature whose training std is below this is (near) constant: dividing by it would blow up
# rounding noise, so it is left unscaled (std 1) instead.
STD_FLOOR = 1e-6
# Long column lists would break the one-line error rule; show this many and count the rest.
MAX_LISTED = 12


@dataclass(frozen=True)
class LoadedSource:
    """What every kind of source loads to, before the one split / standardise / write path."""

    features: np.ndarray  # [rows, n_features], finite: float64, or float32 pixels for images
    labels: np.ndarray  # int64 class index per row: class i is class_names[i]
    class_names: list[str]
    feature_names: list[str]
    schema: dict[str, str]
    # For the too-few-rows error: where the labels come from ("label column 'species'"; empty
    # where the source itself says it) and what a row is.
    labels_from: str = ""
    row_noun: str = "rows"


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

    `source` is `digits`, a CSV/Parquet table with a `label_column`, an `.npz` with arrays `x`
    and `y`, or a folder of images with one sub-folder per class (local or any fsspec URL);
    `label_column` is used by tables only. Every check on the input runs before the first file
    is written, so a bad source leaves nothing behind.
    """
    _check_fractions(val_fraction, test_fraction)
    data = _load_source(source, label_column)
    split_index = _stratified_split(source, data, seed, val_fraction, test_fraction)

    # Statistics come from the training rows only, so val/test stay unseen data.
    train_x = data.features[split_index["train"]]
    mean = train_x.mean(axis=0, dtype=np.float64)
    std = train_x.std(axis=0, dtype=np.float64)
    std = np.where(std < STD_FLOOR, 1.0, std)

    paths = {"train": train_path, "val": val_path, "test": test_path}
    for split in SPLITS:
        rows = split_index[split]
        _write_npz(
            paths[split],
            x=((data.features[rows] - mean) / std).astype(np.float32),
            y=data.labels[rows].astype(np.int64),
            mean=mean.astype(np.float32),
            std=std.astype(np.float32),
            feature_names=np.array(data.feature_names),
            class_names=np.array(data.class_names),
        )

    class_names = data.class_names
    return {
        "source": source,
        "n_features": len(data.feature_names),
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
        # Raw training statistics: the drift trigger (infra/trigger) compares new data with them.
        "statistics": {
            "source": source,
            "n_rows": len(split_index["train"]),
            "features": {
                name: {"mean": float(m), "std": float(sd), "min": float(lo), "max": float(hi)}
                for name, m, sd, lo, hi in zip(data.feature_names, mean, std,
                                               train_x.min(axis=0), train_x.max(axis=0))
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
            f"({one_line(error, 160, with_type=True)}); run 'gcloud auth application-default login' or set "
            "GOOGLE_APPLICATION_CREDENTIALS"
        ) from error


def _load_source(source: str, label_column: str) -> LoadedSource:
    """Find out what kind of source `source` is and load it with that kind's loader."""
    import fsspec

    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits(as_frame=True)
        return _table_source(source, digits.frame, "target")  # 64 pixel columns plus "target"

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
    if suffix in TABLE_SUFFIXES:
        return _load_table(source, TABLE_SUFFIXES[suffix], label_column)
    if suffix == ".npz":
        return _load_npz(source)
    if fs.isdir(fs_path):
        return _load_image_folder(source, fs, fs_path)
    raise UserInputError(
        f"data source '{source}' has unsupported suffix '{suffix}'; "
        f"pass a {', '.join(TABLE_SUFFIXES)} or .npz file, an image folder, or 'digits'"
    )


def _load_table(source: str, kind: str, label_column: str) -> LoadedSource:
    """A CSV or Parquet table: every column but `label_column` is a numeric feature."""
    import fsspec
    import pandas as pd

    try:
        with fsspec.open(source, "rb") as handle:
            table = pd.read_csv(handle) if kind == "csv" else pd.read_parquet(handle)
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
    return _table_source(source, table, label_column)


def _table_source(source: str, table: pd.DataFrame, label_column: str) -> LoadedSource:
    import pandas as pd

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
    _check_finite(source, features, feature_columns)

    label = table[label_column]
    if label.isna().any():
        raise UserInputError(
            f"data source '{source}' has {int(label.isna().sum())} rows with no value in label "
            f"column '{label_column}'; fill or drop those rows"
        )
    origin = f"label column '{label_column}'"
    labels, class_names = _class_indices(source, label, origin, "a label column")
    return LoadedSource(features, labels, class_names, feature_columns,
                        {col: str(dtype) for col, dtype in table.dtypes.items()},
                        labels_from=origin)


def _load_npz(source: str) -> LoadedSource:
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
            f"(arrays: {_list(sorted(arrays)) or 'none'}); save the features as x and the "
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
                        labels_from="array 'y'")


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
        return _class_indices(source, pd.Series(text_or_numbers), "array 'y'", "labels y")
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
            f"data source '{source}' array 'y' has values {_list([str(v) for v in outside])} "
            f"outside class_names' indices 0..{len(class_names) - 1}; store y as indices "
            "into class_names"
        )
    return y.astype(np.int64), class_names


def _load_image_folder(source: str, fs: AbstractFileSystem, root: str) -> LoadedSource:
    """A folder with one sub-folder per class (its name is the class) of same-sized images."""
    class_folders = sorted(
        _basename(entry["name"]) for entry in fs.ls(root, detail=True)
        if entry["type"] == "directory" and _visible(entry["name"], root)
    )
    if not class_folders:
        raise UserInputError(
            f"data source '{source}' is a folder with no class sub-folders; put each class's "
            "images in a sub-folder named after the class"
        )
    if len(class_folders) < 2:
        raise UserInputError(
            f"data source '{source}' has a single class folder '{class_folders[0]}'; add a "
            "sub-folder of images for each class, at least two"
        )
    base = source.rstrip("/")
    images, labels, names = [], [], []  # names as the user knows them, for errors
    for index, class_name in enumerate(class_folders):
        folder = f"{root.rstrip('/')}/{class_name}"
        files = sorted(
            _basename(entry["name"]) for entry in fs.ls(folder, detail=True)
            if entry["type"] == "file" and _visible(entry["name"], folder)
            and Path(entry["name"]).suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise UserInputError(
                f"data source '{source}' class folder '{class_name}' has no images "
                f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder"
            )
        for file in files:
            name = f"{base}/{class_name}/{file}"
            image = _read_image(source, fs, f"{folder}/{file}", name)
            if images and image.size != images[0].size:
                width, height = images[0].size
                raise UserInputError(
                    f"data source '{source}' image '{name}' is {image.width}x{image.height} but "
                    f"'{names[0]}' is {width}x{height}; resize them all to {width}x{height}"
                )
            images.append(image)
            labels.append(index)
            names.append(name)

    # Grayscale only when every image is: one colour image makes every row RGB.
    mode = "L" if all(image.mode in GRAYSCALE_MODES for image in images) else "RGB"
    width, height = images[0].size
    features = np.stack(
        [np.asarray(image.convert(mode), dtype=np.float32).reshape(-1) for image in images]
    )
    channels = ("",) if mode == "L" else ("_r", "_g", "_b")
    feature_names = [f"p{row}_{col}{channel}"  # row-major, channels last, as the pixels
                     for row in range(height) for col in range(width) for channel in channels]
    return LoadedSource(features, np.array(labels, dtype=np.int64), class_folders, feature_names,
                        {"image": f"{mode} {width}x{height}", "label": "folder name"},
                        row_noun="images")


def _read_image(source: str, fs: AbstractFileSystem, path: str, name: str) -> PIL.Image.Image:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(fs.cat_file(path)))
        image.load()
    except Exception as error:  # Pillow raises many kinds for a bad file
        # Pillow's own text for an unknown format names only the in-memory buffer.
        reason = ("not an image format Pillow knows"
                  if isinstance(error, UnidentifiedImageError) else one_line(error, 200, with_type=True))
        raise UserInputError(
            f"data source '{source}' image '{name}' could not be read ({reason}); "
            "replace or remove it"
        ) from error
    return image


def _check_finite(source: str, features: np.ndarray, feature_names: list[str]) -> None:
    bad = [name for name, ok in zip(feature_names, np.isfinite(features).all(axis=0)) if not ok]
    if bad:
        raise UserInputError(
            f"data source '{source}' has missing or infinite values in feature columns "
            f"{_list(bad)}; fill or drop those rows"
        )


def _class_indices(
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
            f"the same ({_list(class_names)}); make the labels unambiguous"
        )
    if len(class_names) < 2:
        raise UserInputError(
            f"data source '{source}' {origin} has a single class "
            f"'{class_names[0] if class_names else ''}'; pass {labels_noun} with at least two "
            "classes"
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
        listed = ", ".join(too_few) if too_few else "some classes"
        where = f" {data.labels_from}" if data.labels_from else ""
        return UserInputError(
            f"data source '{source}'{where} has too few {unit} for classes "
            f"{listed}; each class needs at least {needed} {unit} to appear in train, val and "
            f"test - add {unit}, drop rare classes or raise --val-fraction/--test-fraction"
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


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _visible(path: str, parent: str) -> bool:
    """Not hidden (.DS_Store, .ipynb_checkpoints) and not the listed folder itself (object
    stores may list a folder's placeholder object among its contents)."""
    return path.rstrip("/") != parent.rstrip("/") and not _basename(path).startswith(".")
