"""Deploy and benchmark against the real ``tritonserver`` shipped in the nvidia-pytriton wheel."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http
from artifacts import N_CLASSES, N_FEATURES, VARIANT_RECORDS
from google.protobuf import text_format
from processes import process_table, triton_processes, wait_gone
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from torchship.components.benchmark.stage import benchmark_repository
from torchship.components.contracts import ServingSettings
from torchship.components.deploy.targets.local import deploy_local
from torchship.components.errors import ServingError, UserInputError
from torchship.components.files import write_json
from torchship.components.triton.binary import find_tritonserver
from torchship.components.triton.repository import build_model_repository
from torchship.components.triton.server import TritonServer

VARIANTS = tuple(record["name"] for record in VARIANT_RECORDS)


# -- helpers ------------------------------------------------------------------------------------


def _ort(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


# -- tests --------------------------------------------------------------------------------------
# workdir, onnx_dir (fp32 and pruned), test_path and local_repo come from conftest.py.


def test_find_tritonserver():
    paths = find_tritonserver()
    assert paths.binary.is_file() and os.access(paths.binary, os.X_OK)
    assert paths.libs.is_dir()


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_config_pbtxt_is_a_model_config(workdir, onnx_dir, backend):
    repo = workdir / f"cfg_{backend}"
    repo.mkdir()
    (repo / "stale").mkdir()  # an existing repository is replaced as a whole
    models = build_model_repository(onnx_dir, repo, backend, ServingSettings(max_batch_size=16))

    assert sorted(m["name"] for m in models) == sorted(VARIANTS)
    assert sorted(p.name for p in repo.iterdir()) == sorted(VARIANTS)
    assert not [p for p in repo.parent.iterdir() if p.name.startswith(f".{repo.name}")]
    for model in models:
        assert model["inputs"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [8]}]
        assert model["outputs"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [3]}]
        assert model["max_batch_size"] == 16
        model_dir = repo / model["name"]
        config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.name == model["name"]
        assert config.max_batch_size == 16
        assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
            ("input", mc.TYPE_FP32, [N_FEATURES])
        ]
        assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
            ("logits", mc.TYPE_FP32, [N_CLASSES])
        ]
        assert config.HasField("dynamic_batching")
        assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 1000
        assert [(g.count, g.kind) for g in config.instance_group] == [
            (1, mc.ModelInstanceGroup.KIND_CPU)
        ]
        assert (model_dir / "1" / "model.onnx").read_bytes() == (
            onnx_dir / model["name"] / "model.onnx"
        ).read_bytes()
        if backend == "onnxruntime":
            assert (config.platform, config.backend) == ("onnxruntime_onnx", "")
            assert not (model_dir / "1" / "model.py").exists()
            # One ONNX Runtime thread per instance, as the python backend's model.py has it.
            assert {name: value.string_value for name, value in config.parameters.items()} == {
                "intra_op_thread_count": "1", "inter_op_thread_count": "1"}
        else:
            assert (config.platform, config.backend) == ("", "python")
            source = (model_dir / "1" / "model.py").read_text()
            assert "class TritonPythonModel" in source and "onnxruntime" in source


def test_build_rejects_bad_input(workdir, onnx_dir):
    with pytest.raises(UserInputError, match="backend"):
        build_model_repository(onnx_dir, workdir / "x", backend="tensorrt")
    empty = workdir / "empty_onnx"
    empty.mkdir()
    with pytest.raises(UserInputError, match="onnx_dir"):
        build_model_repository(empty, workdir / "x")


def test_deploy_local_matches_onnxruntime(workdir, onnx_dir, test_path):
    repo = workdir / "repo_deploy"
    result = deploy_local(onnx_dir, repo, test_path, n_samples=32, atol=1e-4)

    assert sorted(result["models"]) == sorted(VARIANTS)
    for stats in result["models"].values():
        assert stats["ready"] is True
        assert stats["max_abs_diff_grpc"] <= 1e-4
        assert stats["max_abs_diff_http"] <= 1e-4
        assert stats["n_samples"] == 32
    assert result["server_startup_s"] > 0
    assert wait_gone(str(repo), 5) == []


def test_dynamic_batches_are_split_back(workdir, onnx_dir, test_path):
    """Simultaneous requests of different sizes, merged by the batcher, each get their own rows."""
    import tritonclient.http as httpclient

    repo = workdir / "repo_batching"
    build_model_repository(onnx_dir, repo, "python", ServingSettings(max_queue_delay_us=50_000))
    x = np.load(test_path)["x"]
    sizes = [1, 2, 3, 4, 5, 6, 7, 8]
    with TritonServer(repo) as server:
        pids = [pid for pid, pgid, state, _ in process_table()
                if pgid == server.pid and state != "Z"]
        assert len(pids) >= 1 + len(VARIANTS)  # the server and one stub per model
        assert server.log_path is not None and server.log_path.is_file()

        client = httpclient.InferenceServerClient(server.http_url, concurrency=len(sizes))
        try:
            # The model was warmed up with one sample when it loaded; count from here.
            before = client.get_inference_statistics("fp32")["model_stats"][0]
            pending = []
            for k, size in enumerate(sizes):
                rows = x[10 * k : 10 * k + size]
                infer_input = httpclient.InferInput("input", list(rows.shape), "FP32")
                infer_input.set_data_from_numpy(rows)
                pending.append((rows, client.async_infer("fp32", [infer_input])))
            for rows, request in pending:
                got = request.get_result(timeout=30).as_numpy("logits")
                np.testing.assert_allclose(
                    got, _ort(repo / "fp32" / "1" / "model.onnx", rows), atol=1e-5
                )
            stats = client.get_inference_statistics("fp32")["model_stats"][0]
            assert stats["inference_count"] - before["inference_count"] == sum(sizes)
            # Some requests were batched together.
            assert stats["execution_count"] - before["execution_count"] < len(sizes)
        finally:
            client.close()
    assert wait_gone(str(repo), 5) == []
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    assert alive == []


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rindex(")") + 2 :].split()[0]


def test_benchmark_grpc(workdir, local_repo, test_path):
    lines = []
    duration = 1.0
    result = benchmark_repository(
        local_repo,
        test_path,
        concurrency=(1, 2),
        batch_size=1,
        warmup_s=0.3,
        duration_s=duration,
        protocol="grpc",
        progress=lines.append,
    )
    assert result["protocol"] == "grpc" and result["batch_size"] == 1
    rows = result["results"]
    assert [(r["model"], r["concurrency"]) for r in rows] == [
        (m, c) for m in sorted(VARIANTS) for c in (1, 2)
    ]
    assert len(lines) >= len(rows)
    for row in rows:
        assert row["errors"] == 0
        assert row["requests"] > 10
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["mean_ms"] > 0
        expected = row["requests"] / duration
        assert expected / 2 <= row["throughput_rps"] <= expected * 1.5
    out = write_json(result, workdir / "bench" / "bench.json")
    assert json.loads(out.read_text())["results"][0]["model"] == rows[0]["model"]
    assert wait_gone(str(local_repo), 5) == []


def test_benchmark_http_batched(local_repo, test_path):
    result = benchmark_repository(
        local_repo,
        test_path,
        concurrency=1,
        batch_size=4,
        warmup_s=0.2,
        duration_s=0.5,
        protocol="http",
        models=["pruned"],
        progress=None,
    )
    (row,) = result["results"]
    assert row["model"] == "pruned" and row["errors"] == 0 and row["requests"] > 0
    assert row["throughput_sps"] == pytest.approx(4 * row["throughput_rps"])


def test_benchmark_rejects_unknown_model(local_repo, test_path):
    with pytest.raises(UserInputError, match="models"):
        benchmark_repository(local_repo, test_path, models=["nope"], progress=None)


def test_corrupt_model_raises_serving_error_promptly(workdir, local_repo):
    repo = workdir / "repo_corrupt"
    shutil.copytree(local_repo, repo)
    (repo / "pruned" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    started = time.monotonic()
    with (
        pytest.raises(ServingError) as excinfo,
        TritonServer(repo, startup_timeout_s=60, log_path=workdir / "corrupt.log"),
    ):
        pytest.fail("server with a corrupt model became ready")
    assert time.monotonic() - started < 30
    message = str(excinfo.value)
    assert "pruned" in message
    assert wait_gone(str(repo), 5) == []


def test_not_ready_in_time_raises_serving_error(workdir, local_repo):
    started = time.monotonic()
    with (
        pytest.raises(ServingError, match="not ready after"),
        TritonServer(local_repo, startup_timeout_s=0.3, log_path=workdir / "slow.log"),
    ):
        pytest.fail("server should not be ready this fast")
    assert time.monotonic() - started < 20
    assert wait_gone(str(local_repo), 5) == []


SLOW_MODEL = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(3)
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("logits", np.zeros((1, 3), dtype=np.float32))]
            )
            for _ in requests
        ]
"""


