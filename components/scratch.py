"""Temporary folders that say who made them, so that what a killed process left is found and
removed: by the Triton watchdog the moment its owner dies, or by the next start (`sweep_stale`).

Each folder is ``<tmp>/torchship-<what>-XXXX`` with an owner record (``.torchship-owner``: the
owner's pid and the kernel's start time of that process, so a reused pid is not taken for the
owner, and the Triton server started there, if any). ``<tmp>`` is the system's temporary folder
when its path is plain ASCII without spaces (Triton's Python backend starts its stubs through a
shell that splits paths at spaces, and their interpreter reads paths as ASCII), else ``/tmp``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torchship.components.files import write_json

__all__ = ["OWNER_FILE", "PREFIX", "group_alive", "killpg", "make_scratch_dir", "owner_alive",
           "process_start",
           "record_server", "safe_path", "scratch_dir", "scratch_root", "sweep_stale"]

PREFIX = "torchship-"
OWNER_FILE = ".torchship-owner"
SHM = Path("/dev/shm")
_SAFE = re.compile(r"^[A-Za-z0-9_./+=@,:-]+$")


def safe_path(path: str | os.PathLike) -> bool:
    """Whether Triton and its stubs can use `path` as it is: ASCII, no space, no shell quoting."""
    return bool(_SAFE.fullmatch(str(path)))


def scratch_root() -> Path:
    """Where scratch folders go: the temporary folder, when its path is safe for Triton."""
    base = Path(tempfile.gettempdir())
    return base if safe_path(base) else Path("/tmp")


def process_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (ticks since boot), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has ended; only its exit status is left
        return None
    return fields[19]


def killpg(pgid: int, sig: int) -> None:
    """Signal a process group that may be gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def owner_alive(record: dict) -> bool:
    """Whether the process a record names is still the one that wrote it."""
    pid, start = record.get("pid"), record.get("start")
    return isinstance(pid, int) and start is not None and process_start(pid) == start


def _write_record(folder: Path, record: dict) -> None:
    write_json(record, folder / OWNER_FILE)


def make_scratch_dir(what: str) -> Path:
    """A new scratch folder owned by this process (the caller removes it)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{what}-", dir=scratch_root()))
    _write_record(folder, {"pid": os.getpid(), "start": process_start(os.getpid())})
    return folder


@contextlib.contextmanager
def scratch_dir(what: str) -> Iterator[Path]:
    """A scratch folder for the block, removed afterwards (or, if this process is killed, by the
    watchdog or the next `sweep_stale`)."""
    folder = make_scratch_dir(what)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def record_server(folder: Path, pid: int) -> None:
    """Note in a scratch folder's record the Triton server started there (for the sweep)."""
    record = _read_record(folder) or {}
    record["server"] = {"pid": pid, "start": process_start(pid)}
    _write_record(folder, record)


def _read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _ours(folder: Path) -> bool:
    """Whether `folder` is a folder (not a link to one) of this user: the only kind swept."""
    try:
        info = folder.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _serves_from(pid: int, folder: Path) -> bool:
    """Whether process `pid` is a tritonserver leading its process group, started in `folder`
    (its backends are there), as `TritonServer` starts one."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        stat_text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    leader = stat_text[stat_text.rindex(")") + 2:].split()[2] == str(pid)
    return leader and words[0].endswith("/tritonserver") and any(
        w.startswith(f"--backend-directory={folder}/") for w in words)


def _stale_servers(folder: Path) -> list[int] | None:
    """The servers still running that `folder`'s records (its own and those of the scratch
    folders inside it) name; None when a folder inside has an owner still alive."""
    servers = []
    for record_file in [folder / OWNER_FILE, *folder.glob(f"**/{PREFIX}*/{OWNER_FILE}")]:
        record = _read_record(record_file.parent)
        if record is None:
            continue
        if record_file.parent != folder and owner_alive(record):
            return None
        server = record.get("server")
        if isinstance(server, dict) and owner_alive(server) and _serves_from(
                server["pid"], record_file.parent):
            servers.append(server["pid"])
    return servers


def sweep_stale(owner_pid: int | None = None) -> list[Path]:
    """Remove the scratch folders whose owner is dead (only those of `owner_pid` when given),
    stopping the server each one (or a scratch folder inside it) records, and the
    shared-memory regions of dead owners' servers; return the folders removed. Left alone: a
    folder without a readable record, a link, another user's folder (not ours to judge), one
    with a folder inside whose owner is alive; and a recorded server is stopped only while its
    pid is still that tritonserver (same start time, its backends in that folder)."""
    removed = []
    roots = {scratch_root(), Path(tempfile.gettempdir())}
    for root in roots:
        for folder in root.glob(PREFIX + "*") if root.is_dir() else ():
            record = _read_record(folder) if _ours(folder) else None
            if record is None or owner_alive(record):
                continue
            if owner_pid is not None and record.get("pid") != owner_pid:
                continue
            servers = _stale_servers(folder)
            if servers is None:  # a process still works in there: the next sweep will do
                continue
            for server in servers:  # the server and its stubs: its process group
                killpg(server, signal.SIGKILL)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    # Triton's Python backend names its regions with the prefix torchship<owner pid>_.
    for region in SHM.glob("torchship*_*") if SHM.is_dir() else ():
        match = re.match(r"torchship(\d+)_", region.name)
        if match and process_start(int(match.group(1))) is None and (
                owner_pid is None or int(match.group(1)) == owner_pid):
            with contextlib.suppress(OSError):
                region.unlink()
    return removed
