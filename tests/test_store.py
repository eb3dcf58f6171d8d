"""The one S3 client, :class:`hisparc_datastore.storage.store.Bucket`, against the real
S3 server of the session: what it stores, how each failure maps, and integrity on the way.

The upload function and the writer use exactly this client; their HTTP tests drive it end
to end, these pin its contract.  boto3 (the development tools' control-plane client) reads
back what was stored, so the objects are checked by another S3 implementation.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import sys
from collections.abc import Iterator

import boto3
import pytest

from hisparc_datastore.storage.store import (
    PICKLE_CONTENT_TYPE,
    Bucket,
    BucketError,
    ObjectMissing,
    ObjectRefused,
)

try:  # tests/ as a package, or tests/ on sys.path
    from .conftest import S3Endpoint
    from .faultproxy import Fault, FaultProxy
except ImportError:
    from conftest import S3Endpoint  # type: ignore[no-redef]
    from faultproxy import Fault, FaultProxy  # type: ignore[no-redef]

METADATA = {"station": "501", "cluster": "Amsterdam%20Science", "events": "3",
            "received": "2024-06-01T10:00:00.000000+00:00"}


def boto(bucket: Bucket, endpoint: S3Endpoint):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint.url, region_name="us-east-1",
                        aws_access_key_id=endpoint.access_key,
                        aws_secret_access_key=endpoint.secret_key)


def test_put_get_head_round_trip(bucket: Bucket, s3_endpoint: S3Endpoint) -> None:
    body = b"(lp0\n." * 1000
    etag = bucket.put("incoming/501/a.pickle", body, METADATA)
    assert etag == hashlib.md5(body).hexdigest()  # noqa: S324 - one part: the MD5
    stored = bucket.get("incoming/501/a.pickle")
    assert (stored.body, stored.etag, stored.metadata) == (body, etag, METADATA)
    assert bucket.metadata("incoming/501/a.pickle") == METADATA
    info = bucket.head("incoming/501/a.pickle")
    assert info is not None and (info.size, info.etag) == (len(body), etag)
    other = boto(bucket, s3_endpoint).head_object(Bucket=bucket.name, Key="incoming/501/a.pickle")
    assert other["ContentType"] == PICKLE_CONTENT_TYPE and other["Metadata"] == METADATA


def test_missing_and_refused_keys(bucket: Bucket) -> None:
    with pytest.raises(ObjectMissing):
        bucket.get("incoming/501/none.pickle")
    assert bucket.head("incoming/501/none.pickle") is None
    assert bucket.metadata("incoming/501/none.pickle") is None
    bucket.delete("incoming/501/none.pickle")  # deleting nothing is fine
    for key in ("incoming/501/x\x00.pickle", "incoming/501/\ud800.pickle",
                "incoming//501/x.pickle", "incoming/501/" + "a" * 1100):
        with pytest.raises(ObjectRefused):
            bucket.get(key)


def test_copy_move_and_metadata_replaced(bucket: Bucket) -> None:
    bucket.put("incoming/501/m.pickle", b"body", METADATA)
    bucket.copy("incoming/501/m.pickle", "archive/2024/06/01/501/m.pickle")
    assert bucket.get("archive/2024/06/01/501/m.pickle").metadata == METADATA
    bucket.move("incoming/501/m.pickle", "failed/501/m.pickle",
                {**METADATA, "failure-reason": "why"})
    assert bucket.head("incoming/501/m.pickle") is None
    moved = bucket.get("failed/501/m.pickle")
    assert moved.body == b"body" and moved.metadata["failure-reason"] == "why"
    with pytest.raises(ObjectMissing):
        bucket.copy("incoming/501/m.pickle", "archive/x.pickle")


def test_list_in_key_order_and_delete_many(bucket: Bucket) -> None:
    keys = [f"incoming/{station}/{n:032x}.pickle" for station in (7001, 501) for n in range(3)]
    for key in keys:
        bucket.put(key, b"x", {})
    bucket.put("archive/2024/01/01/501/y.pickle", b"y", {})
    assert [info.key for info in bucket.list("incoming/")] == sorted(keys)
    left = bucket.delete_many([*keys[:4], "incoming/501/x\x00.pickle"])
    assert left == ["incoming/501/x\x00.pickle"]  # a key the client cannot address stays
    assert [info.key for info in bucket.list("incoming/")] == sorted(keys[4:])


def test_a_body_damaged_on_the_way_is_refused(bucket: Bucket, s3_endpoint: S3Endpoint) -> None:
    """Every put carries a SHA-256 checksum the server verifies: a flipped byte is refused,
    nothing is stored (the upload answers it 404, the station resends)."""
    with FaultProxy(s3_endpoint.url.removeprefix("http://")) as proxy:
        through = Bucket(bucket.name, endpoint=proxy.url, access_key=s3_endpoint.access_key,
                         secret_key=s3_endpoint.secret_key, max_attempts=1)
        proxy.fault = Fault("flip", match=lambda method, path: method == "PUT")
        with pytest.raises(BucketError):
            through.put("incoming/501/damaged.pickle", b"the real body" * 100, METADATA)
    assert bucket.head("incoming/501/damaged.pickle") is None


def test_unreachable_bucket_is_a_bucket_error(unused_port: int) -> None:
    down = Bucket("nowhere", endpoint=f"http://127.0.0.1:{unused_port}", access_key="a",
                  secret_key="b", connect_timeout=0.3, read_timeout=0.3, max_attempts=1)
    with pytest.raises(BucketError) as raised:
        down.put("incoming/501/x.pickle", b"body", {})
    assert not isinstance(raised.value, ObjectMissing | ObjectRefused)
    with pytest.raises(BucketError):
        list(down.list("incoming/"))



def test_put_async_stores_and_fails_as_put_does(bucket: Bucket, s3_endpoint: S3Endpoint,
                                                unused_port: int) -> None:
    """The event loop's put: the same object, metadata and etag as :meth:`Bucket.put`, and
    the same exceptions (a refused key, an unreachable bucket, a body damaged on the way)."""
    body = b"(lp0\n." * 500

    async def puts() -> None:
        etag = await bucket.put_async("incoming/501/async.pickle", body, METADATA)
        assert etag == hashlib.md5(body).hexdigest()  # noqa: S324 - one part: the MD5
        with pytest.raises(ObjectRefused):
            await bucket.put_async("incoming/501/x\x00.pickle", body, METADATA)
        down = Bucket("nowhere", endpoint=f"http://127.0.0.1:{unused_port}", access_key="a",
                      secret_key="b", connect_timeout=0.3, read_timeout=0.3, max_attempts=1)
        with pytest.raises(BucketError) as raised:
            await down.put_async("incoming/501/x.pickle", body, {})
        assert not isinstance(raised.value, ObjectMissing | ObjectRefused)
        with FaultProxy(s3_endpoint.url.removeprefix("http://")) as proxy:
            through = Bucket(bucket.name, endpoint=proxy.url,
                             access_key=s3_endpoint.access_key,
                             secret_key=s3_endpoint.secret_key, max_attempts=1)
            proxy.fault = Fault("flip", match=lambda method, path: method == "PUT")
            with pytest.raises(BucketError):
                await through.put_async("incoming/501/damaged-async.pickle", body, METADATA)

    asyncio.run(puts())
    stored = bucket.get("incoming/501/async.pickle")
    assert (stored.body, stored.metadata) == (body, METADATA)
    other = boto(bucket, s3_endpoint).head_object(Bucket=bucket.name,
                                                  Key="incoming/501/async.pickle")
    assert other["ContentType"] == PICKLE_CONTENT_TYPE
    assert bucket.head("incoming/501/damaged-async.pickle") is None


FORKING = """\
import os, sys
from hisparc_datastore.storage.store import Bucket
bucket = Bucket(sys.argv[1], endpoint=sys.argv[2], access_key=sys.argv[3], secret_key=sys.argv[4])
pid = os.fork()  # as gunicorn forks a worker: the master made the client, no request
if pid == 0:
    os._exit(0 if bucket.get("incoming/501/fork.pickle").body == b"forked" else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_worker_forked_before_any_request_uses_the_client(bucket: Bucket,
                                                             s3_endpoint: S3Endpoint) -> None:
    """gunicorn imports a function in its master and forks the workers; the master makes
    no request (obstore is not fork-safe after one), so the workers' requests work."""
    bucket.put("incoming/501/fork.pickle", b"forked", {})
    done = subprocess.run(
        [sys.executable, "-c", FORKING, bucket.name, s3_endpoint.url, s3_endpoint.access_key,
         s3_endpoint.secret_key], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def unused_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
