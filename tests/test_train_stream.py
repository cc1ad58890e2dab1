"""Streaming a split into DDP training: a rank reads only its row groups, every row once an epoch
in equal batch counts, resuming mid-epoch from the window that holds the position, and a real
2-process run killed mid-epoch that resumes to the same rows and weights."""

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import one_process_job, process_table

from torchship.components.contracts import TensorContract
from torchship.components.data.shards import (
    ShardIndex,
    encode_shard,
    shard_name,
    write_file,
    write_index,
)
from torchship.components.data.splits import save_split, split_index
from torchship.components.errors import UserInputError
from torchship.components.models import load_checkpoint
from torchship.components.train.checkpoints import checkpoint_dir_for
from torchship.components.train.config import TrainConfig
from torchship.components.train.stage import train_model
from torchship.components.train.stream import TrainStream, range_batches, rank_range

FEATURES, CLASSES = 8, 3
SHARD_ROWS = (300, 500, 200)  # 1000 rows in three shards of 10, 16 and 7 row groups


def sharded_split(folder: Path, shard_rows=SHARD_ROWS, features: int = FEATURES,
                  classes: int = CLASSES, seed: int = 0) -> tuple[str, np.ndarray, np.ndarray]:
    """A split folder of several shards, its row keys the row numbers (so a row's inputs and
    label can be looked up by its key): the path, the inputs and the labels."""
    rng = np.random.default_rng(seed)
    n_rows = sum(shard_rows)
    x = rng.normal(size=(n_rows, features)).astype(np.float32)
    y = (x @ rng.normal(size=(features, classes))).argmax(axis=1)
    names = [f"class{i}" for i in range(classes)]
    folder.mkdir(parents=True)
    shards, first = [], 0
    for number, rows in enumerate(shard_rows):
        part = slice(first, first + rows)
        data, groups = encode_shard({"input": x[part]}, [names[i] for i in y[part]],
                                    np.arange(first, first + rows, dtype=np.uint64))
        shards.append({**write_file(str(folder), shard_name(number), data), "rows": rows,
                       "row_groups": groups})
        first += rows
    write_index(str(folder), {
        "n_rows": n_rows, "contract": TensorContract.table(features, classes).to_dict(),
        "class_names": names, "class_counts": np.bincount(y, minlength=classes).tolist(),
        "shapes": {"input": [features]}, "dtypes": {"input": "float32"}, "shards": shards,
        "standardise": None, "extra": {}})
    return str(folder), x, y


class RecordingIndex(ShardIndex):
    """A split's real index that also records the pieces of every read."""

    def __init__(self, path: str):
        index = split_index(path)
        super().__init__(index.folder, index.document, index.what)
        self.reads: list[list] = []

    def read(self, pieces, keys=False):
        self.reads.append(list(pieces))
        return super().read(pieces, keys)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return sharded_split(tmp_path_factory.mktemp("stream") / "train")


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_reads_only_the_row_groups_of_its_range(split, world_size):
    path, _, _ = split
    index = RecordingIndex(path)
    assert len({piece.shard for piece in index.pieces()}) == 3 and len(index.pieces()) == 33
    stream = TrainStream(index, world_size, batch_size=50, seed=0, shuffle_rows=150)
    for epoch in (0, 1):
        order = stream.order(epoch)
        starts = dict(zip(order, np.cumsum([0] + [p.rows for p in order])))
        taken: dict = {}  # piece -> the (start, stop) rows each rank took of it
        keys = []
        for rank in range(world_size):
            index.reads.clear()
            keys += [key for batch in stream.batches(epoch, rank) for key in batch["row_key"]]
            read = [piece for call in index.reads for piece in call]
            slices = stream.slices_for(epoch, rank)
            # Its own pieces, each read once: nothing of another rank's range.
            assert Counter(read) == Counter(s.piece for s in slices)
            # Its slices are its range of the epoch's sequence of rows, in that order.
            lo, hi = rank_range(1000, rank, world_size)
            assert starts[slices[0].piece] + slices[0].start == lo
            assert starts[slices[-1].piece] + slices[-1].stop == hi
            assert all(starts[a.piece] + a.stop == starts[b.piece] + b.start
                       for a, b in itertools.pairwise(slices))
            # Only its first and last row groups can be cut (shared with a neighbour).
            assert all(s.start == 0 and s.stop == s.piece.rows for s in slices[1:-1])
            for s in slices:
                taken.setdefault(s.piece, []).append((s.start, s.stop))
        # The ranks' rows of each piece are disjoint and cover it; every row once.
        assert set(taken) == set(index.pieces())
        for piece, parts in taken.items():
            parts.sort()
            assert parts[0][0] == 0 and parts[-1][1] == piece.rows
            assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
        assert sorted(keys) == list(range(1000))


