"""Training throughput of 1 and 2 DDP workers (gloo, one thread each) on the default 1.1M mlp.

Both runs train the same rows for the same epochs with the same global batch of 4096: one
worker takes four micro-batches of 1024 per optimizer step (gradient accumulation), two workers
two each, so the work per micro-step is the same, and the two-worker run pays one all-reduce of
the 4.5 MB of gradients per optimizer step. Throughput is steady state: samples per second of training in an epoch, as the
workers time it (process start-up, evaluation and checkpoints excluded), the fastest epoch after
the first - as timeit takes the fastest repeat, since other work on the machine only slows one.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from torchship.components.contracts import TensorContract
from torchship.components.data.splits import save_split
from torchship.components.models import MLP, count_parameters
from torchship.components.train.stage import train_model

ROWS = 16_384
FEATURES, CLASSES = 64, 10
EPOCHS = 8  # the first is warm-up and not counted
MICRO_BATCH = 1024
GLOBAL_BATCH = 4096


def write_split(path: Path, rows: int, rng: np.random.Generator, weights: np.ndarray) -> str:
    """A split folder of shards, as prepare-data writes it (training streams it)."""
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    contract = TensorContract.table(FEATURES, CLASSES)
    save_split(path, {contract.input_names[0]: x}, (x @ weights).argmax(axis=1),
               [str(i) for i in range(CLASSES)], contract)
    return str(path)


def steady_samples_per_second(metrics: dict) -> float:
    return max(epoch["samples_per_second"] for epoch in metrics["history"][1:])


def main() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # workers also call torch.set_num_threads(1) on CPU
    load_before = os.getloadavg()[0]  # other work on the machine, before this adds its own
    n_parameters, _ = count_parameters(MLP(FEATURES, CLASSES))
    print(f"model mlp: {n_parameters:,} parameters; {ROWS:,} rows x {EPOCHS} epochs "
          f"(the fastest after the first counted), global batch {GLOBAL_BATCH}, one thread per "
          "worker")
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(FEATURES, CLASSES))
    rates = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        directory = Path(tmp)
        train = write_split(directory / "train", ROWS, rng, weights)
        val = write_split(directory / "val", 2048, rng, weights)
        for workers in (1, 2):
            accumulation = GLOBAL_BATCH // (MICRO_BATCH * workers)
            load = os.getloadavg()[0]
            metrics = train_model(
                train, val, str(directory / f"{workers}proc" / "model.pt"), model_name="mlp",
                epochs=EPOCHS, batch_size=MICRO_BATCH, num_workers=workers, seed=0,
                gradient_accumulation_steps=accumulation,
                progress=lambda line: print(f"  {line}", flush=True),
            )
            assert metrics["global_batch_size"] == GLOBAL_BATCH
            rates[workers] = steady_samples_per_second(metrics)
            median = np.median([epoch["samples_per_second"] for epoch in metrics["history"][1:]])
            print(f"{workers} worker(s), micro-batch {MICRO_BATCH} x {accumulation} "
                  f"accumulation: {rates[workers]:.0f} samples/s in the fastest epoch, "
                  f"{median:.0f} the median (load average {load:.1f} before the run)",
                  flush=True)
    if load_before > 0.5:
        print(f"note: load average {load_before:.1f} before the benchmark on "
              f"{os.cpu_count()} cores: other work shares the CPUs, and two workers suffer "
              "more from it than one (each step waits for the slower); rerun on a quiet "
              "machine for a clean number", file=sys.stderr)
    print(f"train_samples_per_s_1proc = {rates[1]:.1f}")
    print(f"train_samples_per_s_2proc = {rates[2]:.1f}")
    print(f"ddp_scaling_2proc = {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
