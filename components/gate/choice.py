"""choose_variant: the best measured variant that meets every stated constraint, and its table.

The user states satisficing constraints (maximum accuracy drop from fp32, a latency budget at a
stated batch size, a maximum file size) and one metric to optimise; among the variants that
meet every constraint the best on that metric is chosen. When none does, the choice is None
with the reason, and require_chosen raises it for the pipeline's gate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from torchship.components.contracts import CHOICE_JSON, MODEL_ONNX, VARIANTS_JSON
from torchship.components.errors import UserInputError
from torchship.components.export.table import format_variant_table
from torchship.components.files import staged_dir, write_json

# The metric chosen for by default: the lowest ONNX Runtime latency at batch 1.
OPTIMISE = "latency"
# Short names a user may give for the metric to optimise; "latency" means at `latency_batch`.
OPTIMISE_ALIASES = {
    "size": "onnx_size_bytes",
    "compressed_size": "compressed_size_bytes",
    "accuracy": "onnx_test_accuracy",
    "parameters": "n_parameters",
}
# Metrics where more is better; every other one is minimised.
MAXIMISED = {"onnx_test_accuracy", "test_accuracy", "fp32_top1_agreement", "size_ratio",
             "param_ratio", "speedup_b1", "speedup_b64"}
OPTIMISABLE = {"latency_b1_ms", "latency_b64_ms", "onnx_size_bytes", "compressed_size_bytes",
               "n_parameters", "nonzero_parameters", "acc_drop_pt", *MAXIMISED}
# Latency and speed-up at any measured batch size.
PER_BATCH = re.compile(r"(latency_b\d+_ms|speedup_b\d+)")
SIZE_METRICS = ("onnx_size_bytes", "compressed_size_bytes")


class NoVariantMeetsConstraints(RuntimeError):
    """No variant met every constraint; `.choice` holds the table and the reason."""

    def __init__(self, choice: dict[str, Any]) -> None:
        super().__init__(choice["reason"])
        self.choice = choice
        self.table = format_choice_table(choice)


def optimise_metric(optimise: str, latency_batch: int = 1) -> str:
    """The variant-table column `optimise` names (``latency`` is ``latency_b<batch>_ms``)."""
    if optimise == "latency":
        return f"latency_b{latency_batch}_ms"
    metric = OPTIMISE_ALIASES.get(optimise, optimise)
    if metric not in OPTIMISABLE and not PER_BATCH.fullmatch(str(metric)):
        raise UserInputError(
            f"parameter optimise={optimise!r} is not a metric of the variant table; pass "
            "latency, size, compressed_size, accuracy, parameters or one of "
            f"{', '.join(sorted(OPTIMISABLE))}")
    return metric


def choose_variant(
    rows: list[dict[str, Any]],
    max_acc_drop_pt: float | None = None,
    max_latency_ms: float | None = None,
    latency_batch: int = 1,
    max_size_bytes: int | None = None,
    optimise: str = OPTIMISE,
    size_metric: str = "onnx_size_bytes",
) -> dict[str, Any]:
    """Pick the best of the measured `rows` (onnx_dir/variants.json) that meets every constraint.

    Returns {"chosen": name or None, "reason": one line, "optimise": metric, "direction",
    "constraints": the limits, "table": the rows with `checks` (per constraint: metric, value,
    limit, passed), `meets_constraints`, and `outcome`: why it was chosen, the constraint it
    failed, or the margin it lost by on the metric (`margin`)}. A constraint left None is not
    checked; export
    parity must have passed for every variant. Ties go to the higher accuracy, then the
    smaller file, then the order of the rows.
    """
    if not rows:
        raise UserInputError("the variant table is empty; pass the rows that export measured")
    latency_metric = f"latency_b{latency_batch}_ms"
    metric = optimise_metric(optimise, latency_batch)
    if size_metric not in SIZE_METRICS:
        raise UserInputError(
            f"size metric {size_metric!r} is unknown; pass one of {', '.join(SIZE_METRICS)}"
        )
    for value, name in ((max_acc_drop_pt, "max_accuracy_drop_pt"),
                        (max_latency_ms, "max_latency_ms"),
                        (max_size_bytes, "max_size_bytes")):
        if value is not None and not value >= 0:
            raise UserInputError(f"parameter {name}={value!r} must be >= 0 or unset")
    limits = {
        "accuracy": ("acc_drop_pt", max_acc_drop_pt),
        "latency": (latency_metric, max_latency_ms),
        "size": (size_metric, max_size_bytes),
    }
    limits = {key: spec for key, spec in limits.items() if spec[1] is not None}
    constraints_text = "; ".join(_describe(key, m, limit) for key, (m, limit) in limits.items())
    constraints_text = constraints_text or "no constraints"

    table = []
    for row in rows:
        checks: dict[str, dict[str, Any]] = {}
        parity = row.get("parity")
        if parity is not None:
            checks["parity"] = {"metric": "parity", "value": parity.get("passed"),
                                "limit": True, "passed": bool(parity.get("passed"))}
        for key, (name, limit) in limits.items():
            value = row.get(name)
            checks[key] = {"metric": name, "value": value, "limit": limit,
                           "passed": value is not None and value <= limit}
        if row.get(metric) is None:  # cannot be ranked on the metric to optimise
            checks["optimise"] = {"metric": metric, "value": None, "limit": None,
                                  "passed": False}
        meets = all(check["passed"] for check in checks.values())
        table.append({**row, "checks": checks, "meets_constraints": meets, "chosen": False})

    direction = "max" if metric in MAXIMISED or metric.startswith("speedup_") else "min"
    candidates = [row for row in table if row["meets_constraints"]]
    choice: dict[str, Any] = {
        "chosen": None,
        "optimise": metric,
        "direction": direction,
        "constraints": {key: {"metric": m, "limit": limit} for key, (m, limit) in limits.items()},
        "table": table,
    }
    for row in table:
        row["outcome"] = None if row["meets_constraints"] else f"fails {_failed(row)}"
    if not candidates:
        failures = [f"{row['name']} fails {_failed(row)}" for row in table]
        choice["reason"] = (
            f"no variant meets every constraint ({constraints_text}): {'; '.join(failures)}; "
            "relax a constraint or add variants"
        )
        return choice

    sign = -1 if direction == "max" else 1
    position = {row["name"]: index for index, row in enumerate(table)}
    best = min(candidates, key=lambda row: (
        sign * row[metric], -row.get("onnx_test_accuracy", row.get("test_accuracy", 0)),
        row.get("onnx_size_bytes", 0), position[row["name"]]))
    best["chosen"] = True
    others = [row["name"] for row in candidates if row is not best]
    word = "highest" if direction == "max" else "lowest"
    best["outcome"] = f"chosen: the {word} {metric} of the variants meeting every constraint"
    for row in candidates:
        if row is not best:
            row["margin"], row["outcome"] = _margin(metric, direction, row[metric], best[metric])
    choice["chosen"] = best["name"]
    choice["reason"] = (
        f"'{best['name']}' has the {word} {metric} ({_value(metric, best[metric])}) of the "
        f"{len(candidates)} of {len(table)} variants that meet every constraint "
        f"({constraints_text})" + (f"; also meeting them: {', '.join(others)}" if others else "")
    )
    return choice


def require_chosen(choice: dict[str, Any]) -> str:
    """The chosen variant's name; raises NoVariantMeetsConstraints (reason, table) if none."""
    if choice["chosen"] is None:
        raise NoVariantMeetsConstraints(choice)
    return choice["chosen"]


