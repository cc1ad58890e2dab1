"""What served a measurement, as the running server says: the result's ``server`` block.

``server_block`` asks a Triton server over its own API (``get_server_metadata``,
``get_model_config`` per model), so the record holds what ran, not what the repository was
meant to hold; ``local_server_block`` adds which ``tritonserver`` binary ran (the process's own
executable, ``/proc/<pid>/exe``, and the install ``find_tritonserver`` names). A question the
server does not answer is recorded as ``null`` with the reason in ``errors``; it never fails the
measurement::

    {"name": "triton", "version": "2.51.0",
     "binary": "/.../tritonserver" | null (a remote server), "kind", "description": how
     torchship found that install (binary.TritonPaths), null for a remote server,
     "models": {model: {"backend": "python", "platform": null, "max_batch_size": 64,
                        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
                        "dynamic_batching": {"max_queue_delay_microseconds": 100,
                                             "preferred_batch_size": [64]} | null} | null},
     "errors": [str]}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torchship.components.benchmark.server import call, triton_client
from torchship.components.errors import one_line
from torchship.components.triton.binary import find_tritonserver

__all__ = ["local_server_block", "model_serving", "server_block", "unanswered_block"]


def model_serving(config: dict[str, Any]) -> dict[str, Any]:
    """The serving fields of one model config as Triton reports it (its HTTP JSON, or gRPC's
    ``as_json``, where 64-bit numbers are strings and default values are left out)."""
    batching = config.get("dynamic_batching")
    return {
        "backend": config.get("backend") or None,
        "platform": config.get("platform") or None,
        "max_batch_size": int(config.get("max_batch_size", 0)),
        "instance_group": [{"count": int(group.get("count", 0)),
                            "kind": group.get("kind", "KIND_AUTO")}
                           for group in config.get("instance_group") or []],
        "dynamic_batching": None if batching is None else {
            "max_queue_delay_microseconds": int(batching.get("max_queue_delay_microseconds", 0)),
            "preferred_batch_size": [int(b) for b in batching.get("preferred_batch_size", [])],
        },
    }


def unanswered_block(why: str) -> dict[str, Any]:
    """The block for an endpoint that has no Triton metadata API to ask (Vertex AI
    ``rawPredict``)."""
    return {"name": None, "version": None, "binary": None, "kind": None, "description": None,
            "models": {}, "errors": [why]}


def server_block(client: Any, protocol: str, models: Sequence[str], *,
                 headers: dict[str, str] | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """The server's name and version and each model's serving config, asked of the running
    server through a tritonclient ``client`` over ``protocol`` ("grpc" or "http")."""
    block = {**unanswered_block(""), "errors": []}
    try:
        meta = call(client, protocol, "get_server_metadata", headers=headers, timeout_s=timeout_s)
        block.update(name=meta.get("name"), version=meta.get("version"))
    except Exception as exc:  # noqa: BLE001 - recorded; the measurement goes on
        block["errors"].append(f"server metadata: {one_line(exc, 200)}")
    for name in models:
        try:
            config = call(client, protocol, "get_model_config", name, headers=headers,
                          timeout_s=timeout_s)
            block["models"][name] = model_serving(config.get("config", config))
        except Exception as exc:  # noqa: BLE001
            block["models"][name] = None
            block["errors"].append(f"model '{name}' config: {one_line(exc, 200)}")
    return block


def _binary(pid: int | None) -> tuple[str | None, str | None, str | None]:
    """The path of the executable process ``pid`` runs (else the one ``find_tritonserver``
    gives), and that install's kind and description (``binary.TritonPaths``)."""
    path = None
    if pid:
        try:
            path = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            pass
    try:
        paths = find_tritonserver()
    except Exception:  # noqa: BLE001 - the server ran; only its description is missing
        return path, None, None
    return path or str(paths.binary), paths.kind, paths.describe()


def local_server_block(server: Any, models: Sequence[str], timeout_s: float = 10.0) -> dict:
    """``server_block`` of a running local ``TritonServer`` (over its HTTP port), with the
    binary that runs it."""
    client = triton_client("http", server.http_url, False, timeout_s)
    try:
        block = server_block(client, "http", models, timeout_s=timeout_s)
    finally:
        client.close()
    block["binary"], block["kind"], block["description"] = _binary(server.pid)
    return block
