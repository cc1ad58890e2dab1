"""measure_variants: the variant table, measured the way published pruning/quantisation tables are.

Per exported variant, on the held-out test split and with ONNX Runtime on CPU: accuracy and its
drop from fp32 in points, parameters and non-zero parameters, file size and compressed size,
latency at batch 1 and 64, and agreement of its outputs with fp32 (top-1 and max abs logit
difference).

Latency: one InferenceSession per variant with `intra_op_num_threads` fixed (1 by default, so
a ratio compares kernels, not how many cores each grabbed), inter-op 1, sequential execution,
graph optimisation level ALL. Variants are timed in interleaved rounds (every variant once per
round, in rotating order), each a block of calls on the same input; the figure is the median
over rounds of the per-call mean. Interleaving spreads any background load over all variants
alike, so ratios stay fair on a busy machine.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from torchship.components.contracts import (
    BASELINE,
    MODEL_ONNX,
    OUTPUT_NAME,
    VARIANTS_JSON,
)
from torchship.components.data.splits import EVALUATION_ROWS, Split, load_split
from torchship.components.errors import UserInputError
from torchship.components.files import write_json

LATENCY_BATCH_SIZES = (1, 64)
# zlib at its highest level: about what `gzip -9` gives, the usual "compressed size" figure.
COMPRESSION_LEVEL = 9
WARMUP_CALLS = 3


def measure_variants(
    onnx_dir: str | os.PathLike,
    test_path: str,
    threads: int = 1,
    rounds: int = 5,
    block_s: float = 0.01,
    batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
    write: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every row of `onnx_dir/variants.json`; rewrite it with the measures (atomically)
    unless `write` is false; return the rows."""
    onnx_dir = Path(onnx_dir)
    listing = onnx_dir / VARIANTS_JSON
    if not listing.exists():
        raise UserInputError(
            f"'{onnx_dir}' has no variants.json; pass the directory that export wrote"
        )
    rows = measure_records(json.loads(listing.read_text()), onnx_dir, load_split(test_path, rows=EVALUATION_ROWS),
                           threads, rounds, block_s, batch_sizes, progress)
    if write:
        write_json(rows, listing)
    return rows


def measure_records(
    records: list[dict[str, Any]],
    onnx_root: Path,
    test: Split,
    threads: int = 1,
    rounds: int = 5,
    block_s: float = 0.01,
    batch_sizes: Sequence[int] = LATENCY_BATCH_SIZES,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """The records with the measures added, for `onnx_root/<name>/model.onnx` of each."""
    if not isinstance(threads, int) or threads < 1:
        raise UserInputError(f"latency threads must be a whole number >= 1, got {threads!r}")
    if not isinstance(rounds, int) or rounds < 1:
        raise UserInputError(f"latency rounds must be a whole number >= 1, got {rounds!r}")
    paths = {row["name"]: onnx_root / row["name"] / MODEL_ONNX for row in records}
    missing = [str(path) for path in paths.values() if not path.exists()]
    if missing:
        raise UserInputError(
            f"variant files {', '.join(missing)} do not exist; pass the directory export wrote"
        )
    sessions = {name: latency_session(path, threads) for name, path in paths.items()}
    y = test.y
    logits = {name: session.run([OUTPUT_NAME], test.inputs)[0]
              for name, session in sessions.items()}
    # A latency batch of real rows of every input; a batch the test split is too small for
    # repeats its rows.
    feeds = {size: {name: np.resize(array, (size, *array.shape[1:]))
                    for name, array in test.inputs.items()} for size in batch_sizes}
    latency = interleaved_latency(sessions, feeds, rounds, block_s)

    baseline = next((r for r in records if r["name"] == BASELINE), None)
    measured = []
    for row in records:
        name = row["name"]
        data = paths[name].read_bytes()
        predicted = logits[name].argmax(axis=1)
        row = {
            **row,
            "onnx_size_bytes": row.get("onnx_size_bytes", len(data)),
            "compressed_size_bytes": len(zlib.compress(data, COMPRESSION_LEVEL)),
            "onnx_test_accuracy": float(np.mean(predicted == y)),
            **{f"latency_b{size}_ms": latency[name, size] for size in batch_sizes},
            "latency_settings": {
                "provider": "CPUExecutionProvider", "intra_op_num_threads": threads,
                "inter_op_num_threads": 1, "graph_optimization_level": "ORT_ENABLE_ALL",
                "rounds": rounds, "block_s": block_s, "batch_sizes": list(batch_sizes),
                "statistic": "median over interleaved rounds of the per-call mean",
            },
            "compression": f"zlib level {COMPRESSION_LEVEL}",
        }
        if baseline is not None:
            reference = logits[BASELINE]
            row["fp32_top1_agreement"] = float(np.mean(predicted == reference.argmax(axis=1)))
            row["fp32_max_abs_diff"] = float(np.max(np.abs(logits[name] - reference)))
        measured.append(row)

    if baseline is not None:
        fp32 = next(r for r in measured if r["name"] == BASELINE)
        for row in measured:
            row["acc_drop_pt"] = 100 * (fp32["onnx_test_accuracy"] - row["onnx_test_accuracy"])
            row["size_ratio"] = fp32["onnx_size_bytes"] / row["onnx_size_bytes"]
            if row.get("n_parameters") and fp32.get("n_parameters"):
                row["param_ratio"] = fp32["n_parameters"] / row["n_parameters"]
            for size in batch_sizes:
                key = f"latency_b{size}_ms"
                row[f"speedup_b{size}"] = fp32[key] / row[key]
    if progress:
        for row in measured:
            progress(_summary(row, batch_sizes))
    return measured


def latency_session(path: Path, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime CPU session as every latency here is measured: `threads` intra-op threads,
    sequential, every graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # fp16 on CPU warns about every Cast it keeps
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_latency(
    sessions: dict[str, ort.InferenceSession], feeds: dict[int, dict[str, np.ndarray]],
    rounds: int, block_s: float,
) -> dict[tuple[str, int], float]:
    """Median milliseconds per call for each (variant, batch size); see the module docstring."""
    calls: dict[tuple[str, int], int] = {}
    for name, session in sessions.items():
        for size, feed in feeds.items():
            for _ in range(WARMUP_CALLS):
                session.run([OUTPUT_NAME], feed)
            start = time.perf_counter()
            for _ in range(WARMUP_CALLS):
                session.run([OUTPUT_NAME], feed)
            per_call = (time.perf_counter() - start) / WARMUP_CALLS
            calls[name, size] = max(1, min(10_000, int(block_s / max(per_call, 1e-7))))
    samples: dict[tuple[str, int], list[float]] = defaultdict(list)
    names = list(sessions)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = sessions[name].run
            for size, feed in feeds.items():
                n = calls[name, size]
                start = time.perf_counter()
                for _ in range(n):
                    run([OUTPUT_NAME], feed)
                samples[name, size].append((time.perf_counter() - start) / n * 1e3)
    return {key: float(np.median(values)) for key, values in samples.items()}


def _summary(row: dict[str, Any], batch_sizes: Sequence[int]) -> str:
    latency = ", ".join(f"b{size} {row[f'latency_b{size}_ms']:.3f} ms" for size in batch_sizes)
    drop = row.get("acc_drop_pt")
    drop_text = f" ({drop:+.2f} pt drop)" if drop is not None else ""
    return (f"{row['name']}: test acc {row['onnx_test_accuracy']:.4f}{drop_text}, "
            f"{row['onnx_size_bytes'] / 1024:.0f} KiB ({row['compressed_size_bytes'] / 1024:.0f} "
            f"KiB compressed), {latency}")