def publish_chosen_variant(
    onnx_dir: str | os.PathLike, choice: dict[str, Any] | str, chosen_dir: str | os.PathLike,
) -> dict[str, Any]:
    """Copy the chosen variant to `chosen_dir` in onnx_dir's layout: `<name>/model.onnx`,
    `variants.json` with its one row, and `choice.json` (the reason and the whole table).

    Deploy and benchmark take every `<name>/model.onnx` of their input, so giving them this
    directory serves only the chosen model, still named after its variant.
    """
    name = choice if isinstance(choice, str) else require_chosen(choice)
    onnx_dir = Path(onnx_dir)
    rows = json.loads((onnx_dir / VARIANTS_JSON).read_text())
    row = next((r for r in rows if r["name"] == name), None)
    if row is None:
        raise UserInputError(
            f"variant '{name}' is not in '{onnx_dir}/variants.json' (variants: "
            f"{', '.join(r['name'] for r in rows)}); pass one of those"
        )
    with staged_dir(chosen_dir) as staging:
        (staging / name).mkdir()
        shutil.copyfile(onnx_dir / name / MODEL_ONNX, staging / name / MODEL_ONNX)
        (staging / name / MODEL_ONNX).chmod(0o644)
        chosen_row = {**row, "chosen": True}
        write_json([chosen_row], staging / VARIANTS_JSON)
        if not isinstance(choice, str):
            write_json(choice, staging / CHOICE_JSON)
    return chosen_row


