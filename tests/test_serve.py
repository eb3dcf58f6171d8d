"""``hisparc_datastore.serve``: the upload function under gunicorn with our limits.

The server here runs as the images run it, with each of its two workers (``WORKER_TYPE``:
``async``, the image's, and ``threads``, the way back), with a short idle timeout (the
``IDLE_TIMEOUT_SECONDS`` knob) so the stalls below end quickly, a short keep-alive
(``KEEPALIVE_SECONDS``, longer than the idle timeout as in production) so an idle
kept-alive connection is closed within the test, and for the threaded worker as many
threads as there are stalled clients, so a station can only be served once a stall has
been freed (the async worker holds no thread per client).  Nothing is
asserted about how long anything takes at most: a stall that is never freed shows as a
station that is never answered (a hang guard of a minute fails the test), and a stalled
socket that the server never closes shows as a client read that times out.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import S3Endpoint
from gunicorn.http.body import Body, LengthReader
from gunicorn.workers.gthread import ThreadWorker
from hisparc_datastore_dev.processes import Served, serve_function
from hisparc_datastore_dev.py2pickle import dumps_py2
from test_upload_http import (
    MAX_BODY,
    PASSWORD,
    STATION,
    batch,
    md5,
    server_environment,
    upload_site,
    write_config,
)

from hisparc_datastore import cli, serve, serve_async
from hisparc_datastore.format.keys import incoming_key
from hisparc_datastore.storage.store import Bucket

pytestmark = pytest.mark.long

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "functions" / "upload" / "main.py"
IDLE = 3.0
#: The keep-alive here: longer than the idle timeout and gunicorn's 2 s default, as in
#: production (100 s against the idle timeout's 30 s), but short enough to wait out.
KEEPALIVE = 6
#: A pause between two requests on one connection: beyond the idle timeout and gunicorn's
#: default keep-alive, well within KEEPALIVE.
PAUSE = IDLE + 1
FORM = "application/x-www-form-urlencoded"
#: Far beyond any answer or idle timeout here: only a stall that is never freed hits it.
GUARD = 60.0

#: Stalls at every stage gunicorn reads with a blocking socket; one thread each.
STALLS = {
    "half a request line": b"POST / HT",
    "headers unfinished": b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
    "headers, no body": f"POST / HTTP/1.1\r\nContent-Type: {FORM}\r\n"
                        "Content-Length: 500\r\n\r\n".encode(),
    "half a body": f"POST / HTTP/1.1\r\nContent-Type: {FORM}\r\nContent-Length: 500\r\n\r\n"
                   f"station_id=501&password={PASSWORD}".encode(),
    "chunked, one chunk": f"POST / HTTP/1.1\r\nContent-Type: {FORM}\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n5\r\nstati\r\n".encode(),
}
THREADS = len(STALLS)
_seeds = itertools.count(1000)


@dataclass
class Upload:
    served: Served
    bucket: Bucket
    worker_type: str

    def code_lines(self) -> int:
        """How many requests reached the function (it logs one ``code=`` line each)."""
        return sum("code=" in line for line in self.served.log().splitlines())

    def station_upload(self) -> None:
        """A station's fresh batch is answered 100 and stored (within the hang guard)."""
        data = dumps_py2(batch(2, seed=next(_seeds)))
        try:
            answer = requests.post(self.served.url, data=form(data),
                                   headers={"Content-Type": FORM}, timeout=GUARD)
        except requests.Timeout:
            pytest.fail(f"no station served within {GUARD:.0f} s")
        assert (answer.status_code, answer.text) == (200, "100")
        assert self.bucket.head(incoming_key(STATION, md5(data))) is not None


def form(data: bytes) -> bytes:
    return urllib.parse.urlencode({"station_id": str(STATION), "password": PASSWORD,
                                   "data": data.decode("latin-1"),
                                   "checksum": md5(data)}).encode("ascii")


WORKER_TYPES = ("async", "threads")


