"""The benchmark against the real ``tritonserver`` bundled in nvidia-pytriton: local and remote mode,
windows and stability, Triton's own statistics, reports, and failures that end in bounded time."""

from __future__ import annotations

import csv
import http.server
import json
import re
import threading
import time
from pathlib import Path

import pytest
from artifacts import N_CLASSES, N_FEATURES
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from torchship.components.benchmark.display import ProgressBar
from torchship.components.benchmark.perf_analyzer import find_perf_analyzer
from torchship.components.benchmark.results import SCHEMA, find_level, metrics_for_kfp, write_csv
from torchship.components.benchmark.stage import benchmark_endpoint, benchmark_repository
from torchship.components.errors import ServingError, UserInputError
from torchship.components.files import read_json, write_json
from torchship.components.gate.checks import evaluate_gate
from torchship.components.report.html_report import write_html_report
from torchship.components.report.summary import build_summary, format_markdown, format_table
from torchship.components.triton.binary import free_port
from torchship.components.triton.config import read_model_config
from torchship.components.triton.server import TritonServer

SHORT = {"warmup_s": 0.2, "window_s": 0.25, "min_windows": 3, "max_windows": 5}


# -- fixtures -----------------------------------------------------------------------------------
# workdir, onnx_dir (fp32 and pruned), test_path and local_repo come from conftest.py.


@pytest.fixture(scope="module")
def local_result(local_repo, test_path):
    """One local-mode sweep shared by the checks on its numbers and its reports."""
    lines, events = [], []
    started = time.monotonic()
    result = benchmark_repository(
        local_repo, test_path, concurrency=(1, 4), batch_sizes=(1, 4), protocol="grpc",
        models=["fp32"], progress=lines.append, on_window=events.append, **SHORT,
    )
    return result, lines, events, time.monotonic() - started


@pytest.fixture(scope="module")
def server(local_repo):
    with TritonServer(local_repo) as running:
        yield running


# Python-backend models that misbehave on purpose (after the preflight and the load warm-up).
MISBEHAVING = {
    "failing": "if self.count > 40:\n            return self.error('injected failure')",
    "flaky": "if self.count % 5 == 0:\n            return self.error('injected flaky failure')",
    # Stuck from the 41st request on: perf_analyzer sees a window without an answer and hands
    # the level to the Python client, whose request timeout ends the run.
    "stalling": "if self.count >= 41:\n            time.sleep(3)",
}
MODEL_TEMPLATE = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.count = 0

    def error(self, text):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(text))

    def answer(self, request):
        self.count += 1
        {rule}
        x = pb_utils.get_input_tensor_by_name(request, "input").as_numpy()
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor("logits", np.zeros((x.shape[0], 3), dtype=np.float32))]
        )

    def execute(self, requests):
        return [self.answer(request) for request in requests]
