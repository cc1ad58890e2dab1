"""The data step's units of work: a source is planned as read tasks (a CSV file, a range of
Parquet row groups, a batch of image files), and each task is read as chunks of a bounded number of
rows: the raw model inputs, each row's label as text and its row key. Planning reads a header or a
listing, never the rows; the Beam pipeline (`beam_prepare`) reads the tasks in parallel.

A row's key is a hash of its content (a table's values and label, a text row's text and label) or
of its name (an image's path under the source): the same row gets the same key in every run and in
the next data the trigger sees, so it lands in the same split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torchship.components.data.sanity import check_numeric
from torchship.components.errors import UserInputError

__all__ = [
    "PIXEL_EDGES",
    "Chunk",
    "ReadSpec",
    "ReadTask",
    "assign_splits",
    "quantile_edges",
    "read_task",
    "write_listing",
]

# A chunk holds about this many bytes of model inputs: what one worker keeps in memory at once.
CHUNK_BYTES = 32 << 20
MIN_CHUNK_ROWS = 256
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_GOLDEN, _MASK = np.uint64(0x9E3779B97F4A7C15), 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class ReadSpec:
    """What the launcher settled before any row is read; every worker reads with it."""

    source: str
    kind: str  # digits, digits-images, csv, parquet, npz, images
    label_column: str = ""
    feature_columns: tuple[str, ...] = ()
    text_column: str = ""
    tokenizer: str = ""
    max_length: int = 0
    image_size: int = 0
    chunk_rows: int = 4096
    # Inner bin edges of each value column's histogram (the drift trigger's reference), one tuple
    # per column, or one for all (image channels).
    bin_edges: tuple[tuple[float, ...], ...] = ()

    @property
    def text(self) -> bool:
        return bool(self.text_column)

    def histograms(self, values: np.ndarray) -> list[list[int]]:
        """Counts per bin of each value column ([rows, columns]; images per channel, every
        pixel), bins from `bin_edges`: (-inf, e0], (e0, e1], ..., (e_last, inf)."""
        columns = values.shape[1]
        counts = []
        for column in range(columns):
            edges = np.asarray(self.bin_edges[column if len(self.bin_edges) > 1 else 0])
            bins = np.searchsorted(edges, values[:, column].ravel(), side="left")
            counts.append(np.bincount(bins, minlength=len(edges) + 1).tolist())
        return counts


def quantile_edges(values: np.ndarray, bins: int = 10) -> tuple[tuple[float, ...], ...]:
    """Inner edges of about `bins` equally filled bins per column of a sample [rows, columns]."""
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: refused later
        quantiles = np.nanquantile(np.asarray(values, dtype=np.float64),
                                   np.linspace(0, 1, bins + 1)[1:-1], axis=0)
    return tuple(tuple(float(e) for e in np.unique(column[np.isfinite(column)]))
                 for column in quantiles.T)


# Pixel values 0-255 in 8 bins, for every channel.
PIXEL_EDGES = (tuple(float(edge) for edge in range(32, 256, 32)),)


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading: a file, some Parquet row groups, or a batch of image files."""

    number: int
    path: str = ""
    row_groups: tuple[int, ...] = ()
    # Images: (class name, path for fsspec, the name the user knows, key text) per file; or,
    # for a remote runner, the byte range of those lines in a JSON-lines listing (a Dataflow job
    # graph must stay small, and a million file names do not).
    files: tuple[tuple[str, str, str, str], ...] = ()
    listing: str = ""
    listing_range: tuple[int, int] = (0, 0)

    def image_files(self) -> list[tuple[str, str, str, str]]:
        if not self.listing:
            return list(self.files)
        import json

        import fsspec

        fs, path = fsspec.core.url_to_fs(self.listing)
        text = fs.cat_file(path, *self.listing_range).decode()
        return [tuple(json.loads(line)) for line in text.splitlines() if line]


