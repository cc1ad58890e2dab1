"""The promotion gate and regression tracking, on benchmark results made up to the point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from artifacts import N_CLASSES
from onnx import numpy_helper

from torchship.components.benchmark.results import SCHEMA
from torchship.components.errors import UserInputError
from torchship.components.gate.checks import (
    GATE_SCHEMA,
    evaluate_gate,
    gate_metrics,
    read_gate_record,
    write_gate_record,
)
from torchship.components.gate.regression import compare_with_previous
from torchship.components.gate.stage import confusion_matrix


def level(model: str, concurrency: int, window_p99s: list[float], batch_size: int = 1,
          errors: int = 0, stable: bool = True) -> dict:
    windows = [{"index": i + 1, "requests": 100, "errors": 0, "throughput_rps": 400.0,
                "p50_ms": p / 3, "p99_ms": p, "mean_ms": p / 2.5, "client_cpu_s": 0.01}
               for i, p in enumerate(window_p99s)]
    return {
        "model": model, "concurrency": concurrency, "batch_size": batch_size,
        "p50_ms": min(window_p99s) / 3, "p95_ms": min(window_p99s) * 0.9,
        "p99_ms": sum(window_p99s) / len(window_p99s), "throughput_rps": 400.0,
        "requests": 100 * len(windows), "errors": errors, "stable": stable,
        "stability": {"judged_windows": [w["index"] for w in windows]}, "windows": windows,
    }


def result(rows: list[dict]) -> dict:
    return {"schema": SCHEMA, "protocol": "grpc", "batch_size": 1, "batch_sizes": [1],
            "concurrency": sorted({r["concurrency"] for r in rows}), "stability_pct": 15.0,
            "started_at": "2026-01-01T00:00:00+00:00", "results": rows}


def summary(p99_c8: float = 4.0, accuracy: float = 0.96, parity: bool | None = True) -> dict:
    rows = [{"variant": "fp32", "test_accuracy": accuracy, "parity_passed": parity,
             "parity_max_abs_diff": 1e-6},
            {"variant": "int8", "test_accuracy": accuracy - 0.005, "parity_passed": True,
             "parity_max_abs_diff": 0.02}]
    bench = result([level(m, c, [p99_c8 / (2 if c == 1 else 1)] * 3)
                    for m in ("fp32", "int8") for c in (1, 8)])
    return {"rows": rows, "benchmark": bench}


# -- the gate -----------------------------------------------------------------------------------


def test_gate_passes_within_budget_on_the_first_run():
    record = evaluate_gate(summary(), accuracy_floor=0.9, latency_budget_p99_ms=10,
                           target_concurrency=8)
    assert record["schema"] == GATE_SCHEMA and record["passed"] is True
    assert record["candidates"] == ["fp32", "int8"]
    names = {(c["variant"], c["name"]) for c in record["checks"]}
    assert {("fp32", "accuracy"), ("fp32", "parity"), ("fp32", "p99 latency"),
            ("fp32", "errors"), ("int8", "p99 latency")} <= names
    # No previous run: the regression check is kept, neither passed nor failed.
    *evaluated, regression = record["checks"]
    assert all(c["passed"] is True and c["status"] == "passed" for c in evaluated)
    assert regression["name"] == "p99 regression" and regression["passed"] is None
    assert regression["status"] == "not checked" and regression["why"] == "no previous run"
    assert record["counts"] == {"passed": 8, "failed": 0, "not_checked": 1}
    assert "first run" in record["checks"][0]["detail"]
    assert record["reason"].startswith(
        "8 checks passed for fp32, int8, 1 not checked (p99 regression: no previous run); "
        "fp32: p99 4.00 ms at concurrency 8 within the budget of 10 ms")
    assert record["variants"]["fp32"]["p99_ms"] == pytest.approx(4.0)


def test_gate_fails_when_the_latency_budget_is_too_tight():
    record = evaluate_gate(summary(p99_c8=4.0), accuracy_floor=0.9, latency_budget_p99_ms=2.5,
                           target_concurrency=8, variant="fp32")
    assert record["passed"] is False
    (failed,) = [c for c in record["checks"] if c["status"] == "failed"]
    assert failed["name"] == "p99 latency" and failed["value"] == pytest.approx(4.0)
    assert failed["threshold"] == 2.5 and failed["passed"] is False
    assert record["reason"] == ("fp32: p99 4.00 ms at concurrency 8 over the budget of 2.5 ms; "
                                "1 not checked (p99 regression: no previous run)")


def test_gate_compares_accuracy_with_the_serving_baseline(tmp_path):
    passing = evaluate_gate(summary(accuracy=0.96), accuracy_floor=0.5,
                            latency_budget_p99_ms=10, target_concurrency=8)
    baseline = write_gate_record(passing, tmp_path / "serving" / "gate.json")
    assert read_gate_record(baseline)["passed"] is True

    worse = evaluate_gate(summary(accuracy=0.94), accuracy_floor=0.5, baseline_accuracy=baseline,
                          max_accuracy_drop_pt=1.0, latency_budget_p99_ms=10,
                          target_concurrency=8, variant="fp32")
    assert worse["passed"] is False
    assert "vs serving baseline 0.9600 (+2.00 pt drop, at most 1 pt allowed)" in worse["reason"]
    assert worse["baseline"]["source"] == str(baseline)

    within = evaluate_gate(summary(accuracy=0.955), accuracy_floor=0.99, baseline_accuracy=0.96,
                           max_accuracy_drop_pt=1.0, latency_budget_p99_ms=10,
                           target_concurrency=8, variant="fp32")
    assert within["passed"] is True  # the floor is for the first run only


def test_a_baseline_file_that_does_not_exist_is_refused_not_taken_as_a_first_run(tmp_path):
    with pytest.raises(UserInputError, match="nothing.json does not exist; pass the gate record"):
        evaluate_gate(summary(accuracy=0.8), accuracy_floor=0.9,
                      baseline_accuracy=tmp_path / "nothing.json",
                      latency_budget_p99_ms=10, target_concurrency=8, variant="fp32")
    first = evaluate_gate(summary(accuracy=0.8), accuracy_floor=0.9, latency_budget_p99_ms=10,
                          target_concurrency=8, variant="fp32")
    assert first["passed"] is False
    assert "first run, no serving baseline: test accuracy 0.8000 vs floor 0.9000" in first["reason"]


def test_a_model_no_better_than_always_guessing_the_majority_class_fails(tmp_path):
    chance = evaluate_gate(summary(accuracy=0.34), majority=("b", 0.34),
                           latency_budget_p99_ms=10, target_concurrency=8, variant="fp32")
    assert chance["passed"] is False
    # A first run: the accuracy check itself takes the larger bar, the majority-class rate.
    assert chance["reason"].startswith(
        "fp32: first run, no serving baseline: test accuracy 0.3400 vs majority-class rate "
        "0.3400 (always predicting 'b'; at least the accuracy floor 0.0000)")
    [accuracy] = [c for c in chance["checks"] if c["name"] == "accuracy"]
    assert accuracy["bar"] == {"applied": "majority-class rate", "threshold": 0.34,
                               "accuracy_floor": 0.0, "majority_class": "b",
                               "majority_rate": 0.34}
    better = evaluate_gate(summary(accuracy=0.5), majority=("b", 0.34),
                           latency_budget_p99_ms=10, target_concurrency=8, variant="fp32")
    assert better["passed"] is True
    # A floor above the majority-class rate is the bar that applies, and the record says so.
    floored = evaluate_gate(summary(accuracy=0.5), majority=("b", 0.34), accuracy_floor=0.6,
                            latency_budget_p99_ms=10, target_concurrency=8, variant="fp32")
    [accuracy] = [c for c in floored["checks"] if c["name"] == "accuracy"]
    assert not floored["passed"] and accuracy["bar"]["applied"] == "accuracy floor"
    assert accuracy["threshold"] == 0.6 and "vs floor 0.6000 (accuracy_floor; above the " \
        "majority-class rate 0.3400)" in accuracy["detail"]
    # With a serving baseline, accuracy is judged against it and chance is a check of its own.
    served = evaluate_gate(summary(accuracy=0.34), majority=("b", 0.34), baseline_accuracy=0.34,
                           latency_budget_p99_ms=10, target_concurrency=8, variant="fp32")
    names = {c["name"]: c for c in served["checks"]}
    assert names["accuracy"]["passed"] and not names["better than chance"]["passed"]
    assert served["reason"].startswith("fp32: test accuracy 0.3400 vs 0.3400 from always "
                                       "predicting the most frequent class 'b'")


def test_a_baseline_record_of_another_variant_is_the_serving_baseline(tmp_path):
    record = tmp_path / "gate.json"
    record.write_text(json.dumps({"variant": "int8", "variants": {"int8": {"test_accuracy": 0.9}}}))
    gated = evaluate_gate(summary(accuracy=0.8), baseline_accuracy=record,
                          latency_budget_p99_ms=10, target_concurrency=8, variant="fp32")
    assert gated["passed"] is False and "vs serving baseline 0.9000" in gated["reason"]


def test_gate_fails_on_missing_parity_level_or_errors():
    no_parity = evaluate_gate(summary(parity=None), latency_budget_p99_ms=10,
                              target_concurrency=8, variant="fp32")
    assert not no_parity["passed"] and "no parity record" in no_parity["reason"]
    assert evaluate_gate(summary(parity=None), require_parity=False, latency_budget_p99_ms=10,
                         target_concurrency=8, variant="fp32")["passed"]

    not_measured = evaluate_gate(summary(), latency_budget_p99_ms=10, target_concurrency=16,
                                 variant="fp32")
    assert "concurrency 16 (batch 1) was not measured (measured: 1, 8)" in not_measured["reason"]

    with_errors = summary()
    with_errors["benchmark"]["results"][1]["errors"] = 3
    record = evaluate_gate(with_errors, latency_budget_p99_ms=10, target_concurrency=8,
                           variant="fp32")
    assert not record["passed"] and "3 failed requests" in record["reason"]

    unstable = summary()
    unstable["benchmark"]["results"][1]["stable"] = False
    assert evaluate_gate(unstable, latency_budget_p99_ms=10, target_concurrency=8,
                         variant="fp32")["passed"]
    strict = evaluate_gate(unstable, latency_budget_p99_ms=10, target_concurrency=8,
                           variant="fp32", require_stable=True)
    assert not strict["passed"] and "UNSTABLE" in strict["reason"]


def test_gate_rejects_unknown_variants_and_reports_metrics():
    with pytest.raises(UserInputError, match="resnet"):
        evaluate_gate(summary(), latency_budget_p99_ms=10, variant="resnet")
    record = evaluate_gate(summary(), latency_budget_p99_ms=2.5, target_concurrency=8,
                           variant="fp32")
    metrics = gate_metrics(record)
    assert metrics["gate_passed"] == 0.0
    assert metrics["gate_fp32_p99_latency"] == pytest.approx(4.0)


def test_gate_takes_variants_json_rows_and_a_regression():
    parts = {"variants": [{"name": "fp32", "test_accuracy": 0.97,
                           "parity": {"passed": True, "max_abs_diff": 1e-6}}],
             "benchmark": summary()["benchmark"]}
    regression = {"flagged": True, "summary": "p99 regression beyond 10 %: ...",
                  "worst_change_pct": 40.0, "max_p99_regression_pct": 10.0}
    informational = evaluate_gate(parts, latency_budget_p99_ms=10, target_concurrency=8,
                                  regression=regression)
    assert informational["passed"] and informational["regression"] == regression
    blocking = evaluate_gate(parts, latency_budget_p99_ms=10, target_concurrency=8,
                             regression=regression, block_on_regression=True)
    assert not blocking["passed"] and blocking["reason"].startswith("p99 regression")


# -- regression tracking ------------------------------------------------------------------------


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_regression_beyond_the_threshold_is_flagged(tmp_path):
    previous = write(tmp_path / "previous.json",
                     result([level("fp32", 1, [2.0, 2.1, 1.9]), level("fp32", 8, [5.0, 5.2, 4.8])]))
    current = result([level("fp32", 1, [2.0, 2.05, 1.95]), level("fp32", 8, [7.0, 7.2, 6.8])])
    record = compare_with_previous(current, previous, max_p99_regression_pct=10)
    assert record["status"] == "regression" and record["flagged"] is True
    c1, c8 = record["levels"]
    assert not c1["flagged"] and c8["flagged"]
    assert c8["change_pct"] == pytest.approx(40.0)
    low, high = c8["ci95_pct"]
    assert 10 < low < 40 < high
    assert "fp32 c8 b1 5.00 -> 7.00 ms (+40.0 %" in record["summary"]
    assert record["worst_change_pct"] == pytest.approx(40.0)


def test_small_or_noisy_changes_are_not_flagged(tmp_path):
    previous = write(tmp_path / "previous.json", {"benchmark": result(
        [level("fp32", 8, [5.0, 5.1, 4.9]), level("fp32", 16, [5.0, 5.1, 4.9])])})
    current = result([
        level("fp32", 8, [5.2, 5.3, 5.1]),  # +4 %: within 10 %
        level("fp32", 16, [3.0, 9.0, 6.0]),  # +20 % on average, but the windows disagree
        level("fp32", 32, [6.0, 6.0, 6.0]),  # not measured before
    ])
    record = compare_with_previous(current, previous, max_p99_regression_pct=10)
    assert record["status"] == "ok" and not record["flagged"]
    noisy = record["levels"][1]
    assert noisy["change_pct"] == pytest.approx(20.0) and noisy["ci95_pct"][0] < 0
    assert record["new_levels"] == ["fp32 c32 b1"]
    assert record["summary"].startswith("no p99 regression beyond 10 % in 2 levels")


def test_no_previous_run_is_not_an_error(tmp_path):
    record = compare_with_previous(result([level("fp32", 1, [1.0, 1.0, 1.0])]),
                                   tmp_path / "absent.json")
    assert record["status"] == "no baseline" and record["flagged"] is False
    assert "no previous run at" in record["summary"]
    assert compare_with_previous(result([]), None)["status"] == "no baseline"
    with pytest.raises(UserInputError, match="not a benchmark result"):
        compare_with_previous(result([]), write(tmp_path / "other.json", {"x": 1}))


def test_confusion_matrix_of_the_chosen_variant(onnx_dir, test_path):
    # The linear model's predictions, worked out here from its own weights.
    model = onnx.load(str(onnx_dir / "pruned" / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    [w] = [a for a in weights.values() if a.ndim == 2]
    [b] = [a for a in weights.values() if a.ndim == 1]
    split = np.load(test_path)
    predicted = (split["x"] @ w.T + b).argmax(axis=1)

    result = confusion_matrix(str(onnx_dir), "pruned", str(test_path))
    matrix = np.array(result["matrix"])
    assert result["categories"] == [str(i) for i in range(N_CLASSES)]
    assert matrix.shape == (N_CLASSES, N_CLASSES)
    for true in range(N_CLASSES):
        for guess in range(N_CLASSES):
            expected = np.sum((split["y"] == true) & (predicted == guess))
            assert matrix[true, guess] == expected
    assert result["accuracy"] == pytest.approx(np.mean(predicted == split["y"]))


def test_without_a_baseline_the_gate_takes_the_serving_record_the_reference_keeps(tmp_path):
    from torchship.components.gate.stage import serving_baseline

    reference = tmp_path / "torchship-reference" / "torchship" / "vertex"
    said: list[str] = []
    # Nothing deployed yet: a first run, the floor applies.
    assert serving_baseline("", str(reference), "", None, said.append) == (None, None)
    reference.mkdir(parents=True)
    (reference / "serving.json").write_text(json.dumps(
        {"model": "int8", "version": 3, "test_accuracy": 0.93, "target": "vertex"}))
    accuracy, source = serving_baseline("", f"{reference}/", "", None, said.append)
    assert accuracy == 0.93 and source == (
        f"serving record {reference}/serving.json ('int8' version 3)")
    assert said == [(f"serving baseline: {source}: test accuracy 0.9300 (on its own test "
                     "split, when it was deployed)")]
    gated = evaluate_gate(summary(accuracy=0.9), baseline_accuracy=accuracy,
                          baseline_source=source, max_accuracy_drop_pt=1.0,
                          latency_budget_p99_ms=10, target_concurrency=8, variant="fp32")
    assert not gated["passed"] and gated["baseline"]["source"] == source
    # A baseline given by hand wins over the reference; one that is not there is refused.
    given = tmp_path / "gate.json"
    given.write_text(json.dumps({"test_accuracy": 0.5}))
    assert serving_baseline(str(given), str(reference), "", None) == (str(given), None)
    with pytest.raises(UserInputError, match="nothing.json does not exist"):
        serving_baseline(str(tmp_path / "nothing.json"), str(reference), "", None)