@pytest.fixture(scope="module", params=WORKER_TYPES)
def upload(request: pytest.FixtureRequest, s3_endpoint: S3Endpoint,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upload]:
    directory = tmp_path_factory.mktemp("serve")
    config, bucket = upload_site(directory, s3_endpoint, "serve")
    env = server_environment(config, s3_endpoint, WORKERS="1", THREADS=str(THREADS),
                             IDLE_TIMEOUT_SECONDS=str(IDLE), KEEPALIVE_SECONDS=str(KEEPALIVE),
                             GUNICORN_LOG_LEVEL="info", WORKER_TYPE=request.param)
    served = serve_function(SOURCE, "upload", env, directory / "upload.log", cwd=ROOT)
    try:
        yield Upload(served, bucket, request.param)
    finally:
        served.stop()
    assert "Traceback" not in served.log()


def connect(upload: Upload) -> socket.socket:
    return socket.create_connection(("127.0.0.1", upload.served.port), timeout=GUARD)


def read_answer(sock: socket.socket) -> tuple[int, str] | None:
    """The server's answer, or None when it closed the connection without one."""
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        return response.status, response.read().decode("latin-1")
    except (http.client.RemoteDisconnected, ConnectionResetError):
        return None


def test_the_worker_asked_for_serves(upload: Upload) -> None:
    """``WORKER_TYPE``: uvicorn's worker logs its application's start, gunicorn's does not."""
    assert requests.get(upload.served.url, timeout=GUARD).status_code == 200
    started = "Application startup complete" in upload.served.log()
    assert started is (upload.worker_type == "async")


# --- R2: stalled clients -------------------------------------------------------------------


def test_stalled_clients_are_disconnected_and_a_station_is_served(upload: Upload) -> None:
    """Every thread is held by a client that stopped sending (request line, headers, body):
    the idle timeout frees them all, headers without an answer, bodies with ``400``."""
    sockets: dict[str, socket.socket] = {}
    try:
        for name, sent in STALLS.items():  # accepted in this order: they take every thread
            sockets[name] = connect(upload)
            sockets[name].sendall(sent)
        upload.station_upload()
        for name, sock in sockets.items():  # we never close: the server must
            try:
                answer = read_answer(sock)
            except TimeoutError:
                pytest.fail(f"{name}: still open after {GUARD:.0f} s")
            if name in ("half a request line", "headers unfinished"):
                assert answer is None, name
            else:
                assert answer in (None, (200, "400")), (name, answer)
    finally:
        for sock in sockets.values():
            sock.close()
    upload.station_upload()
    assert "the client was idle" in upload.served.log()


