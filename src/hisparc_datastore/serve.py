"""``datastore serve``: a function under gunicorn with our limits, as the images run it.

``python -m hisparc_datastore.serve --source functions/upload/main.py --target upload``
builds the WSGI app with functions-framework's own ``create_app`` (so the function stays
a plain ``@functions_framework.http`` function and ``functions-framework --target upload``
keeps working for development) and serves it with gunicorn, like functions-framework's
CLI does, but with our options instead of its fixed ones (docs/SECURITY.md R2, R4, R5).
A function that carries a plain WSGI application of its own as ``wsgi_app`` (the upload
function does) is served through that instead of functions-framework's Flask app, which
would cost more per request than a one-event upload's own work
(:func:`function_app`; docs/PERFORMANCE.md, "The single-event upload"):

- ``limit_request_line`` is gunicorn's 4094 instead of 0 (no limit): parsing a long
  request line costs time that grows about quadratically with its length (8 MiB took
  14 s of CPU).  Over-long lines, header fields and header counts are answered by
  gunicorn with a 4xx before the function is called.
- Every connection gets a socket *idle* timeout (``IDLE_TIMEOUT_SECONDS``, default 30):
  a client that stops sending in the request line, the headers or the body frees its
  thread when no byte has arrived for that long.  gunicorn's gthread worker reads all of
  these with blocking sockets and no deadline, so a handful of stalled clients could hold
  every thread and no station was served.  A stall in the headers closes the connection
  without an answer; a stall in the body reaches the function as a read error, which the
  upload answers ``400`` ("body unreadable").  A slow but steady upload is never cut:
  only silence counts, not the total time (Knative's request timeout bounds that).
- Closing a connection never waits for the client (see :meth:`IdleTimeoutConn.close`):
  gunicorn's own graceful close would let each client that does not close its end hold
  the worker's main thread for 2 s.
- Kept-alive connections stay open ``KEEPALIVE_SECONDS`` (default 100) between requests,
  not gunicorn's 2 s.  Knative's queue-proxy keeps idle upstream connections for up to
  90 s and reuses them; when gunicorn had already closed one, the proxy's request on it
  failed and the client got a 502.  The server must be the side that waits longer.  The
  idle timeout above does not cut such a connection: between requests gunicorn's gthread
  worker parks it in its selector, without a thread and without a socket timeout, and
  closes it there after the keep-alive time; the idle timeout is set again once the next
  request starts arriving (:meth:`IdleTimeoutConn.init`).  A new connection that sends
  nothing at all is parked the same way, but closed after the idle timeout counted from
  its accept, not after the keep-alive time (:meth:`IdleTimeoutWorker.finish_request`).
- ``WORKERS``, ``THREADS``, ``CLOUD_RUN_TIMEOUT_SECONDS``, ``GUNICORN_LOG_LEVEL``,
  ``HOST`` and ``PORT`` are read as functions-framework reads them, with its defaults, so
  the images, manifests and local stack keep their settings.  The worker is always the
  threaded one (also with one thread), because only it gets the idle timeout.

Temporary files (gunicorn's worker heartbeat files) go where Python's :mod:`tempfile`
puts them: ``$TMPDIR``, else ``/tmp``.  With a read-only root filesystem, mount a writable
volume and point ``TMPDIR`` at it (the Knative manifests use ``/scratch``: Knative before
1.13 refuses volumes mounted at ``/tmp``).

Metrics (:mod:`hisparc_datastore.metrics`): before the function is imported, the launcher
points ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory under ``$TMPDIR`` (unless it is
set), so gunicorn's workers share their counters; the arbiter process serves their sum on
``METRICS_HOST``:``METRICS_PORT`` (default 0.0.0.0:9464; ``METRICS_PORT=0`` turns it off),
a port the Knative Services do not route, so stations cannot reach it.  A worker that exits
has its live gauges removed.

HTTPS: with ``TLS_CERT_FILE`` and ``TLS_KEY_FILE`` (PEM) set, gunicorn serves TLS itself.
The deployed functions leave them unset (Knative's gateway ends the stations' TLS);
``datastore local --https`` sets them, so a client can be tried over TLS on one machine.

Graceful shutdown on SIGTERM (in-flight requests finish within gunicorn's
``graceful_timeout``) and the arbiter's signal handling are gunicorn's own.

gunicorn's control socket (gunicorn 25.1 and later, for its ``gunicornc`` tool) is turned
off: nothing here uses it, and its default place, ``$XDG_RUNTIME_DIR`` or
``$HOME/.gunicorn``, cannot be made for the images' user (``HOME=/nonexistent``), so
every start logged ``Control server error``; on a developer's machine every served
function shared one socket path.  An older gunicorn, which has no such
setting, is given none (:data:`NEWER_GUNICORN_SETTINGS`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import functions_framework
import gunicorn.app.base
from gunicorn import util
from gunicorn.glogging import Logger
from gunicorn.http.body import LengthReader
from gunicorn.workers.gthread import TConn, ThreadWorker

IDLE_TIMEOUT_ENV = "IDLE_TIMEOUT_SECONDS"
DEFAULT_IDLE_TIMEOUT = 30.0
KEEPALIVE_ENV = "KEEPALIVE_SECONDS"
#: Above the 90 s for which Knative's queue-proxy keeps an idle upstream connection.
DEFAULT_KEEPALIVE = 100
#: gunicorn's defaults, which functions-framework overrides for the request line only.
LIMIT_REQUEST_LINE = 4094
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190
DEFAULT_HOST = "0.0.0.0"  # noqa: S104 - a container serves on all its interfaces
DEFAULT_PORT = 8080
METRICS_PORT_ENV = "METRICS_PORT"
DEFAULT_METRICS_PORT = 9464
#: HTTPS served by the launcher itself (a local stack's; Knative's gateway ends TLS).
TLS_CERT_ENV = "TLS_CERT_FILE"
TLS_KEY_ENV = "TLS_KEY_FILE"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: At most this much already-received request data is drained when a connection closes.
DRAIN_CHUNK = 64 * 1024
DRAIN_READS = 16
#: The worker tells the arbiter it is alive at most this often (gunicorn: on every turn of
#: its loop, a system call per request; its worker timeout is whole seconds, or none).
HEARTBEAT_SECONDS = 0.5
#: The attribute of a function that names its own WSGI application (:func:`function_app`).
WSGI_APP_ATTRIBUTE = "wsgi_app"
#: ... and its own ASGI application (:func:`function_asgi_app`), served by the async worker.
ASGI_APP_ATTRIBUTE = "asgi_app"
#: Which worker serves the function: ``async`` (its ASGI application, the default where it
#: has one) or ``threads`` (gunicorn's threaded worker with the WSGI application).
WORKER_TYPE_ENV = "WORKER_TYPE"
WORKER_TYPES = ("auto", "async", "threads")
#: Settings only newer gunicorns know, left out where the installed one lacks them.
NEWER_GUNICORN_SETTINGS = frozenset({"control_socket_disable"})  # gunicorn >= 25.1


class IdleTimeoutConn(TConn):
    """A gthread connection whose socket reads and writes give up after ``idle_timeout``.

    gunicorn calls ``init()`` in the worker thread right before it parses each request
    (new or kept-alive), after it has made the socket blocking again; the timeout must be
    set there, because every switch to blocking mode clears it.
    """

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: When the worker accepted the connection (``time.monotonic()``).
    accepted: float = 0.0

    def init(self) -> None:
        super().init()
        self.sock.settimeout(self.idle_timeout)

    def close(self, graceful: bool = False) -> None:
        """Close without waiting for the client.

        gunicorn's graceful close half-closes and then lingers up to 2 s for the client's
        FIN, on the worker's main thread, which accepts and dispatches every connection: a
        client that never closes (a stalled one just timed out, or one that asked for
        ``Connection: close``) stopped the whole worker for 2 s each, one after the other.
        Here the half-close stays (the response ends with a FIN) and only request bytes
        that have already arrived are drained, without waiting, so they do not turn the
        close into a reset that could cost the client its answer.
        """
        if graceful:
            with contextlib.suppress(OSError):  # BlockingIOError: nothing more arrived
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.setblocking(False)
                for _ in range(DRAIN_READS):
                    if not self.sock.recv(DRAIN_CHUNK):
                        break
        util.close(self.sock)


class IdleTimeoutWorker(ThreadWorker):
    """gunicorn's threaded worker, with :class:`IdleTimeoutConn` connections."""

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    _heartbeat: float = float("-inf")

    def notify(self) -> None:
        """gunicorn's heartbeat, at most every :data:`HEARTBEAT_SECONDS`.

        gunicorn's loop touches the heartbeat file on every turn, i.e. about twice per
        request under load; the arbiter only needs it within the worker timeout (whole
        seconds; ``0``, the default here, checks nothing).
        """
        now = time.monotonic()
        if now - self._heartbeat >= HEARTBEAT_SECONDS:
            self._heartbeat = now
            super().notify()

    def enqueue_req(self, conn: TConn) -> None:
        # Every connection passes here before a thread touches it.  Upgrading the
        # instance (rather than copying gunicorn's accept()) keeps the worker's own
        # bookkeeping untouched across gunicorn versions.
        if not isinstance(conn, IdleTimeoutConn):
            conn.__class__ = IdleTimeoutConn
            conn.idle_timeout = self.idle_timeout  # type: ignore[attr-defined]
            conn.accepted = time.monotonic()  # type: ignore[attr-defined]
        super().enqueue_req(conn)

    def _keepalive_after(self, conn: TConn, keepalive: bool) -> bool:
        """gunicorn's (27), without its drain when the application has read the whole body.

        Before a kept-alive connection goes back to the poller gunicorn drains what the
        application left of the body, setting the socket's timeout for the drain and back:
        two system calls per request even when nothing is left, as after every upload.  A
        body of known length read to its end is that case; anything else is gunicorn's.
        """
        if keepalive:
            body = getattr(getattr(conn.parser, "mesg", None), "body", None)
            reader = getattr(body, "reader", None)
            if (isinstance(reader, LengthReader) and reader.length == 0
                    and body.failed is False and body.buf.tell() == 0):
                return True
        return bool(super()._keepalive_after(conn, keepalive))  # type: ignore[misc]

    def finish_request(self, conn: TConn, fs: Any) -> None:
        """gunicorn's, but a connection still silent since its accept gets the idle timeout.

        gunicorn 27 gives a new connection a thread for up to 5 s to send its first byte,
        then parks it in the selector with the *keep-alive* timeout, meant for a client
        between two requests.  With the long keep-alive Knative needs, a client that
        connects and sends nothing would hold its connection for 100 s; it is a stalled
        client, so it gets the idle timeout, counted from its accept.  Each was accepted
        about 5 s before it is parked, so gunicorn's list stays in timeout order (up to
        thread jitter, which at worst closes one a moment late).
        """
        super().finish_request(conn, fs)
        pending = getattr(self, "pending_conns", None)  # older gunicorn: no such list
        if pending and pending[-1] is conn and isinstance(conn, IdleTimeoutConn):
            conn.timeout = min(conn.timeout, conn.accepted + conn.idle_timeout)


