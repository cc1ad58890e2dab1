"""The joint serving search: model variant x Triton settings under a latency SLO, on one server.

The variants searched are those the gate found eligible (its record's choice table rows with
``meets_constraints``), the gate's own choice first; where ``optimise`` names a property of the
model file (size, accuracy, parameters), which serving does not change, only the gate's choice.
Every candidate, variant x instance_count x dynamic batching max_queue_delay_us x max_batch_size,
becomes its own model, ``<variant>__i<count>_q<delay>_b<max batch>``, in one repository that one
``tritonserver`` serves, as Triton Model Analyzer does. They are measured at the target
concurrency in rounds of successive halving (``halving``): a candidate whose early, short
windows cannot meet the constraints is discarded at once, the best third go on with longer
windows, and the finalists are measured for two thirds of a benchmark level, in interleaved
passes (A B C, C B A, A B C) so that the drift of a shared machine hits each alike.
The incumbent, the gate's variant with the default settings (what deploying without a search
would serve), goes on to the last round whenever it can meet the constraints. The objective
(``choice``):

* with a p99 budget (``latency_budget_p99_ms``) or a ``throughput_target_rps``, or an
  ``optimise`` that is not latency: the highest throughput per core (one core per instance)
  among candidates meeting the constraints;
* else (``optimise="latency"``, the default, or ``latency_b<N>_ms``): the lowest p99.

A candidate beats another only by more than the band, the margin or the measured spread (of
the final passes, and against the incumbent also of their paired per-pass ratios). A challenger
replaces a qualifying incumbent only when it beats it by more than that band; when none does, the
record (``versus_default``, ``tied``) and the log say the search could not tell them from the
default, and the default is chosen. Among challengers that do, when the best is within the band
of others, the record and the log say the search could not tell them apart, and the simplest
(fewest instances, the gate's variant, the default delay and batch size) is chosen. When no
candidate qualifies, the gate's variant with the default settings, under which the gate passed
it, is kept and the record says so. (A grid without the default settings has no incumbent: the
best finalist by the band is chosen.)

The record (schema ``torchship.serving-search/v2``; v1's fields kept, ``variant`` is now the
chosen variant and ``levels`` hold the target concurrency only, a finalist's the mean over the
final passes with the passes under ``passes``; written atomically)::

    {"schema", "variant", "variants", "objective": {"metric", "optimise",
     "latency_budget_p99_ms", "throughput_target_rps", "target_concurrency", "margin_pct"},
     "searched": {"variant", "instance_count", "max_queue_delay_us", "max_batch_size"},
     "default": settings, "default_variant", "concurrency": [target], "method": {...},
     "schedule": [{"round", "window_s", "keep", "passes"}], "candidates": [{"model", "variant",
     "settings", "simplicity", "incumbent", "levels": {"c<target>": {p50_ms, p95_ms, p99_ms,
     throughput_rps, errors, stable, spread_pct, passes, ...}}, "rounds": [...], "qualifies",
     "why_not", "outcome"}], "chosen": model or None, "settings", "reason", "band_pct", "tied",
     "could_not_tell_apart", "incumbent": model or None, "versus_default": {"default",
     "candidate", "gain_pct", "band_pct", "pass_gains_pct"} or None, "pareto_front": [models of
     the last round], "server_startup_s", "wall_s", "created_at"}
"""

from __future__ import annotations

import datetime as _dt
import itertools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torchship.components.benchmark.method import measurement_method
from torchship.components.benchmark.served import local_server_block
from torchship.components.contracts import MODEL_ONNX, TARGET_CONCURRENCY, ServingSettings
from torchship.components.data.splits import load_inputs
from torchship.components.errors import UserInputError
from torchship.components.files import read_json, write_json
from torchship.components.gate.choice import OPTIMISE, publish_chosen_variant
from torchship.components.report.search import write_search_report
from torchship.components.scratch import scratch_dir
from torchship.components.triton.repository import (
    onnx_variants,
    validate_model_repository,
    write_model,
)
from torchship.components.triton.server import TritonServer
from torchship.components.tune_serving.choice import (
    DEFAULT_SETTINGS,
    MARGIN_PCT,
    choose_settings,
    describe,
    format_candidate_table,
    gain_pct,
    objective_text,
    pareto_front,
    serving_objective,
    spread_of,
    value_of,
    variant_property,
    versus_default,
)
from torchship.components.tune_serving.halving import ROUNDS, run_rounds, schedule

