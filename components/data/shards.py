"""How a split is stored: a folder of Parquet shards and the `index.json` that lists them.

Parquet rather than WebDataset-style tar shards: the rows are decoded, fixed-size tensors (image
pixels after resizing, token ids after tokenising), which a columnar file stores compactly and
reads one row group at a time, so a reader takes a bounded number of rows (a calibration sample,
a rank's part) without reading the rest; pyarrow is already a dependency and Beam, BigQuery and
Dataflow read it natively. Tar shards pay off for encoded media decoded at training time, which
the pipeline does not do. Each shard holds one column per model input (a fixed-size list of its
flattened values), the row's `label` as text and its `row_key` (the hash that chose its split);
the index holds what every reader needs without opening a shard: row counts per shard and row
group, the tensor contract, the class names and counts, a sha256 per shard and the training
statistics that standardise the inputs when they are read.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from torchship.components.contracts import TensorContract
from torchship.components.errors import UserInputError

__all__ = ["FORMAT", "INDEX", "Piece", "ShardIndex", "encode_shard", "is_sharded",
           "read_index", "shard_name", "write_file", "write_index"]

FORMAT = "torchship-shards/1"
INDEX = "index.json"
LABEL, ROW_KEY = "label", "row_key"
# A row group holds at most this many bytes of tensor values: the unit a reader reads and a
# training rank is given. Small shards are cut into at least MIN_GROUPS groups so that a few
# training ranks still share them.
ROW_GROUP_BYTES = 16 << 20
MIN_GROUPS, MIN_GROUP_ROWS = 16, 32


def shard_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def _join(folder: str, name: str) -> str:
    return posixpath.join(str(folder).rstrip("/"), name) if "://" in str(folder) \
        else str(folder).rstrip("/") + "/" + name


def group_rows(rows: int, row_bytes: int) -> int:
    """Rows per row group for a shard of `rows` rows of `row_bytes` bytes each."""
    by_bytes = max(1, ROW_GROUP_BYTES // max(1, row_bytes))
    by_count = max(MIN_GROUP_ROWS, -(-rows // MIN_GROUPS))
    return max(1, min(by_bytes, by_count))


def encode_shard(inputs: Mapping[str, np.ndarray], labels: Sequence[str] | np.ndarray,
                 keys: np.ndarray) -> tuple[bytes, list[int]]:
    """One shard's Parquet bytes, the same bytes for the same rows, and its row-group sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = len(keys)
    columns, row_bytes = {}, 0
    for name, array in inputs.items():
        flat = np.ascontiguousarray(array).reshape(rows, -1)
        row_bytes += flat.shape[1] * flat.dtype.itemsize
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    columns[LABEL] = pa.array([str(label) for label in labels], type=pa.string())
    columns[ROW_KEY] = pa.array(np.asarray(keys, dtype=np.uint64))
    table = pa.table(columns)
    per_group = group_rows(rows, row_bytes)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=per_group, compression="zstd",
                   compression_level=1, write_page_checksum=True, write_statistics=False)
    sizes = [min(per_group, rows - start) for start in range(0, rows, per_group)] or [0]
    return buffer.getvalue(), sizes


def write_file(folder: str, name: str, data: bytes) -> dict[str, Any]:
    """Write one shard whole (a local file by rename; an object store writes whole objects) and
    return its index entry, less the row counts."""
    path = _join(folder, name)
    if "://" in path:
        import fsspec

        with fsspec.open(path, "wb") as handle:
            handle.write(data)
    else:
        from torchship.components.files import write_bytes

        write_bytes(path, data, durable=False)
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def is_sharded(path: str) -> bool:
    """A folder with an index, as prepare-data writes a split."""
    from torchship.components.files import read_json

    try:
        return isinstance(read_json(_join(path, INDEX)), dict)
    except (OSError, ValueError):
        return False


def write_index(folder: str, index: dict[str, Any]) -> None:
    """The index goes last: a folder without one is not a split."""
    from torchship.components.files import write_json

    write_json({"format": FORMAT, **index}, _join(folder, INDEX))


@dataclass(frozen=True)
class Piece:
    """One row group of one shard: the unit a reader reads and a training rank is given."""

    shard: int
    group: int
    rows: int


