"""The promotion gate: one record that says whether a candidate may be deployed, and why.

``evaluate_gate`` checks, for each candidate variant of a run summary (``report.summary.build_summary``):

* ``accuracy``: test accuracy against the serving baseline (at most ``max_accuracy_drop_pt``
  points below it) or, on the first run (no baseline), against the larger of ``accuracy_floor``
  and the test split's majority-class rate (always guessing its most frequent class); the check's
  ``bar`` says which applied;
* ``better than chance`` (with a serving baseline): test accuracy above the majority-class rate;
* ``parity``: the exported / quantised model passed its parity check against the PyTorch original;
* ``p99 latency``: p99 at ``target_concurrency`` on a real Triton server within
  ``latency_budget_p99_ms``, and ``errors`` at that level at most ``max_errors``;
* optionally ``stable`` (the level's windows agreed), and ``p99 regression`` (against the
  previous run, from ``regression.compare_with_previous``).

A check that could not be evaluated (no budget given, no previous run, parity not required, no
bar for a first run's accuracy) is kept with ``status`` ``"not checked"``, ``passed`` null and
``why`` (the short reason); it neither passes nor fails the gate, and the reason line counts it:
``3 checks passed for int8, 2 not checked (p99 latency: no p99 budget given; p99 regression: no
previous run)``.

The record (schema ``torchship.gate/v1``)::

    {"schema", "passed": bool, "reason": one line, "checks": [{"name", "variant", "passed":
     bool | null, "status": "passed" | "failed" | "not checked", "why": str | null, "value",
     "threshold", "detail", "bar" (first-run accuracy)}], "counts": {"passed", "failed",
     "not_checked"}, "candidates": [...], "variants": {name: {"test_accuracy", "p99_ms",
     "parity_passed"}}, "baseline": {"accuracy", "source"}, "settings": {...},
     "regression": {...} | null, "created_at"}

It is kept as an artifact whether or not the gate passed; the pipeline deploys only when
``passed``. A passing record is also what a later run reads as its serving baseline.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from typing import Any

from torchship.components.benchmark.results import find_level
from torchship.components.contracts import TARGET_CONCURRENCY
from torchship.components.errors import UserInputError
from torchship.components.files import read_json, write_json
from torchship.components.gate.verdict import check as _check
from torchship.components.gate.verdict import (
    first_run_accuracy,
    not_checked,
    regression_check,
    verdict_reason,
)

__all__ = ["GATE_SCHEMA", "baseline_accuracy_of", "evaluate_gate", "gate_metrics",
           "read_gate_record", "verdict_reason", "write_gate_record"]

GATE_SCHEMA = "torchship.gate/v1"
# Points of test accuracy a candidate may lose against the serving baseline (or fp32).
MAX_ACCURACY_DROP_PT = 1.0
# The accuracy a first model (no serving baseline) must reach.
ACCURACY_FLOOR = 0.0


def _parts(summary_or_parts: dict | str | os.PathLike) -> tuple[dict[str, dict], dict]:
    """(variant rows by name, benchmark result) from a summary, its path, or
    ``{"variants": [variants.json rows], "benchmark": result}``."""
    summary = summary_or_parts
    if not isinstance(summary, dict):
        summary = read_json(summary)
        if summary is None:
            raise UserInputError(f"summary: {summary_or_parts} does not exist; run the benchmark")
    if "rows" in summary:
        rows = {row["variant"]: row for row in summary["rows"]}
    elif "variants" in summary:
        rows = {}
        for variant in summary["variants"]:
            parity = variant.get("parity") or {}
            rows[variant["name"]] = {
                "variant": variant["name"],
                "test_accuracy": variant.get("test_accuracy"),
                "parity_passed": parity.get("passed"),
                "parity_max_abs_diff": parity.get("max_abs_diff"),
            }
    else:
        raise UserInputError(
            "summary: expected a run summary (with 'rows') or {'variants': ..., 'benchmark': ...}"
        )
    benchmark = summary.get("benchmark") or {}
    return rows, benchmark


def baseline_accuracy_of(record: dict[str, Any], variant: str) -> float | None:
    """The serving baseline's accuracy for ``variant`` from a gate record, a run summary, or
    ``{"test_accuracy": x}``; ``None`` when the record has none."""
    variants = record.get("variants")
    if isinstance(variants, dict):
        # The record's own variant is what it deployed: a candidate of another name replaces it.
        for name in (variant, record.get("variant")):
            value = (variants.get(name) or {}).get("test_accuracy")
            if value is not None:
                return float(value)
    for row in record.get("rows", []):
        if row.get("variant") == variant and row.get("test_accuracy") is not None:
            return float(row["test_accuracy"])
    for key in ("test_accuracy", "accuracy"):
        if isinstance(record.get(key), (int, float)):
            return float(record[key])
    return None


def evaluate_gate(
    summary_or_parts: dict | str | os.PathLike,
    accuracy_floor: float = ACCURACY_FLOOR,
    baseline_accuracy: float | str | os.PathLike | None = None,
    max_accuracy_drop_pt: float = MAX_ACCURACY_DROP_PT,
    require_parity: bool = True,
    latency_budget_p99_ms: float | None = None,
    target_concurrency: int = TARGET_CONCURRENCY,
    variant: str | Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    max_errors: int = 0,
    require_stable: bool = False,
    regression: dict | None = None,
    block_on_regression: bool = False,
    baseline_source: str | None = None,
    majority: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """The gate record for ``variant`` (default: every variant in the summary, since the whole
    repository is deployed). ``baseline_accuracy`` is a number (from ``baseline_source``), or a
    path / fsspec URI (``gs://``) of the serving baseline's gate record or summary, which must
    exist. ``majority`` is the test split's most frequent class and its share: a candidate must
    be more accurate than always guessing it. ``latency_budget_p99_ms=None`` leaves the latency
    check not checked (kept, with the reason)."""
    if max_accuracy_drop_pt < 0:
        raise UserInputError(f"max_accuracy_drop_pt: {max_accuracy_drop_pt} must be >= 0")
    if latency_budget_p99_ms is not None and not latency_budget_p99_ms > 0:
        raise UserInputError(f"latency_budget_p99_ms: {latency_budget_p99_ms} must be > 0")
    rows, benchmark = _parts(summary_or_parts)
    if variant is None:
        candidates = list(rows)
    else:
        candidates = [variant] if isinstance(variant, str) else list(variant)
    unknown = [v for v in candidates if v not in rows]
    if unknown or not candidates:
        raise UserInputError(
            f"variant: {', '.join(unknown) or '(none)'} not in the summary (it has "
            f"{', '.join(rows) or 'no variant'}); pass one of those"
        )

    baseline_record = None
    if isinstance(baseline_accuracy, (str, os.PathLike)):
        baseline_source = str(baseline_accuracy)
        baseline_record = read_json(baseline_accuracy)
        if not isinstance(baseline_record, dict):
            raise UserInputError(
                f"baseline_accuracy: {baseline_source} "
                f"{'does not exist' if baseline_record is None else 'is not a gate record'}; "
                "pass the gate record of the serving model, or none on a first run")
    elif baseline_accuracy is not None:
        baseline_source = baseline_source or "given"

    checks, variants = [], {}
    for name in candidates:
        row = rows[name]
        accuracy = row.get("test_accuracy")
        baseline = (baseline_accuracy_of(baseline_record, name) if baseline_record is not None
                    else None if baseline_accuracy is None else float(baseline_accuracy))
        if accuracy is None:
            checks.append(_check("accuracy", name, False, None, None,
                                 f"{name}: no test accuracy in the summary; run compress/export"))
        elif baseline is not None:
            threshold = baseline - max_accuracy_drop_pt / 100.0
            drop_pt = (baseline - accuracy) * 100.0
            checks.append(_check(
                "accuracy", name, accuracy >= threshold - 1e-12, accuracy, threshold,
                f"{name}: test accuracy {accuracy:.4f} vs serving baseline {baseline:.4f} "
                f"({drop_pt:+.2f} pt drop, at most {max_accuracy_drop_pt:g} pt allowed)",
            ))
        else:
            where = (f" (none for '{name}' in {baseline_source})" if baseline_source else "")
            checks.append(first_run_accuracy(name, accuracy, accuracy_floor, majority, where))
        if accuracy is not None and majority is not None and baseline is not None:
            guess, rate = majority
            checks.append(_check(
                "better than chance", name, accuracy > rate + 1e-9, accuracy, rate,
                f"{name}: test accuracy {accuracy:.4f} vs {rate:.4f} from always predicting the "
                f"most frequent class '{guess}'",
            ))

        parity = row.get("parity_passed")
        diff = row.get("parity_max_abs_diff")
        if not require_parity:
            checks.append(not_checked("parity", name, "parity not required", diff))
        elif parity is None:
            checks.append(_check("parity", name, False, diff, None,
                                 f"{name}: no parity record; export checks parity with PyTorch"))
        else:
            text = "" if diff is None else f" (max |diff| {diff:.2g})"
            checks.append(_check(
                "parity", name, bool(parity), diff, None,
                f"{name}: parity with the PyTorch original "
                f"{'passed' if parity else 'FAILED'}{text}",
            ))

        level = find_level(benchmark, name, target_concurrency, batch_size) if benchmark else None
        size = batch_size if batch_size is not None else benchmark.get("batch_size", 1)
        if latency_budget_p99_ms is None:
            measured_p99 = level["p99_ms"] if level else None
            checks.append(not_checked(
                "p99 latency", name, "no p99 budget given", measured_p99, None,
                f"{name}: no p99 budget given (latency_budget_p99_ms); not checked" + (
                    "" if measured_p99 is None else
                    f" (p99 {measured_p99:.2f} ms at concurrency {target_concurrency})")))
        elif level is None:
            checks.append(_check(
                "p99 latency", name, False, None, latency_budget_p99_ms,
                f"{name}: concurrency {target_concurrency} (batch {size}) was not measured "
                f"(measured: {_measured(benchmark, name)}); add it to the sweep",
            ))
        if level is None:
            checks.append(not_checked(
                "errors", name, f"concurrency {target_concurrency} not measured", None,
                max_errors, f"{name}: errors at concurrency {target_concurrency} not checked: "
                f"the level was not measured (measured: {_measured(benchmark, name)})"))
        else:
            p99 = float(level["p99_ms"])
            unstable = "" if level.get("stable", True) else ", level unstable"
            if latency_budget_p99_ms is not None:
                checks.append(_check(
                    "p99 latency", name, p99 <= latency_budget_p99_ms, p99,
                    latency_budget_p99_ms,
                    f"{name}: p99 {p99:.2f} ms at concurrency {target_concurrency} "
                    f"{'within' if p99 <= latency_budget_p99_ms else 'over'} the budget of "
                    f"{latency_budget_p99_ms:g} ms{unstable}",
                ))
            errors = int(level.get("errors", 0))
            checks.append(_check(
                "errors", name, errors <= max_errors, errors, max_errors,
                f"{name}: {errors} failed requests at concurrency {target_concurrency} "
                f"(at most {max_errors} allowed)",
            ))
            if require_stable:
                checks.append(_check(
                    "stable", name, bool(level.get("stable")), None, None,
                    f"{name}: concurrency {target_concurrency} "
                    f"{'stable' if level.get('stable') else 'UNSTABLE'} within "
                    f"±{benchmark.get('stability_pct', 0):g} %",
                ))
        variants[name] = {
            "test_accuracy": accuracy,
            "parity_passed": parity,
            "p99_ms": level["p99_ms"] if level else None,
            "throughput_rps": level["throughput_rps"] if level else None,
            "baseline_accuracy": baseline,
        }

    checks.append(regression_check(regression, ",".join(candidates), block_on_regression))
    reason = verdict_reason(checks, candidates)
    return {
        "schema": GATE_SCHEMA,
        "passed": not any(c["status"] == "failed" for c in checks),
        "reason": reason,
        "checks": checks,
        "counts": {status.replace(" ", "_"): sum(c["status"] == status for c in checks)
                   for status in ("passed", "failed", "not checked")},
        "candidates": candidates,
        "variants": variants,
        "baseline": {"source": baseline_source,
                     "accuracy": {n: v["baseline_accuracy"] for n, v in variants.items()}},
        "settings": {
            "accuracy_floor": accuracy_floor,
            "max_accuracy_drop_pt": max_accuracy_drop_pt,
            "require_parity": require_parity,
            "latency_budget_p99_ms": latency_budget_p99_ms,
            "target_concurrency": target_concurrency,
            "batch_size": batch_size if batch_size is not None else benchmark.get("batch_size"),
            "max_errors": max_errors,
            "require_stable": require_stable,
            "block_on_regression": block_on_regression,
            "majority_class": None if majority is None else
            {"class": majority[0], "rate": majority[1]},
        },
        "regression": regression,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _measured(benchmark: dict, name: str) -> str:
    levels = sorted({int(r["concurrency"]) for r in benchmark.get("results", [])
                     if r["model"] == name})
    return ", ".join(map(str, levels)) or "none"


def gate_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Numbers of a gate record for a KFP ``Metrics`` artifact: ``gate_passed`` and each check's
    value (``gate_<variant>_<check>``)."""
    metrics = {"gate_passed": 1.0 if record.get("passed") else 0.0}
    for status, count in (record.get("counts") or {}).items():
        metrics[f"gate_checks_{status}"] = float(count)
    for check in record.get("checks", []):
        value = check.get("value")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            key = f"gate_{check['variant']}_{check['name']}".replace(" ", "_").replace(",", "_")
            metrics[key] = float(value)
    return metrics


def write_gate_record(record: dict[str, Any], path: str | os.PathLike) -> str:
    """Write the record as JSON to a path (atomically) or an fsspec URI (``gs://``)."""
    return str(write_json(record, path))


def read_gate_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """A gate record from a path or fsspec URI; ``None`` when there is none."""
    return read_json(path)
