"""`make bench-serve`: how well the local Triton server scales with dynamic batching.

Builds a model repository for the default model (`mlp` on `digits`; untrained, since latency does
not depend on the weights) with dynamic batching on, launches the bundled `tritonserver` once and
measures concurrency 1 and 8 at batch size 1, alternating, `--rounds` times each. Each level's
figure is its best round (as `timeit` takes the best run: load from other programs on a shared
machine only ever slows a level down, and concurrency 8, which needs every core, more so); the
medians are printed too. The last line is

    triton_c8_over_c1_throughput = X      (goal: at least 2.5)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from torchship.components.benchmark.stage import benchmark_repository
from torchship.components.contracts import ServingSettings
from torchship.components.data.stage import prepare_data
from torchship.components.models import build_model, export_onnx
from torchship.components.triton.repository import build_model_repository

# Dynamic batching settings measured to scale best on a small CPU machine (see README).
MAX_QUEUE_DELAY_US = 100
PREFERRED_BATCH_SIZES: tuple[int, ...] | None = None
INSTANCE_COUNT = 1


def build_repository(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    test_path = work / "test.npz"
    meta = prepare_data("digits", "label", str(work / "train.npz"), str(work / "val.npz"),
                        str(test_path), seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", meta["n_features"], meta["n_classes"])
    onnx_dir = work / "onnx"
    export_onnx(model, meta["n_features"], onnx_dir / "fp32" / "model.onnx")
    (onnx_dir / "variants.json").write_text(json.dumps([{"name": "fp32"}]))
    repository = work / "repository"
    build_model_repository(onnx_dir, repository, "python", ServingSettings(
        max_queue_delay_us=args.max_queue_delay_us,
        preferred_batch_sizes=tuple(args.preferred_batch_sizes or ()),
        instance_count=args.instance_count,
    ))
    return repository, test_path


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=("grpc", "http"), default="http")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--max-queue-delay-us", type=int, default=MAX_QUEUE_DELAY_US)
    parser.add_argument("--preferred-batch-sizes", type=int, nargs="*",
                        default=list(PREFERRED_BATCH_SIZES or ()))
    parser.add_argument("--instance-count", type=int, default=INSTANCE_COUNT)
    parser.add_argument("--client-processes", type=int, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="torchship-bench-serve-") as tmp:
        repository, test_path = build_repository(Path(tmp), args)
        result = benchmark_repository(
            repository, test_path, concurrency=(1, 8) * args.rounds, batch_size=1,
            warmup_s=0.5, duration_s=3 * args.window_s, window_s=args.window_s,
            max_windows=6, protocol=args.protocol, progress=print,
            client_processes=args.client_processes,
        )
    by_level: dict[int, list[dict]] = {1: [], 8: []}
    for row in result["results"]:
        by_level[row["concurrency"]].append(row)
    best = {c: max(rows, key=lambda r: r["throughput_rps"]) for c, rows in by_level.items()}
    median = {c: statistics.median(r["throughput_rps"] for r in rows)
              for c, rows in by_level.items()}
    unstable = sum(not r["stable"] for r in result["results"])
    print(f"protocol {args.protocol}; dynamic batching: max_queue_delay_us "
          f"{args.max_queue_delay_us}, preferred_batch_sizes {args.preferred_batch_sizes or '-'}, "
          f"instance_count {args.instance_count}")
    for c in (1, 8):
        row = best[c]
        print(f"concurrency {c}: best {row['throughput_rps']:.0f} req/s (p50 {row['p50_ms']:.2f} ms, "
              f"p99 {row['p99_ms']:.2f} ms, server avg batch "
              f"{(row['server'] or {}).get('avg_batch_size') or 0:.2f}), median {median[c]:.0f} "
              f"req/s over {len(by_level[c])} rounds")
    print(f"{unstable} of {len(result['results'])} levels unstable; median ratio "
          f"{median[8] / median[1]:.2f}")
    ratio = best[8]["throughput_rps"] / best[1]["throughput_rps"]
    print(f"triton_c8_over_c1_throughput = {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
