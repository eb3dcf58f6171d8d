"""The bucket: object keys and the few S3 operations the functions need.

Both functions and every CLI command reach S3 through this module, with the same boto3
settings, so what the tests exercise against a local S3 server is what production runs.

boto3 is imported when a :class:`Bucket` is first made, not with this module: the key
helpers and exceptions here are needed by code that never talks to S3 through boto3
(the upload function puts through :mod:`.s3direct`), and importing boto3 costs about
0.1 s of its cold start.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import valid_key

PICKLE_CONTENT_TYPE = "application/x-python-pickle"


class BucketError(Exception):
    """The bucket could not be reached or refused an operation; worth retrying later."""


class ObjectMissing(BucketError):
    """The object does not exist (already moved, or never there)."""


class ObjectRefused(BucketError):
    """The server refuses a request about one key (an HTTP 4xx other than 404, 408, 429).

    Most often the key itself: one it cannot store (a NUL byte, too long) or one that is
    not UTF-8.  A whole-bucket problem (wrong credentials or region) answers 4xx too, so
    callers that treat this as the object's fault first check that the bucket works.
    """


#: 4xx answers that say "try again later", not "never"; 404 is missing, not refused (a
#: missing *bucket* answers 404 too, and that is trouble for every key).
RETRYABLE_4XX = frozenset({404, 408, 429})


@dataclass(frozen=True)
class StoredObject:
    key: str
    body: bytes
    etag: str
    metadata: dict[str, str]
    last_modified: dt.datetime


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    etag: str
    size: int
    last_modified: dt.datetime


def _client_errors() -> tuple[type[BaseException], ...]:
    import botocore.exceptions

    return (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


def _is_missing(exc: BaseException) -> bool:
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        return code in {"NoSuchKey", "404", "NotFound"}
    return False


def _is_refused(exc: BaseException) -> bool:
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return 400 <= status < 500 and status not in RETRYABLE_4XX
    return False


def _failure(what: str, key: str, exc: BaseException) -> BucketError:
    """The exception for a failed request about ``key``: missing, refused, or trouble."""
    if _is_missing(exc):
        return ObjectMissing(key)
    if _is_refused(exc):
        return ObjectRefused(f"{what}: {exc}")
    return BucketError(f"{what}: {exc}")


def _check_key(key: str) -> None:
    if not valid_key(key):
        raise ObjectRefused(f"key {key[:80]!r} is not 1 to 1024 bytes of UTF-8")


class Bucket:
    """One S3 bucket, reached with the configured endpoint and environment credentials."""

    def __init__(
        self,
        name: str,
        endpoint: str = "",
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 20.0,
        max_attempts: int = 3,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.name = name
        self.endpoint = endpoint
        config = Config(
            region_name=region or "us-east-1",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"} if endpoint else {},
            max_pool_connections=32,
            # Some S3-compatible servers reject the newer default CRC checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint or None,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )

    @classmethod
    def from_settings(cls, settings: Settings, **options: float | int) -> Bucket:
        return cls(
            settings.bucket_name,
            endpoint=settings.bucket_endpoint,
            region=settings.bucket_region,
            access_key=settings.aws_access_key_id,
            secret_key=settings.aws_secret_access_key,
            **options,  # type: ignore[arg-type]
        )

    def ensure_exists(self) -> None:
        """Create the bucket if it is not there (local stacks and tests)."""
        try:
            self.client.head_bucket(Bucket=self.name)
            return
        except _client_errors():
            pass
        import botocore.exceptions

        try:
            self.client.create_bucket(Bucket=self.name)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise BucketError(f"cannot create bucket {self.name}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise BucketError(f"cannot create bucket {self.name}: {exc}") from exc

    def put(
        self,
        key: str,
        body: bytes,
        metadata: Mapping[str, str],
        md5_digest: bytes | None = None,
    ) -> str:
        """Store ``body`` whole under ``key`` (S3 puts are atomic); returns the etag.

        The MD5 is sent along so the server refuses a body damaged in transit instead of
        storing it; a caller that has already computed it passes ``md5_digest``.  The
        content type is not a compressible one, so SeaweedFS does not spend CPU trying
        to compress pickles.
        """
        _check_key(key)
        digest = md5_digest or hashlib.md5(body).digest()  # noqa: S324
        content_md5 = base64.b64encode(digest).decode()
        try:
            answer = self.client.put_object(
                Bucket=self.name,
                Key=key,
                Body=body,
                ContentMD5=content_md5,
                ContentType=PICKLE_CONTENT_TYPE,
                Metadata=dict(metadata),
            )
        except _client_errors() as exc:
            raise _failure(f"put {key}", key, exc) from exc
        return str(answer.get("ETag", "")).strip('"')

    def get(self, key: str) -> StoredObject:
        _check_key(key)
        try:
            answer = self.client.get_object(Bucket=self.name, Key=key)
            body = answer["Body"].read()
        except _client_errors() as exc:
            raise _failure(f"get {key}", key, exc) from exc
        return StoredObject(
            key=key,
            body=body,
            etag=str(answer.get("ETag", "")).strip('"'),
            metadata=dict(answer.get("Metadata", {})),
            last_modified=answer["LastModified"],
        )

    def head(self, key: str) -> ObjectInfo | None:
        _check_key(key)
        try:
            answer = self.client.head_object(Bucket=self.name, Key=key)
        except _client_errors() as exc:
            if _is_missing(exc):
                return None
            raise _failure(f"head {key}", key, exc) from exc
        return ObjectInfo(
            key=key,
            etag=str(answer.get("ETag", "")).strip('"'),
            size=int(answer.get("ContentLength", 0)),
            last_modified=answer["LastModified"],
        )

    def metadata(self, key: str) -> dict[str, str] | None:
        _check_key(key)
        try:
            answer = self.client.head_object(Bucket=self.name, Key=key)
        except _client_errors() as exc:
            if _is_missing(exc):
                return None
            raise _failure(f"head {key}", key, exc) from exc
        return dict(answer.get("Metadata", {}))

    def move(self, source: str, target: str, metadata: Mapping[str, str] | None = None) -> None:
        """Copy ``source`` to ``target``, then delete ``source``.

        Not atomic: a crash between the two leaves both, which every caller tolerates
        (the writer's ledger makes reprocessing a no-op).  ``metadata`` replaces the
        object's metadata when given.
        """
        self.copy(source, target, metadata)
        self.delete(source)

    def copy(self, source: str, target: str, metadata: Mapping[str, str] | None = None) -> None:
        """Server-side copy of ``source`` to ``target``; ``metadata`` replaces the object's
        metadata when given, else it is kept.  ObjectMissing when ``source`` is gone."""
        _check_key(source)
        _check_key(target)
        extra: dict[str, object] = {}
        if metadata is not None:
            extra = {"Metadata": dict(metadata), "MetadataDirective": "REPLACE"}
        try:
            self.client.copy_object(
                Bucket=self.name,
                Key=target,
                CopySource={"Bucket": self.name, "Key": source},
                **extra,
            )
        except _client_errors() as exc:
            raise _failure(f"copy {source} -> {target}", source, exc) from exc

    def delete(self, key: str) -> None:
        _check_key(key)
        try:
            self.client.delete_object(Bucket=self.name, Key=key)
        except _client_errors() as exc:
            if not _is_missing(exc):
                raise _failure(f"delete {key}", key, exc) from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, in key order, page by page."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.name, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        key=item["Key"],
                        etag=str(item.get("ETag", "")).strip('"'),
                        size=int(item.get("Size", 0)),
                        last_modified=item["LastModified"],
                    )
        except _client_errors() as exc:
            raise BucketError(f"list {prefix}: {exc}") from exc
