"""Processes the tests start, join or look for: the ``torchship`` command, this process as a
one-worker training job, and tritonserver processes that should be gone (read from /proc)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

TORCHSHIP = [sys.executable, "-m", "torchship.pipelines.cli"]


def torchship(*args: str, env: dict | None = None, timeout: float = 300,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHSHIP, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env=env, cwd=cwd)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def process_table() -> list[tuple[int, int, str, str]]:
    """(pid, pgid, state, cmdline) of every live process, from /proc."""
    rows = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        rows.append((int(entry), int(fields[2]), fields[0], cmdline))
    return rows


def triton_processes(marker: str) -> list[tuple[int, str]]:
    """Live (non-zombie) tritonserver / stub processes whose command line contains ``marker``."""
    return [
        (pid, cmd)
        for pid, _, state, cmd in process_table()
        if state != "Z"
        and marker in cmd
        and ("tritonserver" in cmd or "triton_python_backend_stub" in cmd)
    ]


def watchdogs(tmp: Path) -> list[int]:
    """Live watchdog processes (``components/watchdog.py``) started with TMPDIR at or under
    ``tmp``: those of the processes a test ran with that TMPDIR, not another test's."""
    found = []
    for pid, _, state, cmd in process_table():
        if state == "Z" or "torchship.components.watchdog" not in cmd:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        tmpdir = next((e[7:].decode() for e in environ if e.startswith(b"TMPDIR=")), "")
        if tmpdir == str(tmp) or tmpdir.startswith(f"{tmp}/"):
            found.append(pid)
    return found


def wait_gone(marker: str, timeout: float = 10.0) -> list[tuple[int, str]]:
    """The processes ``triton_processes(marker)`` still finds after waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := triton_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@contextmanager
def one_process_job():
    """As under torchrun with one worker: this process is rank 0 of 1 and trains in place."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(sock.getsockname()[1])
    saved = {key: os.environ.get(key) for key in env}
    threads = torch.get_num_threads()
    os.environ.update(env)
    try:
        yield
    finally:
        torch.set_num_threads(threads)  # a CPU worker pins itself to one thread
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def private_tmp(tmp_path: Path) -> dict:
    """An environment whose TMPDIR is ``tmp_path/tmp`` (made here): what the processes started
    with it leave there is theirs alone."""
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def scratch_left(tmp: Path) -> list[str]:
    """The torchship scratch folders in ``tmp``."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("torchship-"))
