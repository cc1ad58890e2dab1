"""Faults: the server killed mid-benchmark, the whole run killed mid-benchmark, an export killed
mid-write, two deploys at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import onnx
import pytest
from artifacts import N_CLASSES, N_FEATURES, digest, write_onnx_dir
from processes import (
    TORCHSHIP,
    private_tmp,
    scratch_left,
    triton_processes,
    wait_gone,
    watchdogs,
)

from torchship.components.benchmark.stage import benchmark_repository
from torchship.components.errors import ServingError
from torchship.components.export.stage import export_variants
from torchship.components.models import build_model, save_checkpoint
from torchship.components.scratch import PREFIX
from torchship.components.triton.config import read_model_config


def test_tritonserver_killed_during_benchmark_is_a_serving_error_and_leaves_nothing(
        workdir, local_repo, test_path):
    marker = str(local_repo.resolve())
    killed: dict[str, float] = {}
    messages: list[str] = []

    def kill_server(_window: dict) -> None:
        # Called by the benchmark after each measured window: the server dies mid-level.
        servers = [pid for pid, cmd in triton_processes(marker)
                   if cmd.split(" ", 1)[0].endswith("tritonserver")]
        if servers and "killed" not in killed:
            os.killpg(servers[0], signal.SIGKILL)  # the server leads its own process group
            killed["killed"] = time.monotonic()

    started = time.monotonic()
    with pytest.raises(ServingError) as excinfo:
        benchmark_repository(local_repo, test_path, concurrency=(1, 2), duration_s=2,
                             warmup_s=0.5, request_timeout_s=5, startup_timeout_s=60,
                             progress=messages.append, on_window=kill_server)
    assert "killed" in killed, messages
    elapsed = time.monotonic() - killed["killed"]
    message = str(excinfo.value)
    # One line naming the cause, the level and what to do; not Triton's option table.
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith("tritonserver exited during the benchmark (killed by SIGKILL"), \
        message
    assert "while measuring model 'fp32' at concurrency 1, batch size 1" in message, message
    assert "run the benchmark again" in message, message
    assert elapsed < 5 + 10, (elapsed, message)  # within the request timeout (and the stop grace)
    assert wait_gone(marker, 10) == [], "stray tritonserver / stub processes"
    assert time.monotonic() - started < 90


# -- the whole `torchship run` killed during its benchmark ---------------------------------------

QUICK = ["--epochs", "1", "--finetune-epochs", "1", "--variants", "fp32", "--concurrency", "1",
         "--bench-duration", "4", "-p", "serving_instance_counts=[]",
         "-p", "serving_queue_delays_us=[]"]



def test_sigkill_of_the_run_during_the_benchmark_leaves_nothing_and_the_next_run_deploys(
        pipeline_yaml, tmp_path):
    """SIGKILL to the run's whole process group (as a shell's job control or a CI runner sends
    it) while the benchmark measures: 10 s later no tritonserver, stub, watchdog or scratch
    folder is left, the served versions are byte-identical, and the next run deploys. The runs
    write under paths with a space and non-ASCII letters, which every stage and the deploy's
    staging server take."""
    env = private_tmp(tmp_path)
    tmp = tmp_path / "tmp"
    served, root = tmp_path / "served models ü", tmp_path / "my runs é"
    run = [*TORCHSHIP, "run", str(pipeline_yaml), "--pipeline-root", str(root),
           "--local-repository", str(served), *QUICK]
    first = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before = digest(served)
    assert any(path.startswith("torchship/1/") for path in before), sorted(before)
    temporary = sorted(p.name for p in tmp.iterdir())
    # A run that ends leaves no temporary file either: kfp.local's workspace and task scripts
    # went under the run's own scratch folder.
    assert not [name for name in temporary if name.startswith(("tmp", "kfp-", PREFIX))], temporary

    log_path = tmp_path / "killed.log"
    with log_path.open("w") as log:
        killed = subprocess.Popen(run, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)  # a group of its own, as a job
        deadline = time.monotonic() + 400
        while killed.poll() is None and not [  # the benchmark's server, on its candidates
                cmd for _, cmd in triton_processes(str(tmp)) if f"{PREFIX}candidates-" in cmd]:
            assert time.monotonic() < deadline, "the benchmark's server never started"
            time.sleep(0.2)
        assert killed.poll() is None, log_path.read_text()[-3000:]
        time.sleep(1)  # measuring now
        assert "Executing task 'benchmark'" in log_path.read_text()
        assert watchdogs(tmp), "the run and its server are expected to have watchdogs"
        os.killpg(killed.pid, signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
    time.sleep(10)
    assert triton_processes(str(tmp_path)) == [], "a tritonserver or stub was left"
    assert watchdogs(tmp) == [], "a watchdog was left"
    assert scratch_left(tmp) == [], "a temporary folder was left"
    assert sorted(p.name for p in tmp.iterdir()) == temporary
    assert digest(served) == before

    third = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "deployed: fp32 as version 2 of" in third.stdout, third.stdout[-3000:]
    after = digest(served)
    assert {p: sha for p, sha in after.items() if p.startswith("torchship/1/")} == {
        p: sha for p, sha in before.items() if p.startswith("torchship/1/")}
    assert any(path.startswith("torchship/2/") for path in after)
    assert triton_processes(str(tmp_path)) == [] and watchdogs(tmp) == []
    assert scratch_left(tmp) == []


EXPORT = textwrap.dedent("""
    import sys
    from torchship.components.export.stage import export_variants
    export_variants(sys.argv[1], sys.argv[2], sys.argv[3], measure=False, progress=print)