def write_listing(tasks: list[ReadTask], uri: str) -> list[ReadTask]:
    """Move the image tasks' file lists to one JSON-lines file at `uri`; each task keeps the
    byte range of its lines."""
    import dataclasses
    import json

    from torchship.components.files import write_bytes

    lines, ranges, offset = [], [], 0
    for task in tasks:
        text = "".join(json.dumps(list(entry)) + "\n" for entry in task.files).encode()
        lines.append(text)
        ranges.append((offset, offset + len(text)))
        offset += len(text)
    data = b"".join(lines)
    if "://" in uri:
        import fsspec

        with fsspec.open(uri, "wb") as handle:
            handle.write(data)
    else:
        write_bytes(uri, data, durable=False)
    return [dataclasses.replace(task, files=(), listing=uri, listing_range=span)
            for task, span in zip(tasks, ranges)]


@dataclass
class Chunk:
    """Rows read by one task, in source order: raw inputs by name, labels as text, row keys, and
    the values statistics are kept over ([rows, features] of a table, token counts of text)."""

    name: str
    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def chunk_rows(row_bytes: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, row_bytes))


def assign_splits(keys: np.ndarray, seed: int, val_fraction: float,
                  test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Each row's split (0 train, 1 val, 2 test) from its key and the seed, and the order to
    write a chunk's rows in (by the seeded key: classes mixed, the same order every run)."""
    with np.errstate(over="ignore"):
        mixed = np.asarray(keys, dtype=np.uint64) ^ (np.uint64(seed & _MASK) * _GOLDEN)
        # splitmix64's finaliser: every bit of the key moves every bit of the result.
        mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        mixed = mixed ^ (mixed >> np.uint64(31))
    unit = (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    split = np.where(unit < test_fraction, 2, np.where(unit < test_fraction + val_fraction, 1, 0))
    return split.astype(np.int8), np.argsort(mixed, kind="stable")


def text_key(texts: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
                     for t in texts], dtype=np.uint64)


def _frame_keys(features: np.ndarray | None, columns: list[Any]) -> np.ndarray:
    import pandas as pd

    frame = pd.DataFrame({f"c{i}": column for i, column in enumerate(columns)})
    if features is not None and features.size:
        frame = pd.concat([pd.DataFrame(features), frame], axis=1)
        frame.columns = [str(c) for c in range(frame.shape[1])]
    return pd.util.hash_pandas_object(frame, index=False).to_numpy().astype(np.uint64)


def read_task(spec: ReadSpec, task: ReadTask, image_mode: str = "") -> Iterator[Chunk]:
    """The chunks of one task (images converted to `image_mode`, "L" or "RGB"). Bad rows raise
    `UserInputError` naming the source and the fix."""
    if spec.kind == "csv":
        import fsspec
        import pandas as pd

        with fsspec.open(spec.source, "rb") as handle:
            for number, frame in enumerate(pd.read_csv(handle, chunksize=spec.chunk_rows)):
                yield _table_chunk(spec, frame, f"{task.number:05d}-{number:05d}")
    elif spec.kind == "parquet":
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(spec.source, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            batches = parquet.iter_batches(batch_size=spec.chunk_rows,
                                           row_groups=list(task.row_groups))
            for number, batch in enumerate(batches):
                yield _table_chunk(spec, batch.to_pandas(), f"{task.number:05d}-{number:05d}")
    elif spec.kind == "digits":
        from sklearn.datasets import load_digits

        frame = load_digits(as_frame=True).frame
        yield _table_chunk(spec, frame, f"{task.number:05d}-00000")
    elif spec.kind in ("npz", "digits-images"):
        yield _loaded_chunk(spec, task)
    elif spec.kind == "images":
        yield from _image_chunks(spec, task, image_mode)
    else:  # pragma: no cover - the launcher plans only the kinds above
        raise ValueError(f"unknown source kind {spec.kind!r}")


def _table_chunk(spec: ReadSpec, frame, name: str) -> Chunk:
    """A table's (or a text table's) rows."""

    from torchship.components.data.sources import _check_finite

    frame.columns = [str(c) for c in frame.columns]
    source, label_column = spec.source, spec.label_column
    label = frame[label_column]
    if label.isna().any():
        raise UserInputError(
            f"data source '{source}' has {int(label.isna().sum())} rows with no value in label "
            f"column '{label_column}'; fill or drop those rows")
    labels = label.astype(str).to_numpy(dtype=object)  # a class is known by its text
    if spec.text:
        return _text_chunk(spec, frame, labels, name)
    columns = list(spec.feature_columns)
    check_numeric(source, frame, columns)
    features = frame[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    _check_finite(source, features, columns)
    keys = _frame_keys(features, [labels])
    return Chunk(name, {"input": features.astype(np.float32)}, labels, keys, features)


def _text_chunk(spec: ReadSpec, frame, labels: np.ndarray, name: str) -> Chunk:
    from torchship.components.data.text import TEXT_INPUTS, load_tokenizer

    text = frame[spec.text_column]
    if text.isna().any():
        raise UserInputError(
            f"data source '{spec.source}' has {int(text.isna().sum())} rows with no text in "
            f"column '{spec.text_column}'; fill or drop those rows")
    texts = [str(t) for t in text]
    tokenizer = _tokenizers.get(spec.tokenizer)
    if tokenizer is None:
        tokenizer = _tokenizers.setdefault(spec.tokenizer, load_tokenizer(spec.tokenizer))
    encoded = tokenizer(texts, max_length=spec.max_length, truncation=True,
                        padding="max_length", return_tensors="np")
    inputs = {key: np.ascontiguousarray(encoded[key], dtype=np.int64) for key in TEXT_INPUTS}
    # Tokens per text, and its characters: the summary drift is judged by (the trigger has no
    # tokenizer, so it compares the characters).
    lengths = np.stack([inputs["attention_mask"].sum(axis=1, dtype=np.float64),
                        np.fromiter(map(len, texts), dtype=np.float64, count=len(texts))], axis=1)
    keys = text_key([f"{t}\x00{label}" for t, label in zip(texts, labels)])
    return Chunk(name, inputs, labels, keys, lengths,
                 {"largest_token": int(inputs["input_ids"].max(initial=0))})


# One tokenizer per worker process, loaded on its first chunk.
_tokenizers: dict[str, Any] = {}


def _loaded_chunk(spec: ReadSpec, task: ReadTask) -> Chunk:
    """A source read whole (an .npz, the built-in images): one chunk."""
    from torchship.components.data.images import digits_images
    from torchship.components.data.sources import load_npz

    data = load_npz(spec.source) if spec.kind == "npz" else digits_images()
    labels = np.array(data.class_names, dtype=object)[data.labels]
    flat = data.features.reshape(len(data.features), -1)
    keys = _frame_keys(flat, [labels])
    values = (data.features.astype(np.float64) if not data.images
              else data.features)
    return Chunk(f"{task.number:05d}-00000", {"input": data.features.astype(np.float32)},
                 labels, keys, values)


def _image_chunks(spec: ReadSpec, task: ReadTask, mode: str) -> Iterator[Chunk]:
    """A batch of image files, decoded, resized and converted to `mode`, as chunks of about
    CHUNK_BYTES of pixels."""
    import fsspec

    from torchship.components.data.images import BILINEAR, _read_image

    fs = fsspec.core.url_to_fs(spec.source)[0]
    pixels: list[np.ndarray] = []
    labels: list[str] = []
    keys: list[str] = []
    held, number = 0, 0
    files = task.image_files()
    for position, (class_name, path, name, key) in enumerate(files):
        image = _read_image(spec.source, fs, path, name)
        if spec.image_size:
            image = image.resize((spec.image_size, spec.image_size), resample=BILINEAR)
        pixels.append(np.asarray(image.convert(mode or "RGB"), dtype=np.float32))
        labels.append(class_name)
        keys.append(key)
        held += pixels[-1].nbytes
        if held >= CHUNK_BYTES or position == len(files) - 1:
            array = np.stack(pixels)
            features = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)
            features = np.ascontiguousarray(features)
            yield Chunk(f"{task.number:05d}-{number:05d}", {"input": features},
                        np.array(labels, dtype=object), text_key(keys), features)
            pixels, labels, keys, held, number = [], [], [], 0, number + 1
