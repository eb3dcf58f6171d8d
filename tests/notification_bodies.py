"""Notification bodies as the real senders build them, for the parser and HTTP tests.

Shapes follow the senders' documentation: MinIO's webhook target (top-level EventName
and Key plus S3-style Records whose keys are query-escaped), AWS S3 event records
(version 2.1, URL-encoded keys with + for space), Ceph RGW records, and CloudEvents 1.0
built with the ``cloudevents`` SDK (an independent implementation of the spec).
"""

from __future__ import annotations

import json
from urllib.parse import quote_plus

from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

Headers = dict[str, str]


def _record(
    source: str,
    version: str,
    event_name: str,
    bucket: str,
    key: str,
    etag: str,
    size: int,
    safe: str = "/",
) -> dict[str, object]:
    return {
        "eventVersion": version,
        "eventSource": source,
        "awsRegion": "us-east-1",
        "eventTime": "2024-03-01T12:00:00.000Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "datastore"},
        "requestParameters": {"sourceIPAddress": "10.0.0.7"},
        "responseElements": {"x-amz-request-id": "17B8C2E5A1F0C3D9"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "writer",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "datastore"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": quote_plus(key, safe=safe),
                "size": size,
                "eTag": etag,
                "sequencer": "17B8C2E5A1F0C3D9",
            },
        },
    }


def minio_body(
    bucket: str, keys: list[str], event_name: str = "s3:ObjectCreated:Put", etag: str = "0" * 32
) -> bytes:
    """MinIO's webhook body: Records hold the events, keys query-escaped (/ as %2F)."""
    records = [
        _record("minio:s3", "2.0", event_name, bucket, key, etag, 1234, safe="")
        for key in keys
    ]
    for record in records:
        record["source"] = {"host": "10.0.0.7", "port": "", "userAgent": "MinIO (linux)"}
    return json.dumps(
        {"EventName": event_name, "Key": f"{bucket}/{keys[0]}", "Records": records}
    ).encode()


def aws_body(
    bucket: str, keys: list[str], event_name: str = "ObjectCreated:Put", etag: str = "0" * 32
) -> bytes:
    return json.dumps(
        {"Records": [_record("aws:s3", "2.1", event_name, bucket, k, etag, 1234) for k in keys]}
    ).encode()


def ceph_body(
    bucket: str, keys: list[str], event_name: str = "ObjectCreated:Put", etag: str = "0" * 32
) -> bytes:
    records = []
    for key in keys:
        record = _record("ceph:s3", "2.2", event_name, bucket, key, etag, 1234)
        record["eventId"] = "1709294400.123456.0"
        record["opaqueData"] = ""
        s3 = record["s3"]
        assert isinstance(s3, dict)
        s3["object"].update({"versionId": "", "metadata": [], "tags": []})
        records.append(record)
    return json.dumps({"Records": records}).encode()


def s3_test_event(bucket: str) -> bytes:
    return json.dumps(
        {
            "Service": "Amazon S3",
            "Event": "s3:TestEvent",
            "Time": "2024-03-01T12:00:00.000Z",
            "Bucket": bucket,
            "RequestId": "5582815E1AEA5ADF",
            "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
        }
    ).encode()


def cloudevent_binary(inner: bytes | None, event_type: str) -> tuple[Headers, bytes]:
    attributes = {"type": event_type, "source": "/test/bucket"}
    if inner is None:
        headers, body = to_binary(CloudEvent(attributes, None))
        return dict(headers), body or b""
    attributes["datacontenttype"] = "application/json"
    headers, body = to_binary(CloudEvent(attributes, json.loads(inner)))
    return dict(headers), body


def cloudevent_structured(
    inner: bytes | None, event_type: str, base64_data: bool = False
) -> tuple[Headers, bytes]:
    attributes = {"type": event_type, "source": "/test/bucket"}
    if inner is None:
        data: object = None
    elif base64_data:
        attributes["datacontenttype"] = "application/octet-stream"
        data = inner  # bytes: the SDK puts them in data_base64
    else:
        attributes["datacontenttype"] = "application/json"
        data = json.loads(inner)
    headers, body = to_structured(CloudEvent(attributes, data))
    return dict(headers), body