__all__ = ["INSTANCE_COUNTS", "MAX_BATCH_SIZES", "QUEUE_DELAYS_US", "SCHEMA", "candidate_name",
           "candidate_settings", "search_serving_config", "searched_variants", "write_candidates"]

SCHEMA = "torchship.serving-search/v2"
# The settings grid searched by default, per variant: 2 instance counts x 2 dynamic-batching
# delays x 1 max batch size (a max batch size at or over the target concurrency batches every
# request that can wait; `max_batch_sizes` [1, 64] also tries no batching).
INSTANCE_COUNTS = (1, 2)
QUEUE_DELAYS_US = (100, 2000)
MAX_BATCH_SIZES = (DEFAULT_SETTINGS["max_batch_size"],)
_AXES = ("instance_count", "max_queue_delay_us", "max_batch_size")


def candidate_settings(instance_counts: Sequence[int], queue_delays_us: Sequence[int],
                       max_batch_sizes: Sequence[int] = MAX_BATCH_SIZES) -> list[dict[str, int]]:
    """The settings grid, simplest first (each axis: its default first, then ascending); an empty
    axis is not searched (its default is used), and all empty means no search (no candidate)."""
    given = (instance_counts, queue_delays_us, max_batch_sizes)
    if not any(given):
        return []
    fixes = ("pass e.g. [1, 2]", "pass e.g. [100, 2000]", "pass e.g. [1, 64]")
    axes = []
    for name, values, fix, low in zip(_AXES, given, fixes, (1, 0, 1)):
        values = sorted({int(v) for v in values}) or [DEFAULT_SETTINGS[name]]
        if values[0] < low:
            raise UserInputError(f"{name}: {values[0]} must be {low} or more; {fix}")
        axes.append(sorted(values, key=lambda v, d=DEFAULT_SETTINGS[name]: (v != d, v)))
    return [dict(zip(_AXES, point)) for point in itertools.product(*axes)]


def candidate_name(variant: str, settings: dict[str, int]) -> str:
    """The Triton model name of one candidate, e.g. ``fp32__i2_q2000_b64``."""
    return (f"{variant}__i{settings['instance_count']}_q{settings['max_queue_delay_us']}"
            f"_b{settings['max_batch_size']}")


def searched_variants(onnx_dir: str | os.PathLike, gate_record: dict | None,
                      optimise: str = OPTIMISE) -> tuple[list[str], str]:
    """(the variants to search, the gate's choice first; a line saying why these) from the
    export's ``onnx_dir`` and the gate record (None: every variant of ``onnx_dir``)."""
    found = [path.name for path in onnx_variants(Path(onnx_dir))]
    if gate_record is None:
        return found, f"every variant of {onnx_dir} (no gate record)"
    chosen = gate_record.get("variant")
    eligible = [row["name"] for row in (gate_record.get("choice") or {}).get("table", [])
                if row.get("meets_constraints")]
    if chosen is None or chosen not in eligible:
        raise UserInputError(
            f"gate_record: the gate chose no variant that meets its constraints ({chosen!r}); "
            "the serving search runs after a gate that passed: pass that gate's record")
    missing = [name for name in eligible if name not in found]
    if missing:
        raise UserInputError(
            f"onnx_dir: {onnx_dir} lacks the eligible variants {', '.join(missing)} (it holds "
            f"{', '.join(found)}); pass the export's onnx_models, not the gate's chosen_model")
    if variant_property(optimise):
        return [chosen], (f"the gate's choice only: optimise '{optimise}' is a property of the "
                          "model, not of serving")
    ordered = [chosen, *(name for name in eligible if name != chosen)]
    return ordered, "the variants that meet the gate's constraints, the gate's choice first"


