"""The joint serving search (variant x Triton settings) on a real tritonserver: rounds of
successive halving, a candidate discarded early by the p99 budget, the default (incumbent) kept to
the interleaved last round and replaced only by a challenger shown better, the choice by the
objective and its spread band (a tie said so), the Pareto front of the last round and the
report, and the chosen variant and settings in what deploy serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchship.components.deploy.stage import DEFAULT_SERVING_NAME, deploy_to
from torchship.components.errors import UserInputError
from torchship.components.report.search import render_search_report
from torchship.components.triton.config import read_model_config
from torchship.components.triton.versions import version_variant
from torchship.components.tune_serving.choice import (
    DEFAULT_SETTINGS,
    band_against,
    choose_settings,
    format_candidate_table,
    gain_pct,
    pareto_front,
    pass_gains_pct,
    serving_metrics,
    serving_objective,
    spread_pct,
    versus_default,
    write_candidate_table,
)
from torchship.components.tune_serving.halving import (
    FINAL_PASSES,
    FINAL_SHARE,
    _keep_best,
    schedule,
)
from torchship.components.tune_serving.stage import (
    SCHEMA,
    candidate_settings,
    search_serving_config,
    searched_variants,
)

# Short levels: the tiny model answers in well under a millisecond. The last round measures each
# finalist 2/3 of 2 windows of 0.6 s in all: FINAL_PASSES interleaved passes of 2 windows of
# 0.4 s / FINAL_PASSES; earlier rounds' windows are a third and a ninth of 0.6 s.
QUICK = {"duration_s": 1.2, "warmup_s": 0.2, "min_windows": 2, "max_windows": 3}
# A 20 ms batching delay (batches never fill to 64 at concurrency 2) puts p99 near 20 ms: over
# a 12 ms budget even allowing for the short windows' spread.
BUDGET_MS = 12.0


def gate_record(eligible: dict[str, bool], chosen: str = "fp32") -> dict:
    """A passing gate's record, as the gate writes its choice table."""
    return {"variant": chosen, "passed": True, "choice": {"table": [
        {"name": name, "meets_constraints": meets} for name, meets in eligible.items()]}}


@pytest.fixture(scope="module")
def searched(onnx_dir, test_path, tmp_path_factory) -> tuple[dict, Path, list[str]]:
    out = tmp_path_factory.mktemp("search")
    lines: list[str] = []
    record = search_serving_config(
        onnx_dir, test_path, out / "record.json",
        gate_record=gate_record({"fp32": True, "pruned": True}),
        chosen_dir=out / "chosen_model", report_path=out / "report.html",
        instance_counts=[1, 2], queue_delays_us=[100, 20000], target_concurrency=2,
        latency_budget_p99_ms=BUDGET_MS, progress=lines.append, **QUICK)
    return record, out, lines


