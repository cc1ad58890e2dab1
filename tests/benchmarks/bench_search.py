"""`make bench-search`: what the joint serving search buys, and what it costs against measuring
every candidate fully.

On the built-in digits data, three variants of the default `mlp` (untrained, since latency does
not depend on the weights: `fp32`, and the narrower students `distilled` and `tiny`) x
instance_count (1, 2) x max_queue_delay_us (100, 2000) x max_batch_size (64, 1) are searched
under a p99 budget at concurrency 4, choosing by throughput per core: once by successive halving
(the pipeline's search), once exhaustively (one round, every candidate one level of the
benchmark's full warm-up and windows). Then the search's choice and the default (the gate's variant `fp32` with
the default settings) are measured head to head on one fresh tritonserver: `PAIRS` pairs of
full levels (the benchmark's windows), alternating which goes first, so that the drift of a
shared machine hits both alike. The last lines are

    search_best_over_default_throughput = X   (the search's choice over the default, throughput
                                               per core at the p99 SLO's concurrency: the ratio
                                               of the medians over the pairs, with the pairs'
                                               min-max; 1.00 by definition when the search
                                               kept the default)
    search_wall_s_over_exhaustive = Y         (goal: at most 0.5)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from torchship.components.benchmark.engine import cpu_model
from torchship.components.data.stage import prepare_data
from torchship.components.models import build_model, export_onnx
from torchship.components.triton.server import TritonServer
from torchship.components.tune_serving.halving import measure_interleaved
from torchship.components.tune_serving.stage import (
    candidate_name,
    search_serving_config,
    write_candidates,
)

VARIANTS = {"fp32": 1024, "distilled": 256, "tiny": 64}  # the mlp's hidden width
DEFAULT = candidate_name("fp32", {"instance_count": 1, "max_queue_delay_us": 100,
                                  "max_batch_size": 64})
# The head-to-head of the search's choice against the default: this many alternating pairs.
PAIRS = 6


def build_export(work: Path) -> tuple[Path, Path, dict]:
    """The variants as the export stage lays them out, the test split, a passing gate record."""
    test_path = work / "test"
    meta = prepare_data("digits", "label", str(work / "train"), str(work / "val"),
                        str(test_path), seed=0)
    onnx_dir = work / "onnx"
    rows = []
    for name, hidden in VARIANTS.items():
        torch.manual_seed(0)
        model = build_model("mlp", meta["n_features"], meta["n_classes"], {"hidden": hidden})
        export_onnx(model, meta["n_features"], onnx_dir / name / "model.onnx")
        rows.append({"name": name})
    (onnx_dir / "variants.json").write_text(json.dumps(rows))
    gate = {"variant": "fp32", "passed": True, "choice": {"table": [
        {"name": name, "meets_constraints": True} for name in VARIANTS]}}
    return onnx_dir, test_path, gate


def per_core(record: dict, model: str) -> float:
    candidate = next(c for c in record["candidates"] if c["model"] == model)
    level = candidate["levels"][f"c{record['objective']['target_concurrency']}"]
    return level["throughput_rps"] / candidate["settings"]["instance_count"]


def head_to_head(work: Path, onnx_dir: Path, test_path: Path, record: dict, chosen: str,
                 args: argparse.Namespace) -> dict:
    """``chosen`` against ``DEFAULT`` on one fresh tritonserver, ``PAIRS`` pairs of full levels,
    the order alternating: per pair, each one's throughput per core and p99."""
    candidates = [c for c in record["candidates"] if c["model"] in (chosen, DEFAULT)]
    write_candidates(onnx_dir, work / "head-to-head", candidates, test_path)
    with TritonServer(work / "head-to-head") as server:
        levels = measure_interleaved(
            server.grpc_url, [chosen, DEFAULT], str(test_path), args.concurrency, PAIRS,
            say=lambda _line: None, warmup_s=1.0, window_s=args.window_s,
            min_windows=args.windows, max_windows=args.windows)
    cores = {c["model"]: c["settings"]["instance_count"] for c in candidates}
    return {model: {"per_core": [p["throughput_rps"] / cores[model] for p in level["passes"]],
                    "p99_ms": [p["p99_ms"] for p in level["passes"]]}
            for model, level in levels.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-ms", type=float, default=10.0, help="the p99 SLO")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--window-s", type=float, default=1.0, help="a full window")
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args(argv)
    runs, pairs = {}, None
    with tempfile.TemporaryDirectory(prefix="torchship-bench-search-") as tmp:
        onnx_dir, test_path, gate = build_export(Path(tmp))
        for name, rounds in (("search", 3), ("exhaustive", 1)):
            print(f"-- {name} ({rounds} round{'s' if rounds > 1 else ''})")
            runs[name] = search_serving_config(
                onnx_dir, test_path, Path(tmp) / f"{name}.json", gate_record=gate,
                instance_counts=[1, 2], queue_delays_us=[100, 2000], max_batch_sizes=[64, 1],
                target_concurrency=args.concurrency, latency_budget_p99_ms=args.budget_ms,
                rounds=rounds, warmup_s=1.0, window_s=args.window_s,
                duration_s=args.window_s * args.windows, min_windows=args.windows,
                max_windows=args.windows, progress=print)
        chosen = runs["search"]["chosen"] or DEFAULT
        if chosen != DEFAULT:
            print(f"-- head to head: {chosen} against {DEFAULT}, {PAIRS} alternating pairs")
            pairs = head_to_head(Path(tmp), onnx_dir, test_path, runs["search"], chosen, args)
    search, exhaustive = runs["search"], runs["exhaustive"]
    measured = sum(len(c["rounds"]) for c in search["candidates"])
    print(f"cpu: {cpu_model() or 'unknown'}, {os.cpu_count()} cores; {len(search['candidates'])} candidates, "
          f"p99 budget {args.budget_ms:g} ms at concurrency {args.concurrency}")
    print(f"search: chose {chosen} in {search['wall_s']:.1f} s ({measured} levels measured in "
          f"{len(search['schedule'])} rounds; tied: {', '.join(search['tied']) or 'none'})")
    print(f"exhaustive: chose {exhaustive['chosen']} in {exhaustive['wall_s']:.1f} s (tied: "
          f"{', '.join(exhaustive['tied']) or 'none'}); the search's choice "
          f"{'is among' if chosen in [exhaustive['chosen'], *exhaustive['tied']] else 'is not'}"
          " its best")
    print(f"for reference, the exhaustive sweep's own measurements: default {DEFAULT} "
          f"{per_core(exhaustive, DEFAULT):.0f} req/s per core; chosen {chosen} "
          f"{per_core(exhaustive, chosen):.0f} req/s per core")
    if pairs is None:
        why = ("no candidate qualified" if search["chosen"] is None else
               "no candidate was shown better than it")
        ratio, spread = 1.0, f"by definition: the search kept the default {DEFAULT}: {why}"
    else:
        ours, theirs = pairs[chosen], pairs[DEFAULT]
        ratio = statistics.median(ours["per_core"]) / statistics.median(theirs["per_core"])
        each = [a / b for a, b in zip(ours["per_core"], theirs["per_core"])]
        spread = (f"{PAIRS} alternating pairs of full levels on one tritonserver: per-pair "
                  f"ratios {min(each):.2f}-{max(each):.2f}; median per core {chosen} "
                  f"{statistics.median(ours['per_core']):.0f}, {DEFAULT} "
                  f"{statistics.median(theirs['per_core']):.0f} req/s; median p99 "
                  f"{statistics.median(ours['p99_ms']):.2f} and "
                  f"{statistics.median(theirs['p99_ms']):.2f} ms (budget {args.budget_ms:g} ms)")
    figures = {"search_best_over_default_throughput": ratio,
               "search_wall_s_over_exhaustive": search["wall_s"] / exhaustive["wall_s"]}
    print(f"search_best_over_default_throughput = {ratio:.2f}   ({spread})")
    print(f"search_wall_s_over_exhaustive = {figures['search_wall_s_over_exhaustive']:.2f}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
