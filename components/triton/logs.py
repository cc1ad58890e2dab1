"""Reading a ``tritonserver`` log (its errors, why it exited, a port conflict) and watching the
Python-backend stubs it spawns (a stub that crashes fails the start at once)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

__all__ = ["FATAL", "StubWatch", "error_summary", "exit_summary", "log_errors", "port_conflict",
           "stub_crash", "tail"]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


# Error lines Triton always prints on a machine without a GPU; not worth reporting.
BENIGN = ("CudaDriverHelper has not been initialized",)
# Log lines that mean startup has failed (with --exit-on-error the server exits a bit later).
FATAL = ("failed to load '", "error: creating server", "Poll failed for model directory",
          "failed to start ")
# Log lines of a Python-backend stub that died while starting (the server would wait for it).
STUB_CRASH = ("terminate called after throwing",)


def stub_crash(text: str, width: int = 200) -> str | None:
    """A stub's dying words in a server log, on one line (with the C++ `what()` after them)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if any(marker in line for marker in STUB_CRASH):
            words = [line] + [n for n in lines[i + 1:i + 2] if "what()" in n]
            message = " ".join(" ".join(words).split())
            return message if len(message) <= width else message[:width] + " ..."
    return None


class StubWatch:
    """The Python-backend stubs of a starting ``tritonserver``, read from /proc.

    A stub that dies before it answers (``os._exit`` or a segfault while its model.py is
    imported) prints nothing, and Triton waits for it without end; all that shows is the stub, a
    child of the server, left a zombie (Triton reaps the stubs it stops at once). `dead` says
    which one, and how it ended, once it has stayed so for a moment."""

    def __init__(self, server_pid: int, settle_s: float = 1.0) -> None:
        self.server_pid = server_pid
        self.settle_s = settle_s
        self._names: dict[int, str] = {}  # a stub's model (instance), from its command line
        self._dead_since: dict[int, float] = {}

    def dead(self, log: str = "") -> str | None:
        """"the stub of model 'fp32' exited with status 7" for a stub dead a while, else None.
        A stub may die before it is seen alive: its model is then the one the server's `log`
        shows loading that no live stub serves."""
        now, live, dead = time.monotonic(), [], None
        for pid, state, comm, status in _children(self.server_pid):
            if state != "Z":
                self._names[pid] = self._names.get(pid) or _stub_name(pid)
                live += [self._names[pid]] if self._names[pid] else []
            elif self._names.get(pid) or comm.startswith("triton_python_b"):
                since = self._dead_since.setdefault(pid, now)
                # A stub Triton stopped itself exits 0 and is reaped at once; allow it longer.
                if now - since >= (self.settle_s if status else 5 * self.settle_s):
                    dead = pid, status
        if dead is None:
            return None
        pid, status = dead
        name = self._names.get(pid)
        models = [name] if name else [m for m in _loading(log) if not any(
            re.fullmatch(rf"{re.escape(m)}(_\d+)*", n) for n in live)]
        whose = (f"the stub of model '{models[0]}'" if len(models) == 1 else
                 f"a stub (pid {pid}) of one of {', '.join(map(repr, models))}" if models else
                 f"a stub (pid {pid})")
        return f"{whose} {_how(status)}"


def _children(pid: int) -> list[tuple[int, str, str, int]]:
    """(pid, state, command name, exit status) of each child process of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is the stat's third field
            if int(fields[1]) == pid:
                status = int(fields[49]) if len(fields) > 49 else 0  # the 52nd: exit_code
                found.append((int(entry), fields[0], stat[stat.index("(") + 1:stat.rindex(")")],
                              status))
    return found


def _loading(log: str) -> list[str]:
    """The models a server log shows loading, neither loaded nor failed yet."""
    names = dict.fromkeys(re.findall(r"loading: ([^:\s\"]+):\d+", log))
    done = set(re.findall(r"(?:successfully loaded|failed to load) '([^']+)'", log))
    return [name for name in names if name not in done]


def _stub_name(pid: int) -> str | None:
    """The model (instance) a stub serves: the last but one word of its command line (the
    same in the ``bash -c "exec <stub> ..."`` that turns into it)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None
    words = words.replace("\0", " ").split()
    stub = any(w.endswith("/triton_python_backend_stub") for w in words)
    return words[-2] if stub and len(words) >= 3 else None


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        except ValueError:
            return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.WEXITSTATUS(status)}"


LOG_PREFIX = re.compile(r"^[EWI]\d{4} [\d:.]+\s+\d+\s+[\w.]+:\d+\]\s*")


def log_errors(text: str, limit: int = 8, width: int = 500) -> list[str]:
    errors = [
        line
        for line in text.splitlines()
        if line[:1] == "E" and line[1:5].isdigit() and not any(b in line for b in BENIGN)
    ]
    return [e if len(e) <= width else e[:width] + " ..." for e in errors[:limit]]


def error_summary(text: str, width: int = 300) -> str | None:
    """The most telling error of a server log as one line, without Triton's prefix."""
    errors = log_errors(text, limit=100, width=10_000)
    errors += [line for line in text.splitlines() if line.startswith("error: creating server")]
    if not errors:
        return None
    markers = ("failed to start ", "Poll failed", "failed to load '")
    chosen = next((e for m in markers for e in errors if m in e), errors[0])
    # Triton quotes a Python error with its traceback, newlines escaped: keep the error itself.
    chosen = chosen.split("\\n", 1)[0]
    message = " ".join(LOG_PREFIX.sub("", chosen).strip().strip('"').split())
    return message if len(message) <= width else message[:width] + " ..."


def exit_summary(code: int, text: str) -> str:
    """How a server that exited with `code` ended, on one line, with its log's error or last
    line."""
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit status {code}"
    error = error_summary(text, width=120)
    if error:
        return f"{how}; its log says: {error}"
    last = last_line(text)
    return f"{how}; last log line: {last}" if last else how


def last_line(text: str, width: int = 120) -> str | None:
    """The log's last line that says something (not the option table, not the command line)."""
    for line in reversed(text.splitlines()):
        line = " ".join(LOG_PREFIX.sub("", line).strip().strip('"').split())
        if line and line[0] not in "|+$":
            return line if len(line) <= width else line[:width] + " ..."
    return None


def port_conflict(text: str) -> str | None:
    """Which listener ("http" or "grpc") could not bind its port, from the server log."""
    for line in text.splitlines():
        lowered = line.lower()
        if "already in use" in lowered or "address in use" in lowered:
            if "grpc" in lowered or "chttp2" in lowered:
                return "grpc"
            if "http" in lowered:
                return "http"
    return None
