"""Serve a model repository on the bundled ``tritonserver`` until SIGTERM or Ctrl-C (``torchship serve``).

Binds 127.0.0.1 unless told otherwise, waits for readiness within a timeout, keeps model control
closed (the repository is read once, at start), and on SIGTERM / SIGINT stops the server and every
Python-backend stub it started (one process group), leaving no process behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from torchship.components.errors import ServingError, UserInputError
from torchship.components.triton.repository import validate_model_repository
from torchship.components.triton.server import TritonServer
from torchship.components.triton.versions import version_variant

__all__ = ["serve"]

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Stop(BaseException):
    """Raised from the signal handler to abandon a startup in progress."""


def serve(
    repository: str | os.PathLike,
    host: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
    *,
    startup_timeout_s: float = 120.0,
    on_ready: Callable[[TritonServer], None] | None = None,
    log_path: str | os.PathLike | None = None,
    log_verbose: int = 0,
    progress: Callable[[str], None] | None = print,
) -> int:
    """Serve ``repository`` and block until SIGTERM or SIGINT; return the signal number.

    ``http_port`` / ``grpc_port``: fixed ports (``None``: free ones, shown by ``progress`` and on
    the server passed to ``on_ready``). A taken port or a malformed ``config.pbtxt`` raises
    ``UserInputError`` with one line naming it; a server that does not become ready within
    ``startup_timeout_s``, or that dies while serving, raises ``ServingError``. The server is
    stopped (SIGTERM to its process group, then SIGKILL) before this returns or raises. Must run
    in the main thread (it installs the signal handlers, and restores the previous ones).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve() installs signal handlers; call it from the main thread")
    say = progress or (lambda _message: None)
    models = validate_model_repository(Path(repository), load_onnx=False)
    production = [m["name"] for m in models if m["backend"] != "python"]
    if production:
        raise UserInputError(
            f"repository: {', '.join(production)} use platform onnxruntime_onnx, which the bundled "
            "tritonserver lacks (it has the Python backend only); serve a repository built with "
            "backend='python' (the pipeline's local deploy) or run the Triton container"
        )
    server = TritonServer(
        repository, host=host, http_port=http_port, grpc_port=grpc_port,
        startup_timeout_s=startup_timeout_s, log_path=log_path, log_verbose=log_verbose,
    )
    state = {"signal": None, "starting": True}

    def handle(signum: int, _frame) -> None:
        if state["signal"] is not None:
            return  # already stopping; cleanup is bounded, let it finish
        state["signal"] = signum
        if state["starting"]:
            raise _Stop

    previous = {sig: signal.signal(sig, handle) for sig in _STOP_SIGNALS}
    failed = True
    try:
        try:
            server.start()
            state["starting"] = False
            served = ", ".join(f"{m['name']} ({_versions(Path(repository) / m['name'], m)})"
                               for m in models)
            say(f"serving {served} from {server.repository}")
            say(f"  HTTP http://{server.http_url}  gRPC {server.grpc_url}  (Ctrl-C to stop)")
            if on_ready is not None:
                on_ready(server)
            while state["signal"] is None:
                if not server.is_running():
                    raise ServingError(
                        f"tritonserver on {server.repository} exited with status "
                        f"{server.returncode()} while serving (log: {server.log_path})\n"
                        f"{server.log_tail()}"
                    )
                time.sleep(0.2)
        except _Stop:
            pass
        failed = False
    finally:
        state["signal"] = state["signal"] or -1  # later signals: ignored by the handler
        server.stop(_failed=failed)  # a failure keeps the server log its message points at
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say(f"stopped ({signal.Signals(state['signal']).name})")
    return int(state["signal"])


def _versions(model_dir: Path, model: dict) -> str:
    """A model's served versions and the variant each holds: "versions 1 (fp32), 2 (int8)";
    a request without a version gets the last."""
    return "versions " + ", ".join(
        f"{v} ({version_variant(model_dir, v) or 'variant not recorded'})"
        for v in model["versions"])
