"""Nothing left behind: a tritonserver never outlives the process that started it, however that
process dies; what an earlier crash left is removed at the next start; a stub that crashes fails
the start at once; a repository on a path with a space or non-ASCII letters is served."""

from __future__ import annotations

import json
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
from processes import TORCHSHIP, private_tmp, scratch_left, triton_processes, wait_gone

from torchship.components.errors import ServingError
from torchship.components.scratch import OWNER_FILE, PREFIX, process_start, sweep_stale
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


# A model.py whose stub dies while importing it prints nothing, and Triton waits for that stub
# without end (tried: still waiting after 100 s); the start must fail in seconds anyway.
CRASHES = {
    "exits": ("import os; os._exit(7)", "the stub of model 'fp32' exited with status 7"),
    "segfaults": ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
                  "model 'fp32' was killed by SIGSEGV"),
}


@pytest.mark.parametrize("how", sorted(CRASHES))
def test_a_stub_that_dies_importing_its_model_fails_the_start_at_once(tmp_path, local_repo, how):
    repository = tmp_path / "repo"
    shutil.copytree(local_repo, repository)
    model = repository / "fp32" / "1" / "model.py"
    first_line, expected = CRASHES[how]
    model.write_text(first_line + "\n" + model.read_text())
    started = time.monotonic()
    with pytest.raises(ServingError) as excinfo, TritonServer(repository, startup_timeout_s=120):
        pytest.fail("a crashed stub was served")
    message = str(excinfo.value)
    assert time.monotonic() - started < 20, message
    assert "\n" not in message and message.startswith(
        f"a Python-backend stub crashed while tritonserver started on {repository}: "), message
    assert expected in message, message
    assert wait_gone(str(repository), 10) == []


def test_the_sweep_removes_only_what_dead_owners_of_this_user_left(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    gone = subprocess.Popen(["sleep", "60"])
    dead = {"pid": gone.pid, "start": process_start(gone.pid)}
    gone.kill()
    gone.wait()
    bystander = subprocess.Popen(["sleep", "60"])  # alive, and no tritonserver
    me = {"pid": os.getpid(), "start": process_start(os.getpid())}

    def folder(name: str, record: dict | str | None, parent: Path = tmp) -> Path:
        path = parent / f"{PREFIX}{name}"
        path.mkdir()
        if record is not None:
            text = record if isinstance(record, str) else json.dumps(record)
            (path / OWNER_FILE).write_text(text)
        return path

    folder("dead-1", dead)
    folder("dead-server-1", {**dead, "server": {"pid": bystander.pid,
                                                "start": process_start(bystander.pid)}})
    folder("reused-1", {"pid": os.getpid(), "start": "1"})  # our pid, another start: reused
    kept = [folder("alive-1", me), folder("unrecorded-1", None), folder("garbage-1", "{not")]
    outer = folder("dead-outer-1", dead)  # a process still works in a folder inside it
    folder("alive-inner-1", me, parent=outer)
    elsewhere = folder("dead-target-1", dead, parent=tmp_path)
    (tmp / f"{PREFIX}link-1").symlink_to(elsewhere)
    kept += [outer, tmp / f"{PREFIX}link-1"]
    if os.getuid() == 0:  # a folder of another user, with a dead owner
        kept.append(folder("other-user-1", dead))
        os.chown(kept[-1], 65534, 65534)
    regions = [Path(f"/dev/shm/torchship{pid}_test{os.getpid()}_") for pid in (gone.pid, me["pid"])]
    for region in regions:
        region.write_bytes(b"x")
    try:
        removed = sweep_stale()
        assert sorted(p.name for p in removed) == [
            f"{PREFIX}dead-1", f"{PREFIX}dead-server-1", f"{PREFIX}reused-1"]
        assert sorted(p.name for p in tmp.iterdir()) == sorted(p.name for p in kept)
        assert elsewhere.is_dir() and (elsewhere / OWNER_FILE).is_file()
        assert bystander.poll() is None, "a process that is no tritonserver was killed"
        assert not regions[0].exists() and regions[1].exists()
    finally:
        bystander.kill()
        bystander.wait()
        regions[1].unlink(missing_ok=True)


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

    # The same through `torchship serve`, with a temporary folder on such a path too: the
    # server's workspace then goes to /tmp.
    (tmp_path / folder / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / folder / "tmp")}
    serve = subprocess.Popen([*TORCHSHIP, "serve", str(repository)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = serve.stdout.readline()
        assert first.startswith("serving fp32 (versions"), first
        assert str(repository) in first
    finally:
        serve.send_signal(signal.SIGTERM)
        rest = serve.communicate(timeout=60)[0]
    assert serve.returncode == 0 and "stopped (SIGTERM)" in rest, rest
    assert wait_gone(str(repository), 10) == []
    assert list((tmp_path / folder / "tmp").iterdir()) == []
