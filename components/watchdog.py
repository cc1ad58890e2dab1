"""A watchdog: whatever way a process dies (SIGKILL included), the servers it started and its
scratch folders go too.

``tritonserver`` runs in its own session (its stubs are stopped with its process group), so a
signal to the owner's process group does not reach it; nor does anything remove the folders a
killed process leaves. The watchdog, a small process in a session of its own, holds the read end
of a pipe whose write end only the owner has. The owner writes ``server <pid>`` for each server
it launches and ``stopped`` when it has cleaned up itself. End of file without ``stopped`` means
the owner died: the watchdog stops each server's process group (SIGTERM, then SIGKILL after the
grace period) and removes the owner's scratch folders and its servers' shared-memory regions
(`scratch.sweep_stale`).

`Watchdog` starts one (``python -m torchship.components.watchdog OWNER_PID GRACE_S``, the pipe
on its stdin); `TritonServer` keeps one per server, `torchship run` one for the run's scratch
folder, which is the temporary folder of every stage it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from torchship.components.scratch import group_alive, killpg, process_start, sweep_stale


class Watchdog:
    """The watchdog of this process: `watch` each server started, `release` once cleaned up."""

    def __init__(self, grace_s: float = 10.0) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "torchship.components.watchdog", str(os.getpid()),
             str(grace_s)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True,  # a signal to our process group spares it
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    def watch(self, server_pid: int) -> None:
        self._process.stdin.write(f"server {server_pid}\n")
        self._process.stdin.flush()

    def release(self) -> None:
        """This process cleaned up itself: the watchdog exits doing nothing."""
        with contextlib.suppress(OSError, ValueError):
            self._process.stdin.write("stopped\n")
            self._process.stdin.close()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()


def _stop(server: tuple[int, str | None], grace_s: float) -> None:
    pid, start = server
    if start is None or process_start(pid) != start:
        return  # gone already, or the pid is another process's now
    killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while process_start(pid) == start and time.monotonic() < deadline:
        time.sleep(0.05)
    killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def main(owner: int, grace_s: float) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the owner's to handle
    servers: list[tuple[int, str | None]] = []
    for line in sys.stdin:
        word, _, value = line.strip().partition(" ")
        if word == "server":
            servers.append((int(value), process_start(int(value))))
        elif word == "stopped":
            return 0
    # End of file without "stopped": the owner is dying. Let it finish, then clean up after it.
    deadline = time.monotonic() + 5.0
    while process_start(owner) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    for server in servers:
        _stop(server, grace_s)
    sweep_stale(owner_pid=owner)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), float(sys.argv[2])))