def test_every_row_once_an_epoch_in_equal_batch_counts_and_a_new_order_each_epoch(split):
    path, x, y = split
    index = split_index(path)
    stream = TrainStream(index, 3, batch_size=64, seed=7, shuffle_rows=200)
    assert stream.micro_steps == 6  # ceil(ceil(1000 / 3) / 64)
    orders = []
    for epoch in (0, 1):
        per_rank = [list(stream.batches(epoch, rank)) for rank in range(3)]
        assert [len(batches) for batches in per_rank] == [6, 6, 6]  # no rank waits on another
        sizes = [len(batch["y"]) for batches in per_rank for batch in batches]
        assert max(sizes) - min(sizes) <= 1
        keys = np.concatenate([b["row_key"] for batches in per_rank for b in batches])
        assert sorted(keys.tolist()) == list(range(1000))  # every row exactly once
        for batch in (b for batches in per_rank for b in batches):  # rows travel with keys
            np.testing.assert_array_equal(batch["input"], x[batch["row_key"].astype(int)])
            np.testing.assert_array_equal(batch["y"], y[batch["row_key"].astype(int)])
        orders.append([np.concatenate([b["row_key"] for b in batches]) for batches in per_rank])
    rank0 = [order[0] for order in orders]
    assert set(rank0[0].tolist()) != set(rank0[1].tolist())  # other rows for a rank
    assert not np.array_equal(np.sort(rank0[0]), rank0[0])  # shuffled, not in stored order
    # The same seed gives the same stream; another seed another one.
    again = np.concatenate([b["row_key"] for b in stream.batches(0, 0)])
    np.testing.assert_array_equal(again, rank0[0])
    other = TrainStream(index, 3, batch_size=64, seed=8, shuffle_rows=200)
    assert not np.array_equal(np.concatenate([b["row_key"] for b in other.batches(0, 0)]),
                              rank0[0])


def test_resuming_mid_epoch_reads_only_the_window_holding_the_position(split):
    path, _, _ = split
    index = RecordingIndex(path)
    stream = TrainStream(index, 2, batch_size=40, seed=0, shuffle_rows=150)
    epoch, rank = 1, 1
    whole = list(stream.batches(epoch, rank))
    windows = stream.windows(epoch, rank)
    largest_piece = max(piece.rows for piece in index.pieces())
    assert len(windows) >= 3 and len(whole) == stream.micro_steps == 13
    for k in (1, 5, 9, 12):
        index.reads.clear()
        rebuilt = TrainStream(index, 2, batch_size=40, seed=0, shuffle_rows=150)
        position = rebuilt.position(epoch, rank, k)
        rest = list(rebuilt.batches(epoch, rank, start=k))
        assert len(rest) == len(whole) - k
        for a, b in zip(whole[k:], rest):  # the same sequence as uninterrupted
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
        seen = np.concatenate([b["row_key"] for b in whole[:k] + rest])
        assert len(set(seen.tolist())) == len(seen) == sum(len(b["y"]) for b in whole)
        # The first read is the window that holds the position; none before it is read.
        number = position["window"]
        assert index.reads[0] == [s.piece for s in windows[number]]
        later = {s.piece for window in windows[number:] for s in window}
        assert {piece for call in index.reads for piece in call} <= later
        assert max(sum(p.rows for p in call) for call in index.reads) <= 150 + largest_piece
        first = windows[number][0]
        assert position["shard"] == index.shards[first.piece.shard]["file"]
        assert position["rank"] == rank and position["micro_step"] == k


def test_validation_ranges_cover_the_split_once_reading_their_own_row_groups(split):
    path, _, _ = split
    index = RecordingIndex(path)
    covered = []
    for rank in range(3):
        index.reads.clear()
        lo, hi = rank_range(1000, rank, 3)
        batches = list(range_batches(index, lo, hi, 64))
        # Its rows in stored order: the split's rows lo..hi.
        got = np.concatenate([b["input"] for b in batches])
        np.testing.assert_array_equal(got, split[1][lo:hi])
        np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]),
                                      split[2][lo:hi])
        assert all(len(b["y"]) <= 64 for b in batches)
        starts = np.cumsum([0] + [p.rows for p in index.pieces()])
        own = {p for p, s in zip(index.pieces(), starts) if s < hi and s + p.rows > lo}
        assert {piece for call in index.reads for piece in call} == own
        covered += list(range(lo, hi))
    assert covered == list(range(1000))


