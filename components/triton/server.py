"""Run the real ``tritonserver`` binary bundled in the ``nvidia-pytriton`` wheel on a model repository.

The wheel ships Triton with the Python backend only. PyTriton normally drives it through its own
``Triton().bind`` API; here we start the binary directly on a plain model repository, the way the
production Triton container would, so the same repository layout is exercised locally.

What the binary needs to run from a virtual environment is in ``binary``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from torchship.components.errors import ServingError, UserInputError
from torchship.components.scratch import (
    group_alive,
    killpg,
    make_scratch_dir,
    record_server,
    safe_path,
    sweep_stale,
)
from torchship.components.triton.binary import (
    TritonPaths,
    check_port_free,
    connect_host,
    find_tritonserver,
    free_port,
    libpython_dir,
    port_in_use,
    prepend,
)
from torchship.components.triton.config import read_model_config
from torchship.components.triton.logs import (
    FATAL,
    StubWatch,
    error_summary,
    exit_summary,
    log_errors,
    port_conflict,
    stub_crash,
    tail,
)
from torchship.components.watchdog import Watchdog

__all__ = ["TritonServer"]

if TYPE_CHECKING:  # annotations only; no runtime dependency on typing_extensions
    from typing_extensions import Self


class TritonServer:
    """The bundled ``tritonserver`` running on ``repository``, bound to ``host`` (127.0.0.1).

    Use as a context manager::

        with TritonServer(repo) as server:
            client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

    Ports are free ones picked at start unless ``http_port`` / ``grpc_port`` are given; a given
    port that is taken raises ``UserInputError`` naming it. Every ``config.pbtxt`` is parsed before
    the server starts, so a malformed one is one clear error line. Startup waits until the server
    (with strict readiness, i.e. every model) is ready, or raises ``ServingError`` whose first line
    is the server's own reason. Model control is closed: mode ``none`` (the repository is read
    once, at start) and the model-repository API (index, load, unload) needs a key that only this
    object knows. Metrics are off. The server and every Python-backend stub it spawns run in their
    own process group, which is sent SIGTERM and, after ``stop_grace_s``, SIGKILL on exit.

    However this process dies (SIGKILL included), the server does not outlive it: a watchdog
    process (``watchdog``) stops the server's group and removes the workspace. What an earlier
    crash left anyway (servers, scratch folders, shared memory) is removed at the next start. A
    repository whose path Triton's stubs cannot use (a space, non-ASCII letters) is served
    through a link with a plain path, and a stub that crashes fails the start at once.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        startup_timeout_s: float = 60.0,
        stop_grace_s: float = 10.0,
        log_path: str | os.PathLike | None = None,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] | list[str] = (),
    ):
        self.repository = Path(repository).resolve()
        self.host = str(host)
        self._fixed_ports = {"http_port": http_port, "grpc_port": grpc_port}
        for what, port in self._fixed_ports.items():
            if port is not None and not 0 < int(port) < 65536:
                raise UserInputError(f"{what}: {port} is not a TCP port (1-65535)")
        if http_port is not None and http_port == grpc_port:
            raise UserInputError(
                f"grpc_port: {grpc_port} is also the http_port; give the two listeners "
                "different ports"
            )
        self.startup_timeout_s = float(startup_timeout_s)
        self.stop_grace_s = float(stop_grace_s)
        self.log_verbose = int(log_verbose)
        self.extra_args = list(extra_args)
        self._user_log_path = Path(log_path) if log_path is not None else None
        self.log_path: Path | None = self._user_log_path
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.startup_s: float | None = None
        # Header that unlocks the model-repository API (nobody outside this process knows it).
        self.admin_header = {"torchship-admin": secrets.token_hex(16)}
        self._workspace: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._watchdog: Watchdog | None = None
        self._log_file = None

    # -- public API -----------------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        self._require_started()
        return f"{connect_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        self._require_started()
        return f"{connect_host(self.host)}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def exit_reason(self) -> str:
        """How the server exited, on one line: its status and its log's error or last line."""
        code = self.returncode()
        if code is None:
            return "still running" if self._proc is not None else "never started"
        return exit_summary(code, self._log_text())

    def log_tail(self, lines: int = 40) -> str:
        """The error lines of the server log or, when it has none, its last ``lines`` lines."""
        if not self.log_path:
            return "(no server log)"
        try:
            errors = log_errors(self.log_path.read_text(errors="replace"))
        except OSError:
            errors = []
        return "\n".join(errors) if errors else tail(self.log_path, lines)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> TritonServer:
        """Start the server and block until it is ready (or raise ``ServingError``)."""
        if self._proc is not None:
            raise RuntimeError("TritonServer already started")
        if not self.repository.is_dir():
            raise UserInputError(
                f"repository: {self.repository} is not a directory; build a model repository first"
            )
        self._check_configs()
        for what, port in self._fixed_ports.items():
            if port is not None:
                check_port_free(self.host, int(port), what)
        paths = find_tritonserver()
        sweep_stale()  # servers and folders an earlier crash left
        self._workspace = make_scratch_dir("triton")
        try:
            self._watchdog = Watchdog(self.stop_grace_s)
            served = self.repository
            if not safe_path(served):
                served = self._workspace / "repository"
                served.symlink_to(self.repository, target_is_directory=True)
            backends = paths.prepare_backends(self._workspace)
            env = self._environment(paths)
            # Picking a free port and binding it later is racy; retry when another process won.
            for attempt in range(3):
                started = time.monotonic()
                self._launch(paths, served, backends, env, attempt)
                try:
                    self._wait_ready()
                except ServingError:
                    self._terminate()
                    conflict = port_conflict(self._log_text())
                    if conflict is not None:
                        what = f"{conflict}_port"
                        if self._fixed_ports[what] is not None:
                            port = self.http_port if conflict == "http" else self.grpc_port
                            raise UserInputError(port_in_use(what, self.host, port)) from None
                        if attempt < 2:
                            continue
                    raise
                self.startup_s = time.monotonic() - started
                return self
        except BaseException:
            self.stop(_failed=True)
            raise
        raise AssertionError("unreachable")

    def stop(self, _failed: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove the workspace; idempotent."""
        self._terminate()
        if self._workspace is not None:
            if _failed and self._user_log_path is None:
                # Keep the log the error message points at; drop the copied binaries.
                shutil.rmtree(self._workspace / "backends", ignore_errors=True)
            else:
                shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None
        self._proc = None
        if self._watchdog is not None:  # stopped here: the watchdog has nothing to do
            self._watchdog.release()
            self._watchdog = None

    # -- internals ------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self.grpc_port is None:
            raise RuntimeError("TritonServer is not started; use it as a context manager")

    def _check_configs(self) -> None:
        """Parse every ``config.pbtxt`` first: Triton's own complaint is buried in its log."""
        for config_path in sorted(self.repository.glob("*/config.pbtxt")):
            read_model_config(config_path)

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def _environment(self, paths: TritonPaths) -> dict[str, str]:
        env = os.environ.copy()
        env["LD_LIBRARY_PATH"] = prepend(
            env.get("LD_LIBRARY_PATH"), libpython_dir(), str(paths.libs)
        )
        env["PATH"] = prepend(env.get("PATH"), str(Path(sys.prefix) / "bin"))
        # ONNX Runtime / OpenMP inside the stubs: one thread each unless the caller says otherwise.
        env.setdefault("OMP_NUM_THREADS", "1")
        env["TMPDIR"] = str(self._workspace)  # the server writes a .ses file there: gone with it
        env.pop("PYTHONHOME", None)
        # Vertex AI mode switches on from the environment; this server is never that.
        env.pop("AIP_MODE", None)
        return env

    def _pick_ports(self) -> None:
        self.http_port = self._fixed_ports["http_port"] or free_port()
        self.grpc_port = self._fixed_ports["grpc_port"] or free_port()
        while self.grpc_port == self.http_port:
            self.grpc_port = free_port()

    def _launch(self, paths: TritonPaths, served: Path, backends: Path, env: dict[str, str],
                attempt: int):
        self._pick_ports()
        if self._user_log_path is not None:
            self.log_path = self._user_log_path
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.log_path = self._workspace / "tritonserver.log"
        shm_prefix = f"torchship{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        (key, value), = self.admin_header.items()
        cmd = [
            str(paths.binary),
            f"--model-repository={served}",
            "--model-control-mode=none",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--exit-timeout-secs=5",
            "--allow-http=true",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--http-restricted-api=model-repository:{key}={value}",
            "--allow-grpc=true",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--grpc-restricted-protocol=model-repository:{key}={value}",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]
        self._log_file = open(self.log_path, "ab" if attempt else "wb")  # noqa: SIM115
        shown = [c.replace(value, "***") for c in cmd]
        self._log_file.write(("$ " + " ".join(shown) + "\n").encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self._workspace,
            start_new_session=True,  # own process group: the stubs are stopped with it
        )
        record_server(self._workspace, self._proc.pid)
        self._watchdog.watch(self._proc.pid)

    def _failure(self, what: str) -> ServingError:
        """A ``ServingError`` whose first line says what failed and why (the server's reason)."""
        reason = error_summary(self._log_text())
        if reason:  # one line: the reason is the server's own, the rest is in the log
            return ServingError(f"{what}: {reason} (log: {self.log_path})")
        return ServingError(f"{what} (log: {self.log_path})\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + self.startup_timeout_s
        stubs = StubWatch(self._proc.pid)
        client = httpclient.InferenceServerClient(
            self.http_url, connection_timeout=2.0, network_timeout=2.0
        )
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise self._failure(
                        f"tritonserver exited with status {code} while starting on "
                        f"{self.repository}"
                    )
                with contextlib.suppress(Exception):  # not listening yet
                    if client.is_server_ready():
                        return
                text = self._log_text()
                crash = [how for how in (stubs.dead(text), stub_crash(text)) if how]
                if crash:  # Triton would wait for the stub without end
                    raise ServingError(
                        f"a Python-backend stub crashed while tritonserver started on "
                        f"{self.repository}: {'; '.join(crash)} (log: {self.log_path})")
                if any(marker in text for marker in FATAL):
                    # exit-on-error: the server will exit after unloading; no need to wait.
                    raise self._failure(f"tritonserver failed to serve {self.repository}")
                if time.monotonic() > deadline:
                    raise ServingError(
                        f"tritonserver on {self.repository} not ready after "
                        f"{self.startup_timeout_s:.0f} s (log: {self.log_path})\n{self.log_tail()}"
                    )
                time.sleep(0.1)
        finally:
            client.close()

    def _terminate(self) -> None:
        proc = self._proc
        if proc is not None:
            pgid = proc.pid  # start_new_session: the server leads its own group
            if proc.poll() is None:
                killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_grace_s)
                except subprocess.TimeoutExpired:
                    killpg(pgid, signal.SIGKILL)
                    proc.wait(timeout=10)
            # Kill stray stubs (their server gone) and wait until init reaps them: all gone.
            killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