class ShardIndex:
    """A split's index, and reading its row groups."""

    def __init__(self, folder: str, document: dict[str, Any], what: str = "dataset split"):
        self.folder, self.what, self.document = str(folder), what, document
        self.contract = TensorContract.from_dict(document["contract"])
        self.class_names: list[str] = [str(c) for c in document["class_names"]]
        self.shards: list[dict[str, Any]] = document["shards"]
        self.shapes: dict[str, list[int]] = document["shapes"]
        self.dtypes: dict[str, str] = document["dtypes"]
        self.n_rows = int(document["n_rows"])
        standardise = document.get("standardise") or {}
        self._scale: tuple[str, np.ndarray, np.ndarray, tuple] | None = None
        self._classes = None  # the class names as a pyarrow array, for mapping labels
        if standardise:
            name = standardise["input"]
            ndim = len(self.shapes[name])
            # Per column of a table; per channel (axis 1 of [rows, C, H, W]) of an image.
            reshape = (1, -1) if standardise["per"] == "feature" else (1, -1) + (1,) * (ndim - 1)
            self._scale = (name, np.asarray(standardise["mean"], np.float32).reshape(reshape),
                           np.asarray(standardise["std"], np.float32).reshape(reshape), reshape)

    def pieces(self) -> list[Piece]:
        return [Piece(shard, group, int(rows))
                for shard, entry in enumerate(self.shards)
                for group, rows in enumerate(entry["row_groups"]) if rows]

    def path(self, shard: int) -> str:
        return _join(self.folder, self.shards[shard]["file"])

    def read(self, pieces: Sequence[Piece], keys: bool = False) -> dict[str, np.ndarray]:
        """The rows of ``pieces`` in order, standardised: every input by name, ``y`` (int64
        class indices) and, with ``keys``, ``row_key``."""
        import pyarrow.parquet as pq

        parts: list[dict[str, np.ndarray]] = []
        by_shard: dict[int, list[int]] = {}
        for piece in pieces:
            by_shard.setdefault(piece.shard, []).append(piece.group)
        order = [(p.shard, p.group) for p in pieces]
        tables = {}
        for shard, groups in by_shard.items():
            try:
                with self._open(shard) as handle:
                    parquet = pq.ParquetFile(handle, page_checksum_verification=True)
                    for group in groups:
                        tables[(shard, group)] = parquet.read_row_group(group)
            except UserInputError:
                raise
            except Exception as error:  # a truncated, corrupt or missing shard
                raise UserInputError(
                    f"{self.what} '{self.folder}' shard {self.shards[shard]['file']} could not "
                    f"be read ({type(error).__name__}: {str(error)[:160]}); run prepare_data "
                    "again") from error
        for key in order:
            parts.append(self._arrays(tables[key], keys))
        if not parts:
            return self._arrays(None, keys)
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _open(self, shard: int):
        import fsspec

        return fsspec.open(self.path(shard), "rb").open()

    def _arrays(self, table, keys: bool) -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        out: dict[str, np.ndarray] = {}
        for name in self.contract.input_names:
            shape, dtype = self.shapes[name], np.dtype(self.dtypes[name])
            if table is None:
                out[name] = np.zeros((0, *shape), dtype)
                continue
            column = table.column(name).combine_chunks()
            values = column.flatten().to_numpy(zero_copy_only=False)
            out[name] = values.astype(dtype, copy=False).reshape(len(column), *shape)
        if self._scale is not None and table is not None:
            name, mean, std, _ = self._scale
            out[name] = ((out[name] - mean) / std).astype(np.float32)
        if table is None:
            out["y"] = np.zeros(0, np.int64)
        else:
            labels = table.column(LABEL)
            import pyarrow as pa

            if self._classes is None:  # built once, not for every row group read
                self._classes = pa.array(self.class_names)
            codes = pc.index_in(labels, value_set=self._classes)
            y = codes.to_numpy(zero_copy_only=False)
            if codes.null_count:
                raise UserInputError(f"{self.what} '{self.folder}' has labels outside its index's "
                                     "class names; run prepare_data again")
            out["y"] = y.astype(np.int64)
        if keys:
            out[ROW_KEY] = (np.zeros(0, np.uint64) if table is None
                            else table.column(ROW_KEY).to_numpy().astype(np.uint64))
        return out


def read_index(folder: str, what: str = "dataset split") -> ShardIndex:
    from torchship.components.files import read_json

    try:
        document = read_json(_join(folder, INDEX))
    except (OSError, ValueError) as error:
        raise UserInputError(f"{what} '{folder}' has an unreadable {INDEX} ({error}); run "
                             "prepare_data again") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UserInputError(f"{what} '{folder}' has no {INDEX} of format {FORMAT}; pass a split "
                             "written by prepare_data")
    return ShardIndex(folder, document, what)
