"""Memory and throughput of the data step and of one training worker at 1x and 10x the rows.

The bench writes a synthetic Parquet table (FEATURES float64 columns and a label; row groups of
ROW_GROUP rows, as a warehouse export has them) at 1x and 10x the rows, the 10x one over 2 GB.
Each measurement is a fresh process, and its peak resident memory is the kernel's (`wait4`'s
ru_maxrss): prepare-data (the Beam pipeline, DirectRunner) on each source, then one training
worker (rank 0 of 1, as under torchrun) for one epoch on each prepared train split. Memory should
stay flat as the data grows (the model is a small mlp, one epoch: the reading, not the model,
is measured) (growth at most 1.3), and the data step's rows per second should
hold (10x over 1x at least 0.8). Ratios come from one run on one machine; the absolute figures
depend on it, so the CPU is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from torchship.components.benchmark.engine import cpu_model

FEATURES, CLASSES = 32, 10
ROWS_1X = int(os.environ.get("BENCH_DATA_ROWS", "850000"))  # x 10 = 8.5M rows, about 2.2 GB
ROW_GROUP = 65_536
GOAL_RSS_GROWTH, GOAL_RATE = 1.3, 0.8

PREPARE = """
import json, sys, time
from torchship.components.data.stage import prepare_data
source, out = sys.argv[1], sys.argv[2]
started = time.perf_counter()
meta = prepare_data(source, "label", out + "/train", out + "/val", out + "/test")
print("RESULT " + json.dumps({"seconds": time.perf_counter() - started, "rows": meta["n_rows"],
                              "shards": meta["n_shards"]}))
"""

TRAIN = """
import json, os, socket, sys
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port))
from torchship.components.train.stage import train_model
out = sys.argv[1]
metrics = train_model(out + "/train", out + "/val", out + "/model.pt", model_name="mlp",
                      model_options={"hidden": 64, "depth": 1}, epochs=1, batch_size=4096,
                      num_workers=1, progress=lambda _: None)
print("RESULT " + json.dumps({"samples_per_second": metrics["samples_per_second"]}))
"""


def write_source(path: Path, rows: int) -> int:
    """A synthetic table whose label depends on the features, written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(FEATURES, CLASSES))
    writer = None
    for start in range(0, rows, ROW_GROUP):
        n = min(ROW_GROUP, rows - start)
        x = rng.normal(size=(n, FEATURES))
        columns = {f"f{i}": x[:, i] for i in range(FEATURES)}
        columns["label"] = (x @ weights).argmax(axis=1).astype(np.int64)
        table = pa.table(columns)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="none")
        writer.write_table(table)
    assert writer is not None
    writer.close()
    return path.stat().st_size


def measure(code: str, *args: str) -> tuple[float, dict]:
    """Run `code` in a fresh Python; its peak resident memory in MB and its RESULT line."""
    process = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                               text=True)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if line.startswith(("data:", "torchship")):
            print("   ", line.rstrip(), flush=True)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"bench-data: a measured process failed (exit {process.returncode})")
    result = next(json.loads(line[len("RESULT "):]) for line in lines
                  if line.startswith("RESULT "))
    return usage.ru_maxrss / 1024, result  # ru_maxrss is in KiB on Linux


def main() -> None:
    print(f"cpu: {cpu_model() or 'unknown'}, {os.cpu_count()} cores")
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for scale in (1, 10):
            rows = ROWS_1X * scale
            source = Path(tmp) / f"source-{scale}x.parquet"
            started = time.perf_counter()
            size = write_source(source, rows)
            print(f"{scale}x: {rows:,} rows, {size / 1e9:.2f} GB of Parquet written in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            out = Path(tmp) / f"out-{scale}x"
            rss, result = measure(PREPARE, str(source), str(out))
            rate = rows / result["seconds"]
            print(f"{scale}x prepare-data: peak RSS {rss:.0f} MB, {result['seconds']:.1f} s, "
                  f"{rate:,.0f} rows/s, shards {result['shards']}", flush=True)
            source.unlink()
            train_rss, trained = measure(TRAIN, str(out))
            print(f"{scale}x training worker: peak RSS {train_rss:.0f} MB, "
                  f"{trained['samples_per_second']:,.0f} samples/s", flush=True)
            figures.update({f"source_gb_{scale}x": size / 1e9, f"prepare_rss_mb_{scale}x": rss,
                            f"train_rss_mb_{scale}x": train_rss,
                            f"prepare_rows_per_s_{scale}x": rate})
    figures["prepare_rss_growth_10x"] = figures["prepare_rss_mb_10x"] / figures["prepare_rss_mb_1x"]
    figures["train_rss_growth_10x"] = figures["train_rss_mb_10x"] / figures["train_rss_mb_1x"]
    figures["prepare_rows_per_s_10x_over_1x"] = (figures["prepare_rows_per_s_10x"]
                                                 / figures["prepare_rows_per_s_1x"])
    print(f"goals: rss growth <= {GOAL_RSS_GROWTH}, rows/s 10x over 1x >= {GOAL_RATE}")
    for name, value in figures.items():
        print(f"{name} = {value:.3f}" if value < 100 else f"{name} = {value:.0f}")


if __name__ == "__main__":
    main()
