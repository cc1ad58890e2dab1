"""choose_variant, the variant table and publishing the chosen variant, on a measured table."""

import json

import onnx
import pytest
from torch import nn

from torchship.components.errors import UserInputError
from torchship.components.export.table import format_variant_table, variant_metrics
from torchship.components.gate.choice import (
    NoVariantMeetsConstraints,
    choose_variant,
    format_choice_table,
    publish_chosen_variant,
    require_chosen,
)
from torchship.components.models import export_onnx

KIB = 1024


def row(name, accuracy, drop, b1, b64, size_kib, parameters=1_000_000, passed=True):
    """One measured row, with the keys export's measurement writes."""
    return {
        "name": name, "onnx_test_accuracy": accuracy, "acc_drop_pt": drop,
        "latency_b1_ms": b1, "latency_b64_ms": b64, "onnx_size_bytes": size_kib * KIB,
        "compressed_size_bytes": size_kib * KIB // 2, "n_parameters": parameters,
        "nonzero_parameters": parameters, "parity": {"passed": passed},
    }


TABLE = [
    row("fp32", 0.975, 0.0, 0.15, 2.50, 4400),
    row("pruned", 0.970, 0.5, 0.15, 2.50, 4400),
    row("structured", 0.964, 1.1, 0.05, 0.55, 1180, parameters=300_000),
    row("distilled", 0.960, 1.5, 0.03, 0.19, 333, parameters=85_000),
    row("int8", 0.975, 0.0, 0.08, 1.10, 1137),
    row("fp16", 0.975, 0.0, 0.14, 2.50, 2200),
]


def test_unconstrained_choice_is_the_fastest():
    choice = choose_variant(TABLE)
    assert choice["chosen"] == "distilled"
    assert choice["optimise"] == "latency_b1_ms" and choice["direction"] == "min"
    assert all(r["meets_constraints"] for r in choice["table"])
    assert "'distilled' has the lowest latency_b1_ms (0.030 ms)" in choice["reason"]


def test_accuracy_constraint_rules_out_the_lossy_variants():
    choice = choose_variant(TABLE, max_acc_drop_pt=1.0)
    assert choice["chosen"] == "int8"
    by_name = {r["name"]: r for r in choice["table"]}
    assert not by_name["distilled"]["meets_constraints"]
    assert by_name["distilled"]["checks"]["accuracy"] == {
        "metric": "acc_drop_pt", "value": 1.5, "limit": 1.0, "passed": False}
    assert by_name["int8"]["chosen"] and not by_name["fp32"]["chosen"]
    assert "4 of 6 variants" in choice["reason"] and "accuracy drop <= 1.00 pt" in choice["reason"]


def test_latency_budget_at_batch_64_and_size_limit():
    choice = choose_variant(TABLE, max_latency_ms=1.0, latency_batch=64,
                            max_size_bytes=2000 * KIB, optimise="accuracy")
    # structured (0.55 ms, 1180 KiB) and distilled pass; structured is more accurate.
    assert choice["chosen"] == "structured"
    assert choice["optimise"] == "onnx_test_accuracy" and choice["direction"] == "max"
    assert choice["constraints"]["latency"] == {"metric": "latency_b64_ms", "limit": 1.0}


def test_optimising_size_breaks_ties_by_accuracy():
    tied = [row("a", 0.95, 1.0, 0.1, 1.0, 500), row("b", 0.97, 0.0, 0.1, 1.0, 500)]
    assert choose_variant(tied, optimise="size")["chosen"] == "b"
    assert choose_variant(TABLE, optimise="compressed_size")["chosen"] == "distilled"


def test_failed_parity_is_never_chosen():
    table = [row("fp32", 0.97, 0.0, 0.2, 2.0, 4000), row("int8", 0.97, 0.0, 0.1, 1.0, 1000,
                                                          passed=False)]
    choice = choose_variant(table)
    assert choice["chosen"] == "fp32"
    assert choice["table"][1]["checks"]["parity"]["passed"] is False