class IdleTimeoutLogger(Logger):
    """gunicorn's logger, with an idle client logged as one info line, not a traceback.

    gunicorn logs any socket error but a reset as an exception; an idle timeout is the
    expected end of a stalled client, and a traceback per stall would flood the log.
    Only gunicorn's own I/O reaches this logger: the function's errors are Flask's.
    """

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        if isinstance(sys.exc_info()[1], TimeoutError):
            self.info("connection closed: the client was idle (%s)", msg)
            return
        super().exception(msg, *args, **kwargs)


def worker_class(idle_timeout: float) -> type[IdleTimeoutWorker]:
    """The worker class with this idle timeout (gunicorn takes a class, not an instance)."""
    return type("IdleTimeoutWorker", (IdleTimeoutWorker,), {"idle_timeout": idle_timeout})


@dataclass(frozen=True)
class ServeOptions:
    source: Path
    target: str
    host: str
    port: int
    workers: int
    threads: int
    idle_timeout: float
    worker_timeout: int
    loglevel: str
    keepalive: int = DEFAULT_KEEPALIVE
    metrics_host: str = DEFAULT_HOST
    metrics_port: int = DEFAULT_METRICS_PORT
    #: HTTPS with this certificate chain and key (PEM), or plain HTTP when None.
    tls: tuple[Path, Path] | None = None
    #: One of :data:`WORKER_TYPES`; ``auto`` is ``async`` for a function with an ASGI app.
    worker_type: str = "auto"

    def gunicorn(self, asynchronous: bool = False) -> dict[str, Any]:
        """The gunicorn settings; ``timeout`` is the worker heartbeat, 0 (none) by default.

        ``asynchronous``: the async worker (:mod:`hisparc_datastore.serve_async`) for an
        ASGI application, else the threaded worker for a WSGI one.
        """
        tls = {} if self.tls is None else {"certfile": str(self.tls[0]),
                                           "keyfile": str(self.tls[1])}
        if asynchronous:
            from hisparc_datastore import serve_async  # uvicorn: only the upload's image

            worker: type = serve_async.worker_class(
                self.idle_timeout, LIMIT_REQUEST_LINE, LIMIT_REQUEST_FIELDS,
                LIMIT_REQUEST_FIELD_SIZE)
        else:
            worker = worker_class(self.idle_timeout)
        return tls | {
            "bind": f"{self.host}:{self.port}",
            "workers": self.workers,
            "threads": self.threads,
            "keepalive": self.keepalive,
            "worker_class": worker,
            "logger_class": IdleTimeoutLogger,
            "timeout": self.worker_timeout,
            "loglevel": self.loglevel,
            "limit_request_line": LIMIT_REQUEST_LINE,
            "limit_request_fields": LIMIT_REQUEST_FIELDS,
            "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
            "child_exit": _worker_exited,
            "control_socket_disable": True,
        }