""")


def _variants(directory: Path) -> Path:
    for name in ("fp32", "pruned"):
        model = build_model("mlp", N_FEATURES, N_CLASSES)
        save_checkpoint(directory / name / "model.pt", model, "mlp", N_FEATURES, N_CLASSES)
        (directory / name / "variant.json").write_text(json.dumps(
            {"name": name, "format": "torch", "n_features": N_FEATURES, "n_classes": N_CLASSES}))
    return directory


def test_export_killed_mid_write_leaves_the_previous_export_whole(tmp_path, test_path):
    variants = _variants(tmp_path / "variants")
    onnx_dir = tmp_path / "onnx"
    export_variants(variants, str(test_path), onnx_dir, measure=False, progress=lambda _: None)
    before = {p.name: (onnx_dir / p.name / "model.onnx").read_bytes()
              for p in onnx_dir.iterdir() if p.is_dir()}
    assert set(before) == {"fp32", "pruned"}

    proc = subprocess.Popen([sys.executable, "-c", EXPORT, str(variants), str(test_path),
                             str(onnx_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    caught = None
    while time.monotonic() < deadline and proc.poll() is None:
        # The exporter writes `.model.onnx.*.tmp.onnx` inside a `.onnx.tmp-*` staging directory.
        partial = list(tmp_path.glob(".onnx.tmp-*/*/.model.onnx.*.tmp*"))
        if partial:
            proc.send_signal(signal.SIGKILL)
            caught = partial[0]
            break
        time.sleep(0.001)
    proc.wait(timeout=30)
    assert caught is not None, "the export finished before it could be interrupted"
    assert proc.returncode == -signal.SIGKILL

    # The published export is the earlier one, whole, and passes the checker.
    after = {p.name: (onnx_dir / p.name / "model.onnx").read_bytes()
             for p in onnx_dir.iterdir() if p.is_dir()}
    assert after == before
    for name in after:
        onnx.checker.check_model(str(onnx_dir / name / "model.onnx"), full_check=True)
    assert not list(onnx_dir.rglob("*.tmp*"))
    # What the kill leaves is the hidden staging directory beside it, never inside it.
    assert caught.parent.parent.name.startswith(".onnx.tmp-")

    # A re-run succeeds and publishes a complete export.
    records = export_variants(variants, str(test_path), onnx_dir, measure=False,
                              progress=lambda _: None)
    assert [r["name"] for r in records] == ["fp32", "pruned"]
    for name in ("fp32", "pruned"):
        onnx.checker.check_model(str(onnx_dir / name / "model.onnx"), full_check=True)
    assert json.loads((onnx_dir / "variants.json").read_text())[0]["name"] == "fp32"


DEPLOY = textwrap.dedent("""
    import json, sys
    from torchship.components.deploy.targets.local import deploy_local
    result = deploy_local(sys.argv[1], sys.argv[2], sys.argv[3], persistent_repository=sys.argv[4],
                          keep_versions=5, progress=None)
    print("RESULT", json.dumps(result["versions"]))
