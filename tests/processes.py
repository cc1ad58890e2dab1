"""Processes the tests start or look for: the ``torchship`` command, and tritonserver processes
that should be gone (read from /proc)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
