"""An honest gate and a report that explains it: checks that were not evaluated read "not
checked" with the reason, a first run's accuracy has a real bar, and the first screen says what
was optimised, under which constraints, why each variant won or lost, and where it ran."""

from __future__ import annotations

import json
import re

import pytest
from artifacts import export_linear

from torchship.components.data.splits import load_split
from torchship.components.gate.checks import evaluate_gate, gate_metrics
from torchship.components.gate.choice import choose_variant
from torchship.components.gate.regression import compare_with_previous
from torchship.components.gate.stage import decide, known_environment, majority_class
from torchship.components.report.explain import chosen_line, environment_rows
from torchship.components.report.html_report import render_html_report
from torchship.components.report.summary import build_summary, format_markdown


def bench_row(model: str, concurrency: int, p99: float, client: dict | None = None) -> dict:
    return {
        "model": model, "concurrency": concurrency, "batch_size": 1, "p50_ms": p99 / 3,
        "p95_ms": p99 / 1.5, "p99_ms": p99, "mean_ms": p99 / 2.5, "errors": 0, "stable": True,
        "throughput_rps": 400.0 * concurrency / p99, "requests": 900,
        "stability": {"judged_windows": [1, 2, 3]},
        "windows": [{"index": i, "p99_ms": p99} for i in (1, 2, 3)],
        "server": {"request_us": 1500.0, "queue_us": 250.0, "compute_input_us": 10.0,
                   "compute_infer_us": 700.0, "compute_output_us": 20.0},
        "client": client or {"cpu_cores": 0.1},
    }


VARIANTS = [
    {"name": "fp32", "test_accuracy": 0.97, "onnx_test_accuracy": 0.97, "acc_drop_pt": 0.0,
     "onnx_size_bytes": 4 * 1024 * 1024, "latency_b1_ms": 0.080,
     "parity": {"passed": True, "max_abs_diff": 1e-6}},
    {"name": "int8", "test_accuracy": 0.965, "onnx_test_accuracy": 0.965, "acc_drop_pt": 0.5,
     "onnx_size_bytes": 1024 * 1024, "latency_b1_ms": 0.050,
     "parity": {"passed": True, "max_abs_diff": 0.03}},
    {"name": "pruned", "test_accuracy": 0.94, "onnx_test_accuracy": 0.94, "acc_drop_pt": 3.0,
     "onnx_size_bytes": 4 * 1024 * 1024, "latency_b1_ms": 0.040,
     "parity": {"passed": True, "max_abs_diff": 1e-5}},
]


@pytest.fixture
def run(tmp_path, test_path):
    """An export of three real (linear) ONNX variants and a benchmark result of them as the
    perf_analyzer engine records it, on a host it shares with the server."""
    onnx_dir = tmp_path / "onnx"
    for row in VARIANTS:
        export_linear(onnx_dir / row["name"] / "model.onnx")
    (onnx_dir / "variants.json").write_text(json.dumps(VARIANTS))
    client = {"name": "perf_analyzer", "version": "2.51.0", "cpu_s_per_request": 0.00012,
              "cpu_cores": 0.35, "shares_host": True, "fallback": None, "processes": 1}
    measured = {
        "protocol": "grpc", "mode": "local", "batch_size": 1, "batch_sizes": [1],
        "concurrency": [1, 4],
        "host": {"cpu_count": 2, "cpu_model": "Example CPU @ 2.0GHz", "platform": "Linux"},
        "results": [bench_row(m, c, p, client) for m, p in (("fp32", 2.0), ("int8", 1.2),
                                                           ("pruned", 1.0)) for c in (1, 4)],
    }
    return onnx_dir, build_summary(str(onnx_dir), measured), tmp_path


