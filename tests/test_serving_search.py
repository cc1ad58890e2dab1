"""The serving search on a real tritonserver: every candidate measured, the choice by the gate's
objective and its noise band, the record whole, and the chosen settings in the deployed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchship.components.deploy.stage import DEFAULT_SERVING_NAME, deploy_to
from torchship.components.gate.choice import publish_chosen_variant
from torchship.components.triton.config import read_model_config
from torchship.components.tune_serving.choice import (
    DEFAULT_SETTINGS,
    choose_settings,
    format_candidate_table,
    serving_metrics,
    serving_objective,
    write_candidate_table,
)
from torchship.components.tune_serving.stage import (
    SCHEMA,
    candidate_settings,
    search_serving_config,
)

# Short levels: the tiny model answers in well under a millisecond.
QUICK = {"duration_s": 0.6, "warmup_s": 0.2, "min_windows": 2, "max_windows": 3}


@pytest.fixture(scope="module")
def chosen(onnx_dir, tmp_path_factory) -> Path:
    """The gate's chosen model, as the gate publishes it: one variant, fp32."""
    directory = tmp_path_factory.mktemp("gate") / "chosen_model"
    publish_chosen_variant(onnx_dir, "fp32", directory)
    return directory


@pytest.fixture(scope="module")
def searched(chosen, test_path, tmp_path_factory) -> tuple[dict, Path, list[str]]:
    record_path = tmp_path_factory.mktemp("search") / "record.json"
    lines: list[str] = []
    record = search_serving_config(
        chosen, test_path, record_path, instance_counts=[1, 2], queue_delays_us=[100, 2000],
        target_concurrency=2, optimise="size", progress=lines.append, **QUICK)
    return record, record_path, lines


def test_every_candidate_is_measured_and_the_record_is_whole(searched):
    record, record_path, lines = searched
    assert json.loads(record_path.read_text()) == json.loads(json.dumps(record))
    assert record["schema"] == SCHEMA and record["variant"] == "fp32"
    assert record["concurrency"] == [1, 2]
    assert record["objective"]["metric"] == "throughput"  # size is the same for every setting
    models = [c["model"] for c in record["candidates"]]
    assert models == ["fp32__i1_q100", "fp32__i1_q2000", "fp32__i2_q100", "fp32__i2_q2000"]
    for candidate in record["candidates"]:
        for level in ("c1", "c2"):
            measured = candidate["levels"][level]
            assert measured["throughput_rps"] > 0 and measured["errors"] == 0, candidate["model"]
            assert measured["p50_ms"] <= measured["p99_ms"]
        assert candidate["qualifies"] and candidate["why_not"] is None
    assert record["chosen"] in models and record["reason"]
    chosen = next(c for c in record["candidates"] if c["model"] == record["chosen"])
    assert record["settings"] == chosen["settings"]
    # One progress line per candidate and level from the benchmark, a row each, then the choice.
    for model in models:
        assert sum(f"{model} b=1" in line for line in lines) == 2, model
        assert any(line.startswith(model) for line in lines), model
    assert lines[-1].startswith("serving: instance_count ")
    metrics = serving_metrics(record)
    assert metrics["serving_instance_count"] == record["settings"]["instance_count"]
    assert metrics["serving_throughput_rps_c2"] == chosen["levels"]["c2"]["throughput_rps"]


def test_the_choice_is_the_simplest_within_the_band_of_the_best(searched):
    record, _, _ = searched
    candidates = record["candidates"]

    def throughput(candidate: dict) -> float:
        return candidate["levels"]["c2"]["throughput_rps"]

    best = max(throughput(c) for c in candidates)
    chosen = next(c for c in candidates if c["model"] == record["chosen"])
    assert (best - throughput(chosen)) / throughput(chosen) * 100 <= record["band_pct"]
    for simpler in candidates[:chosen["simplicity"]]:
        assert (best - throughput(simpler)) / throughput(simpler) * 100 > max(
            5.0, simpler["levels"]["c2"]["spread_pct"]["throughput_rps"])