def test_a_slow_but_steady_upload_is_not_cut(upload: Upload) -> None:
    """Only silence counts: an upload taking longer than the idle timeout is stored."""
    data = dumps_py2(batch(50, seed=next(_seeds)))
    body = form(data)
    head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {FORM}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    pieces = 16
    step = -(-len(body) // pieces)
    with connect(upload) as sock:
        sock.sendall(head)
        for at in range(0, len(body), step):
            time.sleep(IDLE / 10)  # 16 pauses: together well over the idle timeout
            sock.sendall(body[at : at + step])
        assert read_answer(sock) == (200, "100")
    assert upload.bucket.head(incoming_key(STATION, md5(data))) is not None


# --- keep-alive behind Knative's queue-proxy ---------------------------------------------


def get(sock: socket.socket) -> tuple[int, str, str | None] | None:
    """GET / on an open connection: (status, body, Connection header), or None if closed."""
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        return None
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        return response.status, response.read().decode("latin-1"), response.getheader(
            "Connection")
    except (http.client.RemoteDisconnected, ConnectionResetError):
        return None


def test_a_kept_alive_connection_is_reused_after_a_pause(upload: Upload) -> None:
    """The queue-proxy reuses idle connections for up to 90 s; one gunicorn closed after
    its default 2 s gave a 502.  Neither that nor the idle timeout (3 s here) may close a
    connection that waits for its next request within the keep-alive time."""
    calls = upload.code_lines()
    with connect(upload) as sock:
        first = get(sock)
        assert first is not None and first[0] == 200 and "HiSPARC" in first[1], first
        assert (first[2] or "").lower() != "close"
        time.sleep(PAUSE)
        second = get(sock)
        assert second == first, "the connection was closed while kept alive"
    assert upload.code_lines() == calls  # GET never reaches the upload protocol


def assert_closed_by_server(sock: socket.socket, what: str) -> None:
    """Wait (up to the socket's timeout) for the server to close ``sock``."""
    try:
        end = sock.recv(1)
    except ConnectionResetError:
        end = b""
    except TimeoutError:
        pytest.fail(f"{what} still open after {GUARD:.0f} s")
    assert end == b""


def test_a_connection_idle_beyond_the_keep_alive_is_closed_by_the_server(
    upload: Upload
) -> None:
    with connect(upload) as sock:
        answer = get(sock)
        assert answer is not None and answer[0] == 200, answer
        waited_from = time.monotonic()
        assert_closed_by_server(sock, "a kept-alive connection")
    # A lower bound only (load makes it later, never earlier): the keep-alive closed it,
    # not the idle timeout.
    assert time.monotonic() - waited_from > KEEPALIVE - 1


@pytest.mark.parametrize("worker_type", WORKER_TYPES)
def test_a_connection_that_never_sends_gets_the_idle_timeout_not_the_keep_alive(
    s3_endpoint: S3Endpoint, tmp_path: Path, worker_type: str
) -> None:
    """gunicorn parks a silent new connection with the keep-alive timeout; with the long
    keep-alive a stalled client would keep it for that long.  It is closed after the idle
    timeout instead (gunicorn first waits 5 s for its first byte on a thread)."""
    config = write_config(tmp_path, s3_endpoint, f"serve-{uuid.uuid4().hex[:10]}")
    env = server_environment(config, s3_endpoint, WORKERS="1", THREADS="2",
                             IDLE_TIMEOUT_SECONDS=str(IDLE),
                             KEEPALIVE_SECONDS=str(int(10 * GUARD)),
                             WORKER_TYPE=worker_type)
    served = serve_function(SOURCE, "upload", env, tmp_path / "upload.log", cwd=ROOT)
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=GUARD) as sock:
            assert_closed_by_server(sock, "a silent connection")
        # Nor does a blank line between two requests start a wait of the keep-alive time.
        with socket.create_connection(("127.0.0.1", served.port), timeout=GUARD) as sock:
            answer = get(sock)
            assert answer is not None and answer[0] == 200
            sock.sendall(b"\r\n")
            assert_closed_by_server(sock, "a connection silent after a blank line")
        # Still serving, and kept-alive connections are not affected.
        with socket.create_connection(("127.0.0.1", served.port), timeout=GUARD) as sock:
            first = get(sock)
            assert first is not None and first[0] == 200
            time.sleep(PAUSE)
            assert get(sock) == first
    finally:
        served.stop()
    assert "Traceback" not in served.log()


# --- R4: long request lines ----------------------------------------------------------------


def _send_quietly(sock: socket.socket, raw: bytes) -> None:
    with contextlib.suppress(OSError):  # the server may answer and close before the end
        sock.sendall(raw)


@pytest.mark.parametrize("length", [serve.LIMIT_REQUEST_LINE + 1, 16 * 1024, 8 * 1024 * 1024])
def test_an_overlong_request_line_is_refused_before_the_function(
    upload: Upload, length: int
) -> None:
    """The server answers 414 after reading the limit, and the function is never called.

    Without the limit an 8 MiB line cost 14 s of CPU to parse (docs/SECURITY.md R4).
    With a long line the client may still be sending when the server closes, so the
    connection can be reset before the answer is read: then only "closed" is seen.
    """
    calls = upload.code_lines()
    line = b"POST /" + b"a" * (length - len(b"POST / HTTP/1.1")) + b" HTTP/1.1\r\n"
    assert len(line) == length + 2
    with connect(upload) as sock:
        sender = threading.Thread(target=_send_quietly,
                                  args=(sock, line + b"Content-Length: 0\r\n\r\n"))
        sender.start()
        answer = read_answer(sock)
        with contextlib.suppress(OSError):  # unblocks the sender if it is still sending
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(GUARD)
    if length <= 16 * 1024:
        assert answer is not None and answer[0] == 414, answer
    else:
        assert answer is None or answer[0] == 414, answer
    upload.station_upload()
    assert upload.code_lines() == calls + 1  # the station's only


