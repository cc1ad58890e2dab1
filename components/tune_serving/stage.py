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
import inspect
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torchship.components.benchmark.stage import benchmark_repository
from torchship.components.benchmark.results import find_level, write_json, write_text_atomic
from torchship.components.errors import UserInputError
from torchship.components.triton.repository import (
    load_sample,
    onnx_variants,
    validate_model_repository,
    write_model,
)
from torchship.components.report.summary import _fmt, _markdown_table
from torchship.components.triton.config import model_config

SCHEMA = "torchship.serving-search/v1"
# The settings searched, with today's defaults taken from the ModelConfig builder itself.
AXES = ("instance_count", "max_queue_delay_us")
DEFAULT_SETTINGS = {name: inspect.signature(model_config).parameters[name].default
                    for name in AXES}
MARGIN_PCT = 5.0
_LATENCY_OBJECTIVE = re.compile(r"latency|latency_b\d+_ms")


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


def serving_objective(optimise: str, latency_budget_p99_ms: float) -> str:
    """``throughput`` (highest req/s, within the budget when there is one) or ``latency``
    (lowest p99), from the gate's parameters."""
    if latency_budget_p99_ms and latency_budget_p99_ms > 0:
        return "throughput"
    return "latency" if _LATENCY_OBJECTIVE.fullmatch(optimise) else "throughput"