def test_benchmark_request_timeout_is_an_error_not_a_hang(workdir, onnx_dir, test_path):
    repo = workdir / "repo_slow"
    build_model_repository(onnx_dir, repo, backend="python")
    shutil.rmtree(repo / "pruned")
    (repo / "fp32" / "1" / "model.py").write_text(SLOW_MODEL)
    started = time.monotonic()
    with pytest.raises(ServingError, match="timed out"):
        benchmark_repository(
            repo,
            test_path,
            concurrency=1,
            warmup_s=0.0,
            duration_s=0.5,
            request_timeout_s=0.5,
            progress=None,
        )
    assert time.monotonic() - started < 30
    assert wait_gone(str(repo), 5) == []


# -- torchship serve -------------------------------------------------------------------------------

SERVE_SCRIPT = """
import sys
from torchship.components.triton.serve import serve

def ready(server):
    print("READY", server.pid, server.http_url, flush=True)

print("STOPPED", serve(sys.argv[1], on_ready=ready, progress=None), flush=True)
"""


def _lines(proc: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local.rsplit(":", 1)[0])
    return found


@pytest.mark.parametrize(
    ("sig", "when"),
    [(signal.SIGTERM, "serving"), (signal.SIGINT, "serving"), (signal.SIGTERM, "starting")],
)
def test_serve_stops_cleanly_on_a_signal(local_repo, sig, when):
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(local_repo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = _lines(proc)
        if when == "starting":
            deadline = time.monotonic() + 60
            while not triton_processes(str(local_repo)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert triton_processes(str(local_repo)), "tritonserver never started"
        else:
            line = lines.get(timeout=180)
            assert line and line.startswith("READY"), (line, proc.stderr.read())
            _, pid, url = line.split()
            client = tritonclient.http.InferenceServerClient(url)
            try:
                assert client.is_server_ready() and client.is_model_ready("fp32")
                # Model control is closed: the repository API needs a key only serve() knows.
                with pytest.raises(InferenceServerException, match="restricted"):
                    client.unload_model("fp32")
            finally:
                client.close()
            port = int(url.rsplit(":", 1)[1])
            assert _listening(port) == ["0100007F"]  # 127.0.0.1 only
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        rest = []
        while (line := lines.get(timeout=10)) is not None:
            rest.append(line)
        assert f"STOPPED {int(sig)}" in rest
        if when == "serving":  # the server's process group (server and stubs) is gone too
            assert [p for p, pgid, state, _ in process_table() if pgid == int(pid) and state != "Z"
                    ] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_gone(str(local_repo), 5) == []


def test_serve_port_in_use_is_one_clear_line(local_repo):
    from torchship.components.triton.serve import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(UserInputError) as excinfo:
            serve(local_repo, http_port=port, progress=None)
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"port {port} on 127.0.0.1 is already in use" in message and "--http-port" in message
    assert time.monotonic() - started < 10
    assert wait_gone(str(local_repo), 5) == []


def test_invalid_config_values_are_one_clear_line(workdir, local_repo):
    repo = workdir / "repo_bad_config"
    shutil.copytree(local_repo, repo)
    shutil.rmtree(repo / "pruned")
    config_path = repo / "fp32" / "config.pbtxt"
    text = config_path.read_text()

    config_path.write_text(text.replace("max_batch_size: 64", "max_batch_size: 64x"))
    with pytest.raises(UserInputError) as malformed, TritonServer(repo):
        pytest.fail("a malformed config.pbtxt was served")
    assert "\n" not in str(malformed.value)
    assert "fp32/config.pbtxt is not a valid Triton ModelConfig" in str(malformed.value)

    config_path.write_text(text.replace("max_batch_size: 64", "max_batch_size: -3"))
    with pytest.raises(ServingError) as rejected, TritonServer(repo, startup_timeout_s=60):
        pytest.fail("a negative max_batch_size was served")
    assert "\n" not in str(rejected.value)
    assert "'max_batch_size' must be non-negative" in str(rejected.value)
    assert wait_gone(str(repo), 5) == []