def test_an_impossible_budget_keeps_the_default_settings_and_says_so(chosen, test_path,
                                                                     tmp_path):
    # An empty axis is not searched: instance_count stays at its default.
    record = search_serving_config(
        chosen, test_path, tmp_path / "record.json", instance_counts=[],
        queue_delays_us=[100, 1000], target_concurrency=2, latency_budget_p99_ms=0.001,
        progress=None, **QUICK)
    assert [c["settings"] for c in record["candidates"]] == [
        {"instance_count": 1, "max_queue_delay_us": 100},
        {"instance_count": 1, "max_queue_delay_us": 1000}]
    assert all(c["levels"]["c2"]["throughput_rps"] > 0 for c in record["candidates"])
    assert not any(c["qualifies"] for c in record["candidates"])
    assert all("over the budget of 0.001 ms" in c["why_not"] for c in record["candidates"])
    assert record["chosen"] is None and record["settings"] == DEFAULT_SETTINGS
    assert record["reason"].startswith("no candidate qualifies")
    assert "keeping the default settings (instance_count 1, max_queue_delay_us 100)" in (
        record["reason"])
    write_candidate_table(record, tmp_path / "table.md")
    table = (tmp_path / "table.md").read_text()
    assert "| fp32__i1_q1000 |" in table and "no: p99" in table


def test_no_axis_means_no_search_and_no_server(chosen, test_path, tmp_path):
    record = search_serving_config(chosen, test_path, tmp_path / "record.json",
                                   instance_counts=[], queue_delays_us=[], progress=None)
    assert record["candidates"] == [] and record["settings"] == DEFAULT_SETTINGS
    assert record["server_startup_s"] is None and "no search" in record["reason"]
    assert candidate_settings([2], []) == [{"instance_count": 2, "max_queue_delay_us": 100}]


def test_several_models_are_refused_in_one_line(onnx_dir, test_path, tmp_path):
    from torchship.components.errors import UserInputError

    with pytest.raises(UserInputError, match="holds 2 models .*pass the gate's chosen_model"):
        search_serving_config(onnx_dir, test_path, tmp_path / "r.json", progress=None)
    assert not (tmp_path / "r.json").exists()


def _candidate(model: str, rank: int, p99: float, rps: float, spread: float = 1.0) -> dict:
    count, delay = (int(part[1:]) for part in model.split("__")[1].split("_"))
    return {"model": model, "settings": {"instance_count": count, "max_queue_delay_us": delay},
            "simplicity": rank, "qualifies": True, "why_not": None,
            "levels": {"c4": {"p99_ms": p99, "throughput_rps": rps,
                              "spread_pct": {"p99_ms": spread, "throughput_rps": spread}}}}


def _objective(metric: str, budget: float | None = None) -> dict:
    return {"metric": metric, "optimise": metric, "latency_budget_p99_ms": budget,
            "target_concurrency": 4, "margin_pct": 5.0}


def test_choice_rules_on_given_measurements():
    simple, delayed = _candidate("m__i1_q100", 0, 4.0, 1000), _candidate("m__i1_q2000", 1, 3.0, 1040)
    doubled = _candidate("m__i2_q100", 2, 3.9, 1300)
    candidates = [simple, delayed, doubled]
    # Throughput: the winner is 30% better, beyond the band.
    choice = choose_settings(candidates, _objective("throughput"))
    assert choice["chosen"] == "m__i2_q100" and "beyond the 5.0% band" in choice["reason"]
    # 4% better is within the band: the simpler one is kept, and the reason says why.
    choice = choose_settings([simple, delayed], _objective("throughput"))
    assert choice["chosen"] == "m__i1_q100" and "within the 5.0% band" in choice["reason"]
    # A noisy level widens the band to its measured spread.
    noisy = _candidate("m__i1_q100", 0, 4.0, 1000, spread=40.0)
    assert choose_settings([noisy, doubled], _objective("throughput"))["chosen"] == "m__i1_q100"
    # Latency: the lowest p99, 25% better than the simplest.
    assert choose_settings(candidates, _objective("latency"))["chosen"] == "m__i1_q2000"
    # The objective follows the gate's parameters.
    assert serving_objective("latency", None) == "latency"
    assert serving_objective("latency_b64_ms", None) == "latency"
    assert serving_objective("latency", 5.0) == "throughput"
    assert serving_objective("size", None) == "throughput"


def test_deploy_serves_the_chosen_settings(searched, chosen, test_path, tmp_path):
    record, _, _ = searched
    repository = tmp_path / "model_repository"
    deploy_to("local", chosen, repository, str(repository), test_path,
              serving=record["settings"], progress=lambda _line: None)
    config = read_model_config(repository / DEFAULT_SERVING_NAME / "config.pbtxt")  # fp32's
    assert config.instance_group[0].count == record["settings"]["instance_count"]
    assert config.dynamic_batching.max_queue_delay_microseconds == (
        record["settings"]["max_queue_delay_us"])
    assert "fp32__" in format_candidate_table(record)
