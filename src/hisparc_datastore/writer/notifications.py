"""Bucket notifications, in every shape the writer can be sent, reduced to object keys.

The writer sits behind whatever delivers the bucket's events: MinIO's webhook target, an
S3 event record stream (AWS, Ceph RGW, SeaweedFS), or a CloudEvents broker (Knative) that
wraps either of those, in binary or structured mode.  This module is pure: headers and
body in, a :class:`Notification` out, so every shape is tested without a server.

Accepted shapes
---------------
- MinIO webhook: ``{"EventName": "s3:ObjectCreated:Put", "Key": "<bucket>/<key>",
  "Records": [<S3 event record>, ...]}``.  The records are used when present (their keys
  are URL-encoded); the top-level ``Key`` (not encoded) only when there are none.
- S3 event records: ``{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket":
  {"name": ...}, "object": {"key": <URL-encoded, + for space>, "eTag": ...}}}, ...]}``;
  the event name may carry MinIO's ``s3:`` prefix.  A single record on its own is taken
  too (some brokers send one record per CloudEvent).
- CloudEvents 1.0, binary mode: ``ce-specversion`` and ``ce-type`` headers, the body is
  the event's data (one of the shapes above).
- CloudEvents 1.0, structured mode: ``Content-Type: application/cloudevents+json``, the
  body a JSON event whose ``data`` (JSON, or a string holding JSON) or ``data_base64``
  holds one of the shapes above; ``application/cloudevents-batch+json`` (a JSON array of
  such events) is taken as well.
- A sweep request (:data:`SWEEP_TYPE`): a CloudEvent of type
  ``org.hisparc.datastore.sweep``, data optional; ``{"limit": N}`` caps the number of
  objects the sweep processes.  A Knative PingSource cannot set the event type (it always
  sends ``dev.knative.sources.ping``), so a ping event whose data is
  ``{"action": "sweep"}`` (optionally with ``"limit"``) is a sweep request too.

What is ignored (returned in ``Notification.ignored`` with the reason, never an error):
the S3 test event (``s3:TestEvent``), events other than object creation (ObjectRemoved,
ObjectAccessed, ...), keys outside ``incoming/`` (the writer's own moves to ``archive/``
and ``failed/`` notify too), keys no S3 server can hold (not UTF-8, over 1024 bytes),
and, when ``bucket`` is given, keys in other buckets.

A body that is none of these raises :class:`NotificationError` (and nothing else does,
whatever the body: malformed, nested deeper than the parser recurses, of unexpected
types): the HTTP layer answers 400, because retrying garbage can never succeed.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from hisparc_datastore.format.keys import INCOMING, valid_key

#: CloudEvent type of a sweep request (e.g. from a scheduler).
SWEEP_TYPE = "org.hisparc.datastore.sweep"
#: The fixed type of a Knative PingSource event; a sweep request when its data says so.
PING_TYPE = "dev.knative.sources.ping"

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
TEST_EVENT = "s3:TestEvent"


class NotificationError(ValueError):
    """The body is not a notification this writer understands (answer 400)."""


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str
    event_name: str


@dataclass(frozen=True)
class Ignored:
    """A record that was understood and deliberately not acted on."""

    bucket: str
    key: str
    event_name: str
    reason: str


@dataclass(frozen=True)
class Notification:
    keys: list[ObjectRef] = field(default_factory=list)
    sweep: bool = False
    sweep_limit: int | None = None
    ignored: list[Ignored] = field(default_factory=list)
    kind: str = "s3"  # what the body was: minio, s3, cloudevent-binary, ... (for the log)


def _lower_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(name).lower(): str(value) for name, value in headers.items()}


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _load_json(data: bytes | str, what: str) -> Any:
    """Parse JSON; anything that is not (or nests deeper than the parser can) is a 400.

    The parser recurses per level of nesting: a body of 100,000 ``[`` raises
    ``RecursionError``, which must be the sender's error, not a 500.
    """
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotificationError(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise NotificationError(f"{what} nests too deeply") from None


def _is_create(event_name: str) -> bool:
    return event_name.removeprefix("s3:").startswith("ObjectCreated:")


def _classify(
    bucket: str, key: str, event_name: str, wanted_bucket: str | None
) -> ObjectRef | Ignored:
    if not _is_create(event_name):
        return Ignored(bucket, key, event_name, "not an object-created event")
    if not valid_key(key):
        return Ignored(bucket, key.encode("utf-8", "replace").decode(), event_name,
                       "not a key S3 can hold (1 to 1024 bytes of UTF-8)")
    if not key.startswith(INCOMING):
        return Ignored(bucket, key, event_name, "outside incoming/")
    if wanted_bucket is not None and bucket != wanted_bucket:
        return Ignored(bucket, key, event_name, f"bucket is not {wanted_bucket}")
    return ObjectRef(bucket, key, event_name)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise NotificationError(f"{what} is missing or not a string")
    return value


def _record_ref(record: Any, wanted_bucket: str | None) -> ObjectRef | Ignored:
    """One S3 event record (AWS, Ceph, MinIO); keys arrive URL-encoded with + for space."""
    if not isinstance(record, dict):
        raise NotificationError("an event record is not a JSON object")
    event_name = _text(record.get("eventName"), "record eventName")
    s3 = record.get("s3")
    if not isinstance(s3, dict):
        raise NotificationError("an event record has no s3 object")
    bucket_info, object_info = s3.get("bucket"), s3.get("object")
    if not isinstance(bucket_info, dict) or not isinstance(object_info, dict):
        raise NotificationError("an event record lacks s3.bucket or s3.object")
    bucket = _text(bucket_info.get("name"), "record s3.bucket.name")
    key = unquote_plus(_text(object_info.get("key"), "record s3.object.key"))
    return _classify(bucket, key, event_name, wanted_bucket)


def _split(refs: Iterable[ObjectRef | Ignored]) -> tuple[list[ObjectRef], list[Ignored]]:
    keys: list[ObjectRef] = []
    ignored: list[Ignored] = []
    for ref in refs:
        (keys if isinstance(ref, ObjectRef) else ignored).append(ref)
    return keys, ignored


def _s3_document(document: Any, wanted_bucket: str | None) -> Notification:
    """A MinIO webhook body, an S3 event document, a single record, or the S3 test event."""
    if not isinstance(document, dict):
        raise NotificationError("the notification is not a JSON object")
    if document.get("Event") == TEST_EVENT:
        return Notification(
            ignored=[Ignored(str(document.get("Bucket", "")), "", TEST_EVENT, "test event")],
            kind="s3-test",
        )
    records = document.get("Records")
    if records is not None and not isinstance(records, list):
        raise NotificationError("Records is not a list")
    minio = "EventName" in document
    kind = "minio" if minio else "s3"
    if records:
        keys, ignored = _split(_record_ref(record, wanted_bucket) for record in records)
        return Notification(keys=keys, ignored=ignored, kind=kind)
    if minio:
        event_name = _text(document.get("EventName"), "EventName")
        full_key = _text(document.get("Key"), "Key")
        bucket, slash, key = full_key.partition("/")
        if not slash:
            raise NotificationError("Key is not <bucket>/<key>")
        keys, ignored = _split([_classify(bucket, key, event_name, wanted_bucket)])
        return Notification(keys=keys, ignored=ignored, kind=kind)
    if records is not None:  # an empty record list: nothing to do
        return Notification(kind=kind)
    if "eventName" in document and "s3" in document:
        keys, ignored = _split([_record_ref(document, wanted_bucket)])
        return Notification(keys=keys, ignored=ignored, kind="s3-record")
    raise NotificationError("neither a MinIO webhook body nor S3 event records")


def _positive_limit(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NotificationError("sweep limit must be a positive integer")
    return value


def _cloudevent(
    event_type: str, data: Any, has_data: bool, wanted_bucket: str | None, kind: str
) -> Notification:
    """Dispatch on the CloudEvent type; ``data`` is already parsed JSON (or None)."""
    if event_type == SWEEP_TYPE:
        limit = data.get("limit") if isinstance(data, dict) else None
        return Notification(sweep=True, sweep_limit=_positive_limit(limit), kind=kind)
    if event_type == PING_TYPE:
        if isinstance(data, dict) and data.get("action") == "sweep":
            return Notification(
                sweep=True, sweep_limit=_positive_limit(data.get("limit")), kind=kind
            )
        raise NotificationError(
            'a ping event is a sweep request only with data {"action": "sweep"}'
        )
    if not has_data:
        raise NotificationError(f"CloudEvent of type {event_type!r} carries no data")
    inner = _s3_document(data, wanted_bucket)
    return Notification(
        keys=inner.keys, ignored=inner.ignored, kind=f"{kind}/{inner.kind}"
    )


def _structured_event(event: Any, wanted_bucket: str | None, kind: str) -> Notification:
    if not isinstance(event, dict):
        raise NotificationError("a structured CloudEvent is not a JSON object")
    _text(event.get("specversion"), "CloudEvent specversion")
    event_type = _text(event.get("type"), "CloudEvent type")
    if "data_base64" in event:
        try:
            raw = base64.b64decode(_text(event["data_base64"], "data_base64"), validate=True)
        except binascii.Error as exc:
            raise NotificationError(f"data_base64 is not base64: {exc}") from None
        data: Any = _load_json(raw, "CloudEvent data_base64") if raw.strip() else None
        has_data = data is not None
    elif "data" in event:
        data = event["data"]
        if isinstance(data, str):  # JSON carried as a string
            data = _load_json(data, "CloudEvent data") if data.strip() else None
        has_data = data is not None
    else:
        data, has_data = None, False
    return _cloudevent(event_type, data, has_data, wanted_bucket, kind)


def _merge(parts: list[Notification], kind: str) -> Notification:
    limits = [part.sweep_limit for part in parts if part.sweep]
    numbers = [limit for limit in limits if limit is not None]
    unlimited = not limits or len(numbers) < len(limits)
    return Notification(
        keys=[ref for part in parts for ref in part.keys],
        sweep=bool(limits),
        sweep_limit=None if unlimited else max(numbers),
        ignored=[item for part in parts for item in part.ignored],
        kind=kind,
    )


def parse_notification(
    headers: Mapping[str, str], body: bytes, *, bucket: str | None = None
) -> Notification:
    """Reduce one HTTP notification to the incoming/ keys to write (or a sweep request).

    ``bucket``, when given, is the configured bucket: records for other buckets are
    ignored (reported in ``ignored``), since this writer cannot read them.
    """
    lowered = _lower_headers(headers)
    media_type = _media_type(lowered.get("content-type", ""))

    if "ce-specversion" in lowered:  # binary mode: attributes in headers, body is data
        event_type = lowered.get("ce-type", "").strip()
        if not event_type:
            raise NotificationError("binary CloudEvent without ce-type")
        has_data = bool(body.strip())
        data = _load_json(body, "CloudEvent data") if has_data else None
        return _cloudevent(event_type, data, has_data, bucket, "cloudevent-binary")

    if not body.strip():
        raise NotificationError("empty body")
    document = _load_json(body, "body")
    if media_type == STRUCTURED:
        return _structured_event(document, bucket, "cloudevent-structured")
    if media_type == BATCH:
        if not isinstance(document, list):
            raise NotificationError("a CloudEvents batch is not a JSON array")
        parts = [_structured_event(event, bucket, "cloudevent-batch") for event in document]
        return _merge(parts, "cloudevent-batch")
    # A structured CloudEvent sent with a plain JSON content type is still recognisable.
    if isinstance(document, dict) and "specversion" in document and "type" in document:
        return _structured_event(document, bucket, "cloudevent-structured")
    return _s3_document(document, bucket)