def search_serving_config(
    onnx_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    record_path: str | os.PathLike,
    *,
    instance_counts: Sequence[int] = (1, 2),
    queue_delays_us: Sequence[int] = (100, 2000),
    target_concurrency: int = 4,
    latency_budget_p99_ms: float = 0.0,
    optimise: str = "latency",
    margin_pct: float = MARGIN_PCT,
    batch_size: int = 1,
    duration_s: float = 3.0,
    warmup_s: float = 1.0,
    window_s: float | None = None,
    min_windows: int = 3,
    max_windows: int = 10,
    stability_pct: float = 15.0,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Measure the one model of ``onnx_dir`` (the gate's chosen model) under each candidate
    setting on one local ``tritonserver``, choose (see the module docstring), write the record to
    ``record_path`` and return it. ``latency_budget_p99_ms=0`` means no budget."""
    say = progress or (lambda _message: None)
    variant = _one_variant(Path(onnx_dir))
    grid = candidate_settings(instance_counts, queue_delays_us)
    levels = sorted({1, int(target_concurrency)})
    metric = serving_objective(optimise, latency_budget_p99_ms)
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "variant": variant.name,
        "objective": {"metric": metric, "optimise": optimise,
                      "latency_budget_p99_ms": latency_budget_p99_ms or None,
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
            f"deploying with the default settings ({_describe(DEFAULT_SETTINGS)})"))
    else:
        say(f"serving search: {len(grid)} candidates of '{variant.name}' (instance_count "
            f"{_axis(grid, 'instance_count')} x max_queue_delay_us "
            f"{_axis(grid, 'max_queue_delay_us')}) at concurrency {', '.join(map(str, levels))}, "
            f"choosing by {_objective_text(record['objective'])}")
        with tempfile.TemporaryDirectory(prefix="torchship-serving-search-") as scratch:
            repository = Path(scratch) / "repository"
            names = _write_candidates(variant / "model.onnx", repository, grid, test_path)
            measured = benchmark_repository(
                repository, test_path, concurrency=levels, batch_size=batch_size,
                duration_s=duration_s, warmup_s=warmup_s, window_s=window_s or None,
                min_windows=min_windows, max_windows=max_windows, stability_pct=stability_pct,
                models=names, progress=say,
            )
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
    say(f"serving: {_describe(record['settings'])}: {record['reason']}")
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
    sample = load_sample(test_path, what="test_path")
    names = [candidate_name(model_path.parent.name, settings) for settings in grid]
    for name, settings in zip(names, grid):
        write_model(model_path, repository / name, 1, target="local", versions=[1],
                    sample=sample, **settings)
    validate_model_repository(repository, target="local", load_onnx=False)
    return names


def _candidate(name: str, settings: dict[str, int], rank: int, measured: dict,
               levels: list[int], target: int, budget: float) -> dict[str, Any]:
    rows = {c: find_level(measured, name, c) for c in levels}
    summary = {f"c{c}": _level_summary(row) for c, row in rows.items()}
    at_target = rows[target]
    why_not = None
    if at_target["errors"]:
        why_not = f"{at_target['errors']} failed requests at concurrency {target}"
    elif budget and budget > 0 and at_target["p99_ms"] > budget:
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


def choose_settings(candidates: list[dict[str, Any]], objective: dict[str, Any]) -> dict[str, Any]:
    """``{"chosen", "settings", "reason", "band_pct"}`` for measured ``candidates`` (simplest
    first) under ``objective`` (as in the record): the simplest qualifying candidate that the
    best one does not beat by more than the band; the default settings when none qualifies."""
    level = f"c{objective['target_concurrency']}"
    key = "throughput_rps" if objective["metric"] == "throughput" else "p99_ms"
    qualifying = sorted((c for c in candidates if c["qualifies"]), key=lambda c: c["simplicity"])
    if not qualifying:
        reasons = "; ".join(f"{c['model']}: {c['why_not']}" for c in candidates)
        return {"chosen": None, "settings": dict(DEFAULT_SETTINGS), "band_pct": None, "reason": (
            f"no candidate qualifies ({reasons}); keeping the default settings "
            f"({_describe(DEFAULT_SETTINGS)}) under which the gate passed the model")}

    def value(candidate: dict[str, Any]) -> float:
        return float(candidate["levels"][level][key])

    def spread(candidate: dict[str, Any]) -> float:
        return float(candidate["levels"][level]["spread_pct"].get(key) or 0.0)

    def gain_pct(better: dict[str, Any], than: dict[str, Any]) -> float:
        """How much ``better`` beats ``than`` on the metric, in % of ``than``'s value."""
        change = value(better) - value(than) if key == "throughput_rps" else (
            value(than) - value(better))
        return change / value(than) * 100.0 if value(than) > 0 else float("inf")

    def band(candidate: dict[str, Any]) -> float:
        return max(float(objective["margin_pct"]), spread(best), spread(candidate))

    pick = max if key == "throughput_rps" else min
    best = pick(qualifying, key=value)  # ties go to the simpler, the first in the list
    candidate = next(c for c in qualifying if gain_pct(best, c) <= band(c))  # best ends it
    unit = "req/s" if key == "throughput_rps" else "ms p99"
    shown = f"{value(best):.1f} {unit}" if key == "throughput_rps" else f"{value(best):.2f} {unit}"
    at = f"at concurrency {objective['target_concurrency']}"
    word = "highest throughput" if key == "throughput_rps" else "lowest p99"
    within = (f" within the p99 budget of {objective['latency_budget_p99_ms']:g} ms"
              if objective.get("latency_budget_p99_ms") else "")
    of = f"of the {len(qualifying)} of {len(candidates)} candidates that qualify{within}"
    if candidate is best:
        simplest = qualifying[0]
        reason = f"{best['model']} has the {word} ({shown} {at}) {of}"
        if simplest is not best:
            reason += (f", {gain_pct(best, simplest):.1f}% better than the simplest "
                       f"({simplest['model']}), beyond the {band(simplest):.1f}% band")
    else:
        reason = (f"{candidate['model']} kept as the simpler setting: the best, {best['model']} "
                  f"({shown} {at}), is only {gain_pct(best, candidate):.1f}% better, within the "
                  f"{band(candidate):.1f}% band (margin {objective['margin_pct']:g}% or the "
                  "windows' spread)")
    return {"chosen": candidate["model"], "settings": dict(candidate["settings"]),
            "band_pct": band(candidate), "reason": reason}


def format_candidate_table(record: dict[str, Any], markdown: bool = False) -> str:
    """One row per candidate: settings, p99 and throughput per level, whether it qualifies; the
    chosen one marked, the reason below."""
    levels = [f"c{c}" for c in record["concurrency"]]
    header = ["candidate", "instances", "delay us"]
    for level in levels:
        header += [f"p50 ms {level}", f"p99 ms {level}", f"req/s {level}"]
    header.append("qualifies")
    body = []
    for candidate in record["candidates"]:
        mark = " (chosen)" if candidate["model"] == record["chosen"] else ""
        line = [candidate["model"] + mark,
                str(candidate["settings"]["instance_count"]),
                str(candidate["settings"]["max_queue_delay_us"])]
        for level in levels:
            measured = candidate["levels"][level]
            unstable = "" if measured["stable"] else "*"
            line += [_fmt(measured["p50_ms"], "{:.2f}"),
                     _fmt(measured["p99_ms"], "{:.2f}") + unstable,
                     _fmt(measured["throughput_rps"], "{:.0f}")]
        line.append("yes" if candidate["qualifies"] else f"no: {candidate['why_not']}")
        body.append(line)
    chosen = f"chosen: {_describe(record['settings'])}: {record['reason']}"
    if markdown:
        return "\n".join(["# Serving search", "", _objective_text(record["objective"]), "",
                          *_markdown_table(header, body), "", chosen]) + "\n"
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i in (0, len(header) - 1) else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in [header, *body])


def write_candidate_table(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """The candidate table as Markdown, for the KFP artifact the pipeline UIs render."""
    return write_text_atomic(Path(path), format_candidate_table(record, markdown=True))


def serving_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The chosen settings and, when measured, their p99 and throughput per level, for KFP."""
    metrics = {f"serving_{name}": float(value) for name, value in record["settings"].items()}
    metrics["serving_candidates"] = float(len(record["candidates"]))
    chosen = next((c for c in record["candidates"] if c["model"] == record["chosen"]), None)
    for level, measured in (chosen["levels"] if chosen else {}).items():
        metrics[f"serving_p99_ms_{level}"] = float(measured["p99_ms"])
        metrics[f"serving_throughput_rps_{level}"] = float(measured["throughput_rps"])
    return metrics


def _describe(settings: dict[str, int]) -> str:
    return ", ".join(f"{name} {value}" for name, value in settings.items())


def _axis(grid: list[dict[str, int]], name: str) -> str:
    return ",".join(str(v) for v in sorted({settings[name] for settings in grid}))


def _objective_text(objective: dict[str, Any]) -> str:
    at = f"at concurrency {objective['target_concurrency']}"
    if objective.get("latency_budget_p99_ms"):
        return f"highest throughput {at} with p99 within {objective['latency_budget_p99_ms']:g} ms"
    if objective["metric"] == "latency":
        return f"lowest p99 {at} (optimise '{objective['optimise']}')"
    return (f"highest throughput {at} (optimise '{objective['optimise']}' is the same for every "
            "setting)")