def test_a_request_line_at_the_limit_reaches_the_function(upload: Upload) -> None:
    path = "/" + "a" * (serve.LIMIT_REQUEST_LINE - len("GET / HTTP/1.1"))
    assert len(f"GET {path} HTTP/1.1") == serve.LIMIT_REQUEST_LINE
    answer = requests.get(upload.served.url.rstrip("/") + path, timeout=GUARD)
    assert answer.status_code == 200 and "HiSPARC" in answer.text


def _head(*fields: str, line: str = "POST / HTTP/1.1") -> bytes:
    return ("\r\n".join((line, "Host: 127.0.0.1", *fields)) + "\r\n\r\n").encode("latin-1")


HEADER_CASES = {
    "one field too many": _head(*(f"X-Field-{n}: {n}" for n in range(serve.LIMIT_REQUEST_FIELDS))),
    "a field over the size limit": _head("X-Big: " + "a" * serve.LIMIT_REQUEST_FIELD_SIZE),
    "a field of 8 MiB": _head("X-Big: " + "a" * (8 * 1024 * 1024)),
    "a head of 2 MiB in short fields": _head(*(f"X-{n}: {'a' * 100}" for n in range(20_000))),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_header_fields_over_the_limits_are_refused_before_the_function(
    upload: Upload, case: str
) -> None:
    """431, as gunicorn answers, and the function is never called; the server serves on."""
    calls = upload.code_lines()
    raw = HEADER_CASES[case]
    with connect(upload) as sock:
        sender = threading.Thread(target=_send_quietly, args=(sock, raw))
        sender.start()
        answer = read_answer(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(GUARD)
    if len(raw) < 64 * 1024:
        assert answer is not None and answer[0] == 431, answer
    else:  # the server may close while the client still sends: a reset can lose the answer
        assert answer is None or answer[0] == 431, answer
    upload.station_upload()
    assert upload.code_lines() == calls + 1


def test_a_head_at_the_limits_reaches_the_function(upload: Upload) -> None:
    fields = [f"X-Field-{n}: {n}" for n in range(serve.LIMIT_REQUEST_FIELDS - 2)]
    big = "X-Big: " + "a" * (serve.LIMIT_REQUEST_FIELD_SIZE - len("X-Big: ") - 2)
    with connect(upload) as sock:  # with Host and X-Big: exactly the field count limit
        sock.sendall(_head(*fields, big, line="GET / HTTP/1.1"))
        answer = read_answer(sock)
    assert answer is not None and answer[0] == 200 and "HiSPARC" in answer[1], answer


def test_an_answer_that_leaves_the_body_unread_reaches_a_client_still_sending(
    upload: Upload
) -> None:
    """A body over the limit is answered before it is read, while the client still sends
    it: the client gets the whole answer, not a reset."""
    length = MAX_BODY + 1
    head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {FORM}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    with connect(upload) as sock:
        sock.sendall(head)
        sender = threading.Thread(target=_send_quietly, args=(sock, b"a" * length))
        sender.start()
        answer = read_answer(sock)
        sender.join(GUARD)
    assert answer == (413, "400")
    upload.station_upload()


def test_a_head_request_is_answered_without_a_body_on_a_kept_alive_connection(
    upload: Upload
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", upload.served.port, timeout=GUARD)
    try:
        for method in ("HEAD", "GET", "HEAD"):
            connection.request(method, "/")
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, method
            assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
            assert (body == b"") is (method == "HEAD"), (method, body)
    finally:
        connection.close()


class _KeptOpen(io.BufferedReader):
    def close(self) -> None:
        pass


def test_pipelined_requests_are_answered_in_order(upload: Upload) -> None:
    """Also when what follows a request does not parse: that request's answer, then 400."""
    with connect(upload) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /robots.txt HTTP/1.1\r\n"
                     b"Host: a\r\n\r\nGARBAGE\x00\r\n\r\n")
        # One buffered reader for all three (each HTTPResponse would read ahead on its own
        # and close it after its body).
        stream = _KeptOpen(socket.SocketIO(sock, "rb"))
        shared = types.SimpleNamespace(makefile=lambda *args, **kwargs: stream)
        first, second, third = (read_answer(shared) for _ in range(3))  # type: ignore[arg-type]
    assert first is not None and first[0] == 200 and "HiSPARC" in first[1], first
    assert second is not None and second[0] == 404, second
    assert third is not None and third[0] == 400, third


def test_a_pipelined_request_left_unread_is_answered_after_the_one_before(
    upload: Upload
) -> None:
    """A body over the limit is refused unread and ends the connection, but only after the
    answer to the request before it and its own."""
    with connect(upload) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
                     + f"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: {FORM}\r\n"
                       f"Content-Length: {MAX_BODY + 1}\r\n\r\nstation_id=5".encode())
        stream = _KeptOpen(socket.SocketIO(sock, "rb"))
        shared = types.SimpleNamespace(makefile=lambda *args, **kwargs: stream)
        first, second = (read_answer(shared) for _ in range(2))  # type: ignore[arg-type]
    assert first is not None and first[0] == 200 and "HiSPARC" in first[1], first
    assert second == (413, "400")


def test_a_closed_connection_ends_with_the_answer_and_a_fin_not_a_reset() -> None:
    """The close half-closes and drains what the client already sent, without waiting.

    gunicorn's own graceful close waited up to 2 s for the client's FIN on the worker's
    main thread; stalled clients freed by the idle timeout never send one, so each held
    the whole worker for 2 s (six of them: 12 s before the next request was accepted).
    Here the client never closes, and still gets the answer and then a clean end.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server_address = listener.getsockname()
        client = socket.create_connection(server_address, timeout=GUARD)
        accepted, address = listener.accept()
    with client:
        client.sendall(b"x" * 10_000)  # a request body the server never read (all arrived)
        accepted.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\n400")
        connection = serve.IdleTimeoutConn(None, accepted, address, server_address)
        connection.close(graceful=True)
        assert accepted.fileno() == -1
        received = b""
        while chunk := client.recv(65536):
            received += chunk
        assert received.endswith(b"\r\n\r\n400")


# --- the launcher itself -------------------------------------------------------------------


def _args(**given: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    words = [f"--{key.replace('_', '-')}={value}" for key, value in given.items()]
    return parser.parse_args(["--source", "main.py", "--target", "upload", *words])


def test_options_read_the_environment_as_functions_framework_does() -> None:
    options = serve.options(_args(), {})
    assert (options.host, options.port, options.workers) == ("0.0.0.0", 8080, 1)  # noqa: S104
    assert options.threads == (os.cpu_count() or 1) * 4
    assert options.idle_timeout == serve.DEFAULT_IDLE_TIMEOUT
    assert (options.worker_timeout, options.loglevel) == (0, "error")
    # Longer than Knative's queue-proxy keeps an idle upstream connection (90 s).
    assert options.keepalive == serve.DEFAULT_KEEPALIVE > 90
    environ = {"HOST": "127.0.0.1", "PORT": "9000", "WORKERS": "2", "THREADS": "8",
               "IDLE_TIMEOUT_SECONDS": "12.5", "CLOUD_RUN_TIMEOUT_SECONDS": "60",
               "GUNICORN_LOG_LEVEL": "info", "KEEPALIVE_SECONDS": "120"}
    options = serve.options(_args(), environ)
    assert (options.host, options.port, options.workers, options.threads) == (
        "127.0.0.1", 9000, 2, 8)
    assert (options.idle_timeout, options.worker_timeout, options.loglevel) == (
        12.5, 60, "info")
    assert options.keepalive == 120
    options = serve.options(_args(port=1234, idle_timeout=4), environ)
    assert (options.port, options.idle_timeout) == (1234, 4.0)
    settings = options.gunicorn()
    assert settings["bind"] == "127.0.0.1:1234"
    assert settings["limit_request_line"] == 4094
    assert settings["keepalive"] == 120
    assert settings["worker_class"].idle_timeout == 4.0
    assert issubclass(settings["worker_class"], serve.IdleTimeoutWorker)
    assert options.worker_type == "auto"
    assert serve.options(_args(), {"WORKER_TYPE": "threads"}).worker_type == "threads"
    guarded = options.gunicorn(asynchronous=True)["worker_class"]
    assert issubclass(guarded, serve_async.GuardedUvicornWorker)
    protocol = guarded.CONFIG_KWARGS["http"]
    assert (protocol.idle_timeout, protocol.limit_request_line, protocol.limit_request_fields,
            protocol.limit_request_field_size) == (4.0, 4094, 100, 8190)
    assert (guarded.CONFIG_KWARGS["loop"], guarded.CONFIG_KWARGS["ws"]) == ("uvloop", "none")
    for bad in ({"IDLE_TIMEOUT_SECONDS": "0"}, {"THREADS": "many"}, {"WORKERS": "-1"},
                {"CLOUD_RUN_TIMEOUT_SECONDS": "soon"}, {"KEEPALIVE_SECONDS": "0"},
                {"KEEPALIVE_SECONDS": "1.5"}, {"WORKER_TYPE": "gevent"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            serve.options(_args(), bad)


def test_datastore_serve_is_a_subcommand() -> None:
    assert cli.COMMANDS["serve"][0] == "hisparc_datastore.serve"
    args = cli.build_parser(load=["serve"]).parse_args(
        ["serve", "--source", "functions/upload/main.py", "--target", "upload"])
    assert args._module is serve


def assert_exits_with_0(served: Served) -> None:
    """After the SIGTERM sent to it: the launcher exits by itself, with 0."""
    try:
        assert served.process.wait(GUARD) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {GUARD:.0f} s after SIGTERM")


@pytest.mark.parametrize("worker_type", WORKER_TYPES)
def test_sigterm_to_the_server_alone_stops_it_gracefully(
    s3_endpoint: S3Endpoint, tmp_path: Path, worker_type: str
) -> None:
    """As Docker and Kubernetes stop PID 1: the signal to the launcher only, exit 0."""
    config = write_config(tmp_path, s3_endpoint, f"serve-{uuid.uuid4().hex[:10]}")
    env = server_environment(config, s3_endpoint, WORKERS="2", THREADS="2",
                             WORKER_TYPE=worker_type)
    served = serve_function(SOURCE, "upload", env, tmp_path / "upload.log", cwd=ROOT)
    try:
        assert requests.get(served.url, timeout=GUARD).status_code == 200
        served.process.send_signal(signal.SIGTERM)
        assert_exits_with_0(served)
    finally:
        served.stop()
    assert "Traceback" not in served.log()


@pytest.mark.parametrize("worker_type", WORKER_TYPES)
def test_an_upload_in_flight_at_sigterm_is_answered_and_stored(
    s3_endpoint: S3Endpoint, tmp_path: Path, worker_type: str
) -> None:
    """A rollout stops the old pod with SIGTERM while a station is still sending: its
    upload completes (``100``, stored) before the server exits."""
    config, bucket = upload_site(tmp_path, s3_endpoint, "serve-term")
    env = server_environment(config, s3_endpoint, WORKERS="1", THREADS="2",
                             GUNICORN_LOG_LEVEL="info", WORKER_TYPE=worker_type)
    served = serve_function(SOURCE, "upload", env, tmp_path / "upload.log", cwd=ROOT)
    data = dumps_py2(batch(3, seed=next(_seeds)))
    body = form(data)
    head = (f"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {FORM}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=GUARD) as sock:
            sock.sendall(head + body[: len(body) // 2])
            time.sleep(0.5)  # the request is being read when the signal comes
            served.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            sock.sendall(body[len(body) // 2 :])
            assert read_answer(sock) == (200, "100")
        assert_exits_with_0(served)
    finally:
        served.stop()
    assert bucket.head(incoming_key(STATION, md5(data))) is not None
    assert "Traceback" not in served.log()


# --- per-request work of the worker and the app it serves ----------------------------------


def _functions(tmp_path: Path) -> Path:
    """A source with a function with its own WSGI and ASGI applications, and one with
    neither; functions-framework imports it as a module named after the file."""
    source = tmp_path / f"function_{uuid.uuid4().hex}.py"  # not "main": other tests' module
    source.write_text(textwrap.dedent('''
        import functions_framework

        def direct_wsgi(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"direct"]

        async def direct_asgi(scope, receive, send):
            pass

        @functions_framework.http
        def own(request):
            return "flask"

        own.wsgi_app = direct_wsgi
        own.asgi_app = direct_asgi

        @functions_framework.http
        def plain(request):
            return "flask"
        '''))
    return source


def test_a_function_with_its_own_wsgi_app_is_served_through_it(tmp_path: Path) -> None:
    """functions-framework wraps the function for its Flask view with functools.wraps, which
    carries ``wsgi_app`` over; a function without one is served through Flask."""
    import functions_framework

    source = _functions(tmp_path)
    own = functions_framework.create_app("own", str(source))
    assert serve.function_app(own) is sys.modules[source.stem].direct_wsgi
    plain = functions_framework.create_app("plain", str(source))
    assert serve.function_app(plain) is plain
    assert serve.function_app(object()) is not None  # anything else: served as it is


def test_a_function_with_its_own_asgi_app_is_served_through_it_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``asgi_app`` is found as ``wsgi_app`` is; ``WORKER_TYPE=async`` for a function
    without one stops the launch with a message, before anything is served."""
    import functions_framework

    source = _functions(tmp_path)
    own = functions_framework.create_app("own", str(source))
    assert serve.function_asgi_app(own) is sys.modules[source.stem].direct_asgi
    plain = functions_framework.create_app("plain", str(source))
    assert serve.function_asgi_app(plain) is None
    assert serve.function_asgi_app(object()) is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    monkeypatch.setenv("IDLE_TIMEOUT_SECONDS", "30")
    monkeypatch.setenv("WORKER_TYPE", "async")
    monkeypatch.setenv("METRICS_PORT", "0")
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--source", str(source), "--target", "plain"])
    assert serve.run(args) == 2


def test_the_heartbeat_is_touched_at_most_every_half_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gunicorn touches it on every turn of the worker's loop, about twice per request."""
    touched: list[float] = []
    worker = serve.worker_class(30.0).__new__(serve.worker_class(30.0))
    worker.tmp = types.SimpleNamespace(notify=lambda: touched.append(clock[0]))
    clock = [1000.0]
    monkeypatch.setattr(serve.time, "monotonic", lambda: clock[0])
    for step in (0.0, 0.1, 0.2, 0.49, 0.5, 0.6, 1.2, 1.2):
        clock[0] = 1000.0 + step
        worker.notify()
    assert touched == [1000.0, 1000.5, 1001.2]
    assert serve.HEARTBEAT_SECONDS < 1, "gunicorn's worker timeout is whole seconds"


def _message(reader: object) -> types.SimpleNamespace:
    body = Body(reader)
    return types.SimpleNamespace(parser=types.SimpleNamespace(
        mesg=types.SimpleNamespace(body=body)))


def test_a_body_read_to_its_end_is_not_drained_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn's drain before a kept-alive connection is parked sets the socket's timeout
    twice even with nothing left; a body of known length read to its end skips it."""
    drained: list[object] = []

    def drain(self: object, conn: object, keepalive: bool) -> bool:
        drained.append(conn)
        return keepalive

    monkeypatch.setattr(ThreadWorker, "_keepalive_after", drain, raising=False)
    worker = serve.IdleTimeoutWorker.__new__(serve.IdleTimeoutWorker)
    unreader = types.SimpleNamespace()
    done = _message(LengthReader(unreader, 0))
    assert worker._keepalive_after(done, True) is True
    assert drained == []
    assert worker._keepalive_after(done, False) is False  # closing: gunicorn decides
    left = _message(LengthReader(unreader, 10))
    failed = _message(LengthReader(unreader, 0))
    failed.parser.mesg.body.failed = True
    buffered = _message(LengthReader(unreader, 0))
    buffered.parser.mesg.body.buf.write(b"next")
    chunked = _message(types.SimpleNamespace())
    for conn in (left, failed, buffered, chunked):
        assert worker._keepalive_after(conn, True) is True
    assert drained == [done, left, failed, buffered, chunked]