def test_every_candidate_is_measured_and_the_record_is_whole(searched):
    record, out, lines = searched
    assert json.loads((out / "record.json").read_text()) == json.loads(json.dumps(record))
    assert record["schema"] == SCHEMA and record["variants"] == ["fp32", "pruned"]
    assert record["objective"]["metric"] == "throughput_per_core"  # under a p99 budget
    assert record["concurrency"] == [2] and len(record["schedule"]) == 3
    models = [c["model"] for c in record["candidates"]]
    assert models == ["fp32__i1_q100_b64", "fp32__i1_q20000_b64", "pruned__i1_q100_b64",
                      "pruned__i1_q20000_b64", "fp32__i2_q100_b64", "fp32__i2_q20000_b64",
                      "pruned__i2_q100_b64", "pruned__i2_q20000_b64"]
    # What served, as the running server said (benchmark.served): each candidate's own settings.
    served = record["server"]
    assert served["version"] and Path(served["binary"]).name == "tritonserver"
    assert list(served["models"]) == models and served["errors"] == []
    for candidate in record["candidates"]:
        config, settings = served["models"][candidate["model"]], candidate["settings"]
        assert config["instance_group"][0]["count"] == settings["instance_count"]
        assert config["max_batch_size"] == settings["max_batch_size"]
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == \
            settings["max_queue_delay_us"]
    for candidate in record["candidates"]:
        assert candidate["rounds"] and candidate["rounds"][0]["round"] == 0, candidate["model"]
        measured = candidate["levels"]["c2"]
        assert measured["throughput_rps"] > 0 and measured["errors"] == 0, candidate["model"]
        assert candidate["outcome"], candidate["model"]
    # Later rounds measure fewer candidates with longer windows.
    counts = [sum(len(c["rounds"]) > r for c in record["candidates"]) for r in range(3)]
    assert counts[0] == 8 and counts[0] > counts[1] >= counts[2] >= 1
    windows = [step["window_s"] for step in record["schedule"]]
    assert windows[:2] == pytest.approx([0.6 / 9, 0.6 / 3])
    final = record["schedule"][-1]
    assert final["passes"] == FINAL_PASSES
    assert final["window_s"] * FINAL_PASSES == pytest.approx(0.6 * FINAL_SHARE)
    chosen = next(c for c in record["candidates"] if c["model"] == record["chosen"])
    assert chosen["outcome"] == "chosen" and len(chosen["rounds"]) == 3
    # The last round's figures are the mean over its interleaved passes, each pass kept.
    passes = chosen["levels"]["c2"]["passes"]
    assert len(passes) == FINAL_PASSES and chosen["rounds"][-1]["passes"] == FINAL_PASSES
    assert chosen["levels"]["c2"]["throughput_rps"] == pytest.approx(
        sum(p["throughput_rps"] for p in passes) / FINAL_PASSES)
    assert (record["variant"], record["settings"]) == (chosen["variant"], chosen["settings"])
    assert record["settings"]["max_queue_delay_us"] == 100
    assert record["could_not_tell_apart"] == bool(record["tied"])
    assert lines[-1].startswith(f"serving: {record['variant']} with instance_count ")
    assert any(line.startswith("serving search round 3 of 3") for line in lines)
    metrics = serving_metrics(record)
    assert metrics["serving_max_batch_size"] == 64
    assert metrics["serving_throughput_per_core_c2"] == pytest.approx(
        chosen["levels"]["c2"]["throughput_rps"] / chosen["settings"]["instance_count"])


def test_a_candidate_over_the_budget_is_discarded_in_the_first_round(searched):
    record, _, lines = searched
    slow = [c for c in record["candidates"] if c["settings"]["max_queue_delay_us"] == 20000]
    for candidate in slow:
        assert len(candidate["rounds"]) == 1 and not candidate["qualifies"], candidate["model"]
        assert candidate["outcome"].startswith("discarded in round 1: p99 "), candidate["outcome"]
        assert f"over the budget of {BUDGET_MS:g} ms" in candidate["outcome"]
    [line] = [line for line in lines if line.startswith("serving search round 1: ")]
    assert int(line.split()[4]) >= len(slow) and "discarded (cannot meet the constraints)" in line


def test_the_default_goes_to_the_last_round_and_is_replaced_only_when_beaten(searched):
    record, _, lines = searched
    objective = record["objective"]
    default = next(c for c in record["candidates"] if c["incumbent"])
    assert record["incumbent"] == default["model"] == "fp32__i1_q100_b64"
    assert sum(c["incumbent"] for c in record["candidates"]) == 1
    # Within the budget, so it is measured in every round, in the same passes as the others.
    assert default["qualifies"] and [r["round"] for r in default["rounds"]] == [0, 1, 2]
    finalists = [c for c in record["candidates"] if len(c["rounds"]) == 3 and c["qualifies"]]
    for candidate in finalists:
        assert len(pass_gains_pct(candidate, default, objective)) == FINAL_PASSES
    chosen = next(c for c in finalists if c["model"] == record["chosen"])
    if chosen is default:  # no challenger beat it beyond the band
        assert all(gain_pct(c, default, objective) <= band_against(c, default, objective)
                   for c in finalists)
        assert record["reason"].startswith("no finalist is shown better than the default")
    else:
        versus = record["versus_default"]
        assert versus["candidate"] == chosen["model"] and versus["gain_pct"] > versus["band_pct"]
        assert default["outcome"].startswith(f"the default: {chosen['model']} beats it by")
    assert all(c["simplicity"] > chosen["simplicity"] for c in finalists
               if c["model"] in record["tied"] and c is not chosen)
    assert any(" interleaved passes of 2 windows of 0.13 s" in line for line in lines)


