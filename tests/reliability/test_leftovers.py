"""Nothing left behind: a tritonserver never outlives the process that started it, however that
process dies; what an earlier crash left is removed at the next start; a stub that crashes fails
the start at once; a repository on a path with a space or non-ASCII letters is served."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from processes import TORCHSHIP, process_table, triton_processes, wait_gone

from torchship.components.errors import ServingError
from torchship.components.scratch import PREFIX, process_start
from torchship.components.triton.server import TritonServer

OWNER = textwrap.dedent("""
    import sys, time
    from torchship.components.triton.server import TritonServer
    server = TritonServer(sys.argv[1]).start()
    print(server.pid, server._watchdog.pid, server._workspace, flush=True)
    time.sleep(600)
""")


def start_owner(repository: Path, env: dict) -> tuple[subprocess.Popen, int, int, Path]:
    """A process serving `repository`: (it, the server's pid, its watchdog's pid, workspace)."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(repository)],
                             stdout=subprocess.PIPE, text=True, env=env)
    server, watchdog, workspace = owner.stdout.readline().split()
    return owner, int(server), int(watchdog), Path(workspace)


def private_tmp(tmp_path: Path) -> dict:
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def scratch_left(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(PREFIX))


def shm_regions(pid: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"torchship{pid}_*"))


