"""The notification parser: every sender's shape reduces to the same incoming/ keys."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from hisparc_datastore.writer.notifications import (
    PING_TYPE,
    SWEEP_TYPE,
    NotificationError,
    ObjectRef,
    parse_notification,
)

try:  # tests/ as a package, or tests/ on sys.path (pytest's rootdir-less prepend mode)
    from .notification_bodies import (
        aws_body,
        ceph_body,
        cloudevent_binary,
        cloudevent_structured,
        minio_body,
        s3_test_event,
    )
except ImportError:
    from notification_bodies import (  # type: ignore[no-redef]
        aws_body,
        ceph_body,
        cloudevent_binary,
        cloudevent_structured,
        minio_body,
        s3_test_event,
    )

BUCKET = "hisparc-datastore"
KEYS = ["incoming/501/0123456789abcdef0123456789abcdef.pickle", "incoming/7001/odd name+x.pickle"]
JSON = {"Content-Type": "application/json"}
S3_TYPE = "com.amazonaws.s3.ObjectCreated"


def keys_of(headers: dict[str, str], body: bytes, bucket: str | None = BUCKET) -> list[str]:
    return [ref.key for ref in parse_notification(headers, body, bucket=bucket).keys]


@pytest.mark.parametrize("builder", [minio_body, aws_body, ceph_body])
def test_s3_shapes_give_decoded_keys(builder) -> None:
    notification = parse_notification(JSON, builder(BUCKET, KEYS), bucket=BUCKET)
    assert [ref.key for ref in notification.keys] == KEYS
    assert all(ref.bucket == BUCKET for ref in notification.keys)
    assert not notification.sweep
    assert not notification.ignored


def test_minio_records_keys_are_query_escaped() -> None:
    body = minio_body(BUCKET, KEYS[:1])
    assert json.loads(body)["Records"][0]["s3"]["object"]["key"].startswith("incoming%2F")
    notification = parse_notification(JSON, body)
    assert notification.keys == [ObjectRef(BUCKET, KEYS[0], "s3:ObjectCreated:Put")]
    assert notification.kind == "minio"


def test_minio_body_without_records_uses_top_level_key() -> None:
    body = json.dumps({"EventName": "s3:ObjectCreated:Put", "Key": f"{BUCKET}/{KEYS[1]}"})
    assert keys_of(JSON, body.encode()) == [KEYS[1]]  # top-level Key is not escaped


def test_single_record_is_accepted() -> None:
    record = json.loads(aws_body(BUCKET, KEYS[:1]))["Records"][0]
    assert keys_of(JSON, json.dumps(record).encode()) == KEYS[:1]


@pytest.mark.parametrize(
    "event_name",
    ["ObjectRemoved:Delete", "s3:ObjectRemoved:Delete", "s3:ObjectAccessed:Get",
     "ObjectRestore:Post", "s3:ObjectAccessed:Head"],
)
def test_non_create_events_are_ignored(event_name: str) -> None:
    notification = parse_notification(JSON, aws_body(BUCKET, KEYS, event_name=event_name))
    assert notification.keys == []
    assert {item.reason for item in notification.ignored} == {"not an object-created event"}


@pytest.mark.parametrize(
    "event_name",
    ["ObjectCreated:Copy", "s3:ObjectCreated:CompleteMultipartUpload", "ObjectCreated:Post"],
)
def test_every_create_event_counts(event_name: str) -> None:
    assert keys_of(JSON, aws_body(BUCKET, KEYS, event_name=event_name)) == KEYS


def test_keys_outside_incoming_are_ignored() -> None:
    keys = ["archive/2024/03/01/501/a.pickle", "failed/501/b.pickle", "incoming/501/c.pickle",
            "suspicious/501/d.pickle", "incomingx/e.pickle"]
    notification = parse_notification(JSON, minio_body(BUCKET, keys))
    assert [ref.key for ref in notification.keys] == ["incoming/501/c.pickle"]
    assert len(notification.ignored) == 4
    assert {item.reason for item in notification.ignored} == {"outside incoming/"}


def test_other_bucket_is_ignored_with_reason() -> None:
    notification = parse_notification(JSON, aws_body("someone-else", KEYS), bucket=BUCKET)
    assert notification.keys == []
    assert [item.reason for item in notification.ignored] == [f"bucket is not {BUCKET}"] * 2
    # Without a configured bucket every bucket's keys are reported.
    assert keys_of(JSON, aws_body("someone-else", KEYS), bucket=None) == KEYS


def test_s3_test_event_is_ignored() -> None:
    notification = parse_notification(JSON, s3_test_event(BUCKET))
    assert notification.keys == [] and not notification.sweep
    assert notification.ignored[0].reason == "test event"


def test_empty_records_is_nothing_to_do() -> None:
    assert parse_notification(JSON, b'{"Records": []}').keys == []


@pytest.mark.parametrize("builder", [minio_body, aws_body, ceph_body])
def test_cloudevent_binary_wrapping_each_shape(builder) -> None:
    headers, body = cloudevent_binary(builder(BUCKET, KEYS), S3_TYPE)
    assert "ce-specversion" in headers
    notification = parse_notification(headers, body, bucket=BUCKET)
    assert [ref.key for ref in notification.keys] == KEYS
    assert notification.kind.startswith("cloudevent-binary/")


@pytest.mark.parametrize("base64_data", [False, True])
@pytest.mark.parametrize("builder", [minio_body, aws_body, ceph_body])
def test_cloudevent_structured_wrapping_each_shape(builder, base64_data: bool) -> None:
    headers, body = cloudevent_structured(builder(BUCKET, KEYS), S3_TYPE, base64_data)
    assert headers["content-type"] == "application/cloudevents+json"
    assert (b'"data_base64"' in body) == base64_data
    notification = parse_notification(headers, body, bucket=BUCKET)
    assert [ref.key for ref in notification.keys] == KEYS
    assert notification.kind.startswith("cloudevent-structured/")


def test_structured_data_as_json_string_and_batch_mode() -> None:
    inner = aws_body(BUCKET, KEYS).decode()
    event = {"specversion": "1.0", "id": "1", "source": "/s", "type": S3_TYPE, "data": inner}
    headers = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
    assert keys_of(headers, json.dumps(event).encode()) == KEYS
    batch = json.dumps([event, dict(event, id="2")]).encode()
    notification = parse_notification(
        {"content-type": "application/cloudevents-batch+json"}, batch
    )
    assert [ref.key for ref in notification.keys] == KEYS + KEYS


def test_header_names_are_case_insensitive() -> None:
    headers, body = cloudevent_binary(aws_body(BUCKET, KEYS), S3_TYPE)
    shouted = {name.title(): value for name, value in headers.items()}
    assert keys_of(shouted, body) == KEYS


def test_sweep_request_binary_and_structured() -> None:
    headers, body = cloudevent_binary(None, SWEEP_TYPE)
    notification = parse_notification(headers, body)
    assert notification.sweep and notification.sweep_limit is None and notification.keys == []
    headers, body = cloudevent_structured(b'{"limit": 250}', SWEEP_TYPE)
    notification = parse_notification(headers, body)
    assert notification.sweep and notification.sweep_limit == 250


def test_ping_source_event_requests_a_sweep_by_its_data() -> None:
    headers, body = cloudevent_binary(b'{"action": "sweep", "limit": 10}', PING_TYPE)
    notification = parse_notification(headers, body)
    assert notification.sweep and notification.sweep_limit == 10
    headers, body = cloudevent_binary(b'{"message": "Hello world!"}', PING_TYPE)
    with pytest.raises(NotificationError):
        parse_notification(headers, body)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        (JSON, b""),
        (JSON, b"not json"),
        (JSON, b"\xff\xfe"),
        (JSON, b"[1, 2]"),
        (JSON, b'{"hello": "world"}'),
        (JSON, b'{"Records": "nope"}'),
        (JSON, b'{"Records": [{"eventName": "ObjectCreated:Put"}]}'),
        (JSON, b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {}}}]}'),
        (JSON, b'{"EventName": "s3:ObjectCreated:Put", "Key": "no-slash"}'),
        ({"ce-specversion": "1.0", "ce-type": S3_TYPE}, b""),
        ({"ce-specversion": "1.0"}, b"{}"),
        ({"ce-specversion": "1.0", "ce-type": S3_TYPE}, b"{broken"),
        ({"Content-Type": "application/cloudevents+json"}, b'{"type": "x"}'),
        ({"Content-Type": "application/cloudevents+json"},
         b'{"specversion": "1.0", "type": "x", "data_base64": "!!!"}'),
        ({"Content-Type": "application/cloudevents-batch+json"}, b'{"specversion": "1.0"}'),
        ({"ce-specversion": "1.0", "ce-type": SWEEP_TYPE}, b'{"limit": -1}'),
        ({"ce-specversion": "1.0", "ce-type": SWEEP_TYPE}, b'{"limit": true}'),
    ],
)
def test_garbage_is_a_notification_error(headers: dict[str, str], body: bytes) -> None:
    with pytest.raises(NotificationError):
        parse_notification(headers, body)


# -- whatever the body, a Notification or a NotificationError (the HTTP layer's 400) ------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                     st.text(max_size=20),
                     st.sampled_from(["ObjectCreated:Put", "s3:ObjectCreated:Post",
                                      "incoming/501/a.pickle", "1.0", SWEEP_TYPE, PING_TYPE,
                                      "sweep", "bucket", "\ud800", "%00"]))
_keys = st.sampled_from(["Records", "EventName", "Key", "eventName", "s3", "bucket", "object",
                         "name", "key", "specversion", "type", "data", "data_base64",
                         "limit", "action", "Event", "Bucket"]) | st.text(max_size=8)
_documents = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(_keys, children, max_size=5),
    max_leaves=25,
)
_headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "application/cloudevents+json",
                                     "application/cloudevents-batch+json", "text/plain"]),
    "ce-specversion": st.just("1.0"),
    "ce-type": st.sampled_from([SWEEP_TYPE, PING_TYPE, "com.example", ""]),
})


def _parse_or_refuse(headers: dict[str, str], body: bytes) -> None:
    try:
        notification = parse_notification(headers, body, bucket="bucket")
    except NotificationError:
        return
    assert all(ref.key.startswith("incoming/") for ref in notification.keys)


@hypothesis_settings(max_examples=400, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
@given(_headers, _documents)
def test_any_json_document_is_a_notification_or_a_400(headers: dict[str, str],
                                                       document: object) -> None:
    body = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
    _parse_or_refuse(headers, body)
    # The same document as a structured CloudEvent's data, a string holding JSON, base64.
    _parse_or_refuse({"Content-Type": "application/cloudevents+json"}, json.dumps(
        {"specversion": "1.0", "type": "x", "data": json.dumps(document)}).encode())


@hypothesis_settings(max_examples=200, deadline=None)
@given(_headers, st.binary(max_size=200))
def test_any_bytes_are_a_notification_or_a_400(headers: dict[str, str], body: bytes) -> None:
    _parse_or_refuse(headers, body)


@pytest.mark.parametrize("body", [
    b"[" * 100_000, b'{"a":' * 100_000, b'{"Records": [' + b"[" * 100_000,
    json.dumps({"specversion": "1.0", "type": "x", "data": "[" * 100_000}).encode(),
])
def test_nesting_deeper_than_the_parser_goes_is_a_400(body: bytes) -> None:
    with pytest.raises(NotificationError, match=r"nests too deeply|not JSON"):
        parse_notification({"Content-Type": "application/cloudevents+json"}, body)
