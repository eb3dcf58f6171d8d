"""HTTP entry point of the writer function: ``functions-framework --target writer``.

A thin shell: check the token, read the body within a small limit, parse it with
:func:`hisparc_datastore.writer.notifications.parse_notification`, and hand the keys (or a sweep
request) to the process's :class:`~hisparc_datastore.writer.service.WriterService`, which
writes them, keeps what must wait, and sweeps in the background.  The status tells the
sender what to do:

- 200: every notified key is written and archived, was already done, is quarantined in
  ``failed/``, or *waits* for a reason of its own (a day file held open by a reader, a
  day file or an object with a retry record: listed under ``deferred`` in the answer).
  One bad object or day file never stalls the sender's queue (MinIO delivers in order
  and retries the head for ever); nothing to do (the S3 test event, a removal) is 200 too;
- 202: a sweep request: the sweep runs in the background (``started``), or one already
  does (``running``); its outcome is logged;
- 400: the body is not a notification (retrying it cannot help);
- 401: ``DATASTORE_WRITER_AUTH_TOKEN`` is set and the request does not carry it, either
  as ``Authorization: Bearer <token>`` or as the bare token (MinIO's webhook sends its
  ``auth_token`` setting verbatim as the header value); compared in constant time;
- 413: the body is larger than a notification can be;
- 503: an outage of the whole writer (the bucket unreachable, the volume full, read-only
  or gone, out of memory): the sender should retry, and the objects wait in
  ``incoming/`` for that retry or the next sweep;
- 500: an unexpected error (logged with its traceback).

``GET /healthz`` is the liveness check: 200 while the writer makes progress, 503 when a
run has been stuck in I/O for minutes (a hung volume) or its background thread died, so
the kubelet restarts it; a long, healthy sweep keeps it at 200.  Every other GET and HEAD
answers 200 without touching anything: MinIO probes its webhook endpoint with HEAD
(without the token) before it enables the target.  Settings are loaded at import, so a
configuration error stops the function at start-up.  One log line per request.
"""

from __future__ import annotations

import atexit
import hmac
import json
import logging
import threading
import time
from typing import Any

import flask
import functions_framework

from hisparc_datastore import metrics
from hisparc_datastore.config import ConfigError, Settings, load_settings
from hisparc_datastore.format import payload
from hisparc_datastore.logs import setup_logging
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.writer.notifications import NotificationError, parse_notification
from hisparc_datastore.writer.service import WriterService

log = logging.getLogger("hisparc_datastore.writer.http")

#: Notifications are small JSON documents; anything this big is not one.
MAX_BODY_BYTES = 4 * 1024 * 1024
HEALTH_PATH = "/healthz"
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


# The decoder must work on this interpreter (docs/SECURITY.md): refuse to start if not.
try:
    payload.self_check()
except RuntimeError as exc:
    raise SystemExit(f"writer function: {exc}") from None

SETTINGS = _load()

# One boto3 client per process, made on first use: gunicorn forks workers after import.
_bucket_lock = threading.Lock()
_bucket: Bucket | None = None


def _store() -> Bucket:
    global _bucket
    with _bucket_lock:
        if _bucket is None:
            _bucket = Bucket.from_settings(SETTINGS)
        return _bucket


SERVICE = WriterService(SETTINGS, _store)
atexit.register(SERVICE.stop)  # a graceful exit lets the background chunk finish


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
        state = SERVICE.request_sweep(notification.sweep_limit)
        return 202, {"sweep": state, "_kind": "sweep"}, f"sweep: {state}"

    keys = [ref.key for ref in notification.keys]
    if not keys:
        return (200, {"keys": 0, "_kind": notification.kind},
                f"{notification.kind}: nothing to do{ignored}")
    result = SERVICE.notify(keys)
    fields = {"keys": keys[:20], "archived": len(result.archived), "rows": result.rows,
              "outcome": "ok" if result.ok else "outage"}
    return (
        200 if result.ok else 503,
        {"keys": len(keys), **result.as_dict(), "_kind": notification.kind, "_fields": fields},
        f"{notification.kind}: {len(keys)} keys{ignored}: {result.summary()}",
    )


@functions_framework.http
def writer(request: flask.Request) -> flask.Response:
    """Write the objects a bucket notification names, or sweep on request."""
    if request.method in ("GET", "HEAD"):
        if request.path == HEALTH_PATH:
            healthy, document = SERVICE.health()
            if not healthy:
                log.error("liveness check failed: %s", document)
            return _json(document, 200 if healthy else 503)
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
    kind = str(document.pop("_kind", "error" if status >= 500 else "refused"))
    metrics.NOTIFICATIONS.labels(kind, str(status)).inc()
    level = logging.INFO if status < 500 else logging.WARNING
    log.log(level, "%s %d %.0f ms: %s", request.method, status, milliseconds, text,
            extra={"fields": {"status": status, "kind": kind, "ms": round(milliseconds, 1),
                              **document.pop("_fields", {})}})
    return _json(document, status, headers)