def test_a_server_does_not_outlive_its_owner_killed_with_sigkill(tmp_path, local_repo):
    env = private_tmp(tmp_path)
    repository = tmp_path / "repo"
    shutil.copytree(local_repo, repository)
    owner, server, watchdog, workspace = start_owner(repository, env)
    assert process_start(server) is not None and workspace.is_dir()
    assert triton_processes(str(repository)), "no server or stub is running"
    assert shm_regions(owner.pid), "the stubs' shared memory is expected under /dev/shm"
    owner.kill()  # SIGKILL: no handler, no finally, no atexit
    owner.wait()
    assert wait_gone(str(repository), 10) == [], "tritonserver or a stub outlived its owner"
    deadline = time.monotonic() + 5
    while (process_start(watchdog) or workspace.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_start(watchdog) is None and not workspace.exists()
    assert scratch_left(tmp_path / "tmp") == [] and shm_regions(owner.pid) == []


def test_what_a_crash_left_is_removed_at_the_next_start(tmp_path, local_repo, monkeypatch):
    """With its watchdog killed too, a server outlives its owner: the next start stops it and
    removes its folder and shared memory."""
    env = private_tmp(tmp_path)
    repository = tmp_path / "repo"
    shutil.copytree(local_repo, repository)
    owner, server, watchdog, workspace = start_owner(repository, env)
    os.kill(watchdog, signal.SIGKILL)
    owner.kill()
    owner.wait()
    time.sleep(1)
    assert process_start(server) is not None, "the stale server should still run here"
    assert workspace.is_dir()
    monkeypatch.setenv("TMPDIR", env["TMPDIR"])
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    with TritonServer(local_repo) as fresh:
        assert fresh.is_running()
        assert wait_gone(str(repository), 10) == [], "the stale server was not stopped"
        assert not workspace.exists() and shm_regions(owner.pid) == []
    assert scratch_left(tmp_path / "tmp") == []


def test_a_stub_that_crashes_fails_the_start_at_once(tmp_path, local_repo):
    """Triton's Python backend starts a stub through a shell that splits a path at spaces; a
    second repository on such a path, given to Triton as it is, makes the stub crash."""
    spaced = tmp_path / "with space"
    shutil.copytree(local_repo / "fp32", spaced / "other")
    config = spaced / "other" / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "fp32"', 'name: "other"'))
    started = time.monotonic()
    with pytest.raises(ServingError) as excinfo, TritonServer(
            local_repo, startup_timeout_s=120, extra_args=[f"--model-repository={spaced}"]):
        pytest.fail("a crashed stub was served")
    message = str(excinfo.value)
    assert time.monotonic() - started < 20, message
    assert "\n" not in message and message.startswith(
        "a Python-backend stub crashed while tritonserver started on"), message
    assert "terminate called after throwing" in message
    assert wait_gone(str(spaced), 10) == []


@pytest.mark.parametrize("folder", ["my runs", "modèles ü"])
def test_a_repository_on_a_path_with_a_space_or_non_ascii_letters_is_served(
        tmp_path, local_repo, test_path, folder):
    import tritonclient.http as httpclient

    repository = tmp_path / folder / "repository"
    shutil.copytree(local_repo, repository)
    x = np.load(test_path)["x"][:4]
    with TritonServer(repository, startup_timeout_s=60) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        request = httpclient.InferInput("input", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        logits = client.infer("fp32", [request]).as_numpy("logits")
        client.close()
    assert logits.shape == (4, 3) and np.isfinite(logits).all()

    serve = subprocess.Popen([*TORCHSHIP, "serve", str(repository)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        first = serve.stdout.readline()
        assert first.startswith("serving fp32 (versions"), first
        assert str(repository) in first
    finally:
        serve.send_signal(signal.SIGTERM)
        rest = serve.communicate(timeout=60)[0]
    assert serve.returncode == 0 and "stopped (SIGTERM)" in rest, rest
    assert wait_gone(str(repository), 10) == []


# -- the whole `torchship run` killed during its benchmark ---------------------------------------

QUICK = ["--epochs", "1", "--finetune-epochs", "1", "--variants", "fp32", "--concurrency", "1",
         "--bench-duration", "4", "-p", "serving_instance_counts=[]",
         "-p", "serving_queue_delays_us=[]"]


def digest(repository: Path) -> dict[str, str]:
    return {str(p.relative_to(repository)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(repository.rglob("*")) if p.is_file()}


def watchdogs() -> set[int]:
    return {pid for pid, _, state, cmd in process_table()
            if state != "Z" and "torchship.components.watchdog" in cmd}


def test_sigkill_of_the_run_during_the_benchmark_leaves_nothing_and_the_next_run_deploys(
        pipeline_yaml, tmp_path):
    """The runs write under paths with a space and non-ASCII letters, which every stage and the
    deploy's staging server take."""
    env = private_tmp(tmp_path)
    served, root = tmp_path / "served models ü", tmp_path / "my runs é"
    run = [*TORCHSHIP, "run", str(pipeline_yaml), "--pipeline-root", str(root),
           "--local-repository", str(served), *QUICK]
    first = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    before, guards = digest(served), watchdogs()
    temporary = sorted(p.name for p in (tmp_path / "tmp").iterdir())
    # A run that ends leaves no temporary file either: kfp.local's workspace and task scripts
    # went under the run's own scratch folder.
    assert not [name for name in temporary if name.startswith(("tmp", "kfp-", PREFIX))], temporary

    log = (tmp_path / "killed.log").open("w")
    killed = subprocess.Popen(run, stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)  # a group of its own, as a shell's job
    deadline = time.monotonic() + 400
    while killed.poll() is None and not [  # the benchmark's server, on its candidates
            cmd for _, cmd in triton_processes(str(tmp_path / "tmp"))
            if f"{PREFIX}candidates-" in cmd]:
        assert time.monotonic() < deadline, "the benchmark's server never started"
        time.sleep(0.2)
    assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    time.sleep(1)  # measuring now
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    log.close()
    time.sleep(10)
    assert triton_processes(str(tmp_path)) == [], "a tritonserver or stub was left"
    assert watchdogs() - guards == set(), "a watchdog was left"
    assert scratch_left(tmp_path / "tmp") == [], "a temporary folder was left"
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == temporary
    assert digest(served) == before

    third = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "deployed: fp32 as version 2 of" in third.stdout
    after = digest(served)
    assert {path: sha for path, sha in after.items() if path.startswith("fp32/1/")} == {
        path: sha for path, sha in before.items() if path.startswith("fp32/1/")}
    assert any(path.startswith("fp32/2/") for path in after)
    assert scratch_left(tmp_path / "tmp") == []
