"""Reliability target 2: the bucket stopped, slow or failing, through a fault-injecting proxy.

The functions are served for real (functions-framework) with their bucket endpoint
pointed at :class:`faultproxy.FaultProxy`, which sits in front of the session's real S3
server.  What must hold:

- uploads: every answer while the bucket misbehaves is non-``100`` (so the station
  resends), and no object is ever half there: each stored object is the whole verified
  batch.  A put the server carried out but whose answer was lost (``cut_after``) leaves
  a whole object, and the station's resend maps onto the same key;
- the writer: answers 5xx to notifications while the bucket is away, leaves the objects
  in ``incoming/``, retries a short hiccup by itself, and writes everything exactly once
  when the bucket returns; under random faults on a share of all requests, repeated
  sweeps catch up with nothing lost or doubled.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import TEST_STATIONS, S3Endpoint
from faultproxy import Fault, FaultProxy
from hisparc_datastore_dev.py2pickle import dumps_py2
from notification_bodies import minio_body
from reliability_support import Expected, Served, make_batch, serve, store_batch, verify

from hisparc_datastore.config import Settings
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.writer.pipeline import RetryPolicy, process_keys, sweep

pytestmark = pytest.mark.long

FAST = RetryPolicy(delays=(0.05, 0.1))


@pytest.fixture
def proxy(s3_endpoint: S3Endpoint) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint.url) as running:
        yield running


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324


def post_batch(upload: Served, station: int, body: bytes) -> requests.Response:
    """POST like the station software (the pickle as latin-1 text)."""
    return requests.post(upload.url, data={
        "station_id": str(station), "password": TEST_STATIONS[station][1],
        "data": body.decode("latin-1"), "checksum": md5(body),
    }, timeout=120)


def objects(bucket: Bucket) -> dict[str, bytes]:
    return {info.key: bucket.get(info.key).body for info in bucket.list("")}


def assert_nothing_half(bucket: Bucket) -> None:
    for key, body in objects(bucket).items():
        assert key.endswith(f"/{md5(body)}.pickle"), f"{key} holds a damaged body"


def test_uploads_answer_non_100_and_store_nothing_half(
    proxy: FaultProxy, bucket: Bucket, datastore_env: dict[str, str], tmp_path: Path
) -> None:
    upload = serve("upload", {**datastore_env, "DATASTORE_BUCKET_ENDPOINT": proxy.url},
                   tmp_path / "upload.log")
    figures: Counter = Counter()
    answered_100: dict[str, bytes] = {}  # key -> body
    refused: list[bytes] = []
    bodies = iter(dumps_py2(make_batch(n, 501, events=6)) for n in range(1, 100))

    def attempt(label: str, expect_stored: bool) -> None:
        body = next(bodies)
        before = set(objects(bucket))
        answer = post_batch(upload, 501, body)
        key = f"incoming/501/{md5(body)}.pickle"
        figures[f"{label}: {answer.status_code} {answer.text}"] += 1
        if expect_stored:
            assert (answer.status_code, answer.text) == (200, "100"), label
            answered_100[key] = body
        else:
            assert answer.text != "100", label
            assert answer.status_code >= 500, label
            refused.append(body)
        after = set(objects(bucket))
        if label != "cut_after":
            assert after - before == ({key} if expect_stored else set()), label
        assert_nothing_half(bucket)

    try:
        attempt("pass", True)
        proxy.stop_listening()
        attempt("stopped", False)
        proxy.start_listening()
        for status in (500, 503):
            proxy.fault = Fault("error", status=status)
            attempt(f"error {status}", False)
        # One retry within 4 s (functions/upload/main.py): a single 503 is absorbed, two
        # are answered 404 well within the stations' 10 s, and their resend is the retry.
        proxy.fault = Fault("error", status=503, times=1)
        attempt("one 503", True)
        proxy.fault = Fault("error", status=503, times=2)
        attempt("two 503s", False)
        for kind in ("cut_before", "truncate", "flip", "cut_after"):
            proxy.fault = Fault(kind, match=lambda method, path: method == "PUT")
            attempt(kind, False)
        proxy.fault = Fault("delay", seconds=1.0)
        attempt("slow (1 s)", True)
        proxy.fault = Fault("hang", match=lambda method, path: method == "PUT")
        attempt("silent", False)
        proxy.fault = Fault()
        # The stations resend every refused batch: each is stored once, under its key.
        for body in refused:
            answer = post_batch(upload, 501, body)
            assert (answer.status_code, answer.text) == (200, "100")
            answered_100[f"incoming/501/{md5(body)}.pickle"] = body
        assert objects(bucket) == answered_100
    finally:
        upload.stop()
        proxy.close()
    assert "Traceback" not in upload.log()
    print(f"\nupload under bucket faults: {dict(figures)}; proxy injected {proxy.injected}")


def notify(writer: Served, bucket_name: str, keys: list[str]) -> requests.Response:
    return requests.post(writer.url, data=minio_body(bucket_name, keys),
                         headers={"Content-Type": "application/json"}, timeout=300)


def test_writer_answers_5xx_while_the_bucket_is_away_then_catches_up(
    proxy: FaultProxy, bucket: Bucket, settings: Settings, datastore_env: dict[str, str],
    tmp_path: Path,
) -> None:
    writer = serve("writer", {**datastore_env, "DATASTORE_BUCKET_ENDPOINT": proxy.url},
                   tmp_path / "writer.log")
    expected = Expected()
    statuses: Counter = Counter()

    def put(first: int, count: int) -> list[str]:
        keys = []
        for index in range(first, first + count):
            station = (501, 502, 7001)[index % 3]
            events = make_batch(index, station)
            keys.append(store_batch(bucket, events, station))
            expected.add(keys[-1], station, events)
        return keys

    try:
        keys = put(1, 6)
        proxy.stop_listening()
        answer = notify(writer, bucket.name, keys)
        statuses[f"stopped: {answer.status_code}"] += 1
        assert answer.status_code == 503
        proxy.start_listening()
        for status in (500, 503):
            proxy.fault = Fault("error", status=status)
            answer = notify(writer, bucket.name, keys)
            statuses[f"error {status}: {answer.status_code}"] += 1
            assert answer.status_code == 503
        assert sorted(info.key for info in bucket.list("incoming/")) == sorted(keys)
        assert list(bucket.list("archive/")) == []

        proxy.fault = Fault("error", status=503, times=2)  # a hiccup: the writer retries
        answer = notify(writer, bucket.name, keys)
        statuses[f"two 503s: {answer.status_code}"] += 1
        assert answer.status_code == 200

        # Answers lost after the server acted, on the writer's archive puts and deletes.
        more = put(7, 6)
        proxy.fault = Fault("cut_after", match=lambda method, path: method in (
            "PUT", "DELETE", "POST"), times=4)
        answer = notify(writer, bucket.name, more)
        statuses[f"cut after acting: {answer.status_code}"] += 1
        for _ in range(5):
            if answer.status_code == 200 and not list(bucket.list("incoming/")):
                break
            answer = notify(writer, bucket.name, more)
            statuses[f"cut after acting, again: {answer.status_code}"] += 1
        assert answer.status_code == 200
    finally:
        writer.stop()
    assert list(bucket.list("incoming/")) == []
    verdict = verify(settings.data_dir, expected)
    assert verdict.ok, verdict
    print(f"\nwriter under bucket faults: {dict(statuses)}; proxy injected {proxy.injected}")


def test_sweeps_under_random_faults_catch_up_exactly_once(
    proxy: FaultProxy, bucket: Bucket, settings: Settings
) -> None:
    """Half of all requests fail (5xx, cut before or after acting, truncated)."""
    expected = Expected()
    rng = random.Random(5)
    for index in range(1, 61):
        station = rng.choice((501, 502, 7001))
        events = make_batch(index, station)
        expected.add(store_batch(bucket, events, station), station, events)
    proxied = dataclasses.replace(settings, bucket_endpoint=proxy.url)
    flaky_bucket = Bucket.from_settings(proxied, max_attempts=1)
    proxy.fault = Fault("random", seed=7, weights={
        "pass": 0.5, "error": 0.15, "cut_before": 0.12, "cut_after": 0.15, "truncate": 0.08,
    })
    rounds, failed_rounds = 0, 0
    deadline = time.monotonic() + 240  # a hang guard, not a timing assertion
    while time.monotonic() < deadline:
        keys = [info.key for info in bucket.list("incoming/")]
        if not keys:
            break
        rounds += 1
        if rounds % 2:  # notifications for a random half, then sweeps
            result = process_keys(rng.sample(keys, k=max(1, len(keys) // 2)), flaky_bucket,
                                  proxied, retry=FAST)
        else:
            result = sweep(flaky_bucket, proxied, retry=FAST)
        failed_rounds += not result.ok
    assert list(bucket.list("incoming/")) == []
    assert list(bucket.list("failed/")) == []
    verdict = verify(settings.data_dir, expected)
    assert verdict.ok, verdict
    print(f"\nrandom bucket faults: {len(expected.batches)} batches, {proxy.requests} "
          f"requests, injected {proxy.injected}, {rounds} rounds ({failed_rounds} not ok), "
          f"{verdict.rows} rows checked, at {dt.datetime.now(dt.UTC):%H:%M}")