def format_choice_table(choice: dict[str, Any], markdown: bool = False) -> str:
    """The variant table with a column of the constraints each variant fails, the chosen one
    marked, and the reason below."""
    table = format_variant_table(
        choice["table"], markdown=markdown,
        extra=("meets constraints",
               lambda row: "yes" if row["meets_constraints"] else f"no: {_failed(row)}"),
        marked=lambda row: bool(row.get("chosen")))
    verdict = "chosen" if choice["chosen"] else "no choice"
    return f"{table}\n\n{verdict}: {choice['reason']}"


def _margin(metric: str, direction: str, value: float, best: float) -> tuple[dict, str]:
    """How far a variant that met every constraint is behind the chosen one on the metric."""
    behind = (best - value) if direction == "max" else (value - best)
    relative = behind / abs(best) * 100.0 if best else None
    margin = {"metric": metric, "value": value, "best": best, "behind": behind,
              "behind_pct": relative}
    if behind <= 0:
        return margin, (f"tied on {metric} ({_value(metric, value)}); lost on the tie-break "
                        "(higher accuracy, then smaller file, then order)")
    pct = "" if relative is None else f", {relative:.1f} %"
    return margin, (f"lost by {_value(metric, behind)}{pct} on {metric} "
                    f"({_value(metric, value)} vs {_value(metric, best)})")


def _value(metric: str, value: float) -> str:
    if metric.endswith("_ms"):
        return f"{value:.3f} ms"
    if metric.endswith("_bytes"):
        return f"{value / 1024:.1f} KiB"
    return f"{value:.4g}"


def _label(key: str, metric: str) -> str:
    return "accuracy drop" if key == "accuracy" else metric


def _shown(key: str, metric: str, value: float) -> str:
    return f"{value:.2f} pt" if key == "accuracy" else _value(metric, value)


def _describe(key: str, metric: str, limit: float) -> str:
    return f"{_label(key, metric)} <= {_shown(key, metric, limit)}"


def _failed(row: dict[str, Any]) -> str:
    """What a table row fails, e.g. `accuracy drop 1.48 pt > 1.00 pt, parity`."""
    failed = []
    for key, check in row["checks"].items():
        metric, value, limit = check["metric"], check["value"], check["limit"]
        if check["passed"]:
            continue
        if key == "parity":
            failed.append("parity")
        elif value is None:
            failed.append(f"{metric} (not measured)")
        else:
            failed.append(f"{_label(key, metric)} {_shown(key, metric, value)} > "
                          f"{_shown(key, metric, limit)}")
    return ", ".join(failed) or "nothing"
