"""The rows each training rank reads in an epoch, streamed from a split's row groups so that no
process ever holds the whole split.

Every epoch the row groups ("pieces") are put in an order drawn from (seed, epoch); the N rows
of that sequence are cut into one contiguous, balanced range per rank (rank r of W takes rows
[r*N//W, (r+1)*N//W)), so a rank reads only the row groups holding its range, sharing at most
the two at its ends. Within a rank, rows are shuffled inside windows of consecutive pieces of
about `shuffle_rows` rows, each window's permutation drawn from (seed, epoch, rank, window):
memory stays at about one window and one batch, and any micro-step of the epoch can be found
again by reading only the window that holds it. Every rank runs the same number of
micro-batches, M = ceil(ceil(N/W)/batch_size), its rows cut into M batches whose sizes differ by
at most one, so DDP never waits on a rank that ran out and every row is used once an epoch.

Validation reads each rank's contiguous range of the val split in stored order, in batches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from torchship.components.data.shards import Piece
from torchship.components.data.splits import load_split, split_index
from torchship.components.errors import UserInputError

__all__ = ["WINDOW_BYTES", "InMemoryIndex", "Slice", "TrainStream",
           "open_split", "range_batches", "rank_range"]

# A shuffle window (TrainConfig.shuffle_buffer rows) never holds more than this many bytes of
# rows, however large they are (images).
WINDOW_BYTES = 1 << 30
# Keys of a batch that are not model inputs.
LABELS, ROW_KEY = "y", "row_key"


def open_split(path: str | os.PathLike, what: str = "dataset split") -> Any:
    """The index a stream reads a split through: a split folder's `ShardIndex` (no rows read),
    or, for a split of the single-file format before shards, an `InMemoryIndex` over it."""
    if Path(path).is_file():
        return InMemoryIndex(path, what)
    return split_index(path, what)


class InMemoryIndex:
    """A single-file (`.npz`) split, which can only be read whole, cut into pieces as a shard is
    cut into row groups, so that the stream reads it as it reads a split folder. Its row keys are
    row numbers, as `save_split` writes them."""

    def __init__(self, path: str | os.PathLike, what: str = "dataset split"):
        split = load_split(path, what)
        self.contract, self.class_names = split.contract, list(split.class_names)
        self.n_rows = len(split)
        self._arrays = {**split.inputs, LABELS: split.y,
                        ROW_KEY: np.arange(self.n_rows, dtype=np.uint64)}
        self.shapes = {name: list(a.shape[1:]) for name, a in split.inputs.items()}
        self.dtypes = {name: str(a.dtype) for name, a in split.inputs.items()}
        extra: dict[str, Any] = {key: np.asarray(value).tolist()
                                 for key, value in split.extra.items()}
        if "input_ids" in split.inputs:
            extra["largest_token"] = int(split.inputs["input_ids"].max(initial=0))
        self.document = {"extra": extra}
        per_piece = max(32, -(-self.n_rows // 16))
        sizes = [min(per_piece, self.n_rows - s) for s in range(0, self.n_rows, per_piece)]
        self.shards = [{"file": Path(path).name, "row_groups": sizes}]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)

    def pieces(self) -> list[Piece]:
        return [Piece(0, group, rows) for group, rows in enumerate(self.shards[0]["row_groups"])]

    def read(self, pieces: Sequence[Piece], keys: bool = False) -> dict[str, np.ndarray]:
        rows = np.concatenate([np.arange(self._starts[p.group], self._starts[p.group] + p.rows)
                               for p in pieces] or [np.zeros(0, int)])
        return {name: array[rows] for name, array in self._arrays.items()
                if keys or name != ROW_KEY}


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one piece (row group), as one rank takes them."""

    piece: Piece
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def rank_range(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous, balanced share of `n_rows` rows: [lo, hi)."""
    return rank * n_rows // world_size, (rank + 1) * n_rows // world_size


def _cut(pieces: Sequence[Piece], lo: int, hi: int) -> list[Slice]:
    """The slices of ``pieces`` (in this order) that hold rows [lo, hi) of their sequence."""
    slices, start = [], 0
    for piece in pieces:
        stop = start + piece.rows
        if stop > lo and start < hi:
            slices.append(Slice(piece, max(lo, start) - start, min(hi, stop) - start))
        if stop >= hi:
            break
        start = stop
    return slices


def _read_slices(index: Any, slices: Sequence[Slice], keys: bool) -> dict[str, np.ndarray]:
    """The rows of ``slices``, in order, reading only their pieces."""
    data = index.read([s.piece for s in slices], keys=keys)
    starts = np.cumsum([0] + [s.piece.rows for s in slices])
    if all(s.start == 0 and s.stop == s.piece.rows for s in slices):
        return data
    take = np.concatenate([np.arange(first + s.start, first + s.stop)
                           for first, s in zip(starts, slices)])
    return {name: array[take] for name, array in data.items()}


class TrainStream:
    """An epoch's training rows for each rank of `world_size`, in micro-batches of about
    `batch_size` rows, read from `index` (a `ShardIndex` or `InMemoryIndex`)."""

    def __init__(self, index: Any, world_size: int, batch_size: int, seed: int,
                 shuffle_rows: int, what: str = "train_path"):
        self.index, self.world_size, self.seed = index, world_size, seed
        self.pieces: list[Piece] = index.pieces()
        self.n_rows = sum(piece.rows for piece in self.pieces)
        # Every rank runs this many micro-batches an epoch, its rows cut as evenly as they go.
        self.micro_steps = math.ceil(math.ceil(self.n_rows / world_size) / batch_size)
        if self.n_rows == 0 or self.n_rows // world_size < self.micro_steps:
            raise UserInputError(
                f"{what} has {self.n_rows} rows: too few for {world_size} workers to each run "
                f"{self.micro_steps} batches of {batch_size} with none empty; pass a larger "
                "--batch-size or fewer workers")
        self.window_rows = max(1, min(shuffle_rows, WINDOW_BYTES // _row_bytes(index)))

    def order(self, epoch: int) -> list[Piece]:
        """The epoch's order of every piece: the same on every rank."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces))
        return [self.pieces[i] for i in permutation]

    def slices_for(self, epoch: int, rank: int) -> list[Slice]:
        """What rank `rank` reads in `epoch`: its range of the epoch's sequence of rows."""
        return _cut(self.order(epoch), *rank_range(self.n_rows, rank, self.world_size))

    def windows(self, epoch: int, rank: int) -> list[list[Slice]]:
        """The rank's slices in shuffle windows: consecutive slices of about `window_rows`."""
        windows: list[list[Slice]] = [[]]
        rows = 0
        for piece_slice in self.slices_for(epoch, rank):
            if rows >= self.window_rows:
                windows.append([])
                rows = 0
            windows[-1].append(piece_slice)
            rows += piece_slice.rows
        return [window for window in windows if window]

    def bounds(self, rank: int) -> np.ndarray:
        """Where each of the rank's M micro-batches starts in its rows (and, last, the end)."""
        lo, hi = rank_range(self.n_rows, rank, self.world_size)
        steps = np.arange(self.micro_steps + 1, dtype=np.int64)
        return steps * (hi - lo) // self.micro_steps

    def batches(self, epoch: int, rank: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The rank's micro-batches of `epoch` from micro-step `start` on: every input by name,
        `y` and `row_key`. Starting past 0 reads only from the window that holds the position."""
        bounds = self.bounds(rank)
        windows = self.windows(epoch, rank)
        starts = np.cumsum([0] + [sum(s.rows for s in window) for window in windows])
        loaded, window = -1, {}
        offset = int(bounds[start])
        for step in range(start, self.micro_steps):
            stop, parts = int(bounds[step + 1]), []
            while offset < stop:
                if loaded < 0 or offset >= starts[loaded + 1]:
                    # Let the last window go before the next is read: a batch that spans both
                    # keeps a copy of its own rows of it, not a view that holds all of it.
                    parts = [{name: array.copy() for name, array in part.items()}
                             for part in parts]
                    window = {}
                    loaded = int(np.searchsorted(starts, offset, side="right")) - 1
                    window = self._shuffled(epoch, rank, loaded, windows[loaded])
                first = offset - int(starts[loaded])
                last = min(stop, int(starts[loaded + 1])) - int(starts[loaded])
                parts.append({name: array[first:last] for name, array in window.items()})
                offset += last - first
            yield (parts[0] if len(parts) == 1 else
                   {name: np.concatenate([part[name] for part in parts]) for name in parts[0]})

    def _shuffled(self, epoch: int, rank: int, number: int,
                  window: Sequence[Slice]) -> dict[str, np.ndarray]:
        data = _read_slices(self.index, window, keys=True)
        rng = np.random.default_rng([self.seed, epoch, rank, number])
        permutation = rng.permutation(len(data[LABELS]))
        return {name: array[permutation] for name, array in data.items()}

    def position(self, epoch: int, rank: int, micro_step: int) -> dict[str, Any]:
        """Where rank `rank` is at `micro_step` of `epoch`, for the record: the shard file and
        row of the first row of the window it reads on from, and how far into that window."""
        offset = int(self.bounds(rank)[micro_step])
        windows = self.windows(epoch, rank)
        starts = np.cumsum([0] + [sum(s.rows for s in window) for window in windows])
        number = int(np.searchsorted(starts, offset, side="right")) - 1
        where: dict[str, Any] = {"rank": rank, "micro_step": micro_step, "rank_row": offset}
        if number >= len(windows):
            return {**where, "window": None, "shard": None, "row": None}
        first = windows[number][0]
        shard = self.index.shards[first.piece.shard]
        row = sum(shard["row_groups"][:first.piece.group]) + first.start
        return {**where, "window": number, "shard": shard["file"], "row": int(row),
                "rows_into_window": offset - int(starts[number])}


def _row_bytes(index: Any) -> int:
    """Bytes of one row once read (a standardised input is float32, whatever it is stored as)."""
    total = 0
    for name in index.contract.input_names:
        itemsize = max(4, np.dtype(index.dtypes[name]).itemsize)
        total += int(np.prod(index.shapes[name], dtype=np.int64)) * itemsize
    return max(1, total)


def range_batches(index: Any, lo: int, hi: int,
                  batch_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows [lo, hi) of a split in stored order, in batches of at most `batch_rows`, reading
    only the pieces that hold them, a few at a time."""
    pending: list[Slice] = []
    rows = 0
    slices = _cut(index.pieces(), lo, hi)
    for number, piece_slice in enumerate(slices):
        pending.append(piece_slice)
        rows += piece_slice.rows
        if rows >= batch_rows or number == len(slices) - 1:
            data = _read_slices(index, pending, keys=False)
            for first in range(0, rows, batch_rows):
                yield {name: array[first:first + batch_rows] for name, array in data.items()}
            pending, rows = [], 0