def test_a_first_run_with_no_budget_and_no_previous_run_says_what_it_did_not_check(run,
                                                                                    test_path):
    onnx_dir, summary, tmp_path = run
    record = decide(str(onnx_dir), summary, str(tmp_path / "chosen"), test_path=str(test_path),
                    target_concurrency=4, progress=lambda _: None)
    assert record["passed"] and record["variant"] == "int8"
    statuses = {c["name"]: c["status"] for c in record["checks"]}
    assert statuses == {"accuracy": "passed", "parity": "passed", "errors": "passed",
                        "p99 latency": "not checked", "p99 regression": "not checked"}
    assert all(c["passed"] is None for c in record["checks"] if c["status"] == "not checked")
    # The first run's accuracy bar is the majority-class rate of the test split's labels (the
    # floor is 0), and the record says which applied.
    guess, rate = majority_class(load_split(str(test_path)))
    [accuracy] = [c for c in record["checks"] if c["name"] == "accuracy"]
    assert accuracy["bar"]["applied"] == "majority-class rate"
    assert accuracy["threshold"] == pytest.approx(rate) and accuracy["bar"]["majority_class"] \
        == guess
    assert record["reason"] == ("3 checks passed for int8, 2 not checked (p99 latency: no p99 "
                                "budget given; p99 regression: no previous run)")
    # The measured p99 stays on the unchecked latency check (the retraining reference reads it).
    [latency] = [c for c in record["checks"] if c["name"] == "p99 latency"]
    assert latency["value"] == pytest.approx(1.2) and latency["threshold"] is None

    page = render_html_report(summary, gate=record)
    assert ("gate: PASSED: 3 checks passed for int8, 2 not checked (p99 latency: no p99 budget "
            "given; p99 regression: no previous run)") in page
    rows = re.findall(r"<tr><td>int8</td><td>(p99 latency|p99 regression)</td>"
                      r"<td class=\"(\w+)\">([^<]+)</td>", page)
    assert sorted(rows) == [("p99 latency", "skip", "not checked"),
                            ("p99 regression", "skip", "not checked")]
    assert ">yes<" not in page.split("<h2>Gate checks</h2>")[1].split("<h2>")[0]
    markdown = format_markdown({**summary, "gate": record})
    assert "| p99 latency | not checked | 1.2 | - | int8: no p99 budget given" in markdown


def test_the_first_screen_explains_the_choice(run, test_path):
    onnx_dir, summary, tmp_path = run
    summary["benchmark"]["results"][1]["stable"] = False  # fp32 at concurrency 4
    record = decide(str(onnx_dir), summary, str(tmp_path / "chosen"), test_path=str(test_path),
                    target_concurrency=4, latency_budget_p99_ms=5.0, progress=lambda _: None)
    page = render_html_report(summary, gate=record)
    first = page.split("<h2>Gate checks</h2>")[0]  # what shows before the details
    assert "Objective: the lowest latency_b1_ms: ONNX Runtime latency at batch 1" in first
    assert "<li>accuracy drop from fp32 &lt;= 1 pt</li>" in first
    assert "<li>p99 &lt;= 5 ms at concurrency 4</li>" in first
    assert ("Chosen: int8, served with 1 instance, max batch size 64, dynamic batching, max "
            "queue delay 0.1 ms") in first
    # The chosen row highlighted; the others say the constraint they failed or what they lost by.
    assert re.search(r'<tr class="chosen"><td>int8</td>', first)
    assert "<td>fails accuracy drop 3.00 pt &gt; 1.00 pt</td>" in first
    assert "<td>lost by 0.030 ms, 60.0 % on latency_b1_ms (0.080 ms vs 0.050 ms)</td>" in first
    assert "<td>1024.0</td>" in first and "<td>1.20</td>" in first  # KiB, p99 ms at c4
    assert "<td>fp32</td><td>0.9700</td><td>4096.0</td><td>0.080</td><td>2.00*</td>" in first
    # The environment: what the benchmark recorded, what the gate knows, nothing made up.
    for text in ("Example CPU @ 2.0GHz, 2 cores", "perf_analyzer 2.51.0 (6 of 6 levels)",
                 "0.120 ms CPU per request, 0.35 cores busy",
                 "client shares the host with the server</td><td>yes",
                 "Vertex AI and KServe serve with the onnxruntime backend",
                 "Triton server</td><td>version not recorded by the benchmark"):
        assert text in first, text
    markdown = format_markdown({**summary, "gate": record})
    assert "| **int8** | **0.9650** | **1024.0** |" in markdown
    assert "| pruned | 0.9400 | 4096.0 | 0.040 | 1.00 | 1600 | fails accuracy drop" in markdown
    assert "(max \\|diff\\| 0.03)" in markdown  # a | in a cell does not split the table
    assert "| server request ms | server queue ms |" in markdown and "| 1.500 | 0.250 |" in markdown


def test_unrecorded_environment_reads_not_recorded():
    rows = dict(environment_rows({"benchmark": {"results": []}}))
    assert rows["CPU"] == "model not recorded, cores not recorded"
    assert rows["backend"] == rows["load client"] == "not recorded"
    assert rows["client shares the host with the server"] == "not recorded"
    assert rows["Triton server"] == "version not recorded by the benchmark"
    assert rows["serving settings"] == "not recorded"


def served(count: int, delay_us: int | None, backend: str = "python") -> dict:
    """One model's config as the benchmark's ``server`` block records it."""
    return {"backend": backend, "platform": None, "max_batch_size": 64,
            "instance_group": [{"count": count, "kind": "KIND_CPU"}],
            "dynamic_batching": None if delay_us is None else {
                "max_queue_delay_microseconds": delay_us, "preferred_batch_size": [64]}}


