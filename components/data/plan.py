"""Planning the data step: find out what kind of source it is, check what a header, a listing or
a sample can tell (before any worker starts), and cut it into read tasks (`chunks`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from torchship.components.data.chunks import (
    PIXEL_EDGES,
    ReadSpec,
    ReadTask,
    chunk_rows,
    quantile_edges,
)
from torchship.components.data.sanity import (
    SAMPLE_ROWS,
    check_columns,
    check_header,
    check_label,
    check_numeric,
)
from torchship.components.data.sources import TABLE_SUFFIXES, listed, read_table
from torchship.components.errors import UserInputError, one_line

__all__ = ["Plan", "newest_table", "plan_source", "sample_table"]

DEFAULT_SOURCE, DIGITS_IMAGES = "digits", "digits-images"
SOURCE_KINDS = ("a path to a CSV, Parquet or .npz file, a folder of images with one sub-folder "
                "per class, 'digits' or 'digits-images'")
# Image files per read task.
IMAGES_PER_TASK = 512


@dataclass
class Plan:
    spec: ReadSpec
    tasks: list[ReadTask]
    feature_names: list[str]  # a table's columns; text: tokens, characters; images: set from mode
    schema: dict[str, str]
    labels_from: str = ""
    row_noun: str = "rows"
    class_order: list[str] | None = None  # classes known before reading (folders, npz names)
    extra: dict[str, Any] = field(default_factory=dict)  # text: vocab_size, max_length, ...

    @property
    def table(self) -> bool:
        return self.spec.kind in ("digits", "csv", "parquet", "npz") and not self.spec.text

    @property
    def images(self) -> bool:
        return self.spec.kind in ("images", DIGITS_IMAGES)


def plan_source(source: str, label_column: str, image_size: int = 0, text_column: str = "",
                tokenizer: str = "", max_length: int = 128) -> Plan:
    """The plan for `source`; a bad source fails here, before any task runs."""
    import fsspec

    if source == DEFAULT_SOURCE:
        from sklearn.datasets import load_digits

        frame = load_digits(as_frame=True).frame
        features = [c for c in frame.columns if c != "target"]
        spec = ReadSpec(source, "digits", "target", tuple(features),
                        bin_edges=quantile_edges(frame[features].to_numpy()))
        return Plan(spec, [ReadTask(0)], features,
                    {c: str(t) for c, t in frame.dtypes.items()}, "label column 'target'")
    if source == DIGITS_IMAGES:
        digit_edges = (tuple(float(edge) for edge in range(2, 16, 2)),)  # its pixels are 0-16
        return Plan(ReadSpec(source, DIGITS_IMAGES, bin_edges=digit_edges), [ReadTask(0)],
                    ["grey"],
                    {"image": "L 8x8", "label": "digit"}, row_noun="images",
                    class_order=[str(i) for i in range(10)])
    if not isinstance(source, str) or not source:
        raise UserInputError(f"data source {source!r} is empty; pass {SOURCE_KINDS}")
    if source.startswith(("gs://", "gcs://")):
        _check_google_credentials(source)
    try:
        fs, fs_path = fsspec.core.url_to_fs(source)
    except ValueError as error:  # an unknown protocol; a missing gcsfs/s3fs is an ImportError
        raise UserInputError(
            f"data source '{source}' has an unknown protocol "
            f"({one_line(error, 200, with_type=True)}); pass a local path or a gs://, s3://, "
            "https:// URL") from error
    if not fs.exists(fs_path):
        raise UserInputError(f"data source '{source}' does not exist; pass {SOURCE_KINDS}")
    suffix = Path(fs_path.rstrip("/")).suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return _plan_table(source, fs, fs_path, TABLE_SUFFIXES[suffix], label_column,
                           text_column, tokenizer, max_length)
    if suffix == ".npz":
        return _plan_npz(source)
    if fs.isdir(fs_path):
        return _plan_images(source, fs, fs_path, image_size)
    raise UserInputError(
        f"data source '{source}' has unsupported suffix '{suffix}'; "
        f"pass a {', '.join(TABLE_SUFFIXES)} or .npz file, an image folder, or 'digits'")


def newest_table(source: str) -> tuple[str, int, str] | None:
    """For a folder (a bucket prefix) of tables and no sub-folders, as new data lands in:
    (the table to train on, how many tables there are, when it was written); the pick is the
    trigger's own (drift.folder_tables: the newest, by modification time, then name). None for
    anything else (a file, an image folder)."""
    import fsspec

    from torchship.components.data.drift import folder_tables

    if source in (DEFAULT_SOURCE, DIGITS_IMAGES) or not isinstance(source, str) or not source:
        return None
    try:
        fs, fs_path = fsspec.core.url_to_fs(source)
        if Path(fs_path.rstrip("/")).suffix or not fs.isdir(fs_path):
            return None
        if any(entry["type"] == "directory" for entry in fs.ls(fs_path, detail=True)):
            return None  # one sub-folder per class: an image folder
        tables = folder_tables(source)
    except (ValueError, ImportError, OSError):
        return None  # plan_source says what is wrong with it
    if not tables:
        return None
    newest, written = tables[-1]
    return newest, len(tables), written.strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_google_credentials(source: str) -> None:
    """Fail at once, in one line, where Cloud Storage would otherwise retry for a minute."""
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError as error:
        raise UserInputError(
            f"data source '{source}' needs Google credentials and none were found "
            f"({one_line(error, 160, with_type=True)}); run 'gcloud auth application-default "
            "login' or set GOOGLE_APPLICATION_CREDENTIALS") from error


def sample_table(source: str, fs, fs_path: str, kind: str):
    """The first rows of a table, without reading the rest (a Parquet file by its first batch)."""
    if kind == "csv":
        return read_table(source, kind, nrows=SAMPLE_ROWS), []
    import pyarrow.parquet as pq

    try:
        with fs.open(fs_path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            groups = [parquet.metadata.row_group(i).num_rows
                      for i in range(parquet.metadata.num_row_groups)]
            batch = next(parquet.iter_batches(batch_size=SAMPLE_ROWS), None)
            sample = batch.to_pandas() if batch is not None else None
    except Exception as error:  # any parser failure means a bad file from the user
        raise UserInputError(
            f"data source '{source}' could not be read as parquet: "
            f"{one_line(error, 200, with_type=True)}; pass a valid parquet file") from error
    if sample is None or sample.shape[0] == 0 or sample.shape[1] == 0:
        raise UserInputError(
            f"data source '{source}' is empty (no rows); pass a table with a header and rows")
    if len(set(map(str, sample.columns))) != sample.shape[1]:
        check_header(source, [str(c) for c in sample.columns])
    return sample, groups


def _plan_table(source: str, fs, fs_path: str, kind: str, label_column: str, text_column: str,
                tokenizer: str, max_length: int) -> Plan:

    sample, groups = sample_table(source, fs, fs_path, kind)
    columns = [str(c) for c in sample.columns]
    sample.columns = columns
    wanted = [(label_column, "--label-column")]
    if text_column:
        wanted.insert(0, (text_column, "--text-column"))
    for column, flag in wanted:
        if column not in columns:
            raise UserInputError(
                f"data source '{source}' has no column '{column}' (columns: {listed(columns)}); "
                f"pass {flag}")
    origin = f"label column '{label_column}'"
    check_label(source, sample[label_column], label_column)
    extra: dict[str, Any] = {}
    if text_column:
        extra = _check_text(source, text_column, tokenizer, max_length)
        features = ["tokens", "characters"]
        schema = {text_column: "text", label_column: str(sample[label_column].dtype)}
        row_bytes = 16 * max_length
    else:
        check_columns(source, sample, label_column)
        features = [c for c in columns if c != label_column]
        if not features:
            raise UserInputError(
                f"data source '{source}' has only the label column '{label_column}'; pass a "
                "table with at least one feature column")
        check_numeric(source, sample, features)
        schema = {c: str(t) for c, t in sample.dtypes.items()}
        row_bytes = 8 * len(features)
    rows = chunk_rows(row_bytes)
    if text_column:  # token counts of a row, in 10 bins up to max_length; characters' deciles
        edges = (tuple(float(e) for e in np.unique(np.linspace(1, max_length, 11)[1:-1].round())),
                 *quantile_edges(sample[text_column].astype(str).str.len().to_numpy()[:, None]))
    else:  # each feature's deciles in the sample
        edges = quantile_edges(sample[features].to_numpy(dtype=np.float64, na_value=np.nan))
    spec = ReadSpec(source, kind, label_column, tuple(features) if not text_column else (),
                    text_column, extra.get("tokenizer", ""), max_length, 0, rows, edges)
    tasks = [ReadTask(0)]
    if kind == "parquet":  # row groups in tasks of about `rows` rows: read in parallel
        tasks, current, count = [], [], 0
        for group, group_rows in enumerate(groups):
            current.append(group)
            count += group_rows
            if count >= rows:
                tasks.append(ReadTask(len(tasks), row_groups=tuple(current)))
                current, count = [], 0
        if current:
            tasks.append(ReadTask(len(tasks), row_groups=tuple(current)))
    return Plan(spec, tasks, features, schema, origin, extra=extra)


def _check_text(source: str, text_column: str, tokenizer: str, max_length: int) -> dict:
    from torchship.components.data.text import load_tokenizer

    if not tokenizer:
        raise UserInputError(
            f"data source '{source}' is text (column '{text_column}') and needs a tokenizer; "
            "pass --tokenizer DIR, or --model hf:DIR whose directory holds one")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise UserInputError(f"max_length {max_length!r} is not a whole number >= 2; pass e.g. "
                             "128")
    loaded = load_tokenizer(tokenizer)
    probe = loaded(["a"], max_length=max_length, truncation=True, padding="max_length")
    missing = [name for name in ("input_ids", "attention_mask") if name not in probe]
    if missing:
        raise UserInputError(
            f"tokenizer '{tokenizer}' gives no {', '.join(missing)}; pass a tokenizer that "
            "returns input_ids and attention_mask")
    return {"vocab_size": len(loaded), "max_length": max_length, "tokenizer": str(tokenizer)}


def _plan_npz(source: str) -> Plan:
    """An .npz is read whole (it is one compressed archive): checked here, read by one task."""
    from torchship.components.data.sources import load_npz

    data = load_npz(source)
    spec = ReadSpec(source, "npz", bin_edges=quantile_edges(data.features))
    return Plan(spec, [ReadTask(0)], list(data.feature_names), data.schema,
                data.labels_from, class_order=list(data.class_names))


def _plan_images(source: str, fs, root: str, image_size: int) -> Plan:
    """Class folders and their image files, in an order mixed by a hash of each file's name, cut
    into tasks of IMAGES_PER_TASK files."""
    from torchship.components.data.images import IMAGE_SUFFIXES, _basename, _visible

    class_folders = sorted(
        _basename(entry["name"]) for entry in fs.ls(root, detail=True)
        if entry["type"] == "directory" and _visible(entry["name"], root))
    if not class_folders:
        raise UserInputError(
            f"data source '{source}' is a folder with no class sub-folders; put each class's "
            "images in a sub-folder named after the class")
    if len(class_folders) < 2:
        raise UserInputError(
            f"data source '{source}' has a single class folder '{class_folders[0]}'; add a "
            "sub-folder of images for each class, at least two")
    base, files = source.rstrip("/"), []
    for class_name in class_folders:
        folder = f"{root.rstrip('/')}/{class_name}"
        names = sorted(
            _basename(entry["name"]) for entry in fs.ls(folder, detail=True)
            if entry["type"] == "file" and _visible(entry["name"], folder)
            and Path(entry["name"]).suffix.lower() in IMAGE_SUFFIXES)
        if not names:
            raise UserInputError(
                f"data source '{source}' class folder '{class_name}' has no images "
                f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")
        files.extend((class_name, f"{folder}/{name}", f"{base}/{class_name}/{name}",
                      f"{class_name}/{name}") for name in names)
    files.sort(key=lambda f: hashlib.blake2b(f[3].encode(), digest_size=8).digest())
    tasks = [ReadTask(number, files=tuple(files[start:start + IMAGES_PER_TASK]))
             for number, start in enumerate(range(0, len(files), IMAGES_PER_TASK))]
    spec = ReadSpec(source, "images", image_size=image_size, bin_edges=PIXEL_EDGES)
    return Plan(spec, tasks, [], {"label": "folder name"}, row_noun="images",
                class_order=class_folders)


def class_order(labels: list[str]) -> list[str]:
    """Class names in order: by number where every label is one (2 before 10), else as text."""
    try:
        return sorted(labels, key=lambda label: (float(label), label))
    except ValueError:
        return sorted(labels)
