"""The ``tritonserver`` binary: the one bundled in the ``nvidia-pytriton`` wheel (locally), or a
native Triton install such as NGC's ``/opt/tritonserver`` (the Triton serving image, where the
benchmark and the serving search run on Vertex AI and Kubeflow); where it is, which backends it
has, what it needs to run from a virtual environment, and free and taken ports (its log:
``logs``).

Which one: ``$TORCHSHIP_TRITONSERVER_HOME`` (a folder with ``bin/tritonserver`` and
``backends/``), else ``/opt/tritonserver`` where it has the binary, else the wheel's.

What the wheel's binary needs to run from a virtual environment (see DESIGN.md, "Notes on the
local Triton server"):

* the Python backend directory must hold ``triton_python_backend_stub`` built for the running
  interpreter's version; the wheel keeps one per version under ``python_backend_stubs/``, so we copy
  the backend plus the matching stub into a private workspace (as PyTriton does);
* the interpreter's own ``libpython`` directory first on ``LD_LIBRARY_PATH`` (otherwise the stub links
  the system's libpython and fails with an undefined ``_recursion_count``), and the wheel's
  ``nvidia_pytriton.libs`` on it too (the copied stub and backend lose their ``$ORIGIN`` rpath);
* the virtual environment's ``bin`` first on ``PATH``, so the embedded interpreter of the stub finds
  the venv (``pyvenv.cfg``) and imports its packages (numpy, onnxruntime).

A native install runs as it is, with its own ``backends/`` folder (``onnxruntime``, ``python``,
...): nothing is copied.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path

from torchship.components.errors import UserInputError

__all__ = ["HOME_ENV", "MEASUREMENT_BACKENDS", "TritonPaths", "check_port_free",
           "find_tritonserver", "free_port", "measurement_backend"]

# A native Triton install to use instead of the wheel's binary (the serving image sets it).
HOME_ENV = "TORCHSHIP_TRITONSERVER_HOME"
NGC_HOME = Path("/opt/tritonserver")


class TritonPaths:
    """Locations of a ``tritonserver`` install: the ``nvidia-pytriton`` wheel's (``native``
    False) or a native one such as NGC's ``/opt/tritonserver``."""

    def __init__(self, root: Path, libs: Path, native: bool = False):
        self.root = root  # .../site-packages/pytriton/tritonserver, or /opt/tritonserver
        self.libs = libs  # .../site-packages/nvidia_pytriton.libs, or /opt/tritonserver/lib
        self.native = native

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    @property
    def python_backend(self) -> Path:
        return self.backends / "python"

    @property
    def kind(self) -> str:
        """What the install is, for records: ``native`` or ``nvidia-pytriton``."""
        return "native" if self.native else "nvidia-pytriton"

    def describe(self) -> str:
        return f"{self.binary} ({'native install' if self.native else 'nvidia-pytriton wheel'})"

    def available_backends(self) -> list[str]:
        """The backends this install can load: ``backends/<name>/libtriton_<name>.so``."""
        if not self.backends.is_dir():
            return []
        return sorted(d.name for d in self.backends.iterdir()
                      if (d / f"libtriton_{d.name}.so").is_file())

    def stub(self, version: str) -> Path:
        """The wheel's Python-backend stub for Python ``version``."""
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"

    def prepare_backends(self, workspace: Path) -> Path:
        """The backend directory to start the server with: a native install's own, or, for the
        wheel, a copy in ``workspace`` of its Python backend with the stub for this Python."""
        if self.native:
            return self.backends
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = self.stub(version)
        if not stub.is_file():
            raise UserInputError(
                f"tritonserver: nvidia-pytriton has no Python-backend stub for Python {version} "
                f"(looked for {stub}); use a Python version it supports"
            )
        backends = workspace / "backends"
        python_dir = backends / "python"
        python_dir.mkdir(parents=True)
        for item in self.python_backend.iterdir():
            if item.is_file():
                shutil.copy2(item, python_dir / item.name)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
        return backends


