"""How a benchmark's requests travel: where they go (`Target`), a minimal keep-alive HTTP/1.1
connection that posts prebuilt bytes (``http.client`` costs five times more CPU per request), and
a gRPC channel that sends serialised requests as they are."""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass

__all__ = ["GrpcClient", "HttpConnection", "Target", "http_error"]

_GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class Target:
    """Where requests go. ``http``: ``host``/``port``/``path`` (+ ``tls``); ``grpc``: ``grpc_target``."""

    protocol: str  # "http" (Triton HTTP and Vertex AI rawPredict) or "grpc"
    host: str = ""
    port: int = 0
    path: str = "/"
    tls: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # never printed: may hold a bearer token
    grpc_target: str = ""

    def describe(self) -> str:
        if self.protocol == "grpc":
            return f"grpc{'s' if self.tls else ''}://{self.grpc_target}"
        return f"http{'s' if self.tls else ''}://{self.host}:{self.port}{self.path}"



class _Closed(ConnectionError):
    """The server closed the connection before a whole response arrived."""


class HttpConnection:
    """A minimal keep-alive HTTP/1.1 client: one POST of prebuilt bytes, one response."""

    def __init__(self, target: Target, timeout_s: float):
        self.target = target
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.buffer = b""

    def message(self, body: bytes) -> bytes:
        """The whole request (request line, headers, body) for ``body``."""
        head = [f"POST {self.target.path} HTTP/1.1", f"Host: {self.target.host}:{self.target.port}"]
        head += [f"{k}: {v}" for k, v in self.target.headers]
        head += [f"Content-Length: {len(body)}", "", ""]
        return "\r\n".join(head).encode("latin-1") + body

    def connect(self) -> None:
        sock = socket.create_connection((self.target.host, self.target.port), self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.target.tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.target.host)
        sock.settimeout(self.timeout_s)
        self.sock, self.buffer = sock, b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock, self.buffer = None, b""

    def post(self, message: bytes) -> tuple[int, bytes]:
        """Send ``message``; return (status, body). A reused connection that the server had
        closed is reopened once (inference requests are idempotent)."""
        reused = self.sock is not None
        if not reused:
            self.connect()
        try:
            self.sock.sendall(message)
            return self._response(time.monotonic() + self.timeout_s)
        except _Closed:
            self.close()
            if not reused:
                raise
        except BaseException:
            self.close()
            raise
        self.connect()
        try:
            self.sock.sendall(message)
            return self._response(time.monotonic() + self.timeout_s)
        except BaseException:
            self.close()
            raise

    def _recv(self, deadline: float) -> bytes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {self.timeout_s:g} s")
        try:
            chunk = self.sock.recv(_READ_CHUNK)
        except TimeoutError:
            raise TimeoutError(f"timed out after {self.timeout_s:g} s") from None
        return chunk

    def _response(self, deadline: float) -> tuple[int, bytes]:
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            chunk = self._recv(deadline)
            if not chunk:
                raise _Closed("connection closed by the server")
            buffer += chunk
        head, buffer = buffer[:end].decode("latin-1"), buffer[end + 4 :]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionError(f"not an HTTP response: {lines[0][:80]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(buffer) < length:
                chunk = self._recv(deadline)
                if not chunk:
                    raise ConnectionError("connection closed in the middle of a response")
                buffer += chunk
            body, self.buffer = buffer[:length], buffer[length:]
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body, self.buffer = self._chunked(buffer, deadline)
        else:  # body runs to the end of the connection
            while chunk := self._recv(deadline):
                buffer += chunk
            body, self.buffer = buffer, b""
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def _chunked(self, buffer: bytes, deadline: float) -> tuple[bytes, bytes]:
        body = b""
        while True:
            while (end := buffer.find(b"\r\n")) < 0:
                buffer += self._need(deadline)
            size = int(buffer[:end].split(b";")[0], 16)
            buffer = buffer[end + 2 :]
            while len(buffer) < size + 2:
                buffer += self._need(deadline)
            body, buffer = body + buffer[:size], buffer[size + 2 :]
            if size == 0:
                return body, buffer

    def _need(self, deadline: float) -> bytes:
        chunk = self._recv(deadline)
        if not chunk:
            raise ConnectionError("connection closed in the middle of a response")
        return chunk


def http_error(status: int, body: bytes) -> str:
    """One line for a failed HTTP answer: the status and the server's own error text."""
    text = body[:2000].decode("utf-8", "replace").strip()
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            detail = parsed.get("error")
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
            text = str(detail) if detail else text
    except ValueError:
        pass
    text = " ".join(text.split())[:300]
    return f"HTTP {status}" + (f": {text}" if text else "")


class GrpcClient:
    """One channel per client process, shared by its threads: concurrent calls are HTTP/2 streams
    on one connection, as in a gRPC client application."""

    def __init__(self, target: Target, timeout_s: float):
        import grpc

        self.grpc, self.timeout_s = grpc, timeout_s
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        if target.tls:
            credentials = grpc.ssl_channel_credentials()
            self.channel = grpc.secure_channel(target.grpc_target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(target.grpc_target, options)
        # No serialisers: the request is sent as the bytes given, the answer comes back as bytes.
        self.infer = self.channel.unary_unary(_GRPC_INFER)
        self.metadata = tuple((k.lower(), v) for k, v in target.headers) or None

    def connect(self) -> None:
        try:  # before the clock starts; a failure shows on the first request
            self.grpc.channel_ready_future(self.channel).result(timeout=min(self.timeout_s, 5.0))
        except Exception:  # noqa: BLE001, S110
            pass

    def send(self, payload: bytes) -> None:
        try:
            self.infer(payload, timeout=self.timeout_s, metadata=self.metadata)
        except self.grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            if code == self.grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"timed out after {self.timeout_s:g} s") from None
            name = code.name if code is not None else "error"
            raise ConnectionError(f"gRPC {name}: {' '.join(str(details).split())[:300]}") from None

    def close(self) -> None:
        self.channel.close()