def test_nothing_meets_the_constraints_says_why_for_each_variant():
    choice = choose_variant(TABLE, max_acc_drop_pt=0.2, max_size_bytes=500 * KIB)
    assert choice["chosen"] is None
    reason = choice["reason"]
    assert reason.startswith("no variant meets every constraint (accuracy drop <= 0.20 pt; "
                             "onnx_size_bytes <= 500.0 KiB)")
    assert "int8 fails onnx_size_bytes 1137.0 KiB > 500.0 KiB" in reason
    assert "distilled fails accuracy drop 1.50 pt > 0.20 pt" in reason
    assert reason.endswith("relax a constraint or add variants") and "\n" not in reason
    with pytest.raises(NoVariantMeetsConstraints) as error:
        require_chosen(choice)
    assert str(error.value) == reason
    assert error.value.choice is choice
    assert "no: accuracy drop 1.50 pt > 0.20 pt" in error.value.table
    assert error.value.table.splitlines()[-1] == f"no choice: {reason}"


def test_bad_requests_name_the_input():
    with pytest.raises(UserInputError, match="parameter optimise='speed' is not a metric"):
        choose_variant(TABLE, optimise="speed")
    with pytest.raises(UserInputError, match="parameter max_latency_ms=-1 must be >= 0"):
        choose_variant(TABLE, max_latency_ms=-1)
    with pytest.raises(UserInputError, match="variant table is empty"):
        choose_variant([])
    choice = choose_variant(TABLE, max_latency_ms=1.0, latency_batch=8)
    assert choice["chosen"] is None and "latency_b8_ms (not measured)" in choice["reason"]


def test_table_as_text_and_markdown():
    choice = choose_variant(TABLE, max_acc_drop_pt=1.0)
    text = format_choice_table(choice).splitlines()
    assert text[0].split()[:3] == ["variant", "test", "acc"] and "meets constraints" in text[0]
    assert text[5].startswith("int8 *")
    assert text[-1].startswith("chosen: 'int8'")
    markdown = format_variant_table(TABLE, markdown=True).splitlines()
    assert len(markdown) == 2 + len(TABLE)
    assert all(line.count("|") == markdown[0].count("|") for line in markdown)
    assert markdown[2].startswith("| fp32 | 0.9750 | +0.00 |")


def test_variant_metrics_are_flat_numbers():
    metrics = variant_metrics(TABLE)
    assert metrics["int8_latency_b64_ms"] == 1.10
    assert metrics["distilled_n_parameters"] == 85_000
    assert all(isinstance(value, float) for value in metrics.values())


def test_publish_chosen_variant_copies_only_that_one(tmp_path):
    onnx_dir = tmp_path / "onnx"
    for name in ("fp32", "int8"):
        export_onnx(nn.Linear(4, 3), 4, onnx_dir / name / "model.onnx")
    rows = [row("fp32", 0.97, 0.0, 0.2, 2.0, 4000), row("int8", 0.97, 0.0, 0.1, 1.0, 1000)]
    (onnx_dir / "variants.json").write_text(json.dumps(rows))
    choice = choose_variant(rows)
    chosen_dir = tmp_path / "chosen"
    published = publish_chosen_variant(onnx_dir, choice, chosen_dir)
    assert published["name"] == "int8" and published["chosen"]
    assert sorted(p.name for p in chosen_dir.iterdir()) == ["choice.json", "int8",
                                                            "variants.json"]
    onnx.checker.check_model(str(chosen_dir / "int8" / "model.onnx"))
    assert json.loads((chosen_dir / "variants.json").read_text()) == [published]
    assert json.loads((chosen_dir / "choice.json").read_text())["chosen"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chosen", "onnx"]  # no staging

    publish_chosen_variant(onnx_dir, "fp32", chosen_dir)  # by name, replacing the last one
    assert sorted(p.name for p in chosen_dir.iterdir()) == ["fp32", "variants.json"]
    with pytest.raises(UserInputError, match="variant 'int4' is not in"):
        publish_chosen_variant(onnx_dir, "int4", tmp_path / "other")
    with pytest.raises(NoVariantMeetsConstraints):
        publish_chosen_variant(onnx_dir, choose_variant(rows, max_size_bytes=1), chosen_dir)
