"""Artifacts appear whole or not at all: atomic files, staged directories published by one
rename, and JSON at a path or an fsspec URI. Every stage writes through these; there is no other
copy of the temporary-file-then-rename dance in torchship."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "STALE_STAGING_S",
    "atomic_file",
    "atomic_path",
    "local_directory",
    "make_staging_dir",
    "publish_dir",
    "read_json",
    "remove_stale_staging",
    "staged_dir",
    "write_bytes",
    "write_json",
    "write_text",
]

# A staging directory in which nothing changed for this long was left by a run that was killed
# (SIGKILL, a lost machine): a live one writes each part as it finishes, in seconds to minutes.
STALE_STAGING_S = 3600.0
# The random part tempfile.mkdtemp puts after a staging directory's prefix.
_MKDTEMP_NAME = re.compile(r"[a-z0-9_]{8}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name (``torch.onnx.export``,
    ``onnx.save``, ``kfp``'s compiler). When the block ends without an error the file replaces
    ``path`` (readable by other users and stages, 0o644); otherwise it is removed and ``path`` is
    as it was. ``durable``: on disk (fsync) before the rename, for files a crash must not leave
    empty (checkpoints, a served config). The temporary name keeps ``path``'s suffix, which some
    writers check."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.",
                               suffix=f".tmp{target.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", *,
                durable: bool = False) -> Iterator[IO[Any]]:
    """``atomic_path``'s temporary file, open in ``mode``: it replaces ``path`` only when the
    block ends without an error."""
    with atomic_path(path, durable=durable) as tmp, open(tmp, mode) as handle:
        yield handle


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, "wb", durable=durable) as handle:
        handle.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, "w", durable=durable) as handle:
        handle.write(text)
    return Path(path)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(document: Any, path_or_uri: str | os.PathLike) -> Path | str:
    """Write ``document`` as indented JSON to a path (atomically) or to an fsspec URI such as
    ``gs://bucket/torchship/record.json`` (object stores write whole objects); return where (a
    ``Path``, or the URI)."""
    text = json.dumps(document, indent=2, default=_json_default) + "\n"
    if "://" in str(path_or_uri):
        import fsspec

        with fsspec.open(str(path_or_uri), "w") as handle:
            handle.write(text)
        return str(path_or_uri)
    return write_text(path_or_uri, text)


def read_json(path_or_uri: str | os.PathLike) -> Any:
    """A JSON document from a path or an fsspec URI (``gs://`` included); ``None`` when absent."""
    uri = str(path_or_uri)
    if "://" not in uri:
        path = Path(uri)
        return json.loads(path.read_text()) if path.is_file() else None
    import fsspec

    try:
        with fsspec.open(uri, "r") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


# -- staged directories ----------------------------------------------------------------------------


def _prefix(destination: Path, kind: str) -> str:
    return f".{destination.name}.{kind}-"


def make_staging_dir(destination: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh directory beside ``destination`` to build it in, before ``publish_dir``. Staging
    directories of ``destination`` that killed runs left behind are removed first."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(destination, kind=kind)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(destination, kind), dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the published artifact is read by others
    return staging


def remove_stale_staging(destination: str | os.PathLike, max_idle_s: float = STALE_STAGING_S,
                         kind: str = "tmp") -> list[Path]:
    """Remove the staging (and retired) directories of ``destination``, and of no other, in which
    nothing has changed for ``max_idle_s``; return them. Those still being written stay."""
    destination = Path(destination)
    prefixes = (_prefix(destination, kind), _prefix(destination, "old"))
    removed = []
    for entry in destination.parent.iterdir():
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None or not _MKDTEMP_NAME.fullmatch(entry.name[len(prefix):]) \
                or not entry.is_dir() or entry.is_symlink():
            continue
        try:
            idle_s = time.time() - _last_change(entry)
        except FileNotFoundError:  # its own run just published or removed it
            continue
        if idle_s >= max_idle_s:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _last_change(directory: Path) -> float:
    """The newest modification time of ``directory`` and of everything under it."""
    newest = directory.stat().st_mtime
    for root, dirs, files in os.walk(directory):
        for name in (*dirs, *files):
            with contextlib.suppress(FileNotFoundError):  # removed while we looked
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def publish_dir(staging: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Move a fully built ``staging`` directory to ``destination``, replacing what was there.

    ``rename`` cannot replace a non-empty directory, so the old one is moved aside first and moved
    back if the second rename fails: ``destination`` is never half old and half new.
    """
    staging, destination = Path(staging), Path(destination)
    if not (destination.is_dir() and any(destination.iterdir())):
        os.replace(staging, destination)  # absent or empty: one rename
        return destination
    retired = destination.with_name(f"{_prefix(destination, 'old')}{uuid.uuid4().hex[:8]}")
    os.replace(destination, retired)
    try:
        os.replace(staging, destination)
    except BaseException:
        os.replace(retired, destination)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return destination


@contextlib.contextmanager
def staged_dir(destination: str | os.PathLike) -> Iterator[Path]:
    """Build ``destination`` in a staging directory: published whole when the block ends, removed
    when it raises (``destination`` then stays as it was)::

        with staged_dir(onnx_dir) as staging:
            write_everything_into(staging)
    """
    staging = make_staging_dir(destination)
    try:
        yield staging
        publish_dir(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def local_directory(uri: str | os.PathLike) -> Iterator[Path]:
    """A directory given as a path or an fsspec URI (``gs://``), as a local path for the block:
    the path itself, or a temporary copy of the remote one (removed afterwards)."""
    text = str(uri)
    if "://" not in text:
        yield Path(text)
        return
    import fsspec

    fs, remote = fsspec.core.url_to_fs(text)
    with tempfile.TemporaryDirectory(prefix="torchship-directory-") as work:
        local = Path(work) / Path(remote.rstrip("/")).name
        fs.get(remote.rstrip("/") + "/", str(local), recursive=True)
        yield local
