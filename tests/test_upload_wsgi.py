"""The upload function's two wrappers answer alike: the WSGI app the launcher serves, and
the functions-framework function (``functions-framework --target upload``).

``functions/upload/main.py`` runs in a subprocess (it loads its configuration and sets up
logging at import), built as the launcher builds it: functions-framework's ``create_app``,
then :func:`hisparc_datastore.serve.function_app`, which must pick the module's own
``application``.  Every request below goes to both, each with a fresh WSGI environ, and
the status line, headers and body must be the same, byte for byte; the answer codes are
the protocol's (docs/FORMAT.md, 1.4).  Requests that store a batch store the same bytes
under the same key, so running both is harmless.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path

import pytest
from conftest import S3Endpoint
from test_upload_http import PASSWORD, STATION, batch, server_environment, upload_site

from hisparc_datastore.format.keys import incoming_key

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "functions" / "upload" / "main.py"
FORM = "application/x-www-form-urlencoded"

SCRIPT = textwrap.dedent('''
    import io, json, sys
    import functions_framework
    from werkzeug.test import EnvironBuilder, run_wsgi_app
    from hisparc_datastore import serve

    flask_app = functions_framework.create_app("upload", sys.argv[1])
    served = serve.function_app(flask_app)
    main = sys.modules["main"]
    assert served is main.application, served

    def environ(case):
        body = bytes.fromhex(case["body"])
        headers = dict(case["headers"])
        env = EnvironBuilder(path=case["path"], method=case["method"], data=body,
                             headers=headers).get_environ()
        if case.get("length") is not None:
            env["CONTENT_LENGTH"] = str(case["length"])
        if case.get("chunked"):  # what gunicorn hands on for a chunked body
            env.pop("CONTENT_LENGTH", None)
            env["HTTP_TRANSFER_ENCODING"] = "chunked"
            env["wsgi.input_terminated"] = True
        env["wsgi.input"] = io.BytesIO(body)
        return env

    def call(app, case):
        iterable, status, headers = run_wsgi_app(app, environ(case))
        try:
            body = b"".join(iterable)
        finally:
            if hasattr(iterable, "close"):
                iterable.close()
        return [status, [list(h) for h in headers], body.decode("latin-1")]

    import asyncio

    def scope_and_body(case):
        """The ASGI scope, and the body an HTTP server would deliver for the request."""
        body = bytes.fromhex(case["body"])
        headers = [(name.lower().encode(), value.encode())
                   for name, value in case["headers"].items()]
        if case.get("chunked"):
            headers.append((b"transfer-encoding", b"chunked"))
        elif case.get("length") == "":  # no length and not chunked: no body at all
            body = b""
        else:
            length = case.get("length", len(body))
            headers.append((b"content-length", str(length).encode()))
        scope = {"type": "http", "method": case["method"], "path": case["path"],
                 "headers": headers}
        return scope, body

    def call_asgi(case, messages=None):
        scope, body = scope_and_body(case)
        if messages is None:  # the body in two parts, as a server may hand it on
            half = len(body) // 2
            messages = [{"type": "http.request", "body": body[:half], "more_body": True},
                        {"type": "http.request", "body": body[half:], "more_body": False}]
        sent = []

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.Event().wait()  # the client says nothing more

        async def send(message):
            sent.append(message)

        asyncio.run(main.asgi_application(scope, receive, send))
        start, end = sent
        headers = [[name.decode(), value.decode()] for name, value in start["headers"]]
        return [start["status"], headers, end["body"].decode("latin-1")]

    cases = json.load(sys.stdin)
    answers = {}
    stall = cases.pop("stalled body")
    main.BODY_IDLE_SECONDS = 0.2
    answers["asgi, stalled body"] = call_asgi(stall, [
        {"type": "http.request", "body": b"station_id=501&", "more_body": True}])
    answers["asgi, client gone"] = call_asgi(stall, [
        {"type": "http.request", "body": b"station_id=501&", "more_body": True},
        {"type": "http.disconnect"}])
    for name, case in cases.items():
        if case.get("break_counting"):
            def boom(*args):
                raise OSError("metrics directory gone")
            main._count = boom
        answers[name] = {"flask": call(flask_app, case), "wsgi": call(served, case),
                         "asgi": call_asgi(case)}

    # The request's log record, made without logging's caller lookup, against the one
    # log.log makes; formatted by the configured text and JSON formatters.
    import logging
    from hisparc_datastore import logs
    from hisparc_datastore.upload import protocol as core

    records = []
    capture = logging.Handler()
    capture.emit = records.append
    logging.getLogger("hisparc_datastore").addHandler(capture)
    logged = {}
    for answer in (core.UploadAnswer(code="100", station=501, events=1, nbytes=9,
                                     key="incoming/501/x.pickle"),
                   core.UploadAnswer(code="404", http_status=503, station=501,
                                     reason="bucket: 100% down")):
        main._log(answer, 2.5)
        main.log.log(logging.INFO if answer.http_status < 500 else logging.WARNING,
                     "%s", core.log_line(answer, 2.5),
                     extra={"fields": core.log_fields(answer, 2.5)})
        lean, usual = records[-2:]
        lean.created = usual.created
        lean.msecs = usual.msecs
        logged[answer.code] = [
            [record.name, record.levelname, record.getMessage(), record.fields,
             logs.TextFormatter(logs.FORMAT).format(record),
             logging.Formatter(logs.FORMAT).format(record),
             logs.JsonFormatter().format(record)]
            for record in (lean, usual)]
    answers["log records"] = logged
    json.dump(answers, sys.stdout)
    sys.stdout.flush()
    # Out without the interpreter's finalization: this process ran obstore's blocking and
    # awaited puts side by side, and one run in about sixty ended in SIGABRT at exit,
    # after every answer was written.  (A served worker makes only one kind.)
    import os
    os._exit(0)
''')


def form(data: bytes, password: str = PASSWORD, station: int = STATION) -> bytes:
    return urllib.parse.urlencode({
        "station_id": str(station), "password": password, "data": data.decode("latin-1"),
        "checksum": hashlib.md5(data).hexdigest(),  # noqa: S324
    }).encode("ascii")


def case(method: str = "POST", path: str = "/", body: bytes = b"",
         headers: dict[str, str] | None = None, **extra: object) -> dict[str, object]:
    return {"method": method, "path": path, "body": body.hex(),
            "headers": headers if headers is not None else {"Content-Type": FORM}, **extra}


@pytest.fixture(scope="module")
def answers(s3_endpoint: S3Endpoint, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, dict[str, list]]:
    directory = tmp_path_factory.mktemp("upload-wsgi")
    config, bucket = upload_site(directory, s3_endpoint, "upload-wsgi")
    py3 = pickle.dumps(batch(1, seed=41), protocol=3)
    py3_other = pickle.dumps(batch(1, seed=42), protocol=3)
    boundary = "b0undary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"station_id\"\r\n\r\n"
                 f"{STATION}\r\n--{boundary}\r\nContent-Disposition: form-data; "
                 f"name=\"password\"\r\n\r\n{PASSWORD}\r\n--{boundary}\r\nContent-Disposition: "
                 f"form-data; name=\"checksum\"\r\n\r\n{hashlib.md5(py3).hexdigest()}\r\n"  # noqa: S324
                 f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; "
                 f"filename=\"b\"\r\n\r\n").encode() + py3 + f"\r\n--{boundary}--\r\n".encode()
    cases = {
        "get": case("GET", headers={}),
        "head": case("HEAD", headers={}),
        "stored": case(body=form(py3)),
        "stored, multipart": case(body=multipart, headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"}),
        "stored, another path": case(path="/upload/x", body=form(py3_other)),
        "stored, chunked": case(body=form(py3), chunked=True),
        "wrong password": case(body=form(py3, password="nope")),
        "unknown station": case(body=form(py3, station=999999)),
        "missing fields": case(body=b"station_id=501"),
        "no length, no end": case(body=form(py3), headers={"Content-Type": FORM},
                                  length=""),
        "over the limit": case(body=b"x" * 10, length=10**12),
        "put": case("PUT", body=form(py3)),
        "delete": case("DELETE", headers={}),
        "robots": case("GET", "/robots.txt", headers={}),
        "favicon": case("POST", "/favicon.ico", body=form(py3)),
        "counting fails": case(body=form(py3), break_counting=True),
        "stalled body": case(body=form(py3)),  # the ASGI application's only
    }
    env = server_environment(config, s3_endpoint)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(SOURCE)], input=json.dumps(cases), env=env,
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    answers = json.loads(result.stdout)
    for key in (incoming_key(STATION, hashlib.md5(py3).hexdigest()),  # noqa: S324
                incoming_key(STATION, hashlib.md5(py3_other).hexdigest())):  # noqa: S324
        assert bucket.head(key) is not None, key
    return answers


def test_the_launchers_wsgi_app_answers_as_functions_framework_does(
    answers: dict[str, dict[str, list]],
) -> None:
    for name, pair in answers.items():
        if name != "log records" and not name.startswith("asgi"):
            assert pair["wsgi"] == pair["flask"], name


def test_the_asgi_application_answers_as_the_wsgi_app_does(
    answers: dict[str, dict[str, list]],
) -> None:
    """The same status, body, Content-Type, and Content-Length or none, for every request
    (ASGI carries no reason phrase and lower-case names; the server adds the rest)."""
    for name, pair in answers.items():
        if name == "log records" or name.startswith("asgi"):
            continue
        status, headers, body = pair["wsgi"]
        wanted = {header.lower(): value for header, value in headers
                  if header in ("Content-Type", "Content-Length")}
        got_status, got_headers, got_body = pair["asgi"]
        got = {header: value for header, value in got_headers
               if header in ("content-type", "content-length")}
        assert (got_status, got, got_body) == (int(status.split()[0]), wanted, body), name


def test_the_asgi_application_answers_a_silent_or_gone_client_400(
    answers: dict[str, dict[str, list]],
) -> None:
    """A body read that waits longer than the idle timeout (0.2 s here), or a client that
    went away mid-body, is "body unreadable": ``400``, streamed, as the launcher's idle
    timeout makes it for the threaded worker."""
    for name in ("asgi, stalled body", "asgi, client gone"):
        status, headers, body = answers[name]
        assert (status, body) == (200, "400"), name
        assert ["content-type", "text/plain; charset=utf-8"] in headers
        assert not any(header == "content-length" for header, _ in headers), name


def test_the_log_line_is_what_logging_would_make_of_it(
    answers: dict[str, dict[str, list]],
) -> None:
    """Without the caller's file and line (no format shows them), and with each second's
    time formatted once: the same line, level, fields and JSON."""
    for code, (lean, usual) in answers["log records"].items():
        assert lean == usual, code
        name, level, message, fields, text, plain, document = lean
        assert (name, level) == ("hisparc_datastore.upload.protocol",
                                 "INFO" if code == "100" else "WARNING")
        assert message.startswith(f"upload station=501 code={code} ")
        assert fields["code"] == code and json.loads(document)["code"] == code
        assert text == plain


@pytest.mark.parametrize(("name", "status", "body"), [
    ("get", "200 OK", "HiSPARC datastore upload endpoint"),
    ("head", "200 OK", ""),
    ("stored", "200 OK", "100"),
    ("stored, multipart", "200 OK", "100"),
    ("stored, another path", "200 OK", "100"),
    ("stored, chunked", "200 OK", "100"),
    ("wrong password", "200 OK", "203"),
    ("unknown station", "200 OK", "206"),
    ("missing fields", "200 OK", "400"),
    ("no length, no end", "200 OK", "400"),
    ("over the limit", "413 REQUEST ENTITY TOO LARGE", "400"),
    ("put", "405 METHOD NOT ALLOWED", "400"),
    ("delete", "405 METHOD NOT ALLOWED", "400"),
    ("robots", "404 NOT FOUND", "Not Found"),
    ("favicon", "404 NOT FOUND", "Not Found"),
    ("counting fails", "503 SERVICE UNAVAILABLE", "205"),
])
def test_each_answer_is_the_protocols(answers: dict[str, dict[str, list]], name: str,
                                      status: str, body: str) -> None:
    got_status, headers, got_body = answers[name]["wsgi"]
    assert got_status == status
    if name in ("robots", "favicon"):  # functions-framework's own page
        assert body in got_body
        return
    assert got_body.startswith(body) if name == "get" else got_body == body
    assert ["Content-Type", "text/plain; charset=utf-8"] in headers
    lengths = [value for header, value in headers if header == "Content-Length"]
    # Answers that leave the body unread are streamed: no Content-Length.
    streamed = name in ("get", "head", "over the limit", "put", "delete", "counting fails")
    assert lengths == ([] if streamed else [str(len(body))])
