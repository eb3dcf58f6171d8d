"""The writer function through real HTTP: functions/writer/main.py served as its image does.

One server process (with a notification token) serves the module against the session's
real SeaweedFS, as a deployment would; a short-lived second process checks that a
configuration error stops start-up.  Notification bodies are the senders' documented
shapes (see ``notification_bodies``), sent with ``requests``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import tables
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.ports import free_port
from hisparc_datastore_dev.processes import serve_command, serve_function
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.format.keys import archive_key, failed_key, incoming_key
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for
from hisparc_datastore.writer.notifications import PING_TYPE, SWEEP_TYPE

try:  # tests/ as a package, or tests/ on sys.path
    from .conftest import S3Endpoint, wait_for, write_station_list
    from .notification_bodies import (
        aws_body,
        ceph_body,
        cloudevent_binary,
        cloudevent_structured,
        minio_body,
        s3_test_event,
    )
except ImportError:
    from conftest import S3Endpoint, wait_for, write_station_list  # type: ignore[no-redef]
    from notification_bodies import (  # type: ignore[no-redef]
        aws_body,
        ceph_body,
        cloudevent_binary,
        cloudevent_structured,
        minio_body,
        s3_test_event,
    )

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "functions" / "writer" / "main.py"
TOKEN = "writer-token-" + uuid.uuid4().hex
RECEIVED = dt.datetime(2024, 11, 5, 10, tzinfo=dt.UTC)
JSON = {"Content-Type": "application/json"}


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    bucket: Bucket
    data_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def post(self, body: bytes, headers: dict[str, str] | None = None,
             auth: str | None = f"Bearer {TOKEN}") -> requests.Response:
        all_headers = dict(JSON if headers is None else headers)
        if auth is not None:
            all_headers["Authorization"] = auth
        return requests.post(self.url, data=body, headers=all_headers, timeout=120)


def write_config(directory: Path, endpoint: S3Endpoint, bucket_name: str) -> Path:
    station_list = write_station_list(directory / "stations.csv")
    (directory / "data").mkdir()
    config = directory / "config.ini"
    config.write_text(textwrap.dedent(f"""\
        [General]
        log =
        loglevel = debug
        station_list = {station_list}
        data_dir = {directory / "data"}
        minimum_year = 2020

        [Writer]
        sleep = 1
        anonymous_notifications = true
        retry_delay = 0.5
        retry_max_delay = 1
        retry_attempts = 50

        [Bucket]
        endpoint = {endpoint.url}
        name = {bucket_name}
        """))
    return config


def environment(config: Path, endpoint: S3Endpoint, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATASTORE_", "AWS_"))}
    env.update(DATASTORE_CONFIG=str(config), AWS_ACCESS_KEY_ID=endpoint.access_key,
               AWS_SECRET_ACCESS_KEY=endpoint.secret_key, **extra)
    return env


@pytest.fixture(scope="module")
def server(s3_endpoint: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("writer-http")
    bucket_name = f"writer-http-{uuid.uuid4().hex[:10]}"
    config = write_config(directory, s3_endpoint, bucket_name)
    bucket = Bucket(bucket_name, endpoint=s3_endpoint.url, access_key=s3_endpoint.access_key,
                    secret_key=s3_endpoint.secret_key)
    bucket.ensure_exists()
    env = environment(config, s3_endpoint, DATASTORE_WRITER_AUTH_TOKEN=TOKEN)
    served = serve_function(SOURCE, "writer", env, directory / "writer.log", cwd=ROOT)
    try:
        yield Server(served.url, served.process, served.log_path, bucket, directory / "data")
    finally:
        served.stop()


_seeds = iter(range(1000, 10_000))


def put_batch(server: Server, day: dt.date, n: int = 4, station: int = 501,
              body: bytes | None = None) -> tuple[str, list[dict]]:
    rng = random.Random(next(_seeds))
    start = dt.datetime.combine(day, dt.time(8)) + dt.timedelta(seconds=rng.randrange(3600))
    events = samples.batch(n, start, rng, kinds=("CIC", "SIN"))
    data = dumps_py2(events) if body is None else body
    key = incoming_key(station, hashlib.md5(data).hexdigest())  # noqa: S324
    cluster = {501: "Amsterdam", 7001: "Leiden"}[station]
    server.bucket.put(key, data, metadata_for(Station(station, cluster, "x"), n, RECEIVED))
    return key, events


def rows_of(server: Server, day: dt.date, station_path: str, table: str) -> int:
    path = day_file_path(server.data_dir, day)
    if not path.exists():
        return 0
    with tables.open_file(path, "r") as h5:
        node = h5.get_node(f"{station_path}/{table}") if f"{station_path}/{table}" in h5 else None
        return 0 if node is None else node.nrows


def in_incoming(server: Server, key: str) -> bool:
    return server.bucket.head(key) is not None


# --- authentication and plain HTTP ------------------------------------------------------


def test_get_and_head_answer_without_a_token(server: Server) -> None:
    assert requests.get(server.url, timeout=30).status_code == 200
    assert requests.head(server.url + "any/path", timeout=30).status_code == 200  # MinIO probe


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "wrong", f"Basic {TOKEN}", "Bearer",
                                  f"Bearer {TOKEN}x", f"{TOKEN[:-1]}"])
def test_requests_without_the_token_are_refused(server: Server, auth: str | None) -> None:
    day = dt.date(2024, 11, 1)
    key, _ = put_batch(server, day)
    answer = server.post(aws_body(server.bucket.name, [key]), auth=auth)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert in_incoming(server, key)  # nothing was done


@pytest.mark.parametrize("auth", [f"Bearer {TOKEN}", f"bearer {TOKEN}", TOKEN, f"Bearer  {TOKEN}"],
                         ids=["bearer", "lower-case", "bare (MinIO)", "spaces"])
def test_bearer_or_bare_token_is_accepted(server: Server, auth: str) -> None:
    key, _ = put_batch(server, dt.date(2024, 11, 2))
    answer = server.post(minio_body(server.bucket.name, [key]), auth=auth)
    assert answer.status_code == 200, answer.text
    assert not in_incoming(server, key)


def test_other_methods_and_oversized_bodies(server: Server) -> None:
    assert requests.put(server.url, data=b"{}", timeout=30,
                        headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405
    huge = b" " * (5 * 1024 * 1024)
    assert server.post(huge).status_code == 413


# --- every notification shape -----------------------------------------------------------


def _minio(bucket: str, key: str) -> tuple[dict[str, str], bytes]:
    return JSON, minio_body(bucket, [key])


def _aws(bucket: str, key: str) -> tuple[dict[str, str], bytes]:
    return JSON, aws_body(bucket, [key])


def _ceph(bucket: str, key: str) -> tuple[dict[str, str], bytes]:
    return JSON, ceph_body(bucket, [key])


def _ce_binary(bucket: str, key: str) -> tuple[dict[str, str], bytes]:
    return cloudevent_binary(aws_body(bucket, [key]), "com.amazonaws.s3.ObjectCreated")


def _ce_structured(bucket: str, key: str) -> tuple[dict[str, str], bytes]:
    return cloudevent_structured(minio_body(bucket, [key]), "io.min.s3.ObjectCreated")


def _ce_base64(bucket: str, key: str) -> tuple[dict[str, str], bytes]:
    return cloudevent_structured(ceph_body(bucket, [key]), "ceph.s3.ObjectCreated", True)


@pytest.mark.parametrize(
    "shape", [_minio, _aws, _ceph, _ce_binary, _ce_structured, _ce_base64],
    ids=["minio", "aws", "ceph", "cloudevent-binary", "cloudevent-structured",
         "cloudevent-base64"],
)
def test_each_notification_shape_gets_the_object_written(server: Server, shape) -> None:
    day = dt.date(2024, 11, 3)
    key, events = put_batch(server, day, station=7001)
    before = rows_of(server, day, "/hisparc/cluster_leiden/station_7001", "events")
    headers, body = shape(server.bucket.name, key)

    answer = server.post(body, headers)

    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["keys"] == 1 and document["archived"] == 1 and document["failed"] == {}
    assert not in_incoming(server, key)
    assert server.bucket.head(archive_key(key, RECEIVED)) is not None
    cic = sum(1 for e in events if e["header"]["eventtype_uploadcode"] == "CIC")
    assert rows_of(server, day, "/hisparc/cluster_leiden/station_7001", "events") == before + cic

    again = server.post(body, headers)  # a duplicate delivery
    assert again.status_code == 200 and again.json()["already_done"] == 1
    assert rows_of(server, day, "/hisparc/cluster_leiden/station_7001", "events") == before + cic


def test_nothing_to_do_is_success(server: Server) -> None:
    key, _ = put_batch(server, dt.date(2024, 11, 4))
    name = server.bucket.name
    for body in (s3_test_event(name), aws_body(name, [key], event_name="ObjectRemoved:Delete"),
                 minio_body(name, ["archive/2024/11/04/501/x.pickle"]),
                 aws_body("someone-elses-bucket", [key])):
        answer = server.post(body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"keys": 0}
    assert in_incoming(server, key)
    assert "bucket is not" in server.log()  # the other bucket is logged


@pytest.mark.parametrize("body", [b"", b"garbage", b'{"hello": "world"}', b"[]"])
def test_garbage_is_400(server: Server, body: bytes) -> None:
    answer = server.post(body)
    assert answer.status_code == 400 and "error" in answer.json()


def test_undecodable_object_is_quarantined_once(server: Server) -> None:
    key, _ = put_batch(server, dt.date(2024, 11, 6), body=b"cos\nsystem\n(S'id'\ntR.")
    first = server.post(aws_body(server.bucket.name, [key]))
    assert first.status_code == 200 and list(first.json()["quarantined"]) == [key]
    second = server.post(aws_body(server.bucket.name, [key]))
    assert second.status_code == 200 and second.json()["already_done"] == 1
    assert "failure-reason" in server.bucket.get(failed_key(key)).metadata


def test_an_outage_of_the_volume_is_503_and_a_retry_succeeds(server: Server) -> None:
    day = dt.date(2031, 1, 7)
    key, _ = put_batch(server, day)
    moved = server.data_dir.with_name("data-unmounted")
    server.data_dir.rename(moved)  # the volume is gone: nothing can be written anywhere
    try:
        answer = server.post(aws_body(server.bucket.name, [key]))
        assert answer.status_code == 503
        assert list(answer.json()["failed"]) == [key]
        assert in_incoming(server, key)
    finally:
        moved.rename(server.data_dir)
    retried = server.post(aws_body(server.bucket.name, [key]))
    assert retried.status_code == 200 and retried.json()["archived"] == 1


def test_a_blocked_day_is_200_and_written_once_it_is_fixed(server: Server) -> None:
    """One day's folder is in the way: the notification is answered 200 (deferred) and
    the writer's own backlog writes the object soon after the path is fixed."""
    day = dt.date(2032, 2, 8)
    key, _ = put_batch(server, day)
    other, _ = put_batch(server, dt.date(2032, 2, 9))
    blocker = server.data_dir / "2032"
    blocker.write_text("in the way")
    try:
        answer = server.post(aws_body(server.bucket.name, [key]))
        assert answer.status_code == 200, answer.text
        assert list(answer.json()["deferred"]) == [key]
        assert "NotADirectoryError" in answer.json()["deferred"][key]
    finally:
        blocker.unlink()
    later = server.post(aws_body(server.bucket.name, [other]))  # not held up
    assert later.status_code == 200 and later.json()["archived"] == 1
    wait_for(lambda: not in_incoming(server, key))
    assert rows_of(server, day, "/hisparc/cluster_amsterdam/station_501", "events") >= 1


