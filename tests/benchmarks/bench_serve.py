"""`make bench-serve`: how well the local Triton server scales with dynamic batching.

Builds a model repository for the default model (`mlp` on `digits`; untrained, since latency does
not depend on the weights) with dynamic batching on, launches the bundled `tritonserver` once and
measures concurrency 1 and 8 at batch size 1, alternating, `--rounds` times each. Each level's
figure is its best round (as `timeit` takes the best run: load from other programs on a shared
machine only ever slows a level down, and concurrency 8, which needs every core, more so); the
medians are printed too. The benchmark measures with perf_analyzer where it is installed (the
client and its version are printed). Then, on the same server:

* Triton's own cost: the median p50 at concurrency 1, batch 1 over the rounds, minus the p50 of
  the same ONNX model run in this process by ONNX Runtime (one thread, as the served model runs);
* agreement with perf_analyzer (``components/benchmark/agreement.py``): throughput, p50 and p99
  at concurrency 1 and 8 over gRPC and HTTP, the benchmark against direct perf_analyzer runs
  (p50 and p99 over every request of all rounds pooled).

It prints the CPU model and core count it ran on, and ends with

    triton_c8_over_c1_throughput = X      (goal: at least 2.5)
    triton_overhead_p50_ms = X            (Triton p50 minus in-process ONNX Runtime p50)
    perf_analyzer_agreement_pct = X       (the largest disagreement; goal: at most 10)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from torchship.components.benchmark.agreement import agreement
from torchship.components.benchmark.engine import cpu_model
from torchship.components.benchmark.stage import benchmark_endpoint
from torchship.components.contracts import ServingSettings
from torchship.components.data.splits import load_inputs
from torchship.components.data.stage import prepare_data
from torchship.components.models import build_model, export_onnx
from torchship.components.triton.repository import build_model_repository
from torchship.components.triton.server import TritonServer

# Dynamic batching settings measured to scale best on a small CPU machine (see README).
MAX_QUEUE_DELAY_US = 100
PREFERRED_BATCH_SIZES: tuple[int, ...] | None = None
INSTANCE_COUNT = 1


def ort_p50_ms(model_path: Path, test_path: Path, runs: int = 3000) -> float:
    """p50 of one batch-1 request to the model in this process, ONNX Runtime on one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    x = load_inputs(test_path, what="test_path")["input"].astype(np.float32)
    name = session.get_inputs()[0].name
    for i in range(200):
        session.run(None, {name: x[i % len(x)][None]})
    times = []
    for i in range(runs):
        begin = time.perf_counter()
        session.run(None, {name: x[i % len(x)][None]})
        times.append(time.perf_counter() - begin)
    return float(np.median(times) * 1e3)


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
    parser.add_argument("--agreement-rounds", type=int, default=3)
    args = parser.parse_args(argv)

    print(f"host: {cpu_model() or 'unknown CPU'}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="torchship-bench-serve-") as tmp:
        repository, test_path = build_repository(Path(tmp), args)
        ort_ms = ort_p50_ms(Path(tmp) / "onnx" / "fp32" / "model.onnx", test_path)
        with TritonServer(repository) as server:
            urls = {"grpc": server.grpc_url, "http": server.http_url}
            result = benchmark_endpoint(
                urls[args.protocol], args.protocol, ["fp32"], test_path,
                concurrency=(1, 8) * args.rounds, batch_size=1, warmup_s=0.5,
                duration_s=3 * args.window_s, window_s=args.window_s, max_windows=6,
                progress=print, client_processes=args.client_processes,
            )
            agreed = agreement(urls, "fp32", test_path, levels=(1, 8),
                               rounds=args.agreement_rounds, progress=print)
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
    clients = ", ".join(f"{name} {version}" for name, version in result["clients"])
    cost = statistics.median(r["client"]["cpu_s_per_request"] or 0.0 for r in by_level[1])
    print(f"measured by {clients}; client CPU {cost * 1e6:.0f} us per request at c1, on the "
          "server's host")
    triton_p50 = statistics.median(r["p50_ms"] for r in by_level[1])
    print(f"Triton p50 at c1, batch 1 ({args.protocol}): {triton_p50:.3f} ms (median of "
          f"{len(by_level[1])} rounds); ONNX Runtime in process: {ort_ms:.3f} ms")
    worst = agreed["worst"]
    print(f"largest disagreement with perf_analyzer {agreed['perf_analyzer_version']}: "
          f"{worst['figure']} at {worst['protocol']} c{worst['concurrency']}")
    ratio = best[8]["throughput_rps"] / best[1]["throughput_rps"]
    print(f"triton_c8_over_c1_throughput = {ratio:.2f}")
    print(f"triton_overhead_p50_ms = {triton_p50 - ort_ms:.3f}")
    print(f"perf_analyzer_agreement_pct = {agreed['max_disagreement_pct']:.1f}")
    itself = max(max(row["self_disagreement_pct"].values()) for row in agreed["levels"])
    print(f"perf_analyzer_self_disagreement_pct = {itself:.1f}  (its odd rounds against its even "
          "rounds: the noise floor on this machine now)")
    at = next(row for row in agreed["levels"] if row["protocol"] == worst["protocol"]
              and row["concurrency"] == worst["concurrency"])
    print(f"perf_analyzer_noise_pct = {at['noise_pct'][worst['figure']]:.1f}  (twice the standard "
          "error of the difference at the largest disagreement, from both sides' rounds)")
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
