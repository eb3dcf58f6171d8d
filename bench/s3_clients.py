"""S3 clients compared: boto3, the minio SDK, obstore, and the hand-written DirectS3.

Decides which library carries the datastore's one S3 interface (issue 13).  Everything
runs against a SeaweedFS started for the run on loopback, the way the tests and the
local stack start it (``SeaweedS3``), single bucket, path-style requests, static keys.

What is measured, per client, in this process:

- CPU per operation: ``time.process_time`` over N operations on one thread, divided by
  N (it counts every thread of this process, so the Rust worker threads of obstore and
  urllib3's pools are included; SeaweedFS runs in another process and is not); wall
  time per operation next to it (that one includes SeaweedFS and moves with the load);
- the operations: put of a 1.7 KB object with four metadata keys (station, cluster,
  received, events), content type and an integrity check the server verifies; get of
  that object (body and metadata); head; list of 1000 keys under a prefix; bulk delete
  of 1000 keys (one DeleteObjects request where the client has it); server-side copy;
- put with 8 threads at once on one shared client (the writer's pool): CPU per put and
  puts/s;
- cold start: seconds to import the library and create a client, in a fresh Python
  process each time, median of a few;
- probes (correctness, not speed): which integrity headers SeaweedFS verifies (raw
  SigV4-signed requests with a wrong checksum), which headers obstore sends (a relay on
  loopback records them), what obstore does with metadata, missing objects, conditional
  create, awkward keys, per-key delete failures and a server that never answers.

Integrity check per client (what each sends on put): boto3 and DirectS3 ``Content-MD5``;
obstore ``x-amz-checksum-sha256`` (``checksum_algorithm="sha256"`` with
``unsigned_payload=True``; it has no Content-MD5, and the signed payload hash it sends by
default is not checked by SeaweedFS, see the probes); minio over plain http sends no
Content-MD5, only that same signed payload hash, so it is given ``x-amz-checksum-sha256``
through its ``metadata`` argument (``x-amz-*`` keys pass through as headers).

Run: ``.venv/bin/python bench/s3_clients.py`` (about 2 minutes; ``--quick`` under 1).
Needs ``pip install obstore minio`` in the venv; a client that cannot be imported is
skipped with a note.  Figures move with the machine's load: the load average is printed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import gc
import hashlib
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench-s3-clients"
PROBE_BUCKET = "bench-s3-probes"
REGION = "us-east-1"
CONTENT_TYPE = "application/x-python-pickle"
BODY_BYTES = 1700
METADATA = {
    "station": "501",
    "cluster": "Amsterdam",
    "received": "2026-11-25T12:00:00.123456+00:00",
    "events": "1",
}
CLIENTS = ("boto3", "minio", "obstore", "DirectS3")


# -- the project's pieces (the tree is being reorganised: try the new and old homes) --


def import_first(*names: str) -> Any:
    """The first of the modules ``names`` that imports; ``dev/src`` is tried as well."""
    dev = str(ROOT / "dev" / "src")
    errors = []
    for attempt in (1, 2):
        for name in names:
            try:
                return __import__(name, fromlist=["_"])
            except ImportError as exc:
                errors.append(f"{name}: {exc}")
        if attempt == 1 and dev not in sys.path and Path(dev).is_dir():
            sys.path.append(dev)
    raise ImportError("; ".join(errors))


def seaweed_class() -> Any:
    module = import_first("hisparc_datastore_dev.s3server", "hisparc_datastore.s3server")
    return module.SeaweedS3


def direct_module_name() -> str | None:
    for name in ("hisparc_datastore.storage.s3direct", "hisparc_datastore.s3direct"):
        try:
            __import__(name)
            return name
        except ImportError:
            continue
    return None


# -- the four clients behind one small interface --------------------------------------


@dataclass
class Endpoint:
    url: str
    access_key: str
    secret_key: str

    @property
    def hostport(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc


class Client:
    """put/get/head/list/delete_many/copy, each as the library is meant to be used."""

    name = ""

    def put(self, key: str, body: bytes, metadata: dict[str, str]) -> str:
        raise NotImplementedError

    def get(self, key: str) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    def head(self, key: str) -> int:
        raise NotImplementedError

    def list(self, prefix: str) -> int:
        raise NotImplementedError

    def delete_many(self, keys: Sequence[str]) -> list[str]:
        """Delete ``keys``; the keys the server reported as not deleted."""
        raise NotImplementedError

    def copy(self, source: str, target: str) -> None:
        raise NotImplementedError


def make_boto3(ep: Endpoint) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(  # as the project's Bucket configures it
        region_name=REGION,
        connect_timeout=3,
        read_timeout=20,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path"},
        max_pool_connections=32,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=ep.url,
        aws_access_key_id=ep.access_key,
        aws_secret_access_key=ep.secret_key,
        config=config,
    )


class Boto3Client(Client):
    name = "boto3"

    def __init__(self, ep: Endpoint) -> None:
        self.s3 = make_boto3(ep)

    def put(self, key: str, body: bytes, metadata: dict[str, str]) -> str:
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324
        answer = self.s3.put_object(
            Bucket=BUCKET, Key=key, Body=body, ContentMD5=md5, ContentType=CONTENT_TYPE,
            Metadata=metadata,
        )
        return str(answer["ETag"])

    def get(self, key: str) -> tuple[bytes, dict[str, str]]:
        answer = self.s3.get_object(Bucket=BUCKET, Key=key)
        return answer["Body"].read(), answer["Metadata"]

    def head(self, key: str) -> int:
        return int(self.s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"])

    def list(self, prefix: str) -> int:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sum(len(page.get("Contents", [])) for page in pages)

    def delete_many(self, keys: Sequence[str]) -> list[str]:
        answer = self.s3.delete_objects(
            Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
        )
        return [error["Key"] for error in answer.get("Errors", [])]

    def copy(self, source: str, target: str) -> None:
        self.s3.copy_object(Bucket=BUCKET, Key=target, CopySource={"Bucket": BUCKET, "Key": source})


class MinioClient(Client):
    name = "minio"

    def __init__(self, ep: Endpoint) -> None:
        from minio import Minio

        self.client = Minio(
            ep.hostport, access_key=ep.access_key, secret_key=ep.secret_key, secure=False,
            region=REGION,
        )

    def put(self, key: str, body: bytes, metadata: dict[str, str]) -> str:
        checksum = base64.b64encode(hashlib.sha256(body).digest()).decode()
        result = self.client.put_object(
            BUCKET, key, io.BytesIO(body), len(body), content_type=CONTENT_TYPE,
            metadata={**metadata, "x-amz-checksum-sha256": checksum},
        )
        return str(result.etag)

    def get(self, key: str) -> tuple[bytes, dict[str, str]]:
        response = self.client.get_object(BUCKET, key)
        try:
            body = response.read()
            metadata = {
                name[len("x-amz-meta-"):]: value
                for name, value in response.headers.items()
                if name.lower().startswith("x-amz-meta-")
            }
        finally:
            response.close()
            response.release_conn()
        return body, metadata

    def head(self, key: str) -> int:
        return int(self.client.stat_object(BUCKET, key).size or 0)

    def list(self, prefix: str) -> int:
        return sum(1 for _ in self.client.list_objects(BUCKET, prefix=prefix, recursive=True))

    def delete_many(self, keys: Sequence[str]) -> list[str]:
        from minio.deleteobjects import DeleteObject

        errors = self.client.remove_objects(BUCKET, [DeleteObject(k) for k in keys])
        return [str(error.name) for error in errors]  # lazy: nothing is sent until read

    def copy(self, source: str, target: str) -> None:
        from minio.commonconfig import CopySource

        self.client.copy_object(BUCKET, target, CopySource(BUCKET, source))


def make_obstore(ep: Endpoint, bucket: str = BUCKET, **config: Any) -> Any:
    """An S3Store as the project would build it; ``config`` overrides (None removes)."""
    from obstore.store import S3Store

    client_options = {"allow_http": True, "timeout": "20s", "connect_timeout": "3s",
                      **config.pop("client_options", {})}
    retry_config = config.pop("retry_config", None)
    options = {
        "endpoint": ep.url,
        "access_key_id": ep.access_key,
        "secret_access_key": ep.secret_key,
        "region": REGION,
        "virtual_hosted_style_request": False,
        "checksum_algorithm": "sha256",
        "unsigned_payload": True,
        **config,
    }
    options = {k: v for k, v in options.items() if v is not None}
    return S3Store(bucket, client_options=client_options, retry_config=retry_config, **options)


class ObstoreClient(Client):
    name = "obstore"

    def __init__(self, ep: Endpoint, **config: Any) -> None:
        self.store = make_obstore(ep, **config)

    def put(self, key: str, body: bytes, metadata: dict[str, str]) -> str:
        result = self.store.put(key, body, attributes={"Content-Type": CONTENT_TYPE, **metadata})
        return str(result["e_tag"])

    def get(self, key: str) -> tuple[bytes, dict[str, str]]:
        result = self.store.get(key)
        body = bytes(result.bytes())
        return body, {k: v for k, v in result.attributes.items() if k != "Content-Type"}

    def head(self, key: str) -> int:
        return int(self.store.head(key)["size"])

    def list(self, prefix: str) -> int:
        return len(self.store.list(prefix).collect())

    def delete_many(self, keys: Sequence[str]) -> list[str]:
        self.store.delete(list(keys))  # raises on the first key the server did not delete
        return []

    def copy(self, source: str, target: str) -> None:
        self.store.copy(source, target)


class DirectClient(Client):
    name = "DirectS3"

    def __init__(self, ep: Endpoint, module: str) -> None:
        direct = __import__(module, fromlist=["DirectS3"]).DirectS3
        self.s3 = direct(BUCKET, ep.url, REGION, ep.access_key, ep.secret_key)

    def put(self, key: str, body: bytes, metadata: dict[str, str]) -> str:
        return str(self.s3.put(key, body, metadata))

    def get(self, key: str) -> tuple[bytes, dict[str, str]]:
        stored = self.s3.get(key)
        return stored.body, stored.metadata

    def head(self, key: str) -> int:
        return int(self.s3.head(key).size)

    def list(self, prefix: str) -> int:
        return sum(1 for _ in self.s3.list(prefix))

    def delete_many(self, keys: Sequence[str]) -> list[str]:
        return list(self.s3.delete_many(list(keys)))

    def copy(self, source: str, target: str) -> None:
        self.s3.copy(source, target)


def build_clients(ep: Endpoint, wanted: Sequence[str]) -> tuple[dict[str, Client], list[str]]:
    clients: dict[str, Client] = {}
    notes: list[str] = []
    for name in wanted:
        try:
            if name == "boto3":
                clients[name] = Boto3Client(ep)
            elif name == "minio":
                clients[name] = MinioClient(ep)
            elif name == "obstore":
                clients[name] = ObstoreClient(ep)
            elif name == "DirectS3":
                module = direct_module_name()
                if module is None:
                    notes.append("DirectS3 skipped: no hisparc_datastore s3direct module any more")
                    continue
                clients[name] = DirectClient(ep, module)
        except ImportError as exc:
            notes.append(f"{name} skipped: {exc} (pip install {name})")
    return clients, notes


# -- measuring ------------------------------------------------------------------------


@dataclass
class Figure:
    cpu_ms: float
    wall_ms: float
    count: int


def timed(run: Callable[[int], object], count: int) -> Figure:
    """CPU and wall milliseconds per call of ``run(i)`` for i in range(count)."""
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(count):
        run(i)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return Figure(cpu * 1000 / count, wall * 1000 / count, count)


def timed_threads(run: Callable[[int], object], count: int, threads: int) -> Figure:
    gc.collect()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))  # warm: one connection per thread
        cpu0, wall0 = time.process_time(), time.perf_counter()
        list(pool.map(run, range(threads, threads + count)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return Figure(cpu * 1000 / count, wall * 1000 / count, count)


def body_for(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (BODY_BYTES // 32) + b"\0" * (BODY_BYTES % 32)


def key_for(prefix: str, i: int) -> str:
    return f"{prefix}{hashlib.md5(str(i).encode()).hexdigest()}.pickle"  # noqa: S324


def seed(put: Callable[[str, bytes], object], keys: Sequence[str]) -> None:
    """Create ``keys`` quickly, 8 at a time (not measured)."""
    body = body_for(0)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: put(key, body), keys))


def seeder(ep: Endpoint) -> Callable[[str, bytes], object]:
    try:
        store = make_obstore(ep)
        return lambda key, body: store.put(key, body)
    except ImportError:
        s3 = make_boto3(ep)
        return lambda key, body: s3.put_object(Bucket=BUCKET, Key=key, Body=body)


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def delete_once(client: Client, put: Callable[[str, bytes], object], prefix: str,
                keys: int) -> Figure:
    doomed = [key_for(prefix, i) for i in range(keys)]
    seed(put, doomed)
    figure = timed(lambda i: client.delete_many(doomed), 1)
    left = client.list(prefix)
    if left:
        raise SystemExit(f"{client.name}: {left} keys left after delete_many")
    return figure


def measure_client(
    client: Client, put: Callable[[str, bytes], object], listed: str, n: int,
    list_repeats: int, delete_repeats: int, keys: int,
) -> dict[str, Figure]:
    figures: dict[str, Figure] = {}
    base = f"ops/{client.name}/{uuid.uuid4().hex[:8]}/"
    for i in range(3):  # warm-up: connections, lazy imports, signing-key caches
        client.put(f"{base}warm/{i}", body_for(i), METADATA)
        client.get(f"{base}warm/{i}")
    names = [key_for(base + "incoming/501/", i) for i in range(n)]
    bodies = [body_for(i) for i in range(n)]
    figures["put"] = timed(lambda i: client.put(names[i], bodies[i], METADATA), n)
    body, metadata = client.get(names[0])
    if body != bodies[0] or metadata != METADATA:
        raise SystemExit(f"{client.name}: get returned {len(body)} bytes, metadata {metadata}")
    figures["get"] = timed(lambda i: client.get(names[i]), n)
    figures["head"] = timed(lambda i: client.head(names[i]), n)
    found = client.list(listed)
    if found != keys:
        raise SystemExit(f"{client.name}: listed {found} of {keys} keys")
    figures["list"] = timed(lambda i: client.list(listed), list_repeats)
    deletes = [delete_once(client, put, f"{base}doomed/{r}/", keys)
               for r in range(delete_repeats)]
    figures["delete_many"] = Figure(
        statistics.fmean(f.cpu_ms for f in deletes),
        statistics.fmean(f.wall_ms for f in deletes),
        len(deletes),
    )
    copies = [key_for(base + "archive/501/", i) for i in range(n)]
    figures["copy"] = timed(lambda i: client.copy(names[i], copies[i]), n)
    return figures


def measure_operations(
    clients: dict[str, Client], ep: Endpoint, n: int, list_repeats: int, delete_repeats: int,
    keys: int,
) -> dict[str, dict[str, Figure]]:
    put = seeder(ep)
    listed = f"list/{uuid.uuid4().hex[:8]}/"
    seed(put, [key_for(listed, i) for i in range(keys)])
    results = {}
    for name, client in clients.items():
        results[name] = measure_client(client, put, listed, n, list_repeats, delete_repeats,
                                       keys)
        print(f"  {name:9s} put {results[name]['put'].cpu_ms:.2f} ms CPU ... done "
              f"(load {load()})", flush=True)
    return results


def thread_puts(client: Client, n: int, threads: int) -> Figure:
    base = f"threads/{client.name}/{uuid.uuid4().hex[:8]}/"
    body = body_for(1)
    return timed_threads(lambda i: client.put(key_for(base, i), body, METADATA), n, threads)


def measure_threads(clients: dict[str, Client], n: int, threads: int) -> dict[str, Figure]:
    return {name: thread_puts(client, n, threads) for name, client in clients.items()}


COLD_SNIPPETS = {
    "boto3": (
        "import boto3\nfrom botocore.config import Config",
        "boto3.session.Session().client('s3', endpoint_url=URL, aws_access_key_id=AK, "
        "aws_secret_access_key=SK, config=Config(region_name='us-east-1', "
        "s3={'addressing_style': 'path'}))",
    ),
    "minio": (
        "from minio import Minio",
        "Minio(URL.split('//')[1], access_key=AK, secret_key=SK, secure=False, "
        "region='us-east-1')",
    ),
    "obstore": (
        "from obstore.store import S3Store",
        "S3Store('b', endpoint=URL, access_key_id=AK, secret_access_key=SK, "
        "region='us-east-1', virtual_hosted_style_request=False, "
        "checksum_algorithm='sha256', client_options={'allow_http': True})",
    ),
    "DirectS3": (
        "from MODULE import DirectS3",
        "DirectS3('b', URL, 'us-east-1', AK, SK)",
    ),
}


def measure_cold(
    ep: Endpoint, names: Sequence[str], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (import s, create s) over ``repeats`` fresh interpreters per client."""
    module = direct_module_name() or "hisparc_datastore.s3direct"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "dev" / "src"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    results = {}
    for name in names:
        imports, create = COLD_SNIPPETS[name]
        code = (
            f"import time, json\nURL, AK, SK = {ep.url!r}, {ep.access_key!r}, "
            f"{ep.secret_key!r}\nt0 = time.perf_counter()\n"
            f"{imports.replace('MODULE', module)}\nt1 = time.perf_counter()\n"
            f"client = {create}\nt2 = time.perf_counter()\n"
            "print(json.dumps([t1 - t0, t2 - t1]))\n"
        )
        samples = []
        for _ in range(repeats):
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env,
                timeout=60, check=False,
            )
            if done.returncode != 0:
                print(f"  cold start {name}: failed: {done.stderr.strip()[-300:]}")
                break
            samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if samples:
            results[name] = (
                statistics.median(s[0] for s in samples),
                statistics.median(s[1] for s in samples),
            )
    return results