def _positive(value: str, name: str, kind: type[int] | type[float]) -> Any:
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise ValueError(f"{name} = {value!r} must be a number > 0")
    return number


def options(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeOptions:
    """Command line first, then the environment, then functions-framework's defaults."""
    idle = args.idle_timeout if args.idle_timeout is not None else environ.get(
        IDLE_TIMEOUT_ENV, str(DEFAULT_IDLE_TIMEOUT))
    worker_timeout = environ.get("CLOUD_RUN_TIMEOUT_SECONDS", "0")
    if not worker_timeout.isdigit():
        raise ValueError(f"CLOUD_RUN_TIMEOUT_SECONDS = {worker_timeout!r} must be seconds >= 0")
    return ServeOptions(
        source=Path(args.source),
        target=args.target,
        host=args.host or environ.get("HOST", DEFAULT_HOST),
        port=args.port if args.port is not None else int(environ.get("PORT", DEFAULT_PORT)),
        workers=_positive(environ.get("WORKERS", "1"), "WORKERS", int),
        threads=_positive(environ.get("THREADS", str((os.cpu_count() or 1) * 4)),
                          "THREADS", int),
        idle_timeout=_positive(str(idle), IDLE_TIMEOUT_ENV, float),
        worker_timeout=int(worker_timeout),
        loglevel=environ.get("GUNICORN_LOG_LEVEL", "error"),
        keepalive=_positive(environ.get(KEEPALIVE_ENV, str(DEFAULT_KEEPALIVE)),
                            KEEPALIVE_ENV, int),
        metrics_host=environ.get("METRICS_HOST", DEFAULT_HOST),
        metrics_port=_port(environ.get(METRICS_PORT_ENV, str(DEFAULT_METRICS_PORT)),
                           METRICS_PORT_ENV),
        tls=_tls(environ),
        worker_type=_choice(environ.get(WORKER_TYPE_ENV, "auto"), WORKER_TYPE_ENV,
                            WORKER_TYPES),
    )


def _choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} = {value!r} must be one of {', '.join(choices)}")
    return value


