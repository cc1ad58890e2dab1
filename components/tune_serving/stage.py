"""Serving-configuration search: the gate's chosen model under each Triton setting, the best kept.

As Triton Model Analyzer does, every candidate (instance_count x dynamic batching
max_queue_delay_us) becomes its own model, ``<variant>__i<count>_q<delay>``, in one repository;
one ``tritonserver`` serves them all and ``benchmark_repository`` measures each at concurrency 1
and at the pipeline's target concurrency, with the benchmark stage's method (warm-up, stability
windows). The choice follows the gate's objective at the target concurrency:

* with a p99 budget, the highest throughput among candidates whose p99 meets it;
* else ``optimise="latency"`` (or ``latency_b<N>_ms``): the lowest p99; any other ``optimise``
  (size, accuracy, ...) does not differ between serving settings, so the highest throughput.

A candidate with failed requests never qualifies. Measurements are noisy, so the simplest
qualifying candidate (fewest instances, then the shortest delay) is kept unless the best one
beats it by more than the band: ``margin_pct`` or the measured spread of the two levels' windows
on that metric, whichever is larger. When no candidate qualifies (a budget the search could not
meet), the default settings, the ones the gate measured and passed, are kept, and the record says
so; the stage does not fail, since the gate already approved the model under those settings.

The record (schema ``torchship.serving-search/v1``, written atomically)::

    {"schema", "variant", "objective": {"metric", "optimise", "latency_budget_p99_ms",
     "target_concurrency", "margin_pct"}, "searched": {"instance_count": [...],
     "max_queue_delay_us": [...]}, "default": settings, "concurrency": [levels], "method": {...},
     "candidates": [{"model", "settings", "simplicity", "levels": {"c1": {p50_ms, p95_ms, p99_ms,
     throughput_rps, errors, stable, spread_pct, server_queue_us, server_compute_infer_us}, ...},
     "qualifies", "why_not"}], "chosen": model or None, "settings": what to deploy with,
     "reason", "server_startup_s", "wall_s", "created_at"}
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torchship.components.benchmark.results import find_level
from torchship.components.benchmark.stage import benchmark_repository
from torchship.components.contracts import MODEL_ONNX, TARGET_CONCURRENCY, ServingSettings
from torchship.components.data.splits import load_inputs
from torchship.components.errors import UserInputError
from torchship.components.files import write_json
from torchship.components.gate.choice import OPTIMISE
from torchship.components.scratch import scratch_dir
from torchship.components.triton.repository import (
    onnx_variants,
    validate_model_repository,
    write_model,
)
from torchship.components.tune_serving.choice import (
    DEFAULT_SETTINGS,
    MARGIN_PCT,
    choose_settings,
    describe,
    format_candidate_table,
    objective_text,
    serving_objective,
)

__all__ = ["INSTANCE_COUNTS", "QUEUE_DELAYS_US", "SCHEMA", "candidate_name",
           "candidate_settings", "search_serving_config"]

SCHEMA = "torchship.serving-search/v1"
# The grid searched by default: 2 instance counts x 2 dynamic-batching delays.
INSTANCE_COUNTS = (1, 2)
QUEUE_DELAYS_US = (100, 2000)


def candidate_settings(instance_counts: Sequence[int],
                       queue_delays_us: Sequence[int]) -> list[dict[str, int]]:
    """The grid, simplest first; an empty axis is not searched (its default is used), and two
    empty axes mean no search at all (no candidate)."""
    if not instance_counts and not queue_delays_us:
        return []
    counts = sorted({int(c) for c in instance_counts}) or [DEFAULT_SETTINGS["instance_count"]]
    delays = sorted({int(d) for d in queue_delays_us}) or [DEFAULT_SETTINGS["max_queue_delay_us"]]
    if counts[0] < 1:
        raise UserInputError(f"instance_counts: {counts[0]} must be 1 or more; pass e.g. [1, 2]")
    if delays[0] < 0:
        raise UserInputError(f"queue_delays_us: {delays[0]} is negative; pass e.g. [100, 2000]")
    return [{"instance_count": c, "max_queue_delay_us": d} for c in counts for d in delays]


def candidate_name(variant: str, settings: dict[str, int]) -> str:
    """The Triton model name of one candidate, e.g. ``fp32__i2_q2000``."""
    return f"{variant}__i{settings['instance_count']}_q{settings['max_queue_delay_us']}"


def search_serving_config(
    onnx_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    record_path: str | os.PathLike,
    *,
    instance_counts: Sequence[int] = INSTANCE_COUNTS,
    queue_delays_us: Sequence[int] = QUEUE_DELAYS_US,
    target_concurrency: int = TARGET_CONCURRENCY,
    latency_budget_p99_ms: float | None = None,
    optimise: str = OPTIMISE,
    margin_pct: float = MARGIN_PCT,
    progress: Callable[[str], None] | None = print,
    **measurement: Any,
) -> dict[str, Any]:
    """Measure the one model of ``onnx_dir`` (the gate's chosen model) under each candidate
    setting on one local ``tritonserver``, choose (see the module docstring), write the record to
    ``record_path`` and return it. ``latency_budget_p99_ms=None`` means no budget;
    ``measurement`` is how each level is measured (``benchmark.method.Measurement``, as the
    benchmark stage measured; its concurrency is set here: 1 and the target)."""
    say = progress or (lambda _message: None)
    variant = _one_variant(Path(onnx_dir))
    grid = candidate_settings(instance_counts, queue_delays_us)
    levels = sorted({1, int(target_concurrency)})
    metric = serving_objective(optimise, latency_budget_p99_ms)
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "variant": variant.name,
        "objective": {"metric": metric, "optimise": optimise,
                      "latency_budget_p99_ms": latency_budget_p99_ms,
                      "target_concurrency": int(target_concurrency), "margin_pct": margin_pct},
        "searched": {"instance_count": [int(c) for c in instance_counts],
                     "max_queue_delay_us": [int(d) for d in queue_delays_us]},
        "default": dict(DEFAULT_SETTINGS),
        "concurrency": levels,
        "candidates": [],
        "server_startup_s": None,
    }
    started = time.monotonic()
    if not grid:
        record.update(chosen=None, settings=dict(DEFAULT_SETTINGS), reason=(
            "no search (serving_instance_counts and serving_queue_delays_us are both empty); "
            f"deploying with the default settings ({describe(DEFAULT_SETTINGS)})"))
    else:
        say(f"serving search: {len(grid)} candidates of '{variant.name}' (instance_count "
            f"{_axis(grid, 'instance_count')} x max_queue_delay_us "
            f"{_axis(grid, 'max_queue_delay_us')}) at concurrency {', '.join(map(str, levels))}, "
            f"choosing by {objective_text(record['objective'])}")
        with scratch_dir("serving-search") as scratch:
            repository = Path(scratch) / "repository"
            names = _write_candidates(variant / MODEL_ONNX, repository, grid, test_path)
            measured = benchmark_repository(repository, test_path, models=names, progress=say,
                                            **{**measurement, "concurrency": levels})
        record["method"] = {key: measured[key] for key in (
            "protocol", "batch_size", "warmup_s", "window_s", "min_windows", "max_windows",
            "stability_pct", "stability_metrics")}
        record["server_startup_s"] = measured["server_startup_s"]
        record["candidates"] = [
            _candidate(name, settings, rank, measured, levels, int(target_concurrency),
                       latency_budget_p99_ms)
            for rank, (name, settings) in enumerate(zip(names, grid))
        ]
        record.update(choose_settings(record["candidates"], record["objective"]))
        for line in format_candidate_table(record).splitlines():
            say(line)
    record["wall_s"] = time.monotonic() - started
    record["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    say(f"serving: {describe(record['settings'])}: {record['reason']}")
    write_json(record, record_path)
    return record


def _one_variant(onnx_dir: Path) -> Path:
    variants = onnx_variants(onnx_dir)
    if len(variants) != 1:
        raise UserInputError(
            f"onnx_dir: {onnx_dir} holds {len(variants)} models "
            f"({', '.join(v.name for v in variants)}); the serving search tunes one, so pass "
            "the gate's chosen_model"
        )
    return variants[0]


def _write_candidates(model_path: Path, repository: Path, grid: list[dict[str, int]],
                      test_path: str | os.PathLike) -> list[str]:
    """One model per candidate in a fresh repository, each with a real warm-up sample."""
    sample = load_inputs(test_path, "test_path", 1)
    names = [candidate_name(model_path.parent.name, settings) for settings in grid]
    for name, settings in zip(names, grid):
        write_model(model_path, repository / name, 1, backend="python", versions=[1],
                    sample=sample, serving=ServingSettings().with_values(settings))
    validate_model_repository(repository, backend="python", load_onnx=False)
    return names


def _candidate(name: str, settings: dict[str, int], rank: int, measured: dict,
               levels: list[int], target: int, budget: float | None) -> dict[str, Any]:
    rows = {c: find_level(measured, name, c) for c in levels}
    summary = {f"c{c}": _level_summary(row) for c, row in rows.items()}
    at_target = rows[target]
    why_not = None
    if at_target["errors"]:
        why_not = f"{at_target['errors']} failed requests at concurrency {target}"
    elif budget is not None and at_target["p99_ms"] > budget:
        why_not = (f"p99 {at_target['p99_ms']:.2f} ms at concurrency {target} is over the budget "
                   f"of {budget:g} ms")
    return {"model": name, "settings": dict(settings), "simplicity": rank, "levels": summary,
            "qualifies": why_not is None, "why_not": why_not}



def _level_summary(row: dict[str, Any]) -> dict[str, Any]:
    server = row.get("server") or {}
    return {**{key: row[key] for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps",
                                         "errors", "stable")},
            "spread_pct": row["stability"]["spread_pct"],
            "server_queue_us": server.get("queue_us"),
            "server_compute_infer_us": server.get("compute_infer_us")}


def _axis(grid: list[dict[str, int]], name: str) -> str:
    return ",".join(str(v) for v in sorted({settings[name] for settings in grid}))
