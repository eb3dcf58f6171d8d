"""HTTP entry point of the writer function: ``functions-framework --target writer``.

A thin shell: check the token, read the body within a small limit, parse it with
:func:`hisparc_datastore.notifications.parse_notification`, write the keys with
:func:`hisparc_datastore.writer.process_keys` (or run :func:`~hisparc_datastore.writer.sweep`
for a sweep request), and map the outcome to a status the sender acts on:

- 200: every notified key is written and archived, was already done, or is quarantined in
  ``failed/`` (also: nothing to do, e.g. the S3 test event or a removal event);
- 400: the body is not a notification (retrying it cannot help);
- 401: ``DATASTORE_WRITER_AUTH_TOKEN`` is set and the request does not carry it, either
  as ``Authorization: Bearer <token>`` or as the bare token (MinIO's webhook sends its
  ``auth_token`` setting verbatim as the header value); compared in constant time;
- 413: the body is larger than a notification can be;
- 503: something transient failed (bucket, volume, lock): the sender should retry, and
  the objects wait in ``incoming/`` for that retry or the next sweep;
- 202: a sweep request while this process is already sweeping (nothing more to do).

A sweep request runs :func:`~hisparc_datastore.writer.sweep` for at most
``SWEEP_SECONDS`` (it stops between chunks; the rest waits for the next request).
- 500: an unexpected error (logged with its traceback).

GET and HEAD answer 200 without touching anything: MinIO probes its webhook endpoint with
HEAD (without the token) before it enables the target.  Settings are loaded at import,
so a configuration error stops the function at start-up.  One log line per request.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from typing import Any

import flask
import functions_framework

from hisparc_datastore.bucket import Bucket
from hisparc_datastore.config import ConfigError, Settings, load_settings
from hisparc_datastore.logs import setup_logging
from hisparc_datastore.notifications import NotificationError, parse_notification
from hisparc_datastore.writer import WriteResult, process_keys, sweep

log = logging.getLogger("hisparc_datastore.writer.http")

#: Notifications are small JSON documents; anything this big is not one.
MAX_BODY_BYTES = 4 * 1024 * 1024
#: A sweep request stops taking new chunks after this long, well inside Knative's default
#: 300 s request timeout; what is left waits for the next sweep.
SWEEP_SECONDS = 240.0
DESCRIPTION = "HiSPARC datastore writer: POST bucket notifications or a sweep CloudEvent.\n"


def _load() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise SystemExit(f"writer function: configuration error: {exc}") from None
    setup_logging(settings)
    if not settings.writer_auth_token and not settings.writer_anonymous:
        raise SystemExit(
            "writer function: configuration error: DATASTORE_WRITER_AUTH_TOKEN is not set; "
            "set it (the notification senders present it), or set [Writer] "
            "anonymous_notifications = true to accept notifications from anyone"
        )
    if not settings.writer_auth_token:
        log.warning("no DATASTORE_WRITER_AUTH_TOKEN: notifications from anyone are accepted "
                    "([Writer] anonymous_notifications = true)")
    return settings


SETTINGS = _load()

# One boto3 client per process: gunicorn may fork workers after this module is loaded.
_bucket_lock = threading.Lock()
_bucket: tuple[int, Bucket] | None = None
# One sweep at a time per process; a second request while one runs is answered at once.
_sweeping = threading.Lock()


def _store() -> Bucket:
    global _bucket
    with _bucket_lock:
        if _bucket is None or _bucket[0] != os.getpid():
            _bucket = (os.getpid(), Bucket.from_settings(SETTINGS))
        return _bucket[1]


def authorized(header: str | None, token: str) -> bool:
    """``Bearer <token>`` or the bare token, compared in constant time."""
    given = (header or "").strip()
    scheme, _, rest = given.partition(" ")
    if scheme.lower() == "bearer":
        given = rest.strip()
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def _json(document: dict[str, Any], status: int, headers: dict[str, str] | None = None
          ) -> flask.Response:
    # Streamed, so functions-framework never reads an unread request body afterwards.
    body = json.dumps(document).encode() + b"\n"
    return flask.Response(iter([body]), status=status, mimetype="application/json",
                          headers=headers)


def _read_body(request: flask.Request) -> bytes | None:
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        return None
    body = request.stream.read(MAX_BODY_BYTES + 1)
    return None if len(body) > MAX_BODY_BYTES else body


def _outcome(result: WriteResult) -> int:
    return 200 if result.ok else 503


def _handle(request: flask.Request) -> tuple[int, dict[str, Any], str]:
    """(status, response document, log text) for one POST."""
    token = SETTINGS.writer_auth_token
    if token and not authorized(request.headers.get("Authorization"), token):
        return 401, {"error": "missing or wrong token"}, "refused: token"
    body = _read_body(request)
    if body is None:
        return 413, {"error": "body too large"}, "refused: body too large"
    try:
        notification = parse_notification(
            dict(request.headers), body, bucket=SETTINGS.bucket_name
        )
    except NotificationError as exc:
        return 400, {"error": str(exc)}, f"bad notification: {exc}"
    for item in notification.ignored:
        level = logging.WARNING if item.reason.startswith("bucket is not") else logging.DEBUG
        log.log(level, "ignored %s %s/%s: %s", item.event_name, item.bucket, item.key,
                item.reason)
    ignored = f", {len(notification.ignored)} ignored" if notification.ignored else ""

    if notification.sweep:
        if not _sweeping.acquire(blocking=False):
            return 202, {"sweep": "already running"}, "sweep: already running"
        deadline = time.monotonic() + SWEEP_SECONDS
        try:
            result = sweep(_store(), SETTINGS, limit=notification.sweep_limit,
                           should_stop=lambda: time.monotonic() > deadline)
        finally:
            _sweeping.release()
        return _outcome(result), {"sweep": result.as_dict()}, f"sweep: {result.summary()}"

    keys = [ref.key for ref in notification.keys]
    if not keys:
        return 200, {"keys": 0}, f"{notification.kind}: nothing to do{ignored}"
    result = process_keys(keys, _store(), SETTINGS)
    return (
        _outcome(result),
        {"keys": len(keys), **result.as_dict()},
        f"{notification.kind}: {len(keys)} keys{ignored}: {result.summary()}",
    )


@functions_framework.http
def writer(request: flask.Request) -> flask.Response:
    """Write the objects a bucket notification names, or sweep on request."""
    if request.method in ("GET", "HEAD"):
        return flask.Response(iter([DESCRIPTION.encode()]), status=200, mimetype="text/plain")
    started = time.perf_counter()
    headers: dict[str, str] | None = None
    if request.method != "POST":
        status, document, text = 405, {"error": "POST only"}, f"refused: {request.method}"
    else:
        try:
            status, document, text = _handle(request)
        except Exception as exc:
            log.exception("writer failed unexpectedly")
            status, document = 500, {"error": f"internal error: {type(exc).__name__}"}
            text = f"internal error: {type(exc).__name__}: {exc}"
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    milliseconds = (time.perf_counter() - started) * 1000
    level = logging.INFO if status < 500 else logging.WARNING
    log.log(level, "%s %d %.0f ms: %s", request.method, status, milliseconds, text)
    return _json(document, status, headers)