def test_the_pareto_front_and_the_report(searched):
    record, out, _ = searched
    front = record["pareto_front"]
    last = [c for c in record["candidates"] if c["rounds"][-1]["round"] == 2]
    assert front and set(front) <= {c["model"] for c in last}
    levels = {c["model"]: c["levels"]["c2"] for c in last}
    for model in front:  # no candidate of the last round is better on both axes
        assert not any(o["p99_ms"] < levels[model]["p99_ms"]
                       and o["throughput_rps"] > levels[model]["throughput_rps"]
                       for o in levels.values())
    page = (out / "report.html").read_text()
    assert "<svg" in page and "Pareto front (last round)" in page and "p99 &le; 12 ms" in page
    assert "round 1: windows of 0.07 s" in page and "3 interleaved passes" in page
    assert "among the candidates measured in the last round only" in page
    assert "the default (fp32__i1_q100_b64)" in page
    for candidate in record["candidates"]:
        assert candidate["model"] in page
    assert 'class="chosen"' in page and "discarded in round 1" in page
    write_candidate_table(record, out / "table.md")
    table = (out / "table.md").read_text()
    assert "| fp32__i1_q20000_b64 |" in table and "chosen:" in table


def test_deploy_serves_the_chosen_variant_and_settings(searched, test_path, tmp_path):
    record, out, _ = searched
    chosen_dir = out / "chosen_model"
    assert [p.name for p in chosen_dir.iterdir() if p.is_dir()] == [record["variant"]]
    assert json.loads((chosen_dir / "variants.json").read_text())[0]["name"] == record["variant"]
    repository = tmp_path / "model_repository"
    deploy_to("local", chosen_dir, repository, str(repository), test_path,
              serving=record["settings"], progress=lambda _line: None)
    model_dir = repository / DEFAULT_SERVING_NAME
    config = read_model_config(model_dir / "config.pbtxt")
    assert config.instance_group[0].count == record["settings"]["instance_count"]
    assert config.dynamic_batching.max_queue_delay_microseconds == (
        record["settings"]["max_queue_delay_us"])
    assert config.max_batch_size == record["settings"]["max_batch_size"]
    assert version_variant(model_dir, 1) == record["variant"]


def test_an_impossible_budget_keeps_the_gates_variant_with_the_default_settings(
        onnx_dir, test_path, tmp_path):
    # An empty axis is not searched: instance_count stays at its default.
    record = search_serving_config(
        onnx_dir, test_path, tmp_path / "record.json",
        gate_record=gate_record({"fp32": True, "pruned": False}), chosen_dir=tmp_path / "chosen",
        instance_counts=[], queue_delays_us=[100], target_concurrency=2,
        latency_budget_p99_ms=0.001, progress=None, **QUICK)
    assert [c["model"] for c in record["candidates"]] == ["fp32__i1_q100_b64"]  # pruned: not eligible
    [candidate] = record["candidates"]
    assert not candidate["qualifies"] and "over the budget of 0.001 ms" in candidate["why_not"]
    assert record["chosen"] is None and record["settings"] == DEFAULT_SETTINGS
    assert record["variant"] == "fp32" and record["reason"].startswith("no candidate qualifies")
    assert record["incumbent"] == "fp32__i1_q100_b64" and record["versus_default"] is None
    assert (tmp_path / "chosen" / "fp32" / "model.onnx").is_file()


def test_no_axis_means_no_search_and_no_server(onnx_dir, test_path, tmp_path):
    record = search_serving_config(onnx_dir, test_path, tmp_path / "record.json",
                                   instance_counts=[], queue_delays_us=[], max_batch_sizes=[],
                                   progress=None)
    assert record["candidates"] == [] and record["settings"] == DEFAULT_SETTINGS
    assert record["server_startup_s"] is None and "no search" in record["reason"]
    assert candidate_settings([2], [], []) == [
        {"instance_count": 2, "max_queue_delay_us": 100, "max_batch_size": 64}]
    # Each axis: its default first (the simplest), then ascending.
    assert [s["max_batch_size"] for s in candidate_settings([], [], [1, 64, 8])] == [64, 1, 8]


