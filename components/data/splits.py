"""The splits prepare-data writes and every later stage reads: each model input by its tensor
name, the labels, the class names and the tensor contract. Stages read splits only through here
(and `shards`, for streaming), so how a split is stored can change without them. A split is a
folder of Parquet shards with an index (`shards`); a single `.npz` file, the format before, is
still read."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from torchship.components.contracts import TensorContract
from torchship.components.errors import UserInputError

if TYPE_CHECKING:
    from torchship.components.data.shards import ShardIndex

__all__ = ["EVALUATION_ROWS", "Split", "load_inputs", "load_split", "sample_pieces", "save_split",
           "split_index"]

# Accuracy is measured on at most this many rows of a split (spread over its shards): its
# standard error is then below 0.12 points, and a stage's memory does not grow with the data.
EVALUATION_ROWS = 200_000

# Keys of a split file that are not model inputs.
_LABELS, _CLASSES, _CONTRACT = "y", "class_names", "contract"
# Before the tensor contract a split held one float matrix under this key: read as a table.
_TABLE_KEY = "x"


@dataclass
class Split:
    """One split: ``inputs`` in the contract's order, ``y`` int64 class indices."""

    inputs: dict[str, np.ndarray]
    y: np.ndarray
    class_names: list[str]
    contract: TensorContract
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # mean, std, feature_names, ...

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, index: slice | Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The same rows of every input."""
        return {name: array[index] for name, array in self.inputs.items()}


def save_split(path: str | os.PathLike, inputs: Mapping[str, np.ndarray], y: np.ndarray,
               class_names: Sequence[str], contract: TensorContract,
               **extra: np.ndarray) -> None:
    """Write rows already standardised as a split folder of one shard and its index, whole or
    not at all (prepare-data's own splits come from the Beam pipeline, `beam_prepare`)."""
    from torchship.components.data.shards import encode_shard, shard_name, write_file, write_index
    from torchship.components.files import staged_dir

    missing = [name for name in contract.input_names if name not in inputs]
    if missing:
        raise ValueError(f"split for {path}: no array for inputs {missing}")
    y = np.asarray(y, dtype=np.int64)
    names = [str(c) for c in class_names]
    arrays = {name: np.asarray(inputs[name]) for name in contract.input_names}
    with staged_dir(path) as staging:
        data, groups = encode_shard(arrays, [names[i] for i in y],
                                    np.arange(len(y), dtype=np.uint64))
        entry = {**write_file(str(staging), shard_name(0), data), "rows": len(y),
                 "row_groups": groups}
        write_index(str(staging), {
            "n_rows": len(y), "contract": contract.to_dict(), "class_names": names,
            "class_counts": np.bincount(y, minlength=len(names)).tolist(),
            "shapes": {n: list(a.shape[1:]) for n, a in arrays.items()},
            "dtypes": {n: str(a.dtype) for n, a in arrays.items()},
            "shards": [entry], "standardise": None,
            "extra": {key: np.asarray(value).tolist() for key, value in extra.items()}})


def split_index(path: str | os.PathLike, what: str = "dataset split") -> ShardIndex:
    """The index of a split folder: its shards, row groups, contract and class names, without
    reading a row."""
    from torchship.components.data.shards import is_sharded, read_index

    if not is_sharded(str(path)):
        raise UserInputError(f"{what} '{path}' is not a split folder written by prepare_data "
                             "(no index.json); pass the split itself")
    return read_index(str(path), what)


def sample_pieces(index: ShardIndex, rows: int | None) -> list:
    """Row groups holding at least ``rows`` rows (all of them for None), spread evenly over the
    split: a bounded sample of every part of the source (its first and its newest files alike)
    that reads nothing else."""
    pieces = index.pieces()
    total = sum(piece.rows for piece in pieces)
    if rows is None or rows >= total:
        return pieces
    mean_rows = total / len(pieces)
    wanted = min(len(pieces), max(1, int(np.ceil(rows / mean_rows))))
    while True:
        chosen = [pieces[int(i)] for i in
                  np.unique(np.linspace(0, len(pieces) - 1, wanted).round().astype(int))]
        if sum(piece.rows for piece in chosen) >= rows or wanted == len(pieces):
            return chosen
        wanted += 1


def load_split(path: str | os.PathLike, what: str = "dataset split",
               labels: bool = True, rows: int | None = None) -> Split:
    """Read a split written by prepare_data (with ``rows``, that many rows from row groups spread
    over the split, reading only those); ``what`` names the argument in errors. Without
    ``labels`` a file of inputs alone will do (its ``y`` is then empty)."""
    from torchship.components.data.shards import is_sharded

    if is_sharded(str(path)):
        index = split_index(path, what)
        arrays = index.read(sample_pieces(index, rows))
        y = arrays.pop("y")[:rows]
        inputs = {name: arrays[name][:rows] for name in index.contract.input_names}
        extra = {key: np.asarray(value)
                 for key, value in (index.document.get("extra") or {}).items()}
        return Split(inputs, y, list(index.class_names), index.contract, extra)
    split = _load_npz_split(path, what, labels)
    if rows is not None:
        split = Split(split.rows(slice(0, rows)), split.y[:rows], split.class_names,
                      split.contract, split.extra)
    return split


def _load_npz_split(path: str | os.PathLike, what: str, labels: bool) -> Split:
    """A split of the single-file format before shards (one ``.npz``), still read."""
    if not Path(path).is_file():
        raise UserInputError(
            f"{what} '{path}' does not exist; pass a split written by prepare_data"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as error:  # not a zip, a member that is not an array, a pickled array
        raise UserInputError(
            f"{what} '{path}' is not a split written by prepare_data ({type(error).__name__}); "
            "pass the split itself"
        ) from error
    y = arrays.pop(_LABELS, None)
    if y is None and not labels:
        y = np.zeros(0, dtype=np.int64)
    classes = arrays.pop(_CLASSES, None)
    if _CONTRACT in arrays:
        contract = TensorContract.from_json(str(arrays.pop(_CONTRACT)))
    elif _TABLE_KEY in arrays and arrays[_TABLE_KEY].ndim == 2:
        x = arrays.pop(_TABLE_KEY)
        n_classes = (len(classes) if classes is not None
                     else int(np.max(y, initial=0)) + 1 if y is not None else 0)
        contract = TensorContract.table(x.shape[1], n_classes)
        arrays[contract.input_names[0]] = x
    else:
        raise UserInputError(
            f"{what} '{path}' has no tensor contract and no 'x' table; pass a split written by "
            "prepare_data"
        )
    missing = [name for name in contract.input_names if name not in arrays]
    if y is None or missing:
        raise UserInputError(
            f"{what} '{path}' lacks {', '.join(missing) or 'its labels y'}; pass a split written "
            "by prepare_data"
        )
    inputs = {name: arrays.pop(name) for name in contract.input_names}
    if labels and any(len(array) != len(y) for array in inputs.values()):
        raise UserInputError(f"{what} '{path}' has inputs and labels of different lengths; "
                             "pass a split written by prepare_data")
    class_names = ([str(c) for c in classes] if classes is not None
                   else [str(i) for i in range(contract.n_classes)])
    return Split(inputs, y.astype(np.int64), class_names, contract, arrays)


def load_inputs(path: str | os.PathLike, what: str = "test_path",
                rows: int | None = None) -> dict[str, np.ndarray]:
    """Every input of a split (its first ``rows`` rows): the rows the serving stages send as
    requests, warm-up samples and smoke tests."""
    split = load_split(path, what, labels=False, rows=rows)
    if min(len(array) for array in split.inputs.values()) == 0:
        raise UserInputError(f"{what}: {path} has no rows; run prepare_data on more data")
    return split.inputs
