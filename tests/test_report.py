"""The run summary, its tables and the self-contained HTML report, from made-up results."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from artifacts import export_linear

from torchship.components.gate.checks import evaluate_gate
from torchship.components.gate.regression import compare_with_previous
from torchship.components.gate.stage import confusion_matrix, decide
from torchship.components.report.html_report import (
    histogram_concurrency,
    render_html_report,
    write_html_report,
)
from torchship.components.report.summary import (
    build_summary,
    format_markdown,
    format_table,
    write_summary,
)


def bench_row(model: str, concurrency: int, p99: float, batch_size: int = 1,
              stable: bool = True) -> dict:
    return {
        "model": model, "concurrency": concurrency, "batch_size": batch_size,
        "p50_ms": p99 / 3, "p95_ms": p99 / 1.5, "p99_ms": p99, "mean_ms": p99 / 2.5,
        "throughput_rps": 500.0 * concurrency / (1 + concurrency / 8), "errors": 0,
        "stable": stable, "requests": 900,
        "stability": {"judged_windows": [1, 2, 3]},
        "windows": [{"index": i, "p99_ms": p99} for i in (1, 2, 3)],
        "histogram": {"edges_ms": [0.1, 0.2, 0.4, 0.8], "counts": [100, 700, 100]},
        "server": {"request_us": 400.0, "queue_us": 100.0, "compute_input_us": 10.0,
                   "compute_infer_us": 200.0, "compute_output_us": 20.0,
                   "avg_batch_size": 2.0},
        "client": {"cpu_cores": 0.1},
    }


@pytest.fixture
def onnx_dir(tmp_path):
    rows = [
        {"name": "fp32", "test_accuracy": 0.97, "onnx_size_bytes": 4096,
         "parity": {"max_abs_diff": 1e-6, "passed": True, "top1_agreement": 1.0}},
        {"name": "int8", "test_accuracy": 0.965, "onnx_size_bytes": 1024,
         "parity": {"max_abs_diff": 0.03, "passed": True, "top1_agreement": 0.99},
         "acc_drop_pt": 0.5, "compressed_size_bytes": 900, "latency_b1_ms": 0.02,
         "latency_b64_ms": 0.3},
    ]
    (tmp_path / "variants.json").write_text(json.dumps(rows))
    return tmp_path


@pytest.fixture
def measured():
    rows = [bench_row(m, c, 1.0 + c / 4, stable=(m, c) != ("int8", 8))
            for m in ("fp32", "int8") for c in (1, 4, 8)]
    rows.append(bench_row("fp32", 8, 9.0, batch_size=8))
    return {"protocol": "grpc", "batch_size": 1, "batch_sizes": [1, 8],
            "concurrency": [1, 4, 8], "warmup_s": 0.5, "window_s": 1.0, "min_windows": 3,
            "max_windows": 10, "stability_pct": 15.0,
            "stability_metrics": ["throughput_rps", "p50_ms"],
            "endpoint": "http://127.0.0.1:8000", "mode": "local", "results": rows}


def test_summary_rows_join_variants_and_levels(onnx_dir, measured):
    summary = build_summary(str(onnx_dir), measured)
    fp32, int8 = summary["rows"]
    assert summary["concurrency"] == [1, 4, 8] and summary["batch_sizes"] == [1, 8]
    assert fp32["p99_ms_c8"] == pytest.approx(3.0) and fp32["p99_ms_c8_b8"] == 9.0
    assert fp32["parity_passed"] is True and int8["parity_top1_agreement"] == 0.99
    assert int8["acc_drop_pt"] == 0.5 and int8["latency_b64_ms"] == 0.3
    assert "acc_drop_pt" not in fp32 and int8["stable_c8"] is False


def test_tables_show_extras_and_mark_unstable_levels(onnx_dir, measured, tmp_path):
    summary = build_summary(str(onnx_dir), measured)
    summary["gate"] = evaluate_gate(summary, accuracy_floor=0.9, latency_budget_p99_ms=2.5,
                                    target_concurrency=8)
    table = format_table(summary)
    header = table.splitlines()[0]
    for column in ("acc drop pt", "gzip KiB", "ORT b1 ms", "ORT b64 ms", "p99 ms c8"):
        assert column in header
    int8_line = next(line for line in table.splitlines() if line.startswith("int8"))
    assert "3.00*" in int8_line  # unstable: marked, with a note below
    assert "* unstable (windows disagree beyond the band): int8 c8 b1" in table
    assert table.splitlines()[-1].startswith("gate: FAILED: fp32: p99 3.00 ms")

    markdown = format_markdown(summary)
    assert "**gate: FAILED" in markdown and "| p99 latency | FAILED |" in markdown
    assert "| p99 regression | not checked |" in markdown
    assert "## Client and server time" in markdown
    write_summary(summary, str(tmp_path / "s.json"), str(tmp_path / "s.md"))
    assert json.loads((tmp_path / "s.json").read_text())["gate"]["passed"] is False


def test_html_report_is_self_contained(onnx_dir, measured, tmp_path):
    summary = build_summary(str(onnx_dir), measured)
    gate = evaluate_gate(summary, accuracy_floor=0.9, latency_budget_p99_ms=5,
                         target_concurrency=4)
    previous = tmp_path / "previous.json"
    previous.write_text(json.dumps(measured))
    regression = compare_with_previous(measured, previous)
    page = write_html_report(summary, tmp_path / "report.html", gate=gate,
                             regression=regression).read_text()

    images = re.findall(r'<img alt="[^"]+" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3  # throughput vs p99, latency histogram, client/server time
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert "gate: PASSED" in page and "Against the previous run" in page
    assert "127.0.0.1:8000" in page  # the endpoint, without a scheme that would make a link
    assert histogram_concurrency({**summary, "gate": gate}) == 4
    assert histogram_concurrency(summary) == 8


def test_html_report_shows_the_chosen_variants_confusion_matrix(onnx_dir, measured, test_path,
                                                                 tmp_path):
    for name in ("fp32", "int8"):  # the records above, now with models behind them
        export_linear(onnx_dir / name / "model.onnx")
    summary = build_summary(str(onnx_dir), measured)
    record = decide(str(onnx_dir), summary, str(tmp_path / "chosen"), test_path=str(test_path),
                    progress=lambda _: None)
    matrix = record["confusion_matrix"]
    assert matrix == confusion_matrix(str(onnx_dir), record["variant"], str(test_path))
    assert sum(map(sum, matrix["matrix"])) == len(np.load(test_path)["y"])
    page = render_html_report(summary, gate=record)
    assert f"'{record['variant']}' on the test split" in page
    # One row per true class: its name, then a count per predicted class.
    for name, counts in zip(matrix["categories"], matrix["matrix"], strict=True):
        assert "<tr><td>" + "</td><td>".join([name, *map(str, counts)]) + "</td></tr>" in page
