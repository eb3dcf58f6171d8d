"""The bucket: the one way both functions and every command reach S3.

:class:`Store` says what the datastore needs of a bucket; :class:`Bucket` is its one
implementation, on obstore (the Python bindings of Rust's ``object_store``): no request
signing of our own, about a fifth of boto3's CPU per request, and a cold start of
milliseconds (docs/PERFORMANCE.md, "The S3 client").  Every put carries a SHA-256 checksum
the server verifies, so a body damaged on the way is refused, not stored.

Credentials come from the environment, as obstore reads them: static keys
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), web identity (IRSA), ECS and EKS pod
identity, then the instance metadata service.  The control plane obstore lacks (creating
the bucket, for the local stack and tests) is :meth:`Bucket.ensure_exists`, with boto3,
installed only with the development tools.

Failures map onto three exceptions: :class:`ObjectMissing` (not there), :class:`ObjectRefused`
(the server or the client refuses this key: a NUL byte, an empty path segment, too long),
and :class:`BucketError` (anything else: unreachable, 5xx, credentials; worth a retry).

obstore is not fork-safe: once a process has made a request, a child forked from it (without
exec) hangs on its first request.  The client is therefore made on first use, and the
functions make no request at import: gunicorn imports them in its master, then forks the
workers, which make the requests.  Subprocesses that exec (the CLI, served functions) are
unaffected.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import valid_key

PICKLE_CONTENT_TYPE = "application/x-python-pickle"
#: Concurrent S3 requests of one writer run (the work is mostly waiting on the server).
S3_THREADS = 8
#: Attributes obstore returns beside the user metadata.
_STANDARD_ATTRIBUTES = frozenset({
    "Content-Type", "Content-Disposition", "Content-Encoding", "Content-Language",
    "Cache-Control",
})
_STATUS = re.compile(r"status code: (\d{3})")


class BucketError(Exception):
    """The bucket could not be reached or refused an operation; worth retrying later."""


class ObjectMissing(BucketError):
    """The object does not exist (already moved, or never there)."""


class ObjectRefused(BucketError):
    """The server or the client refuses a request about one key (an HTTP 4xx other than
    404, 408, 429, or a key the client cannot address).

    Most often the key itself: one with a NUL byte or an empty segment, or too long.  A
    whole-bucket problem (wrong region) answers 4xx too, so callers that treat this as
    the object's fault first check that the bucket works.
    """


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


class Store(Protocol):
    """What the datastore needs of a bucket."""

    name: str

    def get(self, key: str) -> StoredObject: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def metadata(self, key: str) -> dict[str, str] | None: ...

    def put(self, key: str, body: bytes, metadata: Mapping[str, str],
            content_type: str = PICKLE_CONTENT_TYPE) -> str: ...

    def copy(self, source: str, target: str,
             metadata: Mapping[str, str] | None = None) -> None: ...

    def move(self, source: str, target: str,
             metadata: Mapping[str, str] | None = None) -> None: ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: Sequence[str]) -> list[str]: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...


def _unquote(etag: str | None) -> str:
    return (etag or "").strip('"')


def _status(exc: BaseException) -> int | None:
    found = _STATUS.search(str(exc))
    return int(found.group(1)) if found else None


class Bucket:
    """One S3 bucket, reached with the configured endpoint and environment credentials.

    ``timeout`` bounds each request, ``connect_timeout`` each connection, and
    ``max_attempts`` the tries of a request that failed transiently (5xx, a lost
    connection), all within ``retry_seconds``: the upload keeps the total well inside the
    stations' 10 s patience.
    """

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
        retry_seconds: float = 30.0,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.region = region or "us-east-1"
        self._access_key = access_key
        self._secret_key = secret_key
        self._options = {
            "connect_timeout": f"{connect_timeout}s",
            "timeout": f"{read_timeout}s",
        }
        self._retry = {
            "max_retries": max(max_attempts - 1, 0),
            "retry_timeout": dt.timedelta(seconds=retry_seconds),
            "backoff": {"init_backoff": dt.timedelta(milliseconds=100),
                        "max_backoff": dt.timedelta(seconds=1), "base": 2},
        }
        self._client: Any = None
        self._lock = threading.Lock()

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

    # -- the client, made on first use (see the module docstring on forks)

    def _store(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        from obstore.store import S3Store

        config: dict[str, Any] = {
            "region": self.region,
            "checksum_algorithm": "sha256",  # the server verifies every body it stores
            "unsigned_payload": True,  # the checksum covers the body; no second hash
        }
        options: dict[str, Any] = dict(self._options)
        if self.endpoint:
            config["endpoint"] = self.endpoint
            config["virtual_hosted_style_request"] = False
            options["allow_http"] = self.endpoint.startswith("http://")
        if self._access_key and self._secret_key:
            config["access_key_id"] = self._access_key
            config["secret_access_key"] = self._secret_key
        return S3Store(self.name, client_options=options, retry_config=self._retry, **config)

    # -- errors

    def _failure(self, what: str, key: str, exc: BaseException) -> BucketError:
        """The exception for a failed request about ``key``: missing, refused, or trouble."""
        if isinstance(exc, FileNotFoundError):
            return ObjectMissing(key)
        if isinstance(exc, ValueError | TypeError):  # a path the client cannot address
            return ObjectRefused(f"{what}: {exc}")
        status = _status(exc)
        if status is not None and 400 <= status < 500 and status not in (404, 408, 429):
            name = type(exc).__name__
            if name not in ("PermissionDeniedError", "UnauthenticatedError"):
                return ObjectRefused(f"{what}: HTTP {status}: {_first_line(exc)}")
        return BucketError(f"{what}: {_first_line(exc)}")

    @staticmethod
    def _check_key(key: str) -> None:
        if not valid_key(key):
            raise ObjectRefused(f"key {key[:80]!r} is not 1 to 1024 bytes of UTF-8")

    # -- operations

    def get(self, key: str) -> StoredObject:
        self._check_key(key)
        try:
            answer = self._store().get(key)
            body = bytes(answer.bytes())
        except Exception as exc:
            raise self._failure(f"get {key}", key, exc) from exc
        meta = answer.meta
        return StoredObject(key, body, _unquote(meta.get("e_tag")),
                            _user_metadata(answer.attributes), meta["last_modified"])

    def head(self, key: str) -> ObjectInfo | None:
        self._check_key(key)
        try:
            meta = self._store().head(key)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._failure(f"head {key}", key, exc) from exc
        return ObjectInfo(key, _unquote(meta.get("e_tag")), int(meta["size"]),
                          meta["last_modified"])

    def metadata(self, key: str) -> dict[str, str] | None:
        """The object's user metadata (a HEAD request), or None if it is not there."""
        self._check_key(key)
        try:
            answer = self._store().get(key, options={"head": True})
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._failure(f"head {key}", key, exc) from exc
        return _user_metadata(answer.attributes)

    def put(self, key: str, body: bytes, metadata: Mapping[str, str],
            content_type: str = PICKLE_CONTENT_TYPE) -> str:
        """Store ``body`` whole under ``key`` (one request, never multipart); the etag.

        The content type defaults to the pickle's, which no S3 server tries to compress.
        """
        self._check_key(key)
        attributes = {"Content-Type": content_type, **metadata}
        try:
            answer = self._store().put(key, body, attributes=attributes, use_multipart=False)
        except Exception as exc:
            raise self._failure(f"put {key}", key, exc) from exc
        return _unquote(answer.get("e_tag"))

    async def put_async(self, key: str, body: bytes, metadata: Mapping[str, str],
                        content_type: str = PICKLE_CONTENT_TYPE) -> str:
        """:meth:`put` for an event loop: the request is made on obstore's runtime while
        the loop serves other requests, instead of a thread waiting for the answer."""
        self._check_key(key)
        attributes = {"Content-Type": content_type, **metadata}
        try:
            answer = await self._store().put_async(key, body, attributes=attributes,
                                                   use_multipart=False)
        except Exception as exc:
            raise self._failure(f"put {key}", key, exc) from exc
        return _unquote(answer.get("e_tag"))

    def copy(self, source: str, target: str, metadata: Mapping[str, str] | None = None) -> None:
        """Copy ``source`` to ``target``: server-side, or (to replace the metadata, which
        a server-side copy here cannot) through this process.  ObjectMissing when
        ``source`` is gone."""
        self._check_key(source)
        self._check_key(target)
        if metadata is not None:
            stored = self.get(source)
            self.put(target, stored.body, metadata)
            return
        try:
            self._store().copy(source, target)
        except Exception as exc:
            raise self._failure(f"copy {source} -> {target}", source, exc) from exc

    def move(self, source: str, target: str, metadata: Mapping[str, str] | None = None) -> None:
        """Copy, then delete ``source``.

        Not atomic: a crash between the two leaves both, which every caller tolerates
        (the writer's ledger makes reprocessing a no-op).
        """
        self.copy(source, target, metadata)
        self.delete(source)

    def delete(self, key: str) -> None:
        self._check_key(key)
        try:
            self._store().delete(key)
        except FileNotFoundError:
            return
        except Exception as exc:
            raise self._failure(f"delete {key}", key, exc) from exc

    def delete_many(self, keys: Sequence[str]) -> list[str]:
        """Delete keys in DeleteObjects requests of up to 1000; the keys still there after.

        One request for a thousand one-event objects instead of a thousand; when the
        server reports a failure (obstore names only the first), the keys are deleted
        one by one to find which are left.
        """
        addressable = [key for key in keys if valid_key(key)]
        left = [key for key in keys if not valid_key(key)]
        if not addressable:
            return left
        try:
            self._store().delete(addressable)
            return left
        except Exception:  # noqa: S110 - every key is retried alone below
            pass
        for key in addressable:
            try:
                self.delete(key)
            except BucketError:
                left.append(key)
        return left

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` (a folder: ``incoming/``), in key order."""
        try:
            for page in self._store().list(prefix):
                for meta in page:
                    yield ObjectInfo(meta["path"], _unquote(meta.get("e_tag")),
                                     int(meta["size"]), meta["last_modified"])
        except BucketError:
            raise
        except Exception as exc:
            raise self._failure(f"list {prefix}", prefix, exc) from exc

    # -- control plane

    def ensure_exists(self) -> None:
        """Create the bucket if it is not there (local stacks and tests; boto3)."""
        try:
            import boto3
            import botocore.exceptions
            from botocore.config import Config
        except ImportError as exc:  # the images do not install boto3
            raise BucketError(f"creating a bucket needs boto3 ({exc})") from exc
        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint or None, aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            config=Config(region_name=self.region, connect_timeout=3, read_timeout=20,
                          retries={"max_attempts": 3, "mode": "standard"},
                          s3={"addressing_style": "path"} if self.endpoint else {}),
        )
        try:
            client.head_bucket(Bucket=self.name)
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            pass
        try:
            client.create_bucket(Bucket=self.name)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise BucketError(f"cannot create bucket {self.name}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise BucketError(f"cannot create bucket {self.name}: {exc}") from exc


def _user_metadata(attributes: Mapping[str, Any]) -> dict[str, str]:
    return {name.lower(): str(value) for name, value in attributes.items()
            if name not in _STANDARD_ATTRIBUTES}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