def search_serving_config(
    onnx_dir: str | os.PathLike,
    test_path: str | os.PathLike,
    record_path: str | os.PathLike,
    *,
    gate_record: str | os.PathLike | dict | None = None,
    chosen_dir: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
    instance_counts: Sequence[int] = INSTANCE_COUNTS,
    queue_delays_us: Sequence[int] = QUEUE_DELAYS_US,
    max_batch_sizes: Sequence[int] = MAX_BATCH_SIZES,
    target_concurrency: int = TARGET_CONCURRENCY,
    latency_budget_p99_ms: float | None = None,
    throughput_target_rps: float | None = None,
    optimise: str = OPTIMISE,
    margin_pct: float = MARGIN_PCT,
    rounds: int = ROUNDS,
    backend: str = "python",
    progress: Callable[[str], None] | None = print,
    **measurement: Any,
) -> dict[str, Any]:
    """Search the variants of ``onnx_dir`` (the export's, narrowed by ``gate_record``: a path or
    the record) x the settings grid on one local ``tritonserver`` (see the module docstring);
    write the record to ``record_path``, the chosen variant in the gate's ``chosen_model`` layout
    to ``chosen_dir`` and the HTML report to ``report_path`` (each when given); return the
    record. ``measurement`` is the benchmark's method (``benchmark.method.Measurement``): its
    window and warm-up are the last round's, its ``min_windows`` the windows of every level;
    ``rounds=1`` is the exhaustive sweep (every candidate with full windows). ``backend``: the
    Triton backend the candidates are served with (``triton.binary.measurement_backend``)."""
    say = progress or (lambda _message: None)
    gate = read_json(gate_record) if isinstance(gate_record, (str, os.PathLike)) else gate_record
    if isinstance(gate_record, (str, os.PathLike)) and gate is None:
        raise UserInputError(f"gate_record: {gate_record} does not exist; pass the gate's record")
    variants, variants_from = searched_variants(onnx_dir, gate, optimise)
    grid = candidate_settings(instance_counts, queue_delays_us, max_batch_sizes)
    target = int(target_concurrency)
    method = measurement_method(**{**measurement, "concurrency": [target]})
    objective = {"metric": serving_objective(optimise, latency_budget_p99_ms,
                                             throughput_target_rps),
                 "optimise": optimise, "latency_budget_p99_ms": latency_budget_p99_ms,
                 "throughput_target_rps": throughput_target_rps,
                 "target_concurrency": target, "margin_pct": margin_pct}
    candidates = [
        {"model": candidate_name(variant, settings), "variant": variant,
         "settings": dict(settings), "levels": {}, "rounds": [], "qualifies": None,
         "why_not": None, "outcome": None}
        for settings in grid for variant in variants
    ]
    candidates.sort(key=lambda c: (c["settings"]["instance_count"], variants.index(c["variant"]),
                                   grid.index(c["settings"])))
    for rank, candidate in enumerate(candidates):
        candidate["simplicity"] = rank
        # What deploying without a search serves; a challenger must be shown better than it.
        candidate["incumbent"] = (candidate["variant"], candidate["settings"]) == (
            variants[0], DEFAULT_SETTINGS)
    plan = schedule(len(candidates), method.window_s, rounds)
    record: dict[str, Any] = {
        "schema": SCHEMA, "variants": variants, "variants_from": variants_from,
        "objective": objective,
        "searched": {"variant": variants, "instance_count": [int(c) for c in instance_counts],
                     "max_queue_delay_us": [int(d) for d in queue_delays_us],
                     "max_batch_size": [int(b) for b in max_batch_sizes]},
        "default": dict(DEFAULT_SETTINGS), "default_variant": variants[0],
        "concurrency": [target],
        "method": {"protocol": "grpc", "batch_size": method.batch_sizes[0],
                   "warmup_s": method.warmup_s, "window_s": method.window_s,
                   "windows": method.min_windows, "stability_pct": method.stability_pct,
                   "rounds": len(plan), "cores_per_instance": 1, "backend": backend,
                   "engine": method.engine},
        "schedule": plan if grid else [], "candidates": candidates if grid else [],
        "server_startup_s": None,
    }
    started = time.monotonic()
    default = {"variant": variants[0], "settings": dict(DEFAULT_SETTINGS)}
    if not grid:
        record.update(chosen=None, variant=variants[0], settings=dict(DEFAULT_SETTINGS),
                      band_pct=None, tied=[], reason=(
                          "no search (serving_instance_counts, serving_queue_delays_us and serving_"
                          "max_batch_sizes are all empty); deploying the gate's choice with the "
                          f"default settings ({describe(DEFAULT_SETTINGS)})"))
    else:
        say(f"serving search: {len(candidates)} candidates ({len(variants)} variants "
            f"{', '.join(variants)} x {len(grid)} settings: instance_count "
            f"{_axis(grid, 'instance_count')} x max_queue_delay_us "
            f"{_axis(grid, 'max_queue_delay_us')} x max_batch_size "
            f"{_axis(grid, 'max_batch_size')}) at concurrency {target}, choosing by "
            f"{objective_text(objective)}; {len(plan)} rounds")
        with scratch_dir("serving-search") as scratch:
            repository = Path(scratch) / "repository"
            write_candidates(Path(onnx_dir), repository, candidates, test_path, backend)
            with TritonServer(repository, startup_timeout_s=max(120.0, 6.0 * len(candidates))
                              ) as server:
                record["server_startup_s"] = server.startup_s
                record["server"] = local_server_block(server, [c["model"] for c in candidates])
                say(f"tritonserver ready in {server.startup_s:.1f} s with "
                    f"{len(candidates)} candidate models")
                finalists = run_rounds(
                    server.grpc_url, candidates, str(test_path), objective, plan,
                    windows=method.min_windows, warmup_s=method.warmup_s, say=say,
                    batch_size=method.batch_sizes[0], stability_pct=method.stability_pct,
                    request_timeout_s=method.request_timeout_s, engine=method.engine)
        record.update(choose_settings(finalists, objective, default))
        for candidate in finalists:
            candidate["outcome"] = ("chosen" if candidate["model"] == record["chosen"] else
                                    _lost(candidate, record, finalists))
        record["pareto_front"] = pareto_front(candidates, target, plan[-1]["round"])
        for line in format_candidate_table(record).splitlines():
            say(line)
    record["could_not_tell_apart"] = bool(record.get("tied"))
    record["incumbent"] = next((c["model"] for c in candidates if c["incumbent"]), None)
    record.setdefault("versus_default", None)
    record["wall_s"] = time.monotonic() - started
    record["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if record["could_not_tell_apart"]:
        kept = ("the default is kept" if record["chosen"] == record["incumbent"] else
                "the simplest is chosen")
        say(f"serving search: could not tell apart {', '.join(record['tied'])} (within the "
            f"measured spread); {kept}")
    say(f"serving: {record['variant']} with {describe(record['settings'])}: {record['reason']}")
    if chosen_dir is not None:
        publish_chosen_variant(onnx_dir, record["variant"], chosen_dir)
    if report_path is not None:
        write_search_report(record, report_path)
    write_json(record, record_path)
    return record


def _lost(candidate: dict[str, Any], record: dict[str, Any],
          finalists: list[dict[str, Any]]) -> str:
    against_default = versus_default(candidate, record, finalists)
    if against_default:
        return against_default
    if candidate["model"] in record.get("tied", []):
        return f"tied with the chosen one (within the {record['band_pct']:.1f}% band), less simple"
    if not candidate["qualifies"]:
        return f"fails in the last round: {candidate['why_not']}"
    objective = record["objective"]
    best = (min if objective["metric"] == "latency" else max)(
        (c for c in finalists if c["qualifies"]), key=lambda c: value_of(c, objective))
    band = max(objective["margin_pct"], spread_of(best, objective), spread_of(candidate, objective))
    return (f"lost: the best ({best['model']}) is {gain_pct(best, candidate, objective):.1f}% "
            f"better, beyond the {band:.1f}% band")


def write_candidates(onnx_dir: Path, repository: Path, candidates: list[dict[str, Any]],
                      test_path: str | os.PathLike, backend: str = "python") -> None:
    """One model per candidate in a fresh repository, each with a real warm-up sample."""
    sample = load_inputs(test_path, "test_path", 1)
    for candidate in candidates:
        write_model(onnx_dir / candidate["variant"] / MODEL_ONNX, repository / candidate["model"],
                    1, backend=backend, versions=[1], sample=sample,
                    serving=ServingSettings().with_values(candidate["settings"]))
    validate_model_repository(repository, backend=backend, load_onnx=False)


def _axis(grid: list[dict[str, int]], name: str) -> str:
    return ",".join(str(v) for v in sorted({settings[name] for settings in grid}))
