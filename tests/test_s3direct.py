"""The writer's lean S3 client against the real S3 server, compared with boto3's view."""

from __future__ import annotations

import datetime as dt

import pytest

from hisparc_datastore.config import Settings
from hisparc_datastore.storage.bucket import Bucket, BucketError, ObjectMissing
from hisparc_datastore.storage.s3direct import DirectS3, Signer, canonical_query, uri_encode


@pytest.fixture
def direct(settings: Settings, bucket: Bucket) -> DirectS3:
    client = DirectS3.from_settings(settings)
    assert client is not None
    return client


KEYS = [
    "incoming/501/0123456789abcdef0123456789abcdef.pickle",
    "incoming/7001/with space+plus%percent.pickle",
    "incoming/7001/caf\u00e9 \u2603.pickle",
]


def test_put_get_round_trip_matches_boto3(direct: DirectS3, bucket: Bucket) -> None:
    metadata = {"station": "501", "cluster": "Amsterdam", "received": "2024-03-02T07:30:00+00:00"}
    for number, key in enumerate(KEYS):
        body = bytes(range(256)) * (number + 1)
        etag = direct.put(key, body, metadata)
        via_boto = bucket.get(key)
        assert via_boto.body == body and via_boto.metadata == metadata
        assert via_boto.etag == etag
        via_direct = direct.get(key)
        assert via_direct.body == body
        assert via_direct.metadata == metadata
        assert via_direct.etag == etag
        assert via_direct.last_modified == via_boto.last_modified
        assert via_direct.last_modified.tzinfo is not None


def test_list_pages_in_key_order(direct: DirectS3, bucket: Bucket) -> None:
    keys = sorted(f"incoming/{station}/{n:032x}.pickle" for station in (7, 501) for n in range(7))
    for key in keys:
        bucket.put(key, b"x" * 3, {})
    bucket.put("archive/2024/01/01/7/a.pickle", b"y", {})
    listed = list(direct.list("incoming/", page_size=4))
    assert [info.key for info in listed] == keys
    boto = {info.key: info for info in bucket.list("incoming/")}
    for info in listed:
        assert info.size == 3
        assert info.etag == boto[info.key].etag
        assert info.last_modified == boto[info.key].last_modified
    assert list(direct.list("nothing-here/")) == []


def test_missing_objects_and_deletes(direct: DirectS3, bucket: Bucket) -> None:
    with pytest.raises(ObjectMissing):
        direct.get("incoming/501/missing.pickle")
    direct.delete("incoming/501/missing.pickle")  # deleting nothing is fine
    for key in KEYS:
        bucket.put(key, b"data", {})
    assert direct.delete_many([*KEYS, "incoming/never/was.pickle"]) == []
    assert list(bucket.list("")) == []
    bucket.put(KEYS[0], b"data", {})
    direct.delete(KEYS[0])
    assert bucket.head(KEYS[0]) is None
    assert direct.delete_many([]) == []


def test_errors_are_bucket_errors(settings: Settings, bucket: Bucket) -> None:
    wrong = DirectS3(settings.bucket_name, settings.bucket_endpoint, "us-east-1",
                     settings.aws_access_key_id or "", "not-the-secret")
    with pytest.raises(BucketError) as refused:
        wrong.get(KEYS[0])
    assert not isinstance(refused.value, ObjectMissing)
    no_bucket = DirectS3(f"{settings.bucket_name}-absent", settings.bucket_endpoint,
                         "us-east-1", settings.aws_access_key_id or "",
                         settings.aws_secret_access_key or "")
    with pytest.raises(BucketError) as missing_bucket:
        no_bucket.get("incoming/1/a.pickle")
    assert not isinstance(missing_bucket.value, ObjectMissing)  # NoSuchBucket: not "done"
    down = DirectS3("b", "http://127.0.0.1:9", "us-east-1", "a", "b", timeout=0.5)
    with pytest.raises(BucketError):
        down.get(KEYS[0])


def test_from_settings_needs_static_credentials(settings: Settings) -> None:
    import dataclasses

    assert DirectS3.from_settings(dataclasses.replace(settings, aws_access_key_id=None)) is None
    with pytest.raises(ValueError, match="endpoint"):
        DirectS3("b", "ftp://example.org", "us-east-1", "a", "b")


def test_signature_matches_the_aws_documented_example() -> None:
    """AWS's SigV4 example for S3: GET /test.txt with a Range header (UNSIGNED payload
    differs from the documented one, so only the structure and the key derivation are
    checked against an independent computation)."""
    signer = Signer("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                    "us-east-1")
    when = dt.datetime(2013, 5, 24, tzinfo=dt.UTC)
    headers = signer.sign("GET", "/test.txt", "", {"host": "examplebucket.s3.amazonaws.com",
                                                   "range": "bytes=0-9"}, when)
    assert headers["x-amz-date"] == "20130524T000000Z"
    assert headers["authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature="
    )
    # The documented signing key for this secret, date, region and service.
    assert signer._key("20130524").hex() == (
        "dbb893acc010964918f1fd433add87c70e8b0db6be30c1fbeafefa5ec6ba8378"
    )


def test_uri_and_query_encoding() -> None:
    assert uri_encode("incoming/7001/a b+c~d.pickle") == "incoming/7001/a%20b%2Bc~d.pickle"
    assert canonical_query({"prefix": "incoming/", "list-type": "2"}) == (
        "list-type=2&prefix=incoming%2F"
    )


def test_server_side_copy_keeps_body_and_metadata(direct: DirectS3, bucket: Bucket) -> None:
    metadata = {"station": "7001", "cluster": "Leiden"}
    bucket.put(KEYS[1], b"payload" * 1000, metadata)
    direct.copy(KEYS[1], "archive/2024/01/01/7001/copy.pickle")
    copied = bucket.get("archive/2024/01/01/7001/copy.pickle")
    assert copied.body == b"payload" * 1000 and copied.metadata == metadata
    with pytest.raises(ObjectMissing):
        direct.copy("incoming/1/not-there.pickle", "archive/x.pickle")