def test_the_variants_searched_come_from_the_gate(onnx_dir, tmp_path):
    both = gate_record({"fp32": True, "pruned": True}, chosen="pruned")
    assert searched_variants(onnx_dir, both)[0] == ["pruned", "fp32"]  # the gate's first
    # A property of the model file (size): the gate already chose by it.
    names, why = searched_variants(onnx_dir, both, optimise="size")
    assert names == ["pruned"] and "property of the model" in why
    assert searched_variants(onnx_dir, None)[0] == ["fp32", "pruned"]
    lacking = gate_record({"fp32": True, "int8": True})
    with pytest.raises(UserInputError, match="lacks the eligible variants int8 .*onnx_models"):
        searched_variants(onnx_dir, lacking)
    with pytest.raises(UserInputError, match="gate_record: .* does not exist"):
        search_serving_config(onnx_dir, "t", tmp_path / "r.json",
                              gate_record=tmp_path / "none.json", progress=None)
    assert not (tmp_path / "r.json").exists()


def test_successive_halving_schedule():
    plan = schedule(20, 1.0, passes=3, share=2 / 3)
    assert [round(step["window_s"], 3) for step in plan] == [0.111, 0.333, 0.222]
    assert [step["keep"] for step in plan] == [7, 3, None]
    assert [step["passes"] for step in plan] == [1, 1, 3]  # the last: 3 passes of 0.22 s
    assert schedule(2, 1.0, passes=1, share=1) == [{"round": 0, "window_s": 1.0, "keep": None,
                                                   "passes": 1}]
    # The exhaustive sweep: every candidate one level of full windows, no passes; a search of
    # two candidates has one round too, interleaved.
    assert schedule(20, 1.0, rounds=1) == [{"round": 0, "window_s": 1.0, "keep": None,
                                            "passes": 1}]
    assert schedule(2, 0.9)[0]["passes"] == FINAL_PASSES


def _candidate(model: str, rank: int, p99: float, rps: float, spread: float = 1.0) -> dict:
    variant, settings = model.split("__")
    count, delay = (int(part[1:]) for part in settings.split("_")[:2])
    return {"model": model, "variant": variant, "simplicity": rank, "qualifies": True,
            "why_not": None, "settings": {"instance_count": count, "max_queue_delay_us": delay,
                                          "max_batch_size": 64},
            "levels": {"c4": {"p99_ms": p99, "throughput_rps": rps, "errors": 0,
                              "spread_pct": {"p99_ms": spread, "throughput_rps": spread}}}}


def _objective(metric: str, budget: float | None = None) -> dict:
    return {"metric": metric, "optimise": "latency", "latency_budget_p99_ms": budget,
            "target_concurrency": 4, "margin_pct": 5.0}


def test_choice_rules_and_ties_on_given_measurements():
    simple = _candidate("fp32__i1_q100", 0, 4.0, 1000)
    other = _candidate("int8__i1_q100", 1, 3.0, 1400)
    doubled = _candidate("int8__i2_q100", 2, 2.0, 2400)  # 1200 req/s per core
    per_core = _objective("throughput_per_core", 5.0)
    # Per core, int8 on one instance is 40% better than fp32, beyond the band; no tie.
    choice = choose_settings([simple, other, doubled], per_core)
    assert (choice["chosen"], choice["variant"], choice["tied"]) == ("int8__i1_q100", "int8", [])
    assert "beyond the" in choice["reason"]
    # Differences within the measured spread: a tie, said so, and the simplest chosen.
    noisy = [_candidate("fp32__i1_q100", 0, 4.0, 1000, spread=30.0),
             _candidate("int8__i1_q100", 1, 3.0, 1150, spread=30.0)]
    choice = choose_settings(noisy, per_core)
    assert choice["chosen"] == "fp32__i1_q100" and choice["tied"] == [
        "fp32__i1_q100", "int8__i1_q100"]
    assert choice["reason"].startswith("could not tell apart 2 candidates")
    # Latency: the lowest p99.
    assert choose_settings([simple, other, doubled], _objective("latency"))["chosen"] == (
        "int8__i2_q100")
    assert pareto_front([simple, other, doubled], 4) == ["int8__i2_q100"]
    # The objective follows the gate's parameters.
    assert serving_objective("latency", None) == "latency"
    assert serving_objective("latency_b64_ms", None) == "latency"
    assert serving_objective("latency", 5.0) == "throughput_per_core"
    assert serving_objective("latency", None, 900.0) == "throughput_per_core"
    assert serving_objective("size", None) == "throughput_per_core"
    record = {"objective": per_core, "candidates": noisy, "chosen": "fp32__i1_q100",
              "variant": "fp32", "settings": noisy[0]["settings"], "reason": "r",
              "pareto_front": []}
    assert "fp32__i1_q100 (chosen)" in format_candidate_table(record)