"""


@pytest.fixture(scope="module")
def bad_server(workdir, local_repo):
    path = workdir / "repo_bad"
    for name, rule in MISBEHAVING.items():
        (path / name / "1").mkdir(parents=True)
        config = text_format.Parse((local_repo / "fp32" / "config.pbtxt").read_text(),
                                   mc.ModelConfig())
        config.name = name
        config.ClearField("model_warmup")
        (path / name / "config.pbtxt").write_text(text_format.MessageToString(config))
        (path / name / "1" / "model.py").write_text(MODEL_TEMPLATE.replace("{rule}", rule))
    with TritonServer(path) as running:
        yield running


# -- local mode ---------------------------------------------------------------------------------


def test_local_sweep_numbers_are_consistent(local_result):
    result, lines, events, _ = local_result
    assert result["schema"] == SCHEMA and result["mode"] == "local"
    assert result["protocol"] == "grpc" and result["batch_sizes"] == [1, 4]
    assert [(r["batch_size"], r["concurrency"]) for r in result["results"]] == [
        (1, 1), (1, 4), (4, 1), (4, 4)
    ]
    for row in result["results"]:
        where = f"b{row['batch_size']} c{row['concurrency']}"
        assert row["errors"] == 0 and row["first_error"] is None, where
        assert row["requests"] > 20, where
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] \
            <= row["p99_ms"] <= row["max_ms"], where
        assert row["min_ms"] <= row["mean_ms"] <= row["max_ms"], where
        # Throughput is requests over the judged windows' time, exactly: the Python client's
        # windows are window_s long; perf_analyzer's a little longer, as it measured them.
        client = row["client"]
        assert client["name"] == ("perf_analyzer" if find_perf_analyzer() else "python"), where
        if client["name"] == "python":
            assert row["duration_s"] == pytest.approx(SHORT["min_windows"] * SHORT["window_s"])
        else:
            assert client["version"] == "2.51.0" and client["fallback"] is None, where
            assert 1 <= row["duration_s"] / (SHORT["min_windows"] * SHORT["window_s"]) < 2
            breakdown = row["perf_analyzer"]
            assert breakdown["server_compute_infer_us"] > 0 and breakdown["p99_us"] > 0, where
            # perf_analyzer has no warm-up of its own: a run of its own before the model's
            # first level; its next level finds the server warm (each run opens its own
            # connections, so another warm-up run would warm only the server).
            warmup = breakdown["warmup"]
            if row["concurrency"] == 1:
                assert warmup["by"] == "perf_analyzer" and warmup["requests"] > 0, where
                assert warmup["warmup_s"] >= SHORT["warmup_s"] and "--concurrency-range" \
                    f" {row['concurrency']}" in warmup["command"], where
            else:
                assert warmup == {"skipped": "measured at concurrency 1 just before"}, where
        assert client["shares_host"] is True and client["cpu_s_per_request"] > 0, where
        assert row["throughput_rps"] == pytest.approx(row["requests"] / row["duration_s"])
        assert row["throughput_sps"] == pytest.approx(row["batch_size"] * row["throughput_rps"])
        judged = [w for w in row["windows"] if w["index"] in row["stability"]["judged_windows"]]
        assert sum(w["requests"] for w in judged) == row["requests"], where
        assert SHORT["min_windows"] <= len(row["windows"]) <= SHORT["max_windows"], where
        # Stability is stated, never implied.
        assert isinstance(row["stable"], bool), where
        assert row["stability"]["band_pct"] == 15.0
        assert len(row["stability"]["judged_windows"]) == SHORT["min_windows"]
        if not row["stable"] and client["name"] == "python":
            assert len(row["windows"]) == SHORT["max_windows"], where
        assert sum(row["histogram"]["counts"]) == row["requests"], where
        assert len(row["histogram"]["edges_ms"]) == len(row["histogram"]["counts"]) + 1
        low, high = row["p99_ci95_ms"]
        assert 0 <= low <= high, where
        # Triton's own view beside the client's.
        server = row["server"]
        assert server is not None, row["server_error"]
        assert server["requests"] >= row["requests"] * 0.8, where
        assert server["failures"] == 0
        # Snapshots are taken while requests are in flight: off by at most a few of them.
        slack = 2 * row["concurrency"] * row["batch_size"]
        assert abs(server["inferences"] - server["requests"] * row["batch_size"]) <= slack, where
        assert server["avg_batch_size"] >= row["batch_size"]
        for key in ("queue_us", "compute_input_us", "compute_infer_us", "compute_output_us"):
            assert server[key] >= 0, (where, key)
        assert 0 < server["request_us"] <= row["max_ms"] * 1e3
        assert row["client"]["cpu_s"] > 0 and row["client"]["threads"] == row["concurrency"]
        assert isinstance(row["client"]["saturated"], bool)
    # Progress: a line per level, an event per window, the last of each level with its verdict.
    assert len(lines) >= 1 + len(result["results"])
    assert all(("stable" in line or "UNSTABLE" in line) for line in lines[1:])
    finals = [e for e in events if e["stable"] is not None]
    assert len(finals) == len(result["results"]) and finals[-1]["level"] == finals[-1]["levels"]


def test_the_result_records_what_served(local_result, local_repo):
    # As the running server answered: its version, the binary that ran, each model's config.
    served = local_result[0]["server"]
    assert served["name"] == "triton" and re.fullmatch(r"\d+\.\d+\.\d+", served["version"])
    assert Path(served["binary"]).name == "tritonserver" and Path(served["binary"]).is_file()
    assert served["errors"] == [] and list(served["models"]) == ["fp32"]
    config = read_model_config(local_repo / "fp32" / "config.pbtxt")
    model = json.loads(json.dumps(served["models"]["fp32"]))  # a copy: the fixture is shared
    # Triton completes the file: a preferred batch size the file does not set, say.
    preferred = model["dynamic_batching"].pop("preferred_batch_size")
    assert all(1 <= size <= config.max_batch_size for size in preferred)
    assert model == {
        "backend": "python", "platform": None, "max_batch_size": config.max_batch_size,
        "instance_group": [{"count": sum(g.count for g in config.instance_group),
                            "kind": "KIND_CPU"}],
        "dynamic_batching": {
            "max_queue_delay_microseconds": config.dynamic_batching.max_queue_delay_microseconds}}


def test_local_sweep_writes_json_csv_and_kfp_metrics(local_result, workdir):
    result, *_ = local_result
    path = write_json(result, workdir / "out" / "bench.json")
    assert read_json(path)["results"][0]["p99_ms"] == result["results"][0]["p99_ms"]
    assert read_json(workdir / "out" / "absent.json") is None
    with open(write_csv(result, workdir / "out" / "bench.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result["results"])
    assert float(rows[0]["p99_ms"]) == pytest.approx(result["results"][0]["p99_ms"])
    assert rows[0]["server_queue_us"] != ""
    assert rows[0]["client_name"] in ("perf_analyzer", "python")
    assert float(rows[0]["client_cpu_s_per_request"]) > 0
    metrics = metrics_for_kfp(result)
    assert metrics["fp32_c4_b4_p99_ms"] == pytest.approx(find_level(result, "fp32", 4, 4)["p99_ms"])
    assert metrics["fp32_c1_b1_errors"] == 0.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_html_report_embeds_plots_and_links_nowhere(local_result, onnx_dir, workdir):
    result, *_ = local_result
    summary = build_summary(str(onnx_dir), result)
    summary["gate"] = evaluate_gate(summary, accuracy_floor=0.9, latency_budget_p99_ms=1000,
                                    target_concurrency=4, variant="fp32")
    page = write_html_report(summary, workdir / "out" / "report.html").read_text()
    assert page.count('<img alt="') >= 2
    assert page.count('src="data:image/png;base64,') >= 2
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert "gate: PASSED" in page and "fp32" in page
    # The table and Markdown carry the compress stage's extra columns when present.
    assert "acc drop pt" in format_table(summary) and "ORT b1 ms" in format_markdown(summary)


def test_progress_bar_renders_events(local_result):
    import io

    _, _, events, _ = local_result
    stream = io.StringIO()
    bar = ProgressBar(stream)
    for event in events:
        bar(event)
    text = stream.getvalue()
    assert text.count("\r") == len(events) and text.endswith("\n") and "fp32" in text


def test_local_http_and_bad_arguments(local_repo, test_path):
    # The Python client, asked for by name, whether perf_analyzer is present or not.
    result = benchmark_repository(local_repo, test_path, concurrency=2, batch_size=3, protocol="http",
                                  models=["pruned"], progress=None, engine="python", **SHORT)
    (row,) = result["results"]
    assert row["model"] == "pruned" and row["errors"] == 0 and row["server"]["failures"] == 0
    assert row["client"]["name"] == "python" and result["clients"][0][0] == "python"
    assert row["duration_s"] == pytest.approx(SHORT["min_windows"] * SHORT["window_s"])
    assert result["host"]["cpu_count"] >= 1 and "cpu_model" in result["host"]
    with pytest.raises(UserInputError, match="engine: 'ab' is not one of"):
        benchmark_repository(local_repo, test_path, engine="ab", progress=None)
    assert result["endpoint"].startswith("http://127.0.0.1:")
    with pytest.raises(UserInputError, match="batch_size"):
        benchmark_repository(local_repo, test_path, batch_size=1000, progress=None)
    with pytest.raises(UserInputError, match="min_windows"):
        benchmark_repository(local_repo, test_path, min_windows=4, max_windows=2, progress=None)


# -- remote mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_remote_triton(server, test_path, protocol):
    url = server.grpc_url if protocol == "grpc" else f"http://{server.http_url}"
    result = benchmark_endpoint(url, protocol, ["fp32", "pruned"], test_path, concurrency=(2,),
                                progress=None, **SHORT)
    assert result["mode"] == "remote" and result["repository"] is None
    assert [r["model"] for r in result["results"]] == ["fp32", "pruned"]
    served = result["server"]  # asked over the protocol measured; the binary is not known
    assert served["version"] and served["binary"] is None and served["errors"] == []
    assert {m["backend"] for m in served["models"].values()} == {"python"}
    for row in result["results"]:
        assert row["errors"] == 0 and row["requests"] > 20
        assert row["server"]["requests"] > 0 and row["server"]["compute_infer_us"] > 0


def test_remote_vertex_json_body(server, test_path):
    # Triton's own HTTP endpoint takes the same KServe v2 JSON that rawPredict forwards.
    url = f"http://{server.http_url}/v2/models/{{model}}/infer"
    result = benchmark_endpoint(url, "vertex", ["fp32"], test_path, concurrency=(2,),
                                batch_size=2, progress=None, **SHORT)
    (row,) = result["results"]
    assert row["errors"] == 0 and row["requests"] > 20 and row["batch_size"] == 2
    assert row["server"] is None and "statistics" in row["server_error"]
    assert result["endpoint"] == url  # http: no token was fetched or added
    assert result["server"]["version"] is None and "rawPredict" in result["server"]["errors"][0]


def test_remote_without_model_names_needs_them_where_unlisted(server, test_path):
    # The local server keeps its repository index private: the benchmark asks for names.
    with pytest.raises(UserInputError, match="pass the model names"):
        benchmark_endpoint(f"http://{server.http_url}", "http", None, test_path, progress=None)
    with pytest.raises(UserInputError, match="does not fit protocol"):
        benchmark_endpoint(f"http://{server.http_url}", "grpc", ["fp32"], test_path)


@pytest.mark.parametrize("protocol", ["grpc", "http", "vertex"])
def test_nothing_listening_fails_fast(test_path, protocol):
    port = free_port()
    url = {"grpc": f"127.0.0.1:{port}", "http": f"127.0.0.1:{port}",
           "vertex": f"http://127.0.0.1:{port}/predict"}[protocol]
    started = time.monotonic()
    with pytest.raises(ServingError, match="cannot reach"):
        benchmark_endpoint(url, protocol, ["fp32"], test_path, request_timeout_s=3,
                           progress=None)
    assert time.monotonic() - started < 10


class _Always500(http.server.BaseHTTPRequestHandler):
    """Live and describing a model, but every inference fails with HTTP 500."""

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.endswith("/health/live"):
            self._send(200, {})
        elif self.path.endswith("/config"):
            self._send(200, {"name": "fp32", "max_batch_size": 8})
        else:
            self._send(200, {"name": "fp32", "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [-1, N_FEATURES]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, N_CLASSES]}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(500, {"error": "model crashed"})

    def log_message(self, *args):
        pass


@pytest.fixture
def always_500():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always500)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("protocol", ["http", "vertex"])
def test_server_answering_500_fails_clearly(always_500, test_path, protocol):
    url = f"http://{always_500}" + ("/predict" if protocol == "vertex" else "")
    started = time.monotonic()
    with pytest.raises(ServingError, match="model crashed") as excinfo:
        benchmark_endpoint(url, protocol, ["fp32"], test_path, request_timeout_s=3,
                           progress=None)
    assert time.monotonic() - started < 10
    assert "fp32" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_all_errors_during_the_run_stop_it(bad_server, test_path):
    started = time.monotonic()
    with pytest.raises(ServingError, match="injected failure") as excinfo:
        benchmark_endpoint(bad_server.grpc_url, "grpc", ["failing"], test_path,
                           concurrency=(2,), progress=None, **SHORT)
    assert "requests of window" in str(excinfo.value)
    assert time.monotonic() - started < 15


def test_some_errors_are_counted_not_hidden(bad_server, test_path):
    result = benchmark_endpoint(f"http://{bad_server.http_url}", "http", ["flaky"], test_path,
                                concurrency=(2,), progress=None, **SHORT)
    (row,) = result["results"]
    assert row["errors"] > 0 and row["requests"] > 0
    assert 0.1 < row["error_rate"] < 0.35
    assert "injected flaky failure" in row["first_error"]


def test_a_server_that_stalls_mid_run_times_out(bad_server, test_path):
    started = time.monotonic()
    with pytest.raises(ServingError, match="timed out after 0.5 s"):
        benchmark_endpoint(bad_server.grpc_url, "grpc", ["stalling"], test_path,
                           concurrency=(2,), request_timeout_s=0.5, progress=None, **SHORT)
    assert time.monotonic() - started < 15


def test_bench_command_measures_a_repository_and_a_running_server(local_repo, server, test_path,
                                                                   tmp_path):
    import subprocess
    import sys

    def bench(target: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torchship.pipelines.cli", "bench", target, "--test-data",
             str(test_path), "--concurrency", "1,2", "--duration", "0.6", "--max-windows", "3",
             *args], capture_output=True, text=True, timeout=180, check=False)

    local = bench(str(local_repo), "--csv", str(tmp_path / "levels.csv"), "--html",
                  str(tmp_path / "report.html"), "-o", str(tmp_path / "result.json"))
    assert local.returncode == 0, local.stderr[-2000:]
    assert "level 4/4" in local.stdout + local.stderr  # the progress bar reached the end
    assert json.loads((tmp_path / "result.json").read_text())["mode"] == "local"
    assert len((tmp_path / "levels.csv").read_text().splitlines()) == 1 + 4
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") >= 2

    # Our server keeps its model index closed, so a remote run names the models.
    names = [arg for d in sorted(local_repo.iterdir()) if (d / "config.pbtxt").is_file()
             for arg in ("--model", d.name)]
    remote = bench(server.http_url, "--protocol", "http", *names)
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert remote.stdout.count(" errors") >= 4 and " 0 errors" in remote.stdout

    # Who measures, and the knee sweep, as the pipeline's benchmark_engine and benchmark_knee.
    kneed = bench(str(local_repo), "--model", "fp32", "--engine", "python", "--knee",
                  "--latency-budget-ms", "1000", "-o", str(tmp_path / "knee.json"))
    assert kneed.returncode == 0, kneed.stderr[-2000:]
    result = json.loads((tmp_path / "knee.json").read_text())
    assert {row["client"]["name"] for row in result["results"]} == {"python"}
    (knee,) = result["knee"]
    assert knee["model"] == "fp32" and knee["measured"][:2] == [1, 2]

    nowhere = bench("127.0.0.1:9", "--protocol", "http")
    assert nowhere.returncode == 2 and "error: cannot reach Triton" in nowhere.stderr


# -- the knee sweep -----------------------------------------------------------------------------


def test_the_knee_sweep_doubles_until_throughput_stops_rising(server, test_path):
    lines: list[str] = []
    result = benchmark_endpoint(server.grpc_url, "grpc", ["fp32"], test_path, knee=True,
                                knee_max_concurrency=16, progress=lines.append, **SHORT)
    (knee,) = result["knee"]
    measured = [row["concurrency"] for row in result["results"]]
    assert measured == knee["measured"] == [2 ** k for k in range(len(measured))]
    assert result["concurrency"] == measured and knee["model"] == "fp32"
    assert knee["concurrency"] in measured and knee["reason"]
    best = max(result["results"], key=lambda r: r["throughput_rps"])
    assert knee["throughput_rps"] == best["throughput_rps"]
    assert any(line.startswith("knee of 'fp32' at batch size 1: concurrency") for line in lines)
    # A budget no level meets stops the sweep at the first level, with no knee.
    result = benchmark_endpoint(server.grpc_url, "grpc", ["fp32"], test_path, knee=True,
                                latency_budget_p99_ms=0.001, progress=None, **SHORT)
    (knee,) = result["knee"]
    assert knee["concurrency"] is None and knee["measured"] == [1]
    assert "passes the budget 0.001 ms" in knee["reason"]


def test_knee_rules_on_given_levels():
    from torchship.components.benchmark.knee import sweep_to_knee

    curve = {1: (1000, 1.0), 2: (1900, 1.2), 4: (3000, 2.0), 8: (3050, 4.0), 16: (2000, 9.0)}

    def level(c):
        return {"concurrency": c, "throughput_rps": curve[c][0], "p99_ms": curve[c][1]}

    rows, knee = sweep_to_knee(level, 1, 64, 5.0, None)
    assert [r["concurrency"] for r in rows] == [1, 2, 4, 8] and knee["concurrency"] == 4
    assert knee["reason"].startswith("throughput stopped rising: 3050 req/s at concurrency 8")
    rows, knee = sweep_to_knee(level, 1, 64, 5.0, 1.5)
    assert knee["concurrency"] == 2 and "passes the budget 1.5 ms" in knee["reason"]
    rows, knee = sweep_to_knee(level, 1, 2, 5.0, None)
    assert knee["concurrency"] == 2 and "knee_max_concurrency 2" in knee["reason"]
    with pytest.raises(UserInputError, match="latency_budget_p99_ms"):
        benchmark_endpoint("127.0.0.1:1", "grpc", ["fp32"], "x.npz", latency_budget_p99_ms=-1)
