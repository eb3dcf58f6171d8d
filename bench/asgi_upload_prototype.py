"""A prototype, not the upload function: its core served as an ASGI application.

For bench/upload_asgi.py only (docs/PERFORMANCE.md, "The single-event upload"): how
much CPU a one-event upload costs when a request waiting on the network (its body, or
the bucket's answer to the put) is a coroutine instead of a thread.  It runs the same
core (:func:`hisparc_datastore.upload.protocol.handle_upload`, every check) with the
put taken aside and then made with obstore's ``put_async``, and counts and logs as the
function does.  What the function has and this lacks: the body limit before reading,
``GET``/``HEAD`` and method answers, an idle timeout on the body, the answers to a
failing count or log; the launcher's header timeout has no counterpart yet.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hisparc_datastore import metrics
from hisparc_datastore.config import load_settings
from hisparc_datastore.logs import setup_logging
from hisparc_datastore.stations import StationList
from hisparc_datastore.storage.store import PICKLE_CONTENT_TYPE, Bucket
from hisparc_datastore.upload import protocol as core

SETTINGS = load_settings()
setup_logging(SETTINGS)
STATIONS = StationList(SETTINGS.station_list)
BUCKET = Bucket.from_settings(SETTINGS, connect_timeout=1.0, read_timeout=3.0,
                              max_attempts=2, retry_seconds=4.0)
log = logging.getLogger("hisparc_datastore.upload.protocol")


class PutTakenAside:
    """A store whose put only remembers what to store, for the caller to await it."""

    def __init__(self) -> None:
        self.pending: tuple[str, bytes, dict[str, str]] | None = None

    def put(self, key: str, body: bytes, metadata: Mapping[str, str],
            content_type: str = PICKLE_CONTENT_TYPE) -> str:
        self.pending = (key, body, {"Content-Type": content_type, **metadata})
        return ""


async def application(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                      send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    started = time.perf_counter()
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    content_type = next((value.decode("latin-1") for name, value in scope["headers"]
                         if name == b"content-type"), "")
    store = PutTakenAside()
    answer = core.handle_upload(b"".join(chunks), content_type, STATIONS, store,
                                SETTINGS.minimum_year, dt.datetime.now(dt.UTC))
    if store.pending is not None:
        key, body, attributes = store.pending
        try:
            await BUCKET._store().put_async(key, body, attributes=attributes,
                                            use_multipart=False)
        except Exception as exc:  # the function answers a failed put the same way
            answer = core.UploadAnswer(code=core.DATABASE_UNREACHABLE, http_status=503,
                                       reason=f"bucket: {type(exc).__name__}")
    seconds = time.perf_counter() - started
    metrics.child(metrics.UPLOADS, answer.code).inc()
    metrics.UPLOAD_SECONDS.observe(seconds)
    metrics.UPLOAD_BYTES.observe(answer.nbytes)
    if answer.code == core.STORED:
        metrics.UPLOAD_EVENTS.observe(answer.events)
        if answer.station is not None:
            metrics.child(metrics.STATION_LAST_UPLOAD, str(answer.station)).set(time.time())
    log.info(core.log_line(answer, seconds * 1000),
             extra={"fields": core.log_fields(answer, seconds * 1000)})
    text = answer.code.encode("ascii")
    await send({"type": "http.response.start", "status": answer.http_status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(text)).encode("ascii"))]})
    await send({"type": "http.response.body", "body": text})