def _finalist(model: str, rank: int, rps_per_pass: list[float], incumbent: bool = False,
              p99: float = 4.0, last_round: int = 2) -> dict:
    """A candidate as the last round leaves it: the mean over its interleaved passes, their
    spread and the passes themselves."""
    candidate = _candidate(model, rank, p99, sum(rps_per_pass) / len(rps_per_pass),
                           spread=spread_pct(rps_per_pass))
    candidate["incumbent"] = incumbent
    candidate["levels"]["c4"]["p50_ms"] = p99 / 2
    candidate["levels"]["c4"]["passes"] = [
        {"p50_ms": p99 / 2, "p99_ms": p99, "throughput_rps": rps, "errors": 0}
        for rps in rps_per_pass]
    candidate["rounds"] = [{"round": r} for r in range(last_round + 1)]
    return candidate


def _outcomes(finalists: list[dict], objective: dict) -> dict:
    record = {"objective": objective, **choose_settings(finalists, objective)}
    return {**record, "outcomes": {c["model"]: versus_default(c, record, finalists)
                                   for c in finalists}}


def test_the_default_is_kept_unless_a_challenger_beats_it_beyond_the_spread():
    objective = _objective("throughput_per_core", 5.0)
    default = _finalist("fp32__i1_q100", 0, [1000, 1100, 1000], incumbent=True)
    # 8% better on the mean, but the passes spread by up to 6.5%, and pass by pass the ratio
    # swings by 12% (1.15, 0.95, 1.15): not shown better, so the default is kept, and said so.
    swinging = _finalist("int8__i1_q100", 1, [1150, 1050, 1150])
    assert gain_pct(swinging, default, objective) == pytest.approx(8.06, abs=0.01)
    assert band_against(swinging, default, objective) == pytest.approx(12.0, abs=0.1)
    choice = _outcomes([default, swinging], objective)
    assert (choice["chosen"], choice["variant"]) == ("fp32__i1_q100", "fp32")
    assert choice["tied"] == ["fp32__i1_q100", "int8__i1_q100"]
    assert choice["reason"].startswith("no finalist is shown better than the default, fp32__i1_q100")
    assert "could not tell int8__i1_q100 from the default" in choice["reason"]
    assert choice["versus_default"]["pass_gains_pct"] == pytest.approx([15.0, -4.55, 15.0],
                                                                       abs=0.01)
    assert choice["outcomes"]["int8__i1_q100"].startswith(
        "not shown better than the default (fp32__i1_q100): 8.1% better, within the 12.0% band")
    # The same 8% with the passes' ratio steady (both drift alike): beyond the 6.5% band.
    steady = _finalist("int8__i1_q100", 1, [1080, 1188, 1080])
    assert band_against(steady, default, objective) == pytest.approx(
        spread_pct([1000, 1100, 1000]))
    assert _outcomes([default, steady], objective)["chosen"] == "int8__i1_q100"
    # A challenger ahead by less than the band does not replace the default, though it is the
    # best finalist.
    close = _finalist("int8__i2_q100", 2, [2080, 2080, 2080])  # 1040 per core
    choice = _outcomes([default, close], _objective("throughput_per_core", 5.0))
    assert choice["chosen"] == "fp32__i1_q100" and choice["versus_default"]["gain_pct"] < 5.0
    # Beaten beyond the band in every pass: the challenger is chosen, the default says by how much.
    faster = _finalist("int8__i1_q100", 1, [1400, 1500, 1400])
    choice = _outcomes([default, faster, close], objective)
    assert choice["chosen"] == "int8__i1_q100" and choice["tied"] == []
    assert choice["versus_default"]["candidate"] == "int8__i1_q100"
    assert "it beats the default, fp32__i1_q100, by 38.7%" in choice["reason"]
    assert choice["outcomes"]["fp32__i1_q100"].startswith(
        "the default: int8__i1_q100 beats it by 38.7%, beyond the")
    assert choice["outcomes"]["int8__i2_q100"].startswith("not shown better than the default")
    # Lowest p99: a slower challenger lost to the default, by the default's gain over it.
    quick = _finalist("fp32__i1_q100", 0, [1000] * 3, incumbent=True, p99=3.0)
    slow = _finalist("int8__i1_q100", 1, [1000] * 3, p99=3.7)
    choice = _outcomes([quick, slow], _objective("latency"))
    assert choice["chosen"] == "fp32__i1_q100" and choice["tied"] == []
    assert choice["outcomes"]["int8__i1_q100"] == (
        "lost to the default (fp32__i1_q100): it is 18.9% better, beyond the 5.0% band of their "
        "interleaved passes")
    # A default that does not qualify is no incumbent: the best finalist by the band.
    default["qualifies"] = False
    assert _outcomes([default, close], objective)["chosen"] == "int8__i2_q100"