def measure_obstore_variants(ep: Endpoint, n: int) -> dict[str, Figure]:
    """Put CPU of obstore's integrity settings (the main runs use the last one)."""
    variants = {
        "signed payload, no checksum (library default)": {
            "checksum_algorithm": None, "unsigned_payload": None},
        "signed payload + checksum sha256": {"unsigned_payload": None},
        "unsigned payload + checksum sha256 (used above)": {},
    }
    return {label: variant_puts(ObstoreClient(ep, **config), n)
            for label, config in variants.items()}


def variant_puts(client: Client, n: int) -> Figure:
    base = f"variants/{uuid.uuid4().hex[:8]}/"
    for i in range(3):
        client.put(f"{base}warm/{i}", body_for(i), METADATA)
    bodies = [body_for(i) for i in range(n)]
    return timed(lambda i: client.put(key_for(base, i), bodies[i], METADATA), n)


# -- probes: what the server verifies, what obstore sends and does ---------------------


def raw_put(ep: Endpoint, key: str, body: bytes, headers: dict[str, str], payload_hash: str) -> str:
    """A PUT signed with botocore's SigV4 (no client logic in between); status and code."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = f"{ep.url}/{BUCKET}/{key}"
    request = AWSRequest(method="PUT", url=url, data=body,
                         headers={**headers, "x-amz-content-sha256": payload_hash})
    SigV4Auth(Credentials(ep.access_key, ep.secret_key), "s3", REGION).add_auth(request)
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("PUT", parts.path, body=body, headers=dict(request.headers))
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    code = ""
    if b"<Code>" in data:
        code = data.split(b"<Code>", 1)[1].split(b"</Code>", 1)[0].decode()
    return f"HTTP {response.status} {code}".strip()


def probe_integrity(ep: Endpoint) -> list[tuple[str, str]]:
    body = body_for(7)
    other = b"not the body"
    md5 = lambda data: base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: E731,S324
    sha_b64 = lambda data: base64.b64encode(hashlib.sha256(data).digest()).decode()  # noqa: E731
    unsigned = "UNSIGNED-PAYLOAD"
    cases = [
        ("Content-MD5 right", {"Content-MD5": md5(body)}, unsigned),
        ("Content-MD5 wrong", {"Content-MD5": md5(other)}, unsigned),
        ("x-amz-checksum-sha256 right", {"x-amz-checksum-sha256": sha_b64(body)}, unsigned),
        ("x-amz-checksum-sha256 wrong", {"x-amz-checksum-sha256": sha_b64(other)}, unsigned),
        ("signed payload (x-amz-content-sha256) right", {}, hashlib.sha256(body).hexdigest()),
        ("signed payload (x-amz-content-sha256) wrong", {}, hashlib.sha256(other).hexdigest()),
    ]
    return [
        (label, raw_put(ep, f"probe/integrity/{i}", body, headers, payload))
        for i, (label, headers, payload) in enumerate(cases)
    ]


class HeaderRelay:
    """A loopback TCP relay to the S3 endpoint that records each request's head."""

    def __init__(self, target: Endpoint) -> None:
        parts = urllib.parse.urlsplit(target.url)
        self.target = (parts.hostname, parts.port)
        self.heads: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while data := source.recv(65536):
                if record and data[:4] in (b"PUT ", b"GET ", b"POST", b"HEAD", b"DELE"):
                    self.heads.append(data.split(b"\r\n\r\n", 1)[0].decode("latin-1"))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (sink, source):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


