"""A lean S3 client for the writer's hot path: GET, PUT, DELETE and DeleteObjects.

Why it exists: the sweep of one-event objects (PySPARC stations upload one event per
POST) costs two S3 requests per object (get it, put its archive copy).  botocore spends
about 1.3 to 1.6 ms of CPU per request on this project's 2-core machine, under the GIL,
which caps the sweep near 250 objects/s whatever the concurrency; these four requests
signed here with SigV4 over ``http.client`` cost about 0.3 ms.  Everything else (listing,
copies, bucket creation, the upload function) stays on :class:`~.bucket.Bucket`.

Scope, deliberately small: static credentials (the ones :class:`~.config.Settings` reads
from the environment; without them the writer uses boto3 and its credential chain),
path-style addressing for a configured endpoint, virtual-hosted AWS otherwise, payloads
sent unsigned but with a signed ``Content-MD5`` so the server refuses damaged bodies.
Errors map onto the same exceptions as :class:`~.bucket.Bucket`: a missing object is
:class:`~.bucket.ObjectMissing`, anything else :class:`~.bucket.BucketError`.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import http.client
import ssl
import threading
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import valid_key
from hisparc_datastore.storage.bucket import (
    PICKLE_CONTENT_TYPE,
    RETRYABLE_4XX,
    BucketError,
    ObjectInfo,
    ObjectMissing,
    ObjectRefused,
    StoredObject,
)

UNSIGNED = "UNSIGNED-PAYLOAD"
_UNRESERVED = "-_.~"
_META = "x-amz-meta-"


def uri_encode(text: str, keep_slash: bool = True) -> str:
    """SigV4's encoding: every byte but A-Z a-z 0-9 - _ . ~ (and / in paths) as %XX."""
    return urllib.parse.quote(text, safe=_UNRESERVED + ("/" if keep_slash else ""))