def _native_home() -> Path | None:
    home = os.environ.get(HOME_ENV)
    if home:
        if not os.access(Path(home) / "bin" / "tritonserver", os.X_OK):
            raise UserInputError(
                f"{HOME_ENV}: {home} has no executable bin/tritonserver; point it at a Triton "
                "install (e.g. /opt/tritonserver) or unset it to use nvidia-pytriton's"
            )
        return Path(home)
    return NGC_HOME if os.access(NGC_HOME / "bin" / "tritonserver", os.X_OK) else None


def find_tritonserver() -> TritonPaths:
    """Locate ``tritonserver``: a native install (``$TORCHSHIP_TRITONSERVER_HOME``, else NGC's
    ``/opt/tritonserver``), else the binary shipped inside the ``nvidia-pytriton`` wheel.

    Raises ``UserInputError`` with the fix when there is none or it is incomplete.
    """
    home = _native_home()
    if home is not None:
        return TritonPaths(home, home / "lib", native=True)
    try:
        import pytriton
    except ImportError as exc:
        raise UserInputError(
            "tritonserver: the nvidia-pytriton package is not installed; install it with "
            "`pip install nvidia-pytriton` (Linux x86_64/aarch64, glibc >= 2.35) to serve locally"
        ) from exc
    package_dir = Path(pytriton.__file__).resolve().parent
    paths = TritonPaths(package_dir / "tritonserver", package_dir.parent / "nvidia_pytriton.libs")
    if not os.access(paths.binary, os.X_OK):
        raise UserInputError(
            f"tritonserver: no executable at {paths.binary}; the nvidia-pytriton install looks "
            "incomplete, reinstall it with `pip install --force-reinstall nvidia-pytriton`"
        )
    if not (paths.python_backend / "libtriton_python.so").is_file():
        raise UserInputError(
            f"tritonserver: the Python backend is missing under {paths.python_backend}; reinstall "
            "nvidia-pytriton"
        )
    return paths


# What the benchmark and the serving search measure with: `auto` picks Triton's native ONNX
# Runtime backend (what serves in production) where the tritonserver has it, else the Python
# backend running ONNX Runtime in the stub (nvidia-pytriton's binary has only that one).
MEASUREMENT_BACKENDS = ("auto", "onnxruntime", "python")


def measurement_backend(requested: str = "auto", paths: TritonPaths | None = None) -> str:
    """The backend to build the measured repository with: ``requested``, or for ``auto`` the
    ONNX Runtime backend where ``paths`` (default: ``find_tritonserver()``) has it, else
    ``python``; one line naming the fix when the install lacks the requested one."""
    if requested not in MEASUREMENT_BACKENDS:
        raise UserInputError(f"serving_backend: '{requested}' is not one of "
                             f"{', '.join(MEASUREMENT_BACKENDS)}")
    paths = paths or find_tritonserver()
    have = paths.available_backends()
    if requested == "auto":
        return "onnxruntime" if "onnxruntime" in have else "python"
    if requested not in have:
        raise UserInputError(
            f"serving_backend: '{requested}' is not among the backends of {paths.describe()} "
            f"({', '.join(have) or 'none'}); run in the Triton serving image "
            "(torchship-tritonserver) for onnxruntime, or pass auto"
        )
    return requested


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def libpython_dir() -> str | None:
    """The directory holding the running interpreter's shared libpython, if it has one."""
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if libdir and soname and (Path(libdir) / soname).exists():
        return str(libdir)
    return None


def prepend(value: str | None, *entries: str | None) -> str:
    parts = [e for e in entries if e]
    if value:
        parts.append(value)
    return os.pathsep.join(parts)


def connect_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise ``UserInputError`` (one line, naming the port and the fix) if ``port`` is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port in TIME_WAIT is free for tritonserver too; only a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserInputError(port_in_use(what, host, port)) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UserInputError(
                    f"host: {host} is not an address of this machine; use 127.0.0.1 (the "
                    "default) or 0.0.0.0 to listen on every interface"
                ) from None
            if exc.errno == errno.EACCES:
                raise UserInputError(
                    f"{what}: port {port} needs privileges to bind; use a port above 1023"
                ) from None
            raise


def port_in_use(what: str, host: str, port: int) -> str:
    return (
        f"{what}: port {port} on {host} is already in use; stop the process listening there "
        f"(another tritonserver?) or pass a different --{what.replace('_', '-')}"
    )
