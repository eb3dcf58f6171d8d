"""A fault-injecting HTTP proxy on 127.0.0.1, in front of the real S3 server.

Why a proxy and not a mock: the upload function and the writer must meet a bucket that
misbehaves the way a real one does on the wire (refused connections, silence, 5xx
answers, connections cut before or after the server acted), through their real S3
client (:mod:`hisparc_datastore.storage.store`, obstore) and its real retry logic.

The proxy understands just enough HTTP/1.1 to find request and response boundaries
(Content-Length, chunked bodies, HEAD and 204/304 answers without a body), so a fault
can hit one request on a kept-alive connection.  Each request is forwarded on a fresh
upstream connection.  What happens to a request is decided by the current
:class:`Fault` (``proxy.fault = Fault(...)``), optionally only for requests its
``match`` accepts and only ``times`` times:

- ``pass``: forward unchanged;
- ``delay``: wait ``seconds``, then forward;
- ``hang``: read the request and never answer (the client's read timeout decides);
- ``error``: answer ``status`` (500, 503, ...) with an S3 error document, forward nothing;
- ``cut_before``: read the request, close the connection, forward nothing;
- ``cut_after``: forward the request (the server acts on it), close without answering;
- ``truncate``: forward half the request body, then close both sides (a damaged upload);
- ``flip``: forward the request with one byte of its body changed, length kept (damage
  that only a checksum the server verifies can catch);
- ``random``: per request, one of the above drawn by a seeded RNG (``weights``).

``proxy.stop_listening()`` closes the listening socket (connections are refused: the
server is "stopped"); ``start_listening()`` takes the same port again.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Match = Callable[[str, str], bool]

KINDS = ("pass", "delay", "hang", "error", "cut_before", "cut_after", "truncate", "flip")
_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
    b"<Message>injected by faultproxy</Message></Error>"
)


def _always(method: str, path: str) -> bool:
    return True


@dataclass
class Fault:
    """What to do to matching requests; ``times=None`` means every one."""

    kind: str = "pass"
    seconds: float = 0.0
    status: int = 503
    match: Match = _always
    times: int | None = None
    weights: dict[str, float] = field(default_factory=dict)  # for kind="random"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in (*KINDS, "random"):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def decide(self, method: str, path: str) -> str:
        """The kind to apply to this request (``pass`` once ``times`` is used up)."""
        if not self.match(method, path):
            return "pass"
        with self._lock:
            if self.times is not None:
                if self.times <= 0:
                    return "pass"
                self.times -= 1
            if self.kind != "random":
                return self.kind
            kinds = list(self.weights)
            return self._rng.choices(kinds, [self.weights[k] for k in kinds])[0]


class _Closed(Exception):
    """The peer closed the connection."""


class _Reader:
    """Buffered reads of HTTP heads and bodies from one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed
        self.buffer += data

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 1 << 20:
                raise _Closed
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n"

    def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line + b"\r\n"

    def chunked(self) -> bytes:
        """A chunked body, framing included (it is forwarded as it came)."""
        parts = []
        while True:
            size_line = self.line()
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = self.line()
                    parts.append(trailer)
                    if trailer == b"\r\n":
                        return b"".join(parts)
            parts.append(self.exactly(size + 2))

    def rest(self) -> bytes:
        parts = [self.buffer]
        self.buffer = b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                return b"".join(parts)
            parts.append(data)


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    values: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            values[name.strip().lower()] = value.strip()
    return lines[0], values


def _body(reader: _Reader, headers: dict[str, str]) -> bytes | None:
    """The message body by its framing; None when it runs until the connection closes."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return reader.chunked()
    if "content-length" in headers:
        return reader.exactly(int(headers["content-length"]))
    return None


class FaultProxy:
    """``with FaultProxy(upstream_host, upstream_port) as proxy: ... proxy.url``."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        host, _, upstream_port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(upstream_port or 80))
        self.fault = Fault()
        self.port = port
        self.requests = 0  # requests seen
        self.injected: dict[str, int] = {}  # fault kind -> how often it was applied
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self.start_listening()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- listening -------------------------------------------------------------------

    def start_listening(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop_listening(self) -> None:
        """New connections are refused; open ones are cut (a stopped server)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.cut_all()

    def cut_all(self) -> None:
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self._stopping.set()
        self.stop_listening()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            if self._listener is not listener:
                _close(client)
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()

    # -- one client connection ----------------------------------------------------------

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._open.add if add else self._open.discard)(sock)

    def _serve(self, client: socket.socket) -> None:
        self._track(client, True)
        reader = _Reader(client)
        try:
            while True:
                head = reader.head()
                request_line, headers = _headers(head)
                method, path = [*request_line.split(" "), "", ""][:2]
                if headers.get("expect", "").lower() == "100-continue":
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _body(reader, headers) or b""
                with self._lock:
                    self.requests += 1
                kind = self.fault.decide(method, path)
                if kind != "pass":
                    with self._lock:
                        self.injected[kind] = self.injected.get(kind, 0) + 1
                if not self._handle(client, kind, method, head, body):
                    return
                if headers.get("connection", "").lower() == "close":
                    return
        except (_Closed, OSError, ValueError):
            return
        finally:
            self._track(client, False)
            _close(client)

    def _handle(self, client: socket.socket, kind: str, method: str, head: bytes,
                body: bytes) -> bool:
        """Apply ``kind`` to one request; False when the client connection is done."""
        if kind == "delay":
            self._stopping.wait(self.fault.seconds)
        if kind == "hang":
            while not self._stopping.wait(0.5) and self._listener is not None:
                pass
            return False
        if kind == "cut_before":
            return False
        if kind == "error":
            status = self.fault.status
            code = b"SlowDown" if status == 503 else b"InternalError"
            payload = _ERROR_BODY % code
            client.sendall(
                f"HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
            )
            return True
        upstream = socket.create_connection(self.upstream, timeout=60)
        self._track(upstream, True)
        try:
            if kind == "truncate":
                upstream.sendall(head + body[: len(body) // 2])
                time.sleep(0.05)
                return False
            if kind == "flip" and body:
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1:]
            upstream.sendall(head + body)
            response = self._response(_Reader(upstream), method)
            if kind == "cut_after":
                return False
            client.sendall(response)
            return True
        finally:
            self._track(upstream, False)
            _close(upstream)

    @staticmethod
    def _response(reader: _Reader, method: str) -> bytes:
        head = reader.head()
        status_line, headers = _headers(head)
        status = int(status_line.split(" ")[1])
        if status == 100:  # the upstream's answer to Expect: 100-continue; the client had ours
            return FaultProxy._response(reader, method)
        if method == "HEAD" or status in (204, 304):
            return head
        body = _body(reader, headers)
        if body is None:
            body = reader.rest()
        return head + body


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