def header_names(head: str) -> str:
    lines = head.split("\r\n")
    names = sorted(
        line.split(":", 1)[0].lower() for line in lines[1:]
        if line.split(":", 1)[0].lower() not in ("host", "accept", "user-agent", "x-amz-date",
                                                  "authorization", "content-length")
    )
    values = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in lines[1:]}
    payload = values.get("x-amz-content-sha256", "")
    if payload and payload != "UNSIGNED-PAYLOAD":
        payload = "<sha256 of the body>"
    shown = [f"{n}: {payload}" if n == "x-amz-content-sha256" else n for n in names]
    return f"{lines[0].split(' ')[0]}: " + ", ".join(shown)


def printable(text: str) -> str:
    """``text`` up to obstore's "Debug source", control characters escaped."""
    text = text.split("Debug source:")[0].strip()
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def probe_obstore(ep: Endpoint) -> list[tuple[str, str]]:
    """What obstore sends and does, in a bucket of its own (so keys can be compared)."""
    bucket = PROBE_BUCKET
    s3 = make_boto3(ep)
    s3.create_bucket(Bucket=bucket)

    def stored_keys() -> set[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {item["Key"] for page in pages for item in page.get("Contents", [])}

    findings: list[tuple[str, str]] = []
    relay = HeaderRelay(ep)
    try:
        sniffed = make_obstore(Endpoint(relay.url, ep.access_key, ep.secret_key), bucket)
        key = "incoming/501/x.pickle"
        sniffed.put(key, body_for(3), attributes={"Content-Type": CONTENT_TYPE, **METADATA})
        sniffed.copy(key, "failed/501/x.pickle")
        sniffed.put("new.pickle", b"1", mode="create")
        sniffed.delete(["new.pickle", "failed/501/x.pickle"])
        time.sleep(0.2)
        for head in relay.heads:
            findings.append(("sends", header_names(head)))
    finally:
        relay.close()

    store = make_obstore(ep, bucket)
    key = "meta.pickle"
    put = store.put(key, body_for(4), attributes={"Content-Type": CONTENT_TYPE, **METADATA})
    findings.append(("put returns", repr(put)))
    stored = s3.head_object(Bucket=bucket, Key=key)
    findings.append(("put attributes, seen by boto3",
                     f"ContentType={stored['ContentType']!r} Metadata={stored['Metadata']}"))
    findings.append(("get(...).attributes", repr(dict(store.get(key).attributes))))
    findings.append(("head(...) keys", repr(sorted(store.head(key)))))
    headed = store.get(key, options={"head": True})
    findings.append(("get(..., options={'head': True})",
                     f"attributes {len(headed.attributes)} keys, body {len(headed.bytes())} bytes"))
    store.copy(key, key + ".copy")
    findings.append(("copy: metadata of the copy",
                     repr(s3.head_object(Bucket=bucket, Key=key + ".copy")["Metadata"])))
    # No metadata directive on copy.  What does replace it: get + put (one library) ...
    got = store.get(key)
    store.put(key + ".moved", got.bytes(), use_multipart=False,
              attributes={**got.attributes, "failure-reason": "probe"})
    findings.append(("get + put with attributes (quarantine move)",
                     repr(s3.head_object(Bucket=bucket, Key=key + ".moved")["Metadata"])))
    # ... and a store whose default headers carry the directive (works, but a hack).
    replacing = make_obstore(ep, bucket, client_options={"default_headers": {
        "x-amz-metadata-directive": "REPLACE", "x-amz-meta-failure-reason": "probe"}})
    replacing.copy(key, key + ".replaced")
    findings.append(("copy by a store with default_headers REPLACE",
                     repr(s3.head_object(Bucket=bucket, Key=key + ".replaced")["Metadata"])))
    big = body_for(5) * (6 * 1024 * 1024 // BODY_BYTES + 1)
    findings.append(("put of 6 MiB, defaults (multipart above 5 MiB)",
                     repr(store.put("big", big)["e_tag"])))
    findings.append(("put of 6 MiB, use_multipart=False",
                     repr(store.put("big", big, use_multipart=False)["e_tag"])))

    def outcome(action: Callable[[], object]) -> str:
        try:
            result = action()
        except Exception as exc:  # the probe reports whatever it is
            return f"{type(exc).__module__}.{type(exc).__name__}: {printable(str(exc))[:100]}"
        return f"ok {result!r}"[:120]

    findings.append(("put mode='create' on an existing key",
                     outcome(lambda: store.put(key, b"x", mode="create"))))
    findings.append(("get of a missing key", outcome(lambda: store.get("none"))))
    findings.append(("head of a missing key", outcome(lambda: store.head("none"))))
    findings.append(("copy of a missing key", outcome(lambda: store.copy("none", "x"))))
    findings.append(("delete of missing keys", outcome(lambda: store.delete(["n1", "n2"]))))
    findings.append(("delete list with one refused key",
                     outcome(lambda: store.delete(["ok", "bad//key"]))))
    findings.append(("non-ASCII metadata value: put",
                     outcome(lambda: store.put("utf8", b"1", attributes={"reason": "\u00e9"}))))
    findings.append(("  ... then get", outcome(lambda: store.get("utf8"))))
    s3.delete_object(Bucket=bucket, Key="utf8")
    for awkward in ("a//b", "a/./b", "a/../b", "..", "a\x00b", "a\x01b", "a\nb", "a\tb",
                    "a\x7fb", "a/b/", "/a/b", "a b", "a%41b", "a#b?c*", "na\u00efve"):
        def put_and_see(k: str = awkward) -> str:
            before = stored_keys()
            store.put(k, b"1")
            new = sorted(stored_keys() - before)
            for made in new:
                s3.delete_object(Bucket=bucket, Key=made)
            return "stored as " + repr(new)
        findings.append((f"put key {awkward!r}", outcome(put_and_see)))
    s3.put_object(Bucket=bucket, Key="ctl\x01key", Body=b"1")
    findings.append(("get of key 'ctl\\x01key' stored by boto3",
                     outcome(lambda: store.get("ctl\x01key"))))
    findings.append(("  ... listed by obstore as",
                     outcome(lambda: [o["path"] for o in store.list().collect()
                                      if "ctl" in o["path"]])))
    s3.put_object(Bucket=bucket, Key="incoming/501/abc.pickle", Body=b"1")
    findings.append(("list('incoming/501/ab') (a prefix inside a segment)",
                     outcome(lambda: [o["path"] for o in store.list("incoming/501/ab").collect()])))
    findings.append(("list('incoming/50')",
                     outcome(lambda: [o["path"] for o in store.list("incoming/50").collect()])))
    findings.append(("list('incoming/501/abc.pickle') (the key itself)",
                     outcome(lambda: [o["path"] for o in
                                      store.list("incoming/501/abc.pickle").collect()])))
    findings.append(("list('incoming/501/')",
                     outcome(lambda: [o["path"] for o in store.list("incoming/501/").collect()])))
    return findings


FORK_SCRIPT = """
import os, signal, sys, time
from obstore.store import S3Store
url, key, secret, bucket, use_first = sys.argv[1:6]
def store():
    return S3Store(bucket, endpoint=url, access_key_id=key, secret_access_key=secret,
                   client_options={"allow_http": True, "timeout": "3s"},
                   retry_config={"max_retries": 0})
parent = store()
if use_first == "yes":
    parent.put("fork/parent-before", b"1")
started = time.monotonic()
pid = os.fork()
if pid == 0:
    signal.alarm(5)
    store().put("fork/child", b"1")
    os._exit(0)
_, status = os.waitpid(pid, 0)
child = "hung (killed after 5 s)" if os.WIFSIGNALED(status) else "put done"
print("child:", child, flush=True)
store().put("fork/parent-after", b"1")
print("parent after the fork: put done", flush=True)
"""


def probe_fork(ep: Endpoint) -> list[tuple[str, str]]:
    """obstore and fork (gunicorn forks its workers), in a fresh interpreter each time."""
    findings = []
    for label, use_first in (("parent made a store, no request", "no"),
                             ("parent made a request first", "yes")):
        try:
            done = subprocess.run(
                [sys.executable, "-c", FORK_SCRIPT, ep.url, ep.access_key, ep.secret_key,
                 BUCKET, use_first],
                capture_output=True, text=True, timeout=15, check=False,
            )
            lines = done.stdout.strip().splitlines()
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            lines = [*output.strip().splitlines(), "parent after the fork: hung (killed)"]
        findings.append((f"fork, {label}", "; ".join(lines)))
    return findings


class FakeS3:
    """A loopback server answering every request the same way (or never)."""

    def __init__(self, status: int | None, body: bytes = b"") -> None:
        self.status, self.body, self.requests = status, body, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.status is None:
                self.held.append(client)  # never answer
                continue
            threading.Thread(target=self._answer, args=(client,), daemon=True).start()

    def _answer(self, client: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = client.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, rest = buffer.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while len(rest) < length:
                    rest += client.recv(65536)
                buffer = rest[length:]
                self.requests += 1
                client.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/xml\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (self.status, len(self.body),
                                                                   self.body))
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        for sock in self.held:
            sock.close()


def probe_failures() -> list[tuple[str, str]]:
    """Exceptions and time to give up, with the timeouts proposed for the upload."""
    upload_config = {
        "client_options": {"timeout": "3s", "connect_timeout": "1s"},
        "retry_config": {
            "max_retries": 2,
            "retry_timeout": dt.timedelta(seconds=4),
            "backoff": {"init_backoff": dt.timedelta(milliseconds=100),
                        "max_backoff": dt.timedelta(seconds=1), "base": 2},
        },
    }
    findings = []
    cases: list[tuple[str, int | None, bytes, dict[str, Any], str]] = [
        ("server never answers, upload config", None, b"", upload_config, "put"),
        ("503 every time, library defaults", 503, b"", {}, "put"),
        ("503 every time, upload config", 503, b"", upload_config, "put"),
        ("400 (a refused request)", 400, b"<Error><Code>InvalidRequest</Code></Error>",
         upload_config, "put"),
        ("403", 403, b"<Error><Code>AccessDenied</Code></Error>", upload_config, "put"),
        ("DeleteObjects with one key denied", 200,
         b'<?xml version="1.0" encoding="UTF-8"?><DeleteResult><Deleted><Key>k/1</Key>'
         b"</Deleted><Error><Key>k/2</Key><Code>AccessDenied</Code><Message>Access Denied"
         b"</Message></Error></DeleteResult>", upload_config, "delete"),
    ]
    for label, status, body, config, operation in cases:
        fake = FakeS3(status, body)
        store = make_obstore(Endpoint(fake.url, "a", "b"), **config)
        started = time.monotonic()
        try:
            if operation == "put":
                store.put("incoming/501/x.pickle", body_for(1))
            else:
                store.delete(["k/1", "k/2", "k/3"])
            outcome = "no error"
        except Exception as exc:
            text = " ".join(printable(str(exc)).replace("\\n", " ").split())
            if "DeleteObjects request failed" in text:
                text = text[text.index("DeleteObjects request failed"):]
            elif "Server returned" in text:
                text = text[text.index("Server returned"):]
            elif "error sending request" in text or "timed out" in text.lower():
                text = "timeout / connection error"
            outcome = f"{type(exc).__name__}: {text[:70]}"
        elapsed = time.monotonic() - started
        fake.close()
        requests = f", {fake.requests} request(s)" if status is not None else ""
        findings.append((label, f"{outcome} after {elapsed:.2f} s{requests}"))
    return findings


# -- the run ---------------------------------------------------------------------------


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    print(f"\n{title}")
    print(line(header))
    print("-" * len(line(header)))
    for row in rows:
        print(line(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (fewer operations)")
    parser.add_argument("--ops", type=int, help="operations per single-thread figure")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--keys", type=int, default=1000, help="keys listed and bulk-deleted")
    parser.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    parser.add_argument("--only", nargs="+", choices=("ops", "threads", "cold", "probes"),
                        default=["ops", "threads", "cold", "probes"])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    n = args.ops or (200 if args.quick else 1000)
    list_repeats = 5 if args.quick else 20
    delete_repeats = 1 if args.quick else 3
    cold_repeats = 3 if args.quick else 7
    thread_ops = 4 * n

    versions = {}
    for module in ("boto3", "minio", "obstore"):
        try:
            versions[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[module] = "-"
    seaweed = seaweed_class()
    print(__doc__.split("\n\n")[0])
    print(f"{os.cpu_count()} CPUs, load average {load()} at the start; python "
          f"{sys.version.split()[0]}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{n} operations per figure ({list_repeats} lists and {delete_repeats} bulk deletes "
          f"of {args.keys} keys), {thread_ops} puts over {args.threads} threads, "
          f"cold start median of {cold_repeats}")

    record: dict[str, Any] = {"cpus": os.cpu_count(), "versions": versions, "ops": n}
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as scratch:
        server = seaweed(data_dir=Path(scratch) / "seaweedfs", access_key="bench-access",
                         secret_key="bench-secret-" + uuid.uuid4().hex)
        server.start()
        try:
            ep = Endpoint(server.endpoint, server.access_key, server.secret_key)
            make_boto3(ep).create_bucket(Bucket=BUCKET)
            clients, notes = build_clients(ep, args.clients)
            for note in notes:
                print("note:", note)
            ops: dict[str, dict[str, Figure]] = {}
            threads: dict[str, Figure] = {}
            cold: dict[str, tuple[float, float]] = {}
            variants: dict[str, Figure] = {}
            if "ops" in args.only:
                print(f"\nsingle thread, load {load()}:", flush=True)
                ops = measure_operations(clients, ep, n, list_repeats, delete_repeats, args.keys)
                if "obstore" in clients:
                    variants = measure_obstore_variants(ep, n)
            if "threads" in args.only:
                print(f"{args.threads} threads, load {load()}", flush=True)
                threads = measure_threads(clients, thread_ops, args.threads)
            if "cold" in args.only:
                print(f"cold starts, load {load()}", flush=True)
                cold = measure_cold(ep, list(clients), cold_repeats)
            probes: dict[str, list[tuple[str, str]]] = {}
            if "probes" in args.only:
                probes["SeaweedFS verifies (raw SigV4 PUTs)"] = probe_integrity(ep)
                if "obstore" in clients:
                    probes["obstore against SeaweedFS"] = probe_obstore(ep)
                    probes["obstore failures (fake servers on loopback)"] = (
                        probe_failures() + probe_fork(ep))
        finally:
            server.stop()

    for title, findings in probes.items():
        print(f"\n{title}:")
        width = max(len(label) for label, _ in findings)
        for label, value in findings:
            print(f"  {label.ljust(width)}  {value}")

    if variants:
        print_table("obstore put, integrity settings (CPU ms per put, single thread)",
                    ["setting", "CPU ms", "wall ms"],
                    [[k, f"{v.cpu_ms:.3f}", f"{v.wall_ms:.3f}"] for k, v in variants.items()])

    columns = ["put", "get", "head", "list", "delete_many", "copy"]
    names = [c for c in CLIENTS if c in clients]
    if ops:
        print_table(
            f"CPU ms per operation in the client process (wall ms in brackets); list = one "
            f"listing of {args.keys} keys, delete_many = {args.keys} keys in one call",
            ["client", *columns],
            [[name, *(f"{ops[name][c].cpu_ms:.2f} ({ops[name][c].wall_ms:.2f})"
                      for c in columns)] for name in names if name in ops],
        )
    if threads or cold:
        rows = []
        for name in names:
            row = [name]
            if threads:
                t = threads.get(name)
                row += [f"{t.cpu_ms:.2f}" if t else "-", f"{1000 / t.wall_ms:.0f}" if t else "-"]
            if cold:
                c = cold.get(name)
                row += [f"{c[0]:.3f} + {c[1]:.3f}" if c else "-"]
            rows.append(row)
        header = ["client"]
        if threads:
            header += [f"put CPU ms, {args.threads} threads", "puts/s"]
        if cold:
            header += ["cold start: import s + client s"]
        print_table(f"{args.threads} threads on one client; cold start median of "
                    f"{cold_repeats} fresh processes", header, rows)
    print(f"\nload average {load()} at the end")

    if args.json:
        record.update({
            "ops": {k: {op: vars(f) for op, f in v.items()} for k, v in ops.items()},
            "threads": {k: vars(v) for k, v in threads.items()},
            "cold": cold,
            "obstore_variants": {k: vars(v) for k, v in variants.items()},
            "probes": probes,
        })
        args.json.write_text(json.dumps(record, indent=1))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
