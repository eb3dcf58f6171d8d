"""HTTP entry point of the upload function: ``functions-framework --target upload``.

A thin shell around :func:`hisparc_datastore.upload.handle_upload`: it reads the body
within ``[Upload] max_body_bytes``, calls the core, and turns the answer into the
protocol's ``text/plain`` response with one log line.  Decisions made here:

- The shell comes in three wrappers that answer alike (status, body, ``Content-Type``, a
  ``Content-Length`` or none; tests/test_upload_wsgi.py compares them request by request):
  :func:`asgi_application`, what the image's launcher (:mod:`hisparc_datastore.serve`)
  serves with its async worker because ``upload.asgi_app`` names it: a request waiting
  for its body or for the bucket is a coroutine, not a thread, and the put is awaited;
  :func:`application`, a plain WSGI application over the request's environ
  (:func:`serve_request`), which the launcher serves with gunicorn's threaded worker when
  ``WORKER_TYPE=threads`` (the way back, should the async worker misbehave); and
  :func:`upload`, the functions-framework function (``functions-framework --target
  upload``, for development).  Flask's dispatch (request and app contexts, routing, hooks,
  response conversion) cost more per request than everything the function does for a
  one-event batch but its decoding (docs/PERFORMANCE.md, "The single-event upload"), so
  the other two do only what of it the upload needs: the body read within the limit,
  ``Content-Type`` and ``Content-Length`` headers, no body for ``HEAD``, and
  functions-framework's ``404`` for ``/robots.txt`` and ``/favicon.ico``.

- Configuration is loaded when the module is imported, which functions-framework does
  before it starts serving: a bad or missing key stops the process with a message naming
  the key, instead of a function that answers every station with an error.
- Before that, the decoder checks itself on this interpreter
  (:func:`hisparc_datastore.format.payload.self_check`): an interpreter that decodes wrongly
  (CPython 3.11.0-3.11.4 refused every Python 3 pickle with a trace) stops the process
  with a message naming its version, instead of answering stations ``208`` for batches
  they would then resend for ever.
- A body whose Content-Length is over the limit is refused before any of it is read,
  with HTTP 413 and the body ``400`` (stations read only the body; ``400`` is the spec's
  "body unreadable").  The response is streamed (no Content-Length) so
  functions-framework's after-request hook does not read the body after all; gunicorn
  drains or closes the connection.  Bodies without a length (chunked) are read up to the
  limit plus one byte.
- GET and HEAD answer a one-line description (a cheap liveness probe that touches no
  bucket); other methods are answered ``400`` with HTTP 405.  Only a POST body is ever
  read: every other answer is streamed, so no body is read behind the limit's back.
- An unexpected exception is logged as one error line (its traceback only at debug
  level) and answered ``205`` ("transaction failed" in the reference's list) with HTTP
  503: never a 500 page or a traceback to the client, and like every non-``100`` answer
  it makes the station resend the batch later.  That holds for the counting and logging
  after the answer too.
- The bucket (:class:`~hisparc_datastore.storage.store.Bucket`, on obstore) is made at
  import; each worker process opens its own client on its first request.  Its timeouts
  are short (``BUCKET_OPTIONS``), so a slow bucket is answered ``404`` with HTTP 503 in
  seconds, inside the stations' patience.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import flask
import functions_framework
from werkzeug.exceptions import NotFound
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length, get_input_stream

from hisparc_datastore import metrics
from hisparc_datastore.config import ConfigError, Settings, load_settings
from hisparc_datastore.format import payload
from hisparc_datastore.logs import setup_logging
from hisparc_datastore.serve import DEFAULT_IDLE_TIMEOUT, IDLE_TIMEOUT_ENV
from hisparc_datastore.stations import StationList
from hisparc_datastore.storage.store import Bucket, BucketError
from hisparc_datastore.upload import protocol as core

log = logging.getLogger("hisparc_datastore.upload.protocol")

DESCRIPTION = (
    "HiSPARC datastore upload endpoint: POST station_id, password, data and checksum "
    "as a form.\n"
)
READ_CHUNK = 1 << 20
MIMETYPE = "text/plain"
#: What ``flask.Response(..., mimetype=MIMETYPE)`` sends.
CONTENT_TYPE = "text/plain; charset=utf-8"
#: Paths functions-framework answers 404 itself, before the function.
NOT_ROUTED = frozenset({"/robots.txt", "/favicon.ico"})

# The bucket client must give up well within the stations' patience (PySPARC waits 10 s):
# a put that cannot finish in time is answered 404 and resent by the station.  One retry
# of a transient failure, within 4 s; each request at most 3 s.
BUCKET_OPTIONS = {"connect_timeout": 1.0, "read_timeout": 3.0, "max_attempts": 2,
                  "retry_seconds": 4.0}


def _store(settings: Settings) -> Bucket:
    return Bucket.from_settings(settings, **BUCKET_OPTIONS)


def _check_decoder() -> None:
    """Stop the start on an interpreter that decodes wrongly (see the module docstring)."""
    try:
        payload.self_check()
    except RuntimeError as exc:
        raise SystemExit(f"upload function: {exc}") from None


def _load() -> tuple[Settings, StationList]:
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise SystemExit(f"upload function: configuration error: {exc}") from None
    setup_logging(settings)
    if not settings.station_list.is_file():
        raise SystemExit(
            f"upload function: configuration error: [General] station_list = "
            f"{settings.station_list} is not a file"
        )
    return settings, StationList(settings.station_list)


_check_decoder()
SETTINGS, STATIONS = _load()

# Made before gunicorn forks its workers; the S3 client inside is made per process on
# first use (obstore is not fork-safe once it has made a request), shared by the threads.
STORE = _store(SETTINGS)


def _read_body(stream: Any, limit: int) -> bytes | None:
    """The whole body, or None once it grows past ``limit`` (the rest stays unread)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(READ_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None


def _answer(environ: dict[str, Any], stream: Callable[[], Any] | None
            ) -> tuple[core.UploadAnswer, bool]:
    """The core's answer to a POST, and whether the body was left unread."""
    limit = SETTINGS.max_body_bytes
    length = get_content_length(environ)  # as flask.Request.content_length reads it
    if length is not None and length > limit:
        return core.too_large(length, limit), True
    try:
        # flask.Request.stream: the server's own stream when it ends the body itself
        # (gunicorn does, chunked bodies too), else one limited to Content-Length.
        body = _read_body(stream() if stream else get_input_stream(environ), limit)
    except Exception as exc:  # client went away, bad chunking: the body is unreadable
        return core.UploadAnswer(
            code=core.BAD_REQUEST, reason=f"body unreadable: {type(exc).__name__}"
        ), True
    if body is None:
        return core.too_large(None, limit), True
    answer = core.handle_upload(
        body,
        environ.get("CONTENT_TYPE", ""),
        STATIONS,
        STORE,
        SETTINGS.minimum_year,
        dt.datetime.now(dt.UTC),
    )
    return answer, False


def serve_request(environ: dict[str, Any], stream: Callable[[], Any] | None = None
                  ) -> tuple[str, int, bool]:
    """One request's answer: the body text, the HTTP status, and whether to stream it.

    Streamed answers (no Content-Length) are those that leave the request body unread.
    ``stream`` gives the body's stream when something else reads it too (Flask's
    ``request.stream``, which functions-framework reads again after the function); by
    default it is werkzeug's over the environ, as Flask's would be.
    """
    method = environ.get("REQUEST_METHOD", "")
    if method in ("GET", "HEAD"):
        return DESCRIPTION, 200, True  # a GET body is never read
    started = time.perf_counter()
    try:
        answer, unread = _not_post(method) or _answer(environ, stream)
    except Exception as exc:
        answer, unread = _unexpected(exc)
    return _finished(answer, unread, started)


def _not_post(method: str) -> tuple[core.UploadAnswer, bool] | None:
    if method == "POST":
        return None
    return core.UploadAnswer(
        code=core.BAD_REQUEST, http_status=405, reason=f"method {method}"
    ), True


def _unexpected(exc: Exception) -> tuple[core.UploadAnswer, bool]:
    """A defect of ours: one error line, the trace at debug level only; ``205``."""
    log.error("upload failed unexpectedly (answered %s): %s: %s",
              core.TRANSACTION_FAILED, type(exc).__name__, exc)
    log.debug("upload failure detail", exc_info=True)
    return core.UploadAnswer(
        code=core.TRANSACTION_FAILED, http_status=503, reason="internal error"
    ), True


def _finished(answer: core.UploadAnswer, unread: bool, started: float
              ) -> tuple[str, int, bool]:
    seconds = time.perf_counter() - started
    _count(answer, seconds)
    _log(answer, seconds * 1000)
    return answer.code, answer.http_status, unread


def _log(answer: core.UploadAnswer, milliseconds: float) -> None:
    """The request's one log line, as ``log.log(level, line, extra={"fields": ...})``
    would make it, without looking up the caller's file and line (no format uses them)."""
    level = logging.INFO if answer.http_status < 500 else logging.WARNING
    if log.isEnabledFor(level):
        log.handle(log.makeRecord(
            log.name, level, __file__, 0, core.log_line(answer, milliseconds), (), None,
            "serve_request", {"fields": core.log_fields(answer, milliseconds)}))


def _served(environ: dict[str, Any], stream: Callable[[], Any] | None = None
            ) -> tuple[str, int, bool]:
    """:func:`serve_request`, with ``205``/HTTP 503 should counting or logging fail."""
    try:
        return serve_request(environ, stream)
    except Exception as exc:
        return _failed_after_answer(exc)


def _failed_after_answer(exc: Exception) -> tuple[str, int, bool]:
    """Counting or logging failed once the answer was decided: ``205``, HTTP 503."""
    with contextlib.suppress(Exception):
        log.error("upload failed after its answer (answered %s): %s: %s",
                  core.TRANSACTION_FAILED, type(exc).__name__, exc)
    return core.TRANSACTION_FAILED, 503, True


def _response(text: str, streamed: bool) -> tuple[bytes, list[tuple[str, str]]]:
    """The answer's body and headers: a Content-Length unless the answer is streamed."""
    body = text.encode("ascii")
    headers = [("Content-Type", CONTENT_TYPE)]
    if not streamed:
        headers.append(("Content-Length", str(len(body))))
    return body, headers


#: Status lines as werkzeug writes them, for every status the function answers.
_STATUS_LINES = {status: f"{status} {HTTP_STATUS_CODES[status].upper()}"
                 for status in (200, 405, 413, 503)}


def application(
    environ: dict[str, Any], start_response: Callable[[str, list[tuple[str, str]]], Any]
) -> Iterable[bytes]:
    """The upload function as a plain WSGI application: what the image's launcher serves.

    It answers what :func:`upload` answers under functions-framework, byte for byte.
    """
    if environ.get("PATH_INFO") in NOT_ROUTED:
        return NotFound(description="Not Found")(environ, start_response)
    text, status, streamed = _served(environ)
    body, headers = _response(text, streamed)
    start_response(_STATUS_LINES[status], headers)
    return () if environ.get("REQUEST_METHOD") == "HEAD" else (body,)


@functions_framework.http
def upload(request: flask.Request) -> flask.Response:
    """Answer a station's POST with one protocol code as text/plain."""
    text, status, streamed = _served(request.environ, lambda: request.stream)
    content = iter([text.encode("ascii")]) if streamed else text
    return flask.Response(content, status=status, mimetype=MIMETYPE)


#: With WORKER_TYPE=threads the launcher serves this instead of functions-framework's
#: Flask app (the docstring).
upload.wsgi_app = application  # type: ignore[attr-defined]


# --- the same function as an ASGI application -----------------------------------------

#: How long a body read may wait for the next bytes: the launcher's idle timeout.
BODY_IDLE_SECONDS = float(os.environ.get(IDLE_TIMEOUT_ENV, str(DEFAULT_IDLE_TIMEOUT)))

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def asgi_application(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """The upload function as an ASGI application, answering what :func:`application`
    answers (status, body, ``Content-Type``, a ``Content-Length`` or none), with the put
    made by :meth:`~hisparc_datastore.storage.store.Bucket.put_async`.

    What the image serves (the launcher's async worker, :mod:`hisparc_datastore.serve_async`).
    It costs about the reference's CPU per one-event upload, where the threaded worker
    costs 1.1-1.2x (docs/PERFORMANCE.md, "The single-event upload").  Each read of the
    body waits at most ``IDLE_TIMEOUT_SECONDS`` for the client: only the application
    knows it is waiting for a body, so this is the async worker's stalled-body guard.
    """
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    method = scope["method"]
    if scope["path"] in NOT_ROUTED:
        page = NotFound(description="Not Found").get_response()
        await _respond(send, page.status_code, list(page.headers.items()),
                       b"" if method == "HEAD" else page.get_data())
        return
    text, status, streamed = await _served_asgi(scope, receive)
    body, headers = _response(text, streamed)
    await _respond(send, status, headers, b"" if method == "HEAD" else body)


async def _served_asgi(scope: dict[str, Any], receive: Receive) -> tuple[str, int, bool]:
    """:func:`_served` for the ASGI application."""
    try:
        method = scope["method"]
        if method in ("GET", "HEAD"):
            return DESCRIPTION, 200, True
        started = time.perf_counter()
        try:
            answer, unread = _not_post(method) or await _answer_asgi(scope, receive)
        except Exception as exc:
            answer, unread = _unexpected(exc)
        return _finished(answer, unread, started)
    except Exception as exc:
        return _failed_after_answer(exc)


async def _answer_asgi(scope: dict[str, Any], receive: Receive
                       ) -> tuple[core.UploadAnswer, bool]:
    """:func:`_answer` for the ASGI application: the body from ``receive``, the put awaited."""
    headers = {name.decode("latin-1").lower(): value.decode("latin-1")
               for name, value in scope["headers"]}
    limit = SETTINGS.max_body_bytes
    length = get_content_length({  # werkzeug's reading of the headers, as for WSGI
        "CONTENT_LENGTH": headers.get("content-length", ""),
        "HTTP_TRANSFER_ENCODING": headers.get("transfer-encoding", ""),
    })
    if length is not None and length > limit:
        return core.too_large(length, limit), True
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(BODY_IDLE_SECONDS):  # no task per read, as wait_for
                message = await receive()
        except TimeoutError:
            return core.UploadAnswer(code=core.BAD_REQUEST,
                                     reason="body unreadable: TimeoutError"), True
        if message["type"] == "http.disconnect":
            return core.UploadAnswer(code=core.BAD_REQUEST,
                                     reason="body unreadable: ClientDisconnected"), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return core.too_large(None, limit), True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    verified = core.verify_upload(b"".join(chunks), headers.get("content-type", ""),
                                  STATIONS, SETTINGS.minimum_year, dt.datetime.now(dt.UTC))
    if isinstance(verified, core.UploadAnswer):
        return verified, False
    try:
        await STORE.put_async(verified.key, verified.pickled, verified.metadata)
    except BucketError as exc:
        return verified.failed(exc), False
    return verified.answer, False


async def _respond(send: Send, status: int, headers: list[tuple[str, str]],
                   body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(name.lower().encode("latin-1"), value.encode("latin-1"))
                            for name, value in headers]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop: the module is ready once imported."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


#: The launcher serves this with its async worker (the docstring).
upload.asgi_app = asgi_application  # type: ignore[attr-defined]


def _count(answer: core.UploadAnswer, seconds: float) -> None:
    """The upload's metrics (hisparc_datastore.metrics): answers, sizes, latency, stations."""
    metrics.child(metrics.UPLOADS, answer.code).inc()
    metrics.UPLOAD_SECONDS.observe(seconds)
    metrics.UPLOAD_BYTES.observe(answer.nbytes)
    if answer.code == core.STORED:
        metrics.UPLOAD_EVENTS.observe(answer.events)
        if answer.station is not None:  # a listed station's: their number is bounded
            metrics.child(metrics.STATION_LAST_UPLOAD, str(answer.station)).set(time.time())
