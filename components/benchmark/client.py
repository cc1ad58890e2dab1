"""The benchmark's load generator: client processes that keep a fixed number of requests in flight.

Each client process is started once per benchmark (``spawn``: no inherited gRPC state) and runs
one thread per in-flight request, closed loop: send, wait for the answer, send the next. The
request bodies are built once, before the clock starts, from real held-out rows, so a request
costs the client only a send and a receive:

* ``http``: the KServe v2 body (binary tensor extension, or JSON for Vertex AI ``rawPredict``) and
  its headers as one byte string, written to a keep-alive socket; the answer is read with a small
  HTTP/1.1 reader (``http.client`` costs five times more CPU per request);
* ``grpc``: a ``ModelInferRequest`` serialised once and sent as raw bytes over the process's
  channel.

The parent (``ClientPool.run_level``) sets a start time and window boundaries on the shared
monotonic clock; every process reports each window's latencies, errors and its own CPU time, and
the parent decides after each window whether to stop. A request that outlives ``timeout_s`` is an
error, and the pool never waits on a process longer than the window plus that timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np

from torchship.components.benchmark.transport import (
    GrpcClient,
    HttpConnection,
    Target,
    http_error,
)
from torchship.components.errors import ServingError, one_line

if TYPE_CHECKING:  # annotations only; no runtime dependency on typing_extensions
    from typing_extensions import Self

__all__ = ["ClientPool", "WindowReport"]



@dataclass
class WindowReport:
    """One measurement window from all client processes together."""

    index: int  # 1-based
    latencies_ms: np.ndarray
    errors: int
    first_error: str | None
    cpu_s: float
    timed_out: bool


# -- one thread per in-flight request ----------------------------------------------------------------


def _http_sender(target: Target, timeout_s: float):
    connection = HttpConnection(target, timeout_s)

    def send(message: bytes) -> None:
        status, body = connection.post(message)
        if status != 200:
            raise ConnectionError(http_error(status, body))

    return send, connection.close, connection.connect, connection.message


class _LoadThread(threading.Thread):
    """Keeps one request in flight from ``start_at`` until ``stop`` is set; logs each answer."""

    def __init__(self, target: Target, payloads: list[bytes], timeout_s: float, start_at: float,
                 stop: threading.Event, grpc_client: GrpcClient | None = None):
        super().__init__(daemon=True)
        self.target, self.payloads, self.timeout_s = target, payloads, timeout_s
        self.grpc_client = grpc_client
        self.start_at, self.stop = start_at, stop
        # (monotonic end time, latency in seconds, or -1.0 for an error); appended in order.
        self.events: list[tuple[float, float]] = []
        self.first_error: str | None = None
        self.timed_out = False

    def run(self) -> None:
        if self.grpc_client is not None:
            send, close, messages = self.grpc_client.send, (lambda: None), self.payloads
        else:
            send, close, connect, frame = _http_sender(self.target, self.timeout_s)
            messages = [frame(body) for body in self.payloads]
            try:
                connect()  # before the clock starts; a failure shows on the first request
            except OSError:
                pass
        clock, events, n = time.monotonic, self.events, len(messages)
        delay = self.start_at - clock()
        if delay > 0:
            self.stop.wait(delay)
        k = consecutive_errors = 0
        try:
            while not self.stop.is_set():
                begin = clock()
                try:
                    send(messages[k % n])
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    end = clock()
                    events.append((end, -1.0))
                    if self.first_error is None:
                        self.first_error = one_line(exc, 400, with_type=True)
                    if isinstance(exc, TimeoutError):
                        self.timed_out = True
                        return  # a stuck server: stop rather than pile up timeouts
                    consecutive_errors += 1
                    self.stop.wait(min(0.1, 0.001 * consecutive_errors))  # no hot error loop
                else:
                    end = clock()
                    events.append((end, end - begin))
                    consecutive_errors = 0
                k += 1
        finally:
            close()


# -- the client process ----------------------------------------------------------------------------


def _client_main(conn) -> None:
    """Client process: run levels as the parent asks, until told to exit or the pipe closes."""
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "exit":
            return
        if message[0] != "level":  # a late "stop" for a level that had already ended
            continue
        try:
            _run_level(conn, message[1])
        except (EOFError, OSError, BrokenPipeError):
            return
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("failed", one_line(exc, 400, with_type=True)))


def _run_level(conn, spec: dict) -> None:
    target: Target = spec["target"]
    start_at, warmup_s, window_s = spec["start_at"], spec["warmup_s"], spec["window_s"]
    stop = threading.Event()
    grpc_client = None
    if target.protocol == "grpc":
        grpc_client = GrpcClient(target, spec["timeout_s"])
        grpc_client.connect()
    threads = [
        _LoadThread(target, payloads, spec["timeout_s"], start_at, stop, grpc_client)
        for payloads in spec["payloads"]
    ]
    for thread in threads:
        thread.start()
    cursors = [0] * len(threads)
    measure_from = start_at + warmup_s

    def collect(until: float, keep: bool) -> tuple[list[float], int]:
        """Events that ended before ``until`` not yet collected (dropped when not ``keep``)."""
        latencies, errors = [], 0
        for i, thread in enumerate(threads):
            events, k = thread.events, cursors[i]
            stop_at = len(events)
            while k < stop_at and events[k][0] < until:
                if keep:
                    lat = events[k][1]
                    if lat >= 0:
                        latencies.append(lat)
                    else:
                        errors += 1
                k += 1
            cursors[i] = k
        return latencies, errors

    _sleep_until(measure_from)
    collect(measure_from, keep=False)  # the warm-up
    cpu_mark = time.process_time()
    stopped = False
    for index in range(1, spec["max_windows"] + 1):
        boundary = measure_from + index * window_s
        # Answers that end right at the boundary get logged; a "stop" cuts the wait short.
        if _stop_requested(conn, boundary + 0.002):
            stopped = True
            break
        latencies, errors = collect(boundary, keep=True)
        cpu_now = time.process_time()
        first_error = next((t.first_error for t in threads if t.first_error), None)
        conn.send((
            "window",
            index,
            np.asarray(latencies, dtype=np.float64) * 1e3,
            errors,
            first_error,
            cpu_now - cpu_mark,
            any(t.timed_out for t in threads),
        ))
        cpu_mark = cpu_now
    stop.set()
    for thread in threads:
        thread.join(timeout=spec["timeout_s"] + 2.0)
    if grpc_client is not None:
        grpc_client.close()
    if not stopped:  # the parent's stop may still be on its way
        while conn.poll(0.0):
            conn.recv()
    conn.send(("done",))


def _stop_requested(conn, until: float) -> bool:
    """Wait until ``until``; True as soon as the parent says "stop"."""
    while (left := until - time.monotonic()) > 0:
        if conn.poll(left) and conn.recv()[0] == "stop":
            return True
    return False


def _sleep_until(when: float) -> None:
    while (delay := when - time.monotonic()) > 0:
        time.sleep(delay)


# -- the parent's side -----------------------------------------------------------------------------


@dataclass
class _Process:
    process: subprocess.Popen
    conn: Connection
    windows: dict = field(default_factory=dict)


class ClientPool:
    """``processes`` client processes, started once and reused for every level.

    Each is ``python -m torchship.components.benchmark.client`` talking over a socket pair, not a
    ``multiprocessing`` child: nothing of the caller's ``__main__`` is imported again, so a plain
    script or notebook can run a benchmark without an ``if __name__ == "__main__"`` guard.
    """

    def __init__(self, processes: int, startup_timeout_s: float = 60.0):
        self.members: list[_Process] = []
        self.broken = False
        try:
            for _ in range(max(1, int(processes))):
                parent_end, child_end = socket.socketpair()
                with parent_end, child_end:
                    process = subprocess.Popen(
                        [sys.executable, "-m", __name__, str(child_end.fileno())],
                        pass_fds=[child_end.fileno()],
                        stdin=subprocess.DEVNULL,
                    )
                    conn = Connection(os.dup(parent_end.fileno()))
                self.members.append(_Process(process, conn))
            deadline = time.monotonic() + startup_timeout_s
            for member in self.members:
                self._receive(member, "ready", deadline)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def size(self) -> int:
        return len(self.members)

    def close(self) -> None:
        for member in self.members:
            try:
                member.conn.send(("exit",))
            except (OSError, BrokenPipeError):
                pass
        for member in self.members:
            try:
                member.process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait(timeout=2.0)
            member.conn.close()
        self.members = []

    def run_level(
        self,
        target: Target,
        payloads: list[list[bytes]],
        *,
        warmup_s: float,
        window_s: float,
        max_windows: int,
        timeout_s: float,
        on_measure_start: Callable[[], None] | None = None,
        on_window: Callable[[WindowReport], bool] | None = None,
    ) -> list[WindowReport]:
        """Run one level: ``len(payloads)`` threads (one per in-flight request), spread over the
        processes. After each window ``on_window`` says whether to stop (True) or go on."""
        if self.broken:
            raise ServingError("the benchmark client processes failed earlier; start a new run")
        members = self.members[: max(1, min(len(self.members), len(payloads)))]
        shares = [payloads[i :: len(members)] for i in range(len(members))]
        # Processes need a moment to start their threads and open connections.
        start_at = time.monotonic() + 0.05 + 0.01 * len(payloads)
        for member, share in zip(members, shares):
            member.conn.send(("level", {
                "target": target, "payloads": share, "start_at": start_at, "warmup_s": warmup_s,
                "window_s": window_s, "max_windows": max_windows, "timeout_s": timeout_s,
            }))
        measure_from = start_at + warmup_s
        if on_measure_start is not None:
            _sleep_until(measure_from)
            on_measure_start()
        reports: list[WindowReport] = []
        stopped = False
        try:
            for index in range(1, max_windows + 1):
                deadline = measure_from + index * window_s + timeout_s + 10.0
                parts = [self._receive(m, "window", deadline) for m in members]
                report = WindowReport(
                    index=index,
                    latencies_ms=np.concatenate([p[2] for p in parts]),
                    errors=sum(p[3] for p in parts),
                    first_error=next((p[4] for p in parts if p[4]), None),
                    cpu_s=sum(p[5] for p in parts),
                    timed_out=any(p[6] for p in parts),
                )
                reports.append(report)
                if (on_window is not None and on_window(report)) or index == max_windows:
                    stopped = True
                    break
        finally:
            for member in members:
                try:
                    member.conn.send(("stop",))
                except (OSError, BrokenPipeError):
                    pass
            # Each process ends its level within the request timeout: drain to its "done".
            deadline = time.monotonic() + timeout_s + 10.0
            failure = None
            for member in members:
                try:
                    while self._receive(member, None, deadline)[0] != "done":
                        pass
                except ServingError as exc:
                    failure = failure or exc
                    member.process.kill()  # out of step with the parent: of no further use
                    self.broken = True
            if failure is not None and stopped:
                raise failure
        return reports

    def _receive(self, member: _Process, kind: str | None, deadline: float):
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not member.conn.poll(left):
                raise ServingError(
                    "a benchmark client process sent nothing in time (a request is stuck beyond "
                    "the request timeout, or the machine is overloaded)"
                )
            try:
                message = member.conn.recv()
            except (EOFError, OSError) as exc:
                raise ServingError(
                    f"a benchmark client process died (exit code {member.process.poll()})"
                ) from exc
            if message[0] == "failed":
                raise ServingError(f"a benchmark client process failed: {message[1]}")
            if kind is None or message[0] == kind:
                return message


if __name__ == "__main__":  # a client process started by ClientPool; argv[1]: its socket's fd
    _client_main(Connection(int(sys.argv[1])))
