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
