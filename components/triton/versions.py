"""Changing a model repository safely: version directories, the versions served, and the deploy
lock. (Atomic writes and directory swaps are `components.files`.)"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torchship.components.contracts import MODEL_ONNX
from torchship.components.errors import ServingError
from torchship.components.files import read_json, write_json

__all__ = ["LOCK_NAME", "SERVING_RECORD", "VERSION_RECORD", "ServingModel", "repository_lock",
           "served_versions", "serving_model", "version_dirs", "version_variant",
           "write_serving_record", "write_version_record"]

LOCK_NAME = ".torchship-deploy.lock"
# Which model the last deploy promoted, at the repository's top (Triton loads folders only).
SERVING_RECORD = "torchship-serving.json"
# In each version folder: which compressed variant that version is. The model's name stays the
# same across retrains (pipeline parameter serving_model_name), so the variant is per version.
VERSION_RECORD = "torchship-version.json"


@dataclass(frozen=True)
class ServingModel:
    """The model version a repository serves now: what a new one must be no worse than."""

    repository: Path
    name: str
    version: int
    variant: str | None = None

    @property
    def onnx_path(self) -> Path:
        return self.repository / self.name / str(self.version) / MODEL_ONNX

    def __str__(self) -> str:
        variant = f" ({self.variant})" if self.variant else ""
        return f"'{self.name}' version {self.version}{variant} in {self.repository}"


def write_serving_record(repository: Path, name: str, version: int,
                         variant: str | None = None) -> None:
    """Say (atomically) which model version the deploy just promoted, and its variant."""
    write_json({"model": name, "version": int(version), "variant": variant},
               Path(repository) / SERVING_RECORD)


def write_version_record(version_dir: Path, variant: str) -> None:
    """Record in a version folder which variant it holds (Triton ignores the file)."""
    write_json({"variant": variant}, Path(version_dir) / VERSION_RECORD)


def version_variant(model_dir: Path, version: int) -> str | None:
    """The variant a version folder holds; None for one written before versions said so."""
    return (read_json(Path(model_dir) / str(version) / VERSION_RECORD) or {}).get("variant")


def serving_model(repository: str | os.PathLike) -> ServingModel | None:
    """The model a repository serves now: the one its last deploy promoted (its record) or, in a
    repository without a record, the model whose config changed last; its newest served version.
    ``None`` for a repository that does not exist or serves nothing."""
    from torchship.components.triton.config import read_model_config

    repository = Path(repository)
    if not repository.is_dir():
        return None
    record = read_json(repository / SERVING_RECORD) or {}
    configs = sorted(repository.glob("*/config.pbtxt"), key=lambda p: p.stat().st_mtime)
    named = [c for c in configs if c.parent.name == record.get("model")]
    for config_path in (named or configs[-1:]):
        model_dir = config_path.parent
        versions = served_versions(read_model_config(config_path), version_dirs(model_dir))
        if versions and (model_dir / str(versions[-1]) / MODEL_ONNX).is_file():
            return ServingModel(repository, model_dir.name, versions[-1],
                                version_variant(model_dir, versions[-1]))
    return None


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