def test_the_default_is_kept_to_the_last_round_besides_the_best():
    objective = _objective("throughput_per_core", 5.0)
    alive = [_candidate("fp32__i1_q100", 0, 4.0, 900), _candidate("int8__i1_q100", 1, 4.0, 1400),
             _candidate("int8__i1_q2000", 2, 4.0, 1300), _candidate("fp32__i1_q2000", 3, 4.0, 1000)]
    alive[0]["incumbent"] = True
    kept = _keep_best(alive, {"round": 0, "keep": 2}, objective)
    assert [c["model"] for c in kept] == ["fp32__i1_q100", "int8__i1_q100", "int8__i1_q2000"]
    # The one dropped is compared with the last of the best kept, not with the default.
    assert alive[3]["outcome"].startswith("dropped after round 1: 3 of 4; the last kept "
                                          "(int8__i1_q2000) is 30% better")
    assert alive[0].get("outcome") is None and alive[0]["qualifies"]


def test_the_pareto_front_is_of_the_last_round_and_the_plot_says_each_round():
    # Round 1's short windows flattered a dropped candidate: it is plotted, faint, but off the
    # front, which is among the last round's candidates only.
    lucky = _finalist("fp32__i1_q2000", 3, [3000], p99=1.0, last_round=0)
    finalists = [_finalist("fp32__i1_q100", 0, [1000, 1000, 1000], incumbent=True, p99=3.0),
                 _finalist("int8__i1_q100", 1, [1500, 1500, 1500], p99=4.0),
                 _finalist("int8__i2_q100", 2, [1200, 1200, 1200], p99=5.0)]
    candidates = [*finalists, lucky]
    assert pareto_front(candidates, 4) == ["fp32__i1_q2000"]  # every measurement alike
    assert pareto_front(candidates, 4, last_round=2) == ["fp32__i1_q100", "int8__i1_q100"]
    objective = _objective("throughput_per_core", 6.0)
    record = {"objective": objective, "candidates": candidates, **choose_settings(
        finalists, objective), "incumbent": "fp32__i1_q100", "variants": ["fp32", "int8"],
        "schedule": schedule(20, 0.9, passes=3), "method": {"rounds": 3, "windows": 3},
        "pareto_front": pareto_front(candidates, 4, last_round=2)}
    page = render_search_report(record)
    for label in ("round 1: windows of 0.10 s", "round 3: windows of 0.20 s, 3 interleaved passes",
                  "Pareto front (last round)", "among the candidates measured in the last round"):
        assert label in page, label
    assert "against the default (fp32__i1_q100): int8__i1_q100 beats it by 50.0%" in page
    table = format_candidate_table({**record, "variant": "int8"}, markdown=True)
    assert "| fp32__i1_q2000 |" in table and "| int8__i1_q100 (chosen) * |" in table
