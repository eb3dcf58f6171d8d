"""The writer never stalls the notification queue, as the deployment delivers it.

MinIO with ``queue_dir`` (infra/README.md) delivers webhook events strictly in order, one
at a time, and retries a non-2xx answer every few seconds, for ever: whatever is queued
behind a failing event waits.  :class:`StoreAndForward` is that sender, with shorter
pauses.  The served writer (its image's launcher, the session's real S3 server) gets
poison objects of every kind at the head of the queue, then good batches:

- the good batches are in HDF5 within seconds, each notification answered 2xx the first
  time (no retry loop for the sender);
- every poison is accounted for: written (a key longer than the ledger's column),
  quarantined with its reason after its bounded retries (a day file that is a directory
  or corrupt, a station without a cluster, an undecodable body), or reported as refused
  (a key the S3 server refuses, under which nothing can exist);
- a day file held open by a PyTables reader holds up only that day, and its batch is
  written within seconds of the reader closing the file.

A second test shows a long background sweep does not delay notifications behind it.  The
figures printed here are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import queue
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.processes import Served
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import failed_key, incoming_key
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for

try:  # tests/ as a package, or tests/ on sys.path
    from .conftest import wait_for
    from .notification_bodies import aws_body, cloudevent_binary, minio_body
    from .reliability_support import Expected, make_batch, serve, store_batch, verify
except ImportError:
    from conftest import wait_for  # type: ignore[no-redef]
    from notification_bodies import aws_body, cloudevent_binary, minio_body  # type: ignore
    from reliability_support import (  # type: ignore[no-redef]
        Expected,
        make_batch,
        serve,
        store_batch,
        verify,
    )

pytestmark = pytest.mark.long

SWEEP_TYPE = "org.hisparc.datastore.sweep"
RECEIVED = dt.datetime(2024, 6, 4, 9, tzinfo=dt.UTC)
JSON = {"Content-Type": "application/json"}


# -- the sender ---------------------------------------------------------------------------


@dataclass
class Delivery:
    """One queued event: its body and what happened to it."""

    name: str
    body: bytes
    headers: dict[str, str]
    statuses: list[int] = field(default_factory=list)
    answer: dict[str, Any] = field(default_factory=dict)
    delivered_at: float | None = None  # monotonic time of the 2xx
    done: threading.Event = field(default_factory=threading.Event)


class StoreAndForward:
    """MinIO's webhook queue store: in order, one at a time, the head retried on non-2xx.

    MinIO waits ``retry_interval`` (3 s by default) between tries of the head and never
    skips it; here the pause is short so a stall shows as a count of retries, not as
    minutes of waiting.
    """

    def __init__(self, url: str, retry_pause: float = 0.2, timeout: float = 60.0) -> None:
        self.url = url
        self.retry_pause = retry_pause
        self.timeout = timeout
        self.deliveries: list[Delivery] = []
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def send(self, name: str, body: bytes, headers: dict[str, str] | None = None) -> Delivery:
        delivery = Delivery(name, body, dict(JSON if headers is None else headers))
        self.deliveries.append(delivery)
        self._queue.put(delivery)
        return delivery

    def _run(self) -> None:
        while (delivery := self._queue.get()) is not None:
            while True:
                try:
                    answer = requests.post(self.url, data=delivery.body,
                                           headers=delivery.headers, timeout=self.timeout)
                    status = answer.status_code
                except requests.RequestException:
                    status = 0  # no answer in time: MinIO retries that too
                delivery.statuses.append(status)
                if 200 <= status < 300:
                    delivery.answer = answer.json()
                    delivery.delivered_at = time.monotonic()
                    delivery.done.set()
                    break
                time.sleep(self.retry_pause)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)


# -- helpers ------------------------------------------------------------------------------


def put_raw(bucket: Bucket, key: str, body: bytes, station: int = 501,
            cluster: str = "Amsterdam", metadata: bool = True, events: int = 1) -> str:
    meta = metadata_for(Station(station, cluster, "x"), events, RECEIVED) if metadata else {}
    bucket.put(key, body, meta)
    return key


def day_batch(day: dt.date, seed: int, n: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    start = dt.datetime.combine(day, dt.time(10)) + dt.timedelta(seconds=seed)
    return samples.batch(n, start, rng, kinds=("CIC", "SIN"))


def stored(bucket: Bucket, key: str) -> bool:
    return bucket.head(key) is not None


HOLDER = textwrap.dedent("""\
    import sys, tables
    h5 = tables.open_file(sys.argv[1], "r")
    print("open", flush=True)
    sys.stdin.readline()
    h5.close()
    print("closed", flush=True)
    """)


class Reader:
    """A PyTables reader in its own process holding a day file open until :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "open"

    def close(self) -> float:
        """Close the file; returns the monotonic time it was closed."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "closed"
        closed = time.monotonic()
        self.process.wait(10)
        return closed


@pytest.fixture
def writer(datastore_env: dict[str, str], settings: Settings, bucket: Bucket,
           tmp_path: Path) -> Iterator[Served]:
    env = {**datastore_env,
           "DATASTORE_WRITER_RETRY_DELAY": "0.3",
           "DATASTORE_WRITER_RETRY_MAX_DELAY": "0.3",
           "DATASTORE_WRITER_RETRY_ATTEMPTS": "3"}
    served = serve("writer", env, tmp_path / "writer.log")
    try:
        yield served
    finally:
        served.stop()
    assert "Traceback" not in served.log() or "decoding failed unexpectedly" in served.log()


# -- the tests ------------------------------------------------------------------------------


def test_poison_at_the_head_of_the_queue_never_stalls_the_good_batches(
    writer: Served, bucket: Bucket, settings: Settings
) -> None:
    expected = Expected()
    name = bucket.name

    # A day file that a reader holds open: written once, then held.
    held_day = dt.date(2024, 6, 20)
    setup = store_batch(bucket, day_batch(held_day, 1), 501)
    expected.add(setup, 501, day_batch(held_day, 1))
    assert requests.post(writer.url, data=minio_body(name, [setup]), headers=JSON,
                         timeout=60).status_code == 200
    reader = Reader(day_file_path(settings.data_dir, held_day))

    # Poison of every kind.
    directory_day, corrupt_day = dt.date(2024, 6, 21), dt.date(2024, 6, 22)
    day_file_path(settings.data_dir, directory_day).mkdir(parents=True, exist_ok=True)
    corrupt = day_file_path(settings.data_dir, corrupt_day)
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(b"this is not an HDF5 file " * 40)
    long_events = day_batch(dt.date(2024, 6, 2), 2)
    long_key = put_raw(bucket, "incoming/501/" + "l" * 120 + "/" + "k" * 120 + ".pickle",
                       dumps_py2(long_events), events=len(long_events))
    expected.add(long_key, 501, long_events)
    on_directory = store_batch(bucket, day_batch(directory_day, 3), 501)
    on_corrupt = store_batch(bucket, day_batch(corrupt_day, 4), 501)
    on_held = store_batch(bucket, day_batch(held_day, 5), 502)
    expected.add(on_held, 502, day_batch(held_day, 5))
    no_cluster_body = dumps_py2(day_batch(dt.date(2024, 6, 3), 6))
    no_cluster = put_raw(bucket, incoming_key(999, hashlib.md5(no_cluster_body).hexdigest()),  # noqa: S324
                         no_cluster_body, metadata=False)
    undecodable = put_raw(bucket, "incoming/501/" + "0" * 32 + ".pickle",
                          b"cos\nsystem\n(S'id'\ntR.")
    good_next_to_poison = store_batch(bucket, make_batch(1, 7001), 7001)
    expected.add(good_next_to_poison, 7001, make_batch(1, 7001))
    refused_key = "incoming/501/x%00.pickle"  # the notification's URL-encoded form

    sender = StoreAndForward(writer.url)
    try:
        poison = {
            "long key": sender.send("long key", aws_body(name, [long_key])),
            "day file is a directory": sender.send("dir", minio_body(name, [on_directory])),
            "corrupt day file": sender.send("corrupt", minio_body(name, [on_corrupt])),
            "refused key": sender.send("refused", json.dumps({"Records": [{
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": name}, "object": {"key": refused_key}}}]}).encode()),
            "no cluster": sender.send("no cluster", minio_body(name, [no_cluster])),
            "poison with good keys": sender.send(
                "mixed", aws_body(name, [undecodable, good_next_to_poison])),
            "day file held by a reader": sender.send("held", minio_body(name, [on_held])),
        }
        queued = time.monotonic()
        good = []
        for index in range(2, 14):
            station = (501, 502, 7001)[index % 3]
            events = make_batch(index, station)
            key = store_batch(bucket, events, station)
            expected.add(key, station, events)
            good.append(sender.send(f"good {index}", minio_body(name, [key])))
        for delivery in good:
            assert delivery.done.wait(60), f"{delivery.name} never delivered"
        good_seconds = max(d.delivered_at or 0 for d in good) - queued

        # Every delivery was accepted the first time: nothing for the sender to retry.
        assert all(d.statuses == [200] for d in sender.deliveries), [
            (d.name, d.statuses) for d in sender.deliveries]
        assert stored(bucket, on_held)  # still in incoming/: the reader holds its file ...
        assert on_held in poison["day file held by a reader"].answer["deferred"]
        closed = reader.close()
        wait_for(lambda: not stored(bucket, on_held))
        after_close = time.monotonic() - closed  # ... and written soon after it closes
    finally:
        sender.close()
        if reader.process.poll() is None:
            reader.process.kill()

    # The poison, accounted for.
    assert poison["long key"].answer["archived"] == 1
    assert poison["refused key"].answer["refused"] and poison["refused key"].answer["keys"] == 1
    mixed = poison["poison with good keys"].answer
    assert list(mixed["quarantined"]) == [undecodable] and mixed["archived"] == 1
    for what, key in (("day file is a directory", on_directory),
                      ("corrupt day file", on_corrupt), ("no cluster", no_cluster)):
        assert key in poison[what].answer["deferred"], (what, poison[what].answer)
        # After its bounded retries (3 here) it is quarantined with the reason.
        wait_for(lambda key=key: stored(bucket, failed_key(key)), 30)
        reason = bucket.get(failed_key(key)).metadata["failure-reason"]
        assert "after 3 attempts" in reason, reason
        assert not stored(bucket, key)
    assert list(bucket.list("incoming/")) == []
    # Object records go with their objects; a broken day file's record stays while the
    # file is broken (datastore status shows it; the next object for it waits for it).
    assert sorted(info.key for info in bucket.list("deferred/")) == [
        f"deferred/days/{directory_day}.json", f"deferred/days/{corrupt_day}.json"]

    verdict = verify(settings.data_dir, expected)
    # The directory and the corrupt file are not day files PyTables can open.
    broken = {day_file_path(settings.data_dir, day).name for day in (directory_day, corrupt_day)}
    assert {problem.split(" ", 1)[0] for problem in verdict.problems} == broken, verdict
    assert all("does not open in PyTables" in problem for problem in verdict.problems)
    assert (verdict.missing, verdict.doubled, verdict.unexpected) == (0, 0, 0), verdict
    print(f"\npoison first: {len(good)} good batches behind {len(poison)} poison "
          f"notifications all written {good_seconds:.2f} s after queueing (each answered "
          f"2xx at the first try); the held day's batch written {after_close:.2f} s after "
          "the reader closed the file")


def test_a_long_sweep_does_not_delay_notifications(
    writer: Served, bucket: Bucket, settings: Settings
) -> None:
    """A sweep request is answered at once, and notifications pass while it runs."""
    day = dt.date(2024, 7, 1)
    backlog = []
    for index in range(1500):
        events = day_batch(day, 10_000 + index, n=1)
        backlog.append(store_batch(bucket, events, (501, 502)[index % 2]))
    headers, body = cloudevent_binary(None, SWEEP_TYPE)
    started = time.monotonic()
    answer = requests.post(writer.url, data=body, headers=headers, timeout=60)
    sweep_answer_seconds = time.monotonic() - started
    assert answer.status_code == 202 and answer.json()["sweep"] == "started"

    waits, during = [], []
    for index in range(5):
        time.sleep(0.2)
        health = requests.get(f"{writer.url}/healthz", timeout=10).json()
        during.append(health["sweeping"])
        key = store_batch(bucket, make_batch(20 + index, 7001), 7001)
        sent = time.monotonic()
        answer = requests.post(writer.url, data=minio_body(bucket.name, [key]),
                               headers=JSON, timeout=60)
        waits.append(time.monotonic() - sent)
        assert answer.status_code == 200, answer.text
        assert answer.json()["archived"] + len(answer.json()["deferred"]) == 1
    assert during[0], "the sweep was over before the first notification: make it longer"
    swept = wait_for(lambda: not any(True for _ in bucket.list("incoming/")), 120)
    print(f"\nsweep of {len(backlog)} objects answered in {sweep_answer_seconds * 1000:.0f} ms, "
          f"ran {swept:.1f} s more; notifications meanwhile answered in "
          f"{', '.join(f'{w * 1000:.0f}' for w in waits)} ms")