@dataclass(frozen=True)
class Signer:
    """AWS Signature Version 4 for S3 requests with an unsigned payload."""

    access_key: str
    secret_key: str
    region: str

    def _key(self, date: str) -> bytes:
        key = hmac.new(f"AWS4{self.secret_key}".encode(), date.encode(), hashlib.sha256).digest()
        for part in (self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        return key

    def sign(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        now: dt.datetime,
        key_cache: dict[str, bytes] | None = None,
    ) -> dict[str, str]:
        """``headers`` (lower-case names, ``host`` included) plus date and Authorization."""
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        date = stamp[:8]
        signed = {**headers, "x-amz-date": stamp, "x-amz-content-sha256": UNSIGNED}
        names = sorted(signed)
        canonical = "\n".join(
            [
                method,
                path,
                query,
                "".join(f"{name}:{' '.join(signed[name].split())}\n" for name in names),
                ";".join(names),
                UNSIGNED,
            ]
        )
        scope = f"{date}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        if key_cache is None:
            key = self._key(date)
        else:
            key = key_cache.get(date) or key_cache.setdefault(date, self._key(date))
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        signed["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        return signed


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def canonical_query(params: Mapping[str, str]) -> str:
    """Sorted, SigV4-encoded ``name=value`` pairs (also what is sent on the wire)."""
    pairs = sorted((uri_encode(k, False), uri_encode(v, False)) for k, v in params.items())
    return "&".join(f"{name}={value}" for name, value in pairs)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _error_code(body: bytes) -> str:
    try:
        root = ElementTree.fromstring(body)  # noqa: S314 - our own configured S3 server
    except ElementTree.ParseError:
        return ""
    for element in root.iter():
        if _local(element.tag) == "Code":
            return element.text or ""
    return ""


class DirectS3:
    """One bucket, reached over keep-alive connections (one per thread)."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        region: str,
        access_key: str,
        secret_key: str,
        timeout: float = 20.0,
    ) -> None:
        self.name = name
        region = region or "us-east-1"
        if endpoint:
            parts = urllib.parse.urlsplit(endpoint)
            self._prefix = f"/{uri_encode(name)}/"
        else:  # AWS: virtual-hosted style (path style is deprecated there)
            parts = urllib.parse.urlsplit(f"https://{name}.s3.{region}.amazonaws.com")
            self._prefix = "/"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint: {endpoint!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._netloc = parts.netloc
        self._signer = Signer(access_key, secret_key, region)
        self._keys: dict[str, bytes] = {}
        self._timeout = timeout
        self._local = threading.local()
        self._context = ssl.create_default_context() if self._https else None

    @classmethod
    def from_settings(cls, settings: Settings) -> DirectS3 | None:
        """The direct client, or None when credentials must come from boto3's chain."""
        if not (settings.aws_access_key_id and settings.aws_secret_access_key):
            return None
        return cls(
            settings.bucket_name,
            settings.bucket_endpoint,
            settings.bucket_region,
            settings.aws_access_key_id,
            settings.aws_secret_access_key,
        )

    # -- transport ---------------------------------------------------------------------

    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and fresh:
            connection.close()
            connection = None
        if connection is None:
            if self._https:
                connection = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._context
                )
            else:
                connection = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
            self._local.connection = connection
        return connection

    def _request(
        self,
        method: str,
        key: str | None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        query: str = "",
    ) -> _Answer:
        if key is not None and not valid_key(key):
            raise ObjectRefused(f"{method}: key {key[:80]!r} is not 1 to 1024 bytes of UTF-8")
        path = self._prefix + (uri_encode(key) if key is not None else "")
        if key is None and self._prefix != "/":
            path = path.rstrip("/")
        all_headers = {"host": self._netloc, **(headers or {})}
        if body or method in ("PUT", "POST"):
            all_headers["content-length"] = str(len(body))
        signed = self._signer.sign(
            method, path, query, all_headers, dt.datetime.now(dt.UTC), self._keys
        )
        target = f"{path}?{query.replace('=&', '&').removesuffix('=')}" if query else path
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            connection = self._connection(fresh=attempt == 2)
            try:
                connection.request(method, target, body=body or None, headers=signed)
                response = connection.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest) as exc:
                connection.close()
                self._local.connection = None
                if attempt == 2:
                    raise BucketError(f"{method} {key}: {exc}") from exc
                continue
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                self._local.connection = None
                raise BucketError(f"{method} {key}: {exc}") from exc
            if response.will_close:
                connection.close()
                self._local.connection = None
            return _Answer(
                response.status, {k.lower(): v for k, v in response.getheaders()}, data
            )
        raise AssertionError("unreachable")

    @staticmethod
    def _fail(method: str, key: str | None, answer: _Answer) -> BucketError:
        code = _error_code(answer.body) if answer.body else ""
        if answer.status == 404 and code in ("", "NoSuchKey", "NotFound"):
            return ObjectMissing(str(key))
        text = f"{method} {key}: HTTP {answer.status} {code}".rstrip()
        if key is not None and 400 <= answer.status < 500 and answer.status not in RETRYABLE_4XX:
            return ObjectRefused(text)
        return BucketError(text)

    # -- operations --------------------------------------------------------------------

    def get(self, key: str) -> StoredObject:
        answer = self._request("GET", key)
        if answer.status != 200:
            raise self._fail("GET", key, answer)
        length = answer.headers.get("content-length")
        if length is not None and int(length) != len(answer.body):
            raise BucketError(f"GET {key}: short body ({len(answer.body)} of {length} bytes)")
        modified = answer.headers.get("last-modified")
        return StoredObject(
            key=key,
            body=answer.body,
            etag=answer.headers.get("etag", "").strip('"'),
            metadata={
                name[len(_META):]: value
                for name, value in answer.headers.items()
                if name.startswith(_META)
            },
            last_modified=(
                email.utils.parsedate_to_datetime(modified) if modified
                else dt.datetime.now(dt.UTC)
            ),
        )

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, etag and LastModified; None when it is not there."""
        answer = self._request("HEAD", key)
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise self._fail("HEAD", key, answer)
        modified = answer.headers.get("last-modified")
        return ObjectInfo(
            key=key,
            etag=answer.headers.get("etag", "").strip('"'),
            size=int(answer.headers.get("content-length") or 0),
            last_modified=(
                email.utils.parsedate_to_datetime(modified) if modified
                else dt.datetime.now(dt.UTC)
            ),
        )

    def put(
        self,
        key: str,
        body: bytes,
        metadata: Mapping[str, str],
        md5_digest: bytes | None = None,
    ) -> str:
        """The same request as :meth:`~.bucket.Bucket.put`, signed here."""
        digest = md5_digest or hashlib.md5(body).digest()  # noqa: S324 - S3's Content-MD5
        headers = {
            "content-type": PICKLE_CONTENT_TYPE,
            "content-md5": base64.b64encode(digest).decode(),
            **{f"{_META}{name.lower()}": value for name, value in metadata.items()},
        }
        answer = self._request("PUT", key, body, headers)
        if answer.status != 200:
            raise self._fail("PUT", key, answer)
        return answer.headers.get("etag", "").strip('"')

    def copy(self, source: str, target: str) -> None:
        """Server-side copy, metadata included (``x-amz-metadata-directive: COPY``)."""
        if not valid_key(source):
            raise ObjectRefused(f"COPY: key {source[:80]!r} is not 1 to 1024 bytes of UTF-8")
        headers = {
            "x-amz-copy-source": f"/{uri_encode(self.name)}/{uri_encode(source)}",
            "x-amz-metadata-directive": "COPY",
        }
        answer = self._request("PUT", target, b"", headers)
        # S3 may answer a copy 200 and still report an error in the body.
        if answer.status != 200 or b"<Error>" in answer.body:
            code = _error_code(answer.body)
            if code == "NoSuchKey" or (answer.status == 404 and not code):
                raise ObjectMissing(source)
            text = f"COPY {source} -> {target}: HTTP {answer.status} {code}".rstrip()
            if 400 <= answer.status < 500 and answer.status not in RETRYABLE_4XX:
                raise ObjectRefused(text)
            raise BucketError(text)

    def delete(self, key: str) -> None:
        answer = self._request("DELETE", key)
        if answer.status not in (200, 204, 404):
            raise self._fail("DELETE", key, answer)

    def delete_many(self, keys: Sequence[str]) -> list[str]:
        """DeleteObjects for up to 1000 keys; returns the keys the server did not delete."""
        if not keys:
            return []
        if len(keys) > 1000:
            raise ValueError("DeleteObjects takes at most 1000 keys")
        objects = "".join(f"<Object><Key>{escape(key)}</Key></Object>" for key in keys)
        body = f"<Delete><Quiet>true</Quiet>{objects}</Delete>".encode()
        headers = {
            "content-type": "application/xml",
            "content-md5": base64.b64encode(hashlib.md5(body).digest()).decode(),  # noqa: S324
        }
        answer = self._request("POST", None, body, headers, query="delete=")
        if answer.status != 200:
            raise self._fail("POST ?delete", None, answer)
        try:
            root = ElementTree.fromstring(answer.body)  # noqa: S314 - our own S3 server
        except ElementTree.ParseError as exc:
            raise BucketError(f"DeleteObjects: unreadable answer: {exc}") from exc
        leftovers = []
        for element in root:
            if _local(element.tag) == "Error":
                for child in element:
                    if _local(child.tag) == "Key":
                        leftovers.append(child.text or "")
        return leftovers

    def list(self, prefix: str, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """ListObjectsV2 under ``prefix``, page by page, in key order."""
        token: str | None = None
        while True:
            params = {"list-type": "2", "prefix": prefix, "max-keys": str(page_size)}
            if token:
                params["continuation-token"] = token
            answer = self._request("GET", None, query=canonical_query(params))
            if answer.status != 200:
                raise self._fail("LIST", prefix, answer)
            try:
                root = ElementTree.fromstring(answer.body)  # noqa: S314 - our own S3 server
            except ElementTree.ParseError as exc:
                raise BucketError(f"LIST {prefix}: unreadable answer: {exc}") from exc
            truncated, token = False, None
            for element in root:
                tag = _local(element.tag)
                if tag == "Contents":
                    fields = {_local(child.tag): child.text or "" for child in element}
                    yield ObjectInfo(
                        key=fields.get("Key", ""),
                        etag=fields.get("ETag", "").strip('"'),
                        size=int(fields.get("Size") or 0),
                        last_modified=dt.datetime.fromisoformat(fields["LastModified"]),
                    )
                elif tag == "IsTruncated":
                    truncated = (element.text or "").strip().lower() == "true"
                elif tag == "NextContinuationToken":
                    token = element.text or None
            if not truncated or not token:
                return