def test_the_environment_shows_what_the_server_reported():
    gate = {"variant": "int8", "environment": known_environment()}
    server = {"name": "triton", "version": "2.51.0", "binary": "/opt/tritonserver/bin/tritonserver",
              "kind": "native", "models": {"fp32": served(1, 100), "int8": served(2, None)},
              "errors": []}
    bench = {"protocol": "grpc", "mode": "local", "results": [], "server": server}
    rows = dict(environment_rows({"benchmark": bench, "gate": gate}))
    recorded = "(recorded by the benchmark from the running server)"
    assert rows["Triton server"] == f"2.51.0, /opt/tritonserver/bin/tritonserver, native {recorded}"
    assert rows["backend"].startswith("python for fp32, int8 (ONNX Runtime")
    assert "not recorded" not in rows["backend"]
    assert rows["serving settings"] == (
        "fp32: 1 instance (KIND_CPU), max batch size 64, dynamic batching, max queue delay 0.1 ms, "
        "preferred batch size 64; int8: 2 instances (KIND_CPU), max batch size 64, no dynamic "
        f"batching {recorded}")
    # The chosen variant is served as the server said, not as the gate's defaults would have it.
    assert chosen_line(gate, bench).startswith(
        "Chosen: int8, served with 2 instances (KIND_CPU), max batch size 64, no dynamic "
        f"batching {recorded[:-1]};")
    # Models that agree read once; models on different backends each say theirs.
    server["models"] = {"fp32": served(1, 100), "int8": served(1, 100, "onnxruntime")}
    rows = dict(environment_rows({"benchmark": bench, "gate": gate}))
    assert rows["backend"] == "python for fp32; onnxruntime for int8"
    assert rows["serving settings"].endswith(
        "preferred batch size 64 (every model: fp32, int8; recorded by the benchmark from the "
        "running server)")
    # An endpoint that cannot be asked (Vertex AI rawPredict) says why, and what the gate knows.
    bench["server"] = {"version": None, "models": {}, "errors": ["rawPredict: no metadata API"]}
    rows = dict(environment_rows({"benchmark": bench, "gate": gate}))
    assert rows["Triton server"].startswith(
        "version not recorded by the benchmark (rawPredict: no metadata API) (tritonserver "
        "bundled in nvidia-pytriton")
    assert rows["serving settings"].endswith("(torchship's defaults, which the benchmark builds "
                                             "with)")


def test_a_first_run_without_a_bar_and_checks_not_asked_for_are_not_checked():
    parts = {"variants": [{"name": "fp32", "test_accuracy": 0.5, "parity": {"passed": True}}],
             "benchmark": {"batch_size": 1, "results": []}}
    record = evaluate_gate(parts, require_parity=False, target_concurrency=4,
                           regression=compare_with_previous({"results": []}, None))
    assert [(c["name"], c["status"]) for c in record["checks"]] == [
        ("accuracy", "not checked"), ("parity", "not checked"), ("p99 latency", "not checked"),
        ("errors", "not checked"), ("p99 regression", "not checked")]
    assert record["reason"].startswith("no check could be evaluated for fp32: 5 not checked "
                                       "(accuracy: no serving baseline, no accuracy_floor set")
    assert record["counts"] == {"passed": 0, "failed": 0, "not_checked": 5}
    metrics = gate_metrics(record)
    assert metrics["gate_checks_not_checked"] == 5.0 and metrics["gate_checks_passed"] == 0.0


def test_when_no_variant_meets_the_constraints_each_says_what_it_failed(run, test_path):
    onnx_dir, summary, tmp_path = run
    record = decide(str(onnx_dir), summary, str(tmp_path / "chosen"), test_path=str(test_path),
                    max_size_bytes=512 * 1024, target_concurrency=4, progress=lambda _: None)
    assert record["passed"] is False and record["variant"] is None
    page = render_html_report(summary, gate=record)
    first = page.split("<h2>Environment</h2>")[0]
    assert "Chosen: none; no variant meets every constraint" in first
    assert "<li>onnx_size_bytes &lt;= 512.0 KiB</li>" in first
    assert "<td>fails onnx_size_bytes 1024.0 KiB &gt; 512.0 KiB</td>" in first
    assert 'class="chosen"' not in first


def test_each_variant_that_lost_says_why():
    choice = choose_variant(VARIANTS, max_acc_drop_pt=1.0, optimise="size")
    outcome = {row["name"]: row["outcome"] for row in choice["table"]}
    assert outcome["int8"].startswith("chosen: the lowest onnx_size_bytes")
    assert outcome["fp32"] == ("lost by 3072.0 KiB, 300.0 % on onnx_size_bytes (4096.0 KiB vs "
                               "1024.0 KiB)")
    assert outcome["pruned"] == "fails accuracy drop 3.00 pt > 1.00 pt"
    fp32 = next(row for row in choice["table"] if row["name"] == "fp32")
    assert fp32["margin"]["behind_pct"] == pytest.approx(300.0)