def _tls(environ: Mapping[str, str]) -> tuple[Path, Path] | None:
    """``TLS_CERT_FILE`` and ``TLS_KEY_FILE``: both or neither, and both readable."""
    cert, key = environ.get(TLS_CERT_ENV, ""), environ.get(TLS_KEY_ENV, "")
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError(f"{TLS_CERT_ENV} and {TLS_KEY_ENV} go together (HTTPS needs both)")
    for name, path in ((TLS_CERT_ENV, cert), (TLS_KEY_ENV, key)):
        if not os.access(path, os.R_OK):
            raise ValueError(f"{name} = {path!r} is not a readable file")
    return Path(cert), Path(key)


def _port(value: str, name: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise ValueError(f"{name} = {value!r} must be a port number (0: none)")
    return int(value)


def _worker_exited(server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook: a dead worker's live gauges no longer count."""
    if os.environ.get(MULTIPROC_ENV):
        from hisparc_datastore import metrics

        metrics.worker_exited(worker.pid)


def prepare_metrics_dir() -> None:
    """An empty directory for the workers' metric files, unless one is configured.

    Set before anything imports prometheus_client: it chooses its storage at import.
    Emptied on start, since a previous run's files would add their old counts.
    """
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        Path(directory).mkdir(parents=True, exist_ok=True)
        return
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="datastore-metrics-")


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """``GET /metrics``: every worker's values, summed (Prometheus' text format)."""

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        from prometheus_client import CONTENT_TYPE_LATEST

        from hisparc_datastore import metrics

        body = metrics.exposition()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # one line per scrape would drown the function's own log


def serve_metrics(host: str, port: int) -> http.server.ThreadingHTTPServer:
    """The metrics endpoint, on a thread of the arbiter (gunicorn's master process)."""
    server = http.server.ThreadingHTTPServer((host, port), _MetricsHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


class FunctionApplication(gunicorn.app.base.BaseApplication):
    """A prepared WSGI app with fixed settings: no gunicorn command line or config file."""

    def __init__(self, app: Any, settings: Mapping[str, Any]) -> None:
        self.app = app
        self.settings = dict(settings)
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.settings.items():
            if key in NEWER_GUNICORN_SETTINGS and key not in self.cfg.settings:
                continue
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self.app


def function_app(app: Any) -> Any:
    """What to serve of functions-framework's ``app``: the function's own WSGI app, if any.

    An HTTP function that sets ``function.wsgi_app`` to a WSGI application answering what
    the function answers is served through that, without Flask's per-request dispatch;
    any other function (the writer) through ``app``.  functions-framework wraps the
    function for its view with :func:`functools.wraps`, which carries the attribute over
    (and ``__wrapped__``, followed here as well).
    """
    own = _own_app(app, WSGI_APP_ATTRIBUTE)
    return app if own is None else own


def function_asgi_app(app: Any) -> Any | None:
    """The function's own ASGI application (``function.asgi_app``), or None.

    Found as :func:`function_app` finds ``wsgi_app``.  The upload function has one: it
    answers what its WSGI application answers, with the bucket's put awaited.
    """
    return _own_app(app, ASGI_APP_ATTRIBUTE)


def _own_app(app: Any, attribute: str) -> Any | None:
    """The callable the function functions-framework's ``app`` serves names as ``attribute``."""
    view = getattr(app, "view_functions", {}).get("run")
    while view is not None:
        own = getattr(view, attribute, None)
        if callable(own):
            return own
        view = getattr(view, "__wrapped__", None)
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="the function's file, e.g. functions/upload/main.py")
    parser.add_argument("--target", required=True, help="the function's name, e.g. upload")
    parser.add_argument("--host", default=None,
                        help=f"address to bind (default: $HOST or {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None,
                        help=f"port to bind (default: $PORT or {DEFAULT_PORT})")
    parser.add_argument(
        "--idle-timeout", type=float, default=None,
        help=f"seconds a client may send nothing before its connection is closed "
             f"(default: ${IDLE_TIMEOUT_ENV} or {DEFAULT_IDLE_TIMEOUT:g})",
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = options(args, os.environ)
    except ValueError as exc:
        print(f"datastore serve: {exc}", file=sys.stderr)
        return 2
    prepare_metrics_dir()
    # The function reads it too: an ASGI application times out its own body reads.
    os.environ[IDLE_TIMEOUT_ENV] = f"{settings.idle_timeout:g}"
    # Imports the source (configuration is loaded there: an error exits with its message).
    flask_app = functions_framework.create_app(settings.target, str(settings.source))
    asgi_app = None if settings.worker_type == "threads" else function_asgi_app(flask_app)
    if settings.worker_type == "async" and asgi_app is None:
        print(f"datastore serve: {WORKER_TYPE_ENV}=async, but {settings.target} has no "
              f"ASGI application ({ASGI_APP_ATTRIBUTE})", file=sys.stderr)
        return 2
    app = asgi_app if asgi_app is not None else function_app(flask_app)
    if settings.metrics_port:
        try:
            serve_metrics(settings.metrics_host, settings.metrics_port)
        except OSError as exc:
            print(f"datastore serve: metrics port {settings.metrics_port}: {exc}",
                  file=sys.stderr)
            return 2
    gunicorn_settings = settings.gunicorn(asynchronous=asgi_app is not None)
    FunctionApplication(app, gunicorn_settings).run()  # returns only by sys.exit
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hisparc_datastore.serve",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
