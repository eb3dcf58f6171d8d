"""The upload function's put over s3direct stores exactly what ``Bucket.put`` stores.

functions/upload/main.py puts through ``s3direct.DirectS3`` (a lean SigV4 client) when static
credentials are configured, for CPU and cold start (docs/PERFORMANCE.md).  The HTTP tests
(tests/test_upload_http.py) drive that path end to end; these pin the stored object
against the boto3 path, the failure mapping and the fallback, on the real S3 server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from hisparc_datastore.config import Settings
from hisparc_datastore.storage.bucket import PICKLE_CONTENT_TYPE, Bucket, BucketError

SOURCE = Path(__file__).resolve().parents[1] / "functions" / "upload" / "main.py"


@pytest.fixture
def main_module(bucket: Bucket) -> ModuleType:
    """functions/upload/main.py imported as the server imports it (config from the env)."""
    spec = importlib.util.spec_from_file_location("upload_main_under_test", SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_static_credentials_put_through_the_direct_client(main_module: ModuleType) -> None:
    assert isinstance(main_module.STORE, main_module.DirectS3)


def test_direct_put_stores_what_bucket_put_stores(
    main_module: ModuleType, bucket: Bucket
) -> None:
    body = b"(lp0\n." * 1000
    digest = hashlib.md5(body).digest()  # noqa: S324
    metadata = {"station": "501", "cluster": "Amsterdam%20Science", "events": "3",
                "received": "2024-06-01T10:00:00.000000+00:00"}
    etag = main_module.STORE.put("incoming/501/direct.pickle", body, metadata,
                                 md5_digest=digest)
    bucket.put("incoming/501/boto.pickle", body, metadata, md5_digest=digest)

    assert etag == digest.hex()
    direct = bucket.client.head_object(Bucket=bucket.name, Key="incoming/501/direct.pickle")
    boto = bucket.client.head_object(Bucket=bucket.name, Key="incoming/501/boto.pickle")
    for answer in (direct, boto):
        assert answer["ContentType"] == PICKLE_CONTENT_TYPE
        assert answer["ContentLength"] == len(body)
    assert direct["Metadata"] == boto["Metadata"] == metadata
    assert bucket.get("incoming/501/direct.pickle").body == body


def test_a_damaged_body_is_refused_as_a_bucket_error(
    main_module: ModuleType, bucket: Bucket
) -> None:
    wrong = hashlib.md5(b"something else").digest()  # noqa: S324
    with pytest.raises(BucketError):
        main_module.STORE.put("incoming/501/damaged.pickle", b"body", {}, md5_digest=wrong)
    assert bucket.head("incoming/501/damaged.pickle") is None


def test_unreachable_bucket_is_a_bucket_error(
    main_module: ModuleType, settings: Settings, unused_port: int
) -> None:
    down = dataclasses.replace(settings, bucket_endpoint=f"http://127.0.0.1:{unused_port}")
    with pytest.raises(BucketError):
        main_module._store(down).put("incoming/501/x.pickle", b"body", {})


def test_without_static_credentials_boto3_and_its_chain_are_used(
    main_module: ModuleType, settings: Settings
) -> None:
    chain = dataclasses.replace(settings, aws_access_key_id=None, aws_secret_access_key=None)
    assert isinstance(main_module._store(chain), Bucket)


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