def test_too_few_rows_for_the_workers_is_refused(tmp_path):
    contract = TensorContract.table(2, 2)
    save_split(tmp_path / "tiny", {"input": np.zeros((3, 2), np.float32)},
               np.array([0, 1, 0]), ["a", "b"], contract)
    with pytest.raises(UserInputError, match="has 3 rows: too few for 4 workers"):
        TrainStream(split_index(tmp_path / "tiny"), 4, batch_size=8, seed=0, shuffle_rows=16)


def test_stream_settings_are_checked():
    for option, value in (("shuffle_buffer", 0), ("checkpoint_every_steps", -1)):
        with pytest.raises(UserInputError, match=f"--{option.replace('_', '-')} must be"):
            TrainConfig.of("t", "v", "m", {option: value})


def live_processes(marker: str) -> list[int]:
    return [pid for pid, _, state, cmd in process_table() if state != "Z" and marker in cmd]


def test_ddp_run_killed_mid_epoch_resumes_with_the_same_rows(tmp_path):
    train, _, _ = sharded_split(tmp_path / "train", (1500, 1500, 1096), features=64, classes=10)
    val, _, _ = sharded_split(tmp_path / "val", (300,), features=64, classes=10, seed=1)
    # 2 workers, batch 16: 128 optimizer steps an epoch; a checkpoint every 16 within it.
    options = {"epochs": 2, "batch_size": 16, "seed": 0, "num_workers": 2,
               "shuffle_buffer": 512}
    model_path = tmp_path / "run" / "model.pt"
    checkpoints = checkpoint_dir_for(model_path)

    # The real entry point in its own process group, killed (launcher, agent and workers at
    # once, as a preempted VM) as soon as epoch 2's first mid-epoch checkpoint is on disk.
    command = [sys.executable, "-m", "torchship.components.train", "--train-path", train,
               "--val-path", val, "--model-path", str(model_path), "--num-workers", "2",
               "--epochs", "2", "--batch-size", "16", "--seed", "0", "--shuffle-buffer", "512",
               "--checkpoint-every-steps", "16"]
    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("epoch-0002-step-*.pt")):
        assert killed.poll() is None, "the run ended before a mid-epoch checkpoint of epoch 2"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    deadline = time.monotonic() + 10  # the orphaned workers see their agent gone and exit
    while live_processes(str(model_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_processes(str(model_path)) == []
    newest = max(checkpoints.glob("epoch-*.pt")).name
    assert re.fullmatch(r"epoch-0002-step-\d{8}\.pt", newest), newest
    saved = torch.load(checkpoints / newest, weights_only=True)
    within = saved["within_epoch"]
    assert 0 < within["micro_step"] < within["micro_steps"] == 128
    assert [p["rank"] for p in within["positions"]] == [0, 1]
    assert all(p["shard"].endswith(".parquet") and p["row"] >= 0 for p in within["positions"])

    # The same checkpoint taken up by 1 worker: another row order, so epoch 2 starts over.
    shutil.copytree(checkpoints, checkpoint_dir_for(tmp_path / "one" / "model.pt"))
    one_lines: list[str] = []
    with one_process_job():
        one = train_model(train, val, str(tmp_path / "one" / "model.pt"),
                          progress=one_lines.append, **{**options, "num_workers": 1})
    assert one_lines[0].startswith("resuming epoch 2 from its start, not from its micro-step")
    assert "world_size 2 -> 1" in one_lines[0]
    assert one["history"][1]["rows_seen"] == 4096  # every row once in the restarted epoch

    lines: list[str] = []
    resumed = train_model(train, val, str(model_path), progress=lines.append,
                          checkpoint_every_steps=16, **options)
    assert lines[0].startswith(f"resuming mid-epoch 2 at micro-step {within['micro_step']}/128")
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["2/2"]

    # Uninterrupted, and without mid-epoch checkpoints: they change nothing.
    straight = train_model(train, val, str(tmp_path / "straight" / "model.pt"),
                           progress=lambda _: None, **options)
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        assert (a["rows_seen"], a["row_key_digest"]) == (b["rows_seen"], b["row_key_digest"])
        assert a["rows_seen"] == 4096
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["val_loss"] == b["val_loss"]
    assert resumed["optimizer_steps"] == straight["optimizer_steps"] == 256
    model, _ = load_checkpoint(model_path)
    reference, _ = load_checkpoint(tmp_path / "straight" / "model.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    digest = sum(range(4096)) % 2**64  # keys are the row numbers
    assert resumed["history"][1]["row_key_digest"] == f"{digest:016x}"
