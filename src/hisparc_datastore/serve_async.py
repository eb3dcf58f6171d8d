"""The async worker: an ASGI application under gunicorn, with the threaded worker's guards.

The upload function is served this way (``WORKER_TYPE=async``, the default for a
function that names an ASGI application; :mod:`hisparc_datastore.serve`): gunicorn's
arbiter as before (signals, worker restarts, the metrics server, TLS settings), and in
each worker uvicorn's HTTP on uvloop and httptools, where a request that waits for its
body or for the bucket is a coroutine rather than a thread.  That is what brings a
one-event upload's CPU to the reference datastore's (docs/PERFORMANCE.md, "The
single-event upload").

uvicorn alone lacks three of the guards the threaded worker has (docs/SECURITY.md R2, R4);
:class:`GuardedHttpProtocol` adds them on top of uvicorn's httptools protocol:

- **Idle timeout in the request line and headers.**  uvicorn waits for a request's head
  for ever: a client that connects and sends nothing, or stops halfway through its
  headers, keeps its connection open.  Here a connection is closed, without an answer,
  when no byte of a request's head has arrived for ``idle_timeout`` seconds, counted from
  the accept for a new connection.  Between requests uvicorn's keep-alive timeout applies
  (``KEEPALIVE_SECONDS``, longer than Knative's queue-proxy holds idle connections).  A
  stalled *body* is the application's to time out (the upload's ``asgi_application``
  answers ``400`` after the same idle time), since only it knows it is waiting.
- **gunicorn's request limits**: a request line over ``limit_request_line`` bytes is
  answered 414, more than ``limit_request_fields`` header fields or one over
  ``limit_request_field_size`` bytes 431, before the application is called; a head that
  grows beyond what those limits allow in total is refused as soon as it does, so httptools
  never holds more of it.
- **A request body left unread ends the connection, after the answer.**  uvicorn would
  keep such a connection alive and read the rest of the body as the next request.  Here
  the answer is sent, the sending side is shut down (the client sees the answer and a
  FIN), and what the client still sends is read and dropped until it stops for
  ``idle_timeout`` or closes, at most :data:`DISCARD_LIMIT` bytes; closing at once while
  request bytes are still arriving would make the kernel reset the connection, and the
  client could lose the answer.  Over TLS, which cannot half-close, the connection is
  closed after the answer.

Everything else is uvicorn's: parsing, pipelining, flow control, graceful shutdown (in-flight
requests finish, idle connections close) on the arbiter's SIGTERM.  The subclass relies on
uvicorn's protocol attributes (``parser``, ``cycle``, ``url``, ``headers``, ``transport``),
pinned by the upload lock and covered by tests/test_serve.py against the real server.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

#: At most this much of a request body that the answer left unread is read and dropped
#: before the connection is closed anyway.
DISCARD_LIMIT = 64 * 1024 * 1024
#: The version's bytes in a request line ("HTTP/1.1") and the two spaces around the target.
_LINE_OVERHEAD = len(" ") + len(" HTTP/1.1")


class _Refused(Exception):
    """A request over one of the limits, raised inside a parser callback."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with an idle timeout on request heads, gunicorn's
    request limits, and a clean end for connections whose request body was left unread."""

    idle_timeout: ClassVar[float] = 30.0
    limit_request_line: ClassVar[int] = 4094
    limit_request_fields: ClassVar[int] = 100
    limit_request_field_size: ClassVar[int] = 8190

    _idle: asyncio.TimerHandle | None = None
    #: Between the first byte of a request and the end of its headers: silence here is a
    #: stalled client.
    _in_head: bool = False
    _head_bytes: int = 0
    _header_fields: int = 0
    _refused: _Refused | None = None
    #: A refusal to send once the requests before it are answered.
    _waiting_refusal: _Refused | None = None
    #: Dropping what remains of an unread body, after the answer and a half-close.
    _discarding: bool = False
    _discarded: int = 0

    @classmethod
    def head_limit(cls) -> int:
        """The most a request head may take within the line and field limits."""
        return (cls.limit_request_line + 2
                + cls.limit_request_fields * (cls.limit_request_field_size + 2) + 2)

    # --- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_idle()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._discarding:
            self._discarded += len(data)
            if self._discarded > DISCARD_LIMIT:
                self.transport.close()
            else:
                self._arm_idle()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # no upgrades here; uvicorn's warning
        except httptools.HttpParserError as exc:
            self._refuse_after_answers(self._refused or _Refused(
                HTTPStatus.BAD_REQUEST, f"invalid HTTP request: {exc}"))
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.head_limit():
                self._refuse_after_answers(_Refused(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"request head over {self.head_limit()} bytes"))
                return
            self._arm_idle()  # each byte of a head restarts its idle time
        elif self.cycle is None or self.cycle.response_complete:
            # Bytes but no request begun (blank lines before one): uvicorn has just
            # stopped its keep-alive timer, so the idle timeout must hold the connection.
            self._arm_idle()

    # --- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._header_fields = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        method = self.parser.get_method() or b""
        if len(method) + len(self.url) + _LINE_OVERHEAD > self.limit_request_line:
            self._raise(HTTPStatus.REQUEST_URI_TOO_LONG,
                        f"request line over {self.limit_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_fields += 1
        if self._header_fields > self.limit_request_fields:
            self._raise(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                        f"more than {self.limit_request_fields} header fields")
        if len(name) + len(value) + 2 > self.limit_request_field_size:
            self._raise(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                        f"a header field over {self.limit_request_field_size} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_idle()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # The cycle answered is self.cycle unless requests wait in the pipeline: then it
        # is an earlier one, whose body the parser has read to its end.
        cycle = None if self.pipeline else self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            self._end_after_unread_body()
        super().on_response_complete()
        if self._waiting_refusal is not None and not self._answering():
            refused, self._waiting_refusal = self._waiting_refusal, None
            self._refuse(refused)

    # --- helpers -------------------------------------------------------------------------

    def _raise(self, status: HTTPStatus, reason: str) -> None:
        # httptools turns an exception in a callback into HttpParserCallbackError, which
        # data_received answers with the status kept here.
        self._refused = _Refused(status, reason)
        raise self._refused

    def _answering(self) -> bool:
        """Whether a request already read is still being answered (or waits its turn)."""
        return bool(self.pipeline) or (self.cycle is not None
                                       and not self.cycle.response_complete)

    def _refuse_after_answers(self, refused: _Refused) -> None:
        """Refuse now, or once the requests read before the refused one are answered.

        Bytes that fail to parse can follow a complete request whose answer is still being
        made (pipelining, or a body longer than its Content-Length); that request gets its
        answer first, then the refusal, as gunicorn's threaded worker answers them.
        """
        if self._answering():
            self._waiting_refusal = refused
            self.flow.pause_reading()
        else:
            self._refuse(refused)

    def _refuse(self, refused: _Refused) -> None:
        """Answer a request the parser or the limits refused, and close (as gunicorn does)."""
        self._cancel_idle()
        self._unset_keepalive_if_required()
        self.logger.info("request refused (%d): %s", refused.status, refused.reason)
        body = refused.status.phrase.encode("ascii")
        head = (f"HTTP/1.1 {refused.status.value} {refused.status.phrase}\r\n"
                f"content-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode("ascii") + body)
        self._end_after_unread_body()

    def _end_after_unread_body(self) -> None:
        """Half-close after the answer and drop what the client still sends (docstring)."""
        self._discarding = True
        if not self.transport.can_write_eof():  # TLS: no half-close
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self._arm_idle()

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self._idle = self.loop.call_later(self.idle_timeout, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _idle_expired(self) -> None:
        self._idle = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self._discarding:
            self._arm_idle()  # a request is being answered: its own timeouts apply
            return
        if not self.transport.is_closing():
            if not self._discarding:
                self.logger.info("connection closed: the client was idle (%s)",
                                 "in a request's head" if self._in_head
                                 else "before sending a request")
            self.transport.close()


class GuardedUvicornWorker(UvicornWorker):
    """uvicorn's gunicorn worker on uvloop and httptools with :class:`GuardedHttpProtocol`.

    Made per launch by :func:`worker_class` (gunicorn takes a class, not an instance).
    """

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "uvloop", "http": GuardedHttpProtocol, "ws": "none", "lifespan": "on",
        "server_header": False,
        # X-Forwarded-* are not read: no answer depends on the client's address, and the
        # middleware would run for every request.
        "proxy_headers": False,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # gunicorn's connection limit per worker (its worker_connections), as the threaded
        # worker has it; past it uvicorn answers 503, which a station resends later.
        self.config.limit_concurrency = self.cfg.worker_connections


def worker_class(idle_timeout: float, limit_request_line: int, limit_request_fields: int,
                 limit_request_field_size: int) -> type[GuardedUvicornWorker]:
    """The worker class with these guards."""
    protocol = type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "idle_timeout": idle_timeout,
        "limit_request_line": limit_request_line,
        "limit_request_fields": limit_request_fields,
        "limit_request_field_size": limit_request_field_size,
    })
    return type("GuardedUvicornWorker", (GuardedUvicornWorker,), {
        "CONFIG_KWARGS": GuardedUvicornWorker.CONFIG_KWARGS | {"http": protocol},
    })