def test_sweep_requests_run_in_the_background(server: Server) -> None:
    day = dt.date(2024, 11, 8)
    first = [put_batch(server, day)[0] for _ in range(3)]
    headers, body = cloudevent_binary(None, SWEEP_TYPE)
    answer = server.post(body, headers)
    assert answer.status_code == 202, answer.text
    assert answer.json()["sweep"] in ("started", "running")
    wait_for(lambda: not any(in_incoming(server, key) for key in first))

    second = [put_batch(server, day)[0] for _ in range(2)]
    headers, body = cloudevent_structured(json.dumps({"action": "sweep"}).encode(), PING_TYPE)
    answer = server.post(body, headers)
    assert answer.status_code == 202, answer.text
    wait_for(lambda: not any(in_incoming(server, key) for key in second))


def test_liveness(server: Server) -> None:
    answer = requests.get(f"{server.url}/healthz", timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["healthy"] is True


@pytest.mark.parametrize("body", [
    b"[" * 100_000,
    b'{"Records": ' * 50_000,
    b'{"Records": [' + b"[" * 100_000 + b"]",
    b'{"specversion": "1.0", "type": "x", "data": "' + b"[" * 100_000 + b'"}',
    b"\xff\xfe not utf-8",
    b'{"Records": [{"eventName": 5}]}',
    b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": []}}}]}',
    b"1e999999",
    b'"' + b"9" * 100_000 + b'"',
    b"9" * 100_000,
], ids=["deep-arrays", "deep-objects", "deep-record", "deep-data", "not-utf8", "wrong-type",
        "bucket-list", "huge-float", "long-string", "huge-int"])
def test_deep_or_malformed_json_is_400_never_500(server: Server, body: bytes) -> None:
    answer = server.post(body)
    assert answer.status_code == 400, answer.text
    assert "error" in answer.json()


def test_keys_no_server_can_hold_are_ignored_not_errors(server: Server) -> None:
    body = json.dumps({"Records": [
        {"eventName": "ObjectCreated:Put",
         "s3": {"bucket": {"name": server.bucket.name},
                "object": {"key": "incoming/501/\ud800.pickle"}}},
        {"eventName": "ObjectCreated:Put",
         "s3": {"bucket": {"name": server.bucket.name},
                "object": {"key": "incoming/501/" + "x" * 1100}}},
    ]}).encode()
    answer = server.post(body)
    assert answer.status_code == 200 and answer.json()["keys"] == 0


def test_one_log_line_per_request(server: Server) -> None:
    marker = uuid.uuid4().hex
    server.post(b'{"Records": []}', {"Content-Type": "application/json", "X-Marker": marker})
    lines = [line for line in server.log().splitlines() if "hisparc_datastore.writer.http" in line]
    assert lines and "POST 200" in lines[-1]


def test_configuration_error_stops_start_up(s3_endpoint: S3Endpoint, tmp_path: Path) -> None:
    env = environment(tmp_path / "missing.ini", s3_endpoint)
    done = subprocess.run(
        serve_command(SOURCE, "writer", "127.0.0.1", free_port()),
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode != 0
    assert "configuration error" in done.stderr + done.stdout


def test_without_a_token_the_writer_refuses_to_start_unless_told(
    s3_endpoint: S3Endpoint, tmp_path: Path
) -> None:
    """docs/SECURITY.md R9: a writer without a token must not quietly accept anyone."""
    config = write_config(tmp_path, s3_endpoint, "writer-no-token")
    config.write_text(config.read_text().replace("anonymous_notifications = true\n", ""))
    done = subprocess.run(
        serve_command(SOURCE, "writer", "127.0.0.1", free_port()),
        env=environment(config, s3_endpoint), cwd=ROOT, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert done.returncode != 0
    output = done.stderr + done.stdout
    assert "DATASTORE_WRITER_AUTH_TOKEN is not set" in output
    assert "anonymous_notifications" in output