""")


def test_two_deploys_to_one_persistent_repository_get_distinct_versions(tmp_path, test_path):
    served = tmp_path / "served"
    onnx_dirs = [write_onnx_dir(tmp_path / f"onnx{i}", seed=i) for i in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", DEPLOY, str(onnx_dirs[i]),
                          str(tmp_path / f"artifact{i}"), str(test_path), str(served)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    versions = sorted(
        json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])["fp32"]
        for out, _ in outputs
    )
    assert versions == [1, 2]
    config = read_model_config(served / "fp32" / "config.pbtxt")
    assert sorted(config.version_policy.specific.versions) == [1, 2]
    for version in (1, 2):
        assert (served / "fp32" / str(version) / "model.onnx").is_file()
    # Each version holds the model of the deploy that got it.
    by_version = {
        (served / "fp32" / str(v) / "model.onnx").read_bytes() for v in (1, 2)
    }
    assert by_version == {(d / "fp32" / "model.onnx").read_bytes() for d in onnx_dirs}
    assert wait_gone(str(served.resolve()), 5) == []
    assert not [p for p in served.iterdir() if p.name.startswith(".") and p.is_dir()], \
        "staging left behind"


def test_threads_deploying_at_once_also_get_distinct_versions(tmp_path, test_path):
    from torchship.components.deploy.targets.local import deploy_local

    served = tmp_path / "served"
    onnx_dirs = [write_onnx_dir(tmp_path / f"onnx{i}", seed=10 + i) for i in range(2)]
    results: list = [None, None]

    def deploy(i: int) -> None:
        try:
            results[i] = deploy_local(onnx_dirs[i], tmp_path / f"artifact{i}",
                                      test_path, persistent_repository=served, progress=None)
        except Exception as exc:  # noqa: BLE001 - asserted below
            results[i] = exc

    threads = [threading.Thread(target=deploy, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert all(isinstance(r, dict) for r in results), results
    assert sorted(r["versions"]["fp32"] for r in results) == [1, 2]
    shutil.rmtree(served)


def test_export_removes_the_staging_a_killed_export_left_and_only_that(tmp_path, test_path):
    from torchship.components.files import STALE_STAGING_S, make_staging_dir

    variants = _variants(tmp_path / "variants")
    onnx_dir = tmp_path / "onnx"

    def backdate(directory: Path) -> None:
        old = time.time() - 2 * STALE_STAGING_S
        for path in [directory, *directory.rglob("*")]:
            os.utime(path, (old, old))

    # What an export killed with SIGKILL leaves: its hidden staging directory, a model half written.
    killed = make_staging_dir(onnx_dir)
    (killed / "fp32").mkdir()
    (killed / "fp32" / ".model.onnx.x1y2z3.tmp").write_bytes(b"\x08\x07partial")
    backdate(killed)
    # An export to the same destination still writing (its last file is fresh), and a killed
    # export to another destination: neither is this export's to remove.
    running = make_staging_dir(onnx_dir)
    (running / "fp32").mkdir()
    backdate(running)
    (running / "fp32" / ".model.onnx.a1b2c3.tmp").write_bytes(b"being written")
    other = make_staging_dir(tmp_path / "onnx_other")
    backdate(other)

    records = export_variants(variants, str(test_path), onnx_dir, measure=False,
                              progress=lambda _: None)

    assert not killed.exists()
    assert running.is_dir() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["variants", "onnx", running.name, other.name])
    # The export is whole: every variant passes the checker, and nothing else is published.
    assert [r["name"] for r in records] == ["fp32", "pruned"]
    assert sorted(p.name for p in onnx_dir.iterdir()) == [
        "fp32", "pruned", "skipped.json", "variants.json"]
    for name in ("fp32", "pruned"):
        assert [p.name for p in (onnx_dir / name).iterdir()] == ["model.onnx"]
        onnx.checker.check_model(str(onnx_dir / name / "model.onnx"), full_check=True)
    assert [r["name"] for r in json.loads((onnx_dir / "variants.json").read_text())] == [
        "fp32", "pruned"]
