"""`make bench-search`: what the joint serving search buys, and what it costs against measuring
every candidate fully.

On the built-in digits data, three variants of the default `mlp` (untrained, since latency does
not depend on the weights: `fp32`, and the narrower students `distilled` and `tiny`) x
instance_count (1, 2) x max_queue_delay_us (100, 2000) x max_batch_size (64, 1) are searched
under a p99 budget at concurrency 4, choosing by throughput per core: once by successive halving
(the pipeline's search), once exhaustively (one round, every candidate with the benchmark's full
warm-up and windows). The last lines are

    search_best_over_default_throughput = X   (the search's choice over the gate's variant with
                                               the default settings, throughput per core, both
                                               from the exhaustive sweep's full windows)
    search_wall_s_over_exhaustive = Y         (goal: at most 0.5)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from torchship.components.benchmark.engine import cpu_model
from torchship.components.data.stage import prepare_data
from torchship.components.models import build_model, export_onnx
from torchship.components.tune_serving.stage import candidate_name, search_serving_config

VARIANTS = {"fp32": 1024, "distilled": 256, "tiny": 64}  # the mlp's hidden width
DEFAULT = candidate_name("fp32", {"instance_count": 1, "max_queue_delay_us": 100,
                                  "max_batch_size": 64})


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


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-ms", type=float, default=10.0, help="the p99 SLO")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--window-s", type=float, default=1.0, help="a full window")
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args(argv)
    runs = {}
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
    search, exhaustive = runs["search"], runs["exhaustive"]
    chosen = search["chosen"] or DEFAULT
    measured = sum(len(c["rounds"]) for c in search["candidates"])
    print(f"cpu: {cpu_model() or 'unknown'}, {os.cpu_count()} cores; {len(search['candidates'])} candidates, "
          f"p99 budget {args.budget_ms:g} ms at concurrency {args.concurrency}")
    print(f"search: chose {chosen} in {search['wall_s']:.1f} s ({measured} levels measured in "
          f"{len(search['schedule'])} rounds; tied: {', '.join(search['tied']) or 'none'})")
    print(f"exhaustive: chose {exhaustive['chosen']} in {exhaustive['wall_s']:.1f} s (tied: "
          f"{', '.join(exhaustive['tied']) or 'none'}); the search's choice "
          f"{'is among' if chosen in [exhaustive['chosen'], *exhaustive['tied']] else 'is not'}"
          " its best")
    figures = {
        "search_best_over_default_throughput": per_core(exhaustive, chosen)
        / per_core(exhaustive, DEFAULT),
        "search_wall_s_over_exhaustive": search["wall_s"] / exhaustive["wall_s"],
    }
    print(f"default {DEFAULT}: {per_core(exhaustive, DEFAULT):.0f} req/s per core; chosen "
          f"{chosen}: {per_core(exhaustive, chosen):.0f} req/s per core (exhaustive's windows)")
    for name, value in figures.items():
        print(f"{name} = {value:.2f}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
