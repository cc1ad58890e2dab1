"""Changing a model repository safely: version directories, the versions served, and the deploy
lock. (Atomic writes and directory swaps are `components.files`.)"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from torchship.components.errors import ServingError

__all__ = ["LOCK_NAME", "repository_lock", "served_versions", "version_dirs"]

LOCK_NAME = ".torchship-deploy.lock"


def version_dirs(model_dir: Path) -> list[int]:
    """The numeric version directories of a model (what Triton may load), ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir())


def served_versions(config, available: list[int]) -> list[int]:
    """The versions Triton serves for ``config`` given the version directories on disk."""
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return sorted(available)
    if kind == "specific":
        return sorted(v for v in policy.specific.versions if v in available)
    latest = policy.latest.num_versions if kind == "latest" else 1  # Triton's default: latest 1
    return sorted(available)[-max(1, latest) :]


@contextlib.contextmanager
def repository_lock(repository_dir: Path, timeout_s: float = 900.0) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``<repository>/.torchship-deploy.lock`` (created on demand).

    Two deploys into one repository (threads, processes, or KFP runs on one machine) take turns;
    the kernel drops the lock when its holder dies, so a killed deploy never blocks the next.
    """
    repository_dir = Path(repository_dir)
    repository_dir.mkdir(parents=True, exist_ok=True)
    path = repository_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + float(timeout_s)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    raise ServingError(
                        f"repository: {repository_dir} is locked by another deploy (pid "
                        f"{holder}) for more than {timeout_s:.0f} s; wait for it to finish"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
