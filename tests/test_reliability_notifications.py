"""Reliability target 3: duplicated, reordered, dropped and stale notifications.

Notification senders deliver at least once, in any order, and sometimes not at all;
keys may be gone by the time a notification arrives (another writer was faster, the
object was quarantined or never existed).  Whatever the stream, after a sweep every
accepted batch is in HDF5 exactly once and nothing is left in ``incoming/``.

The storm test goes through the writer function served for real, with notifications
posted from several threads at once; the others call the writer core directly.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from notification_bodies import aws_body, minio_body
from reliability_support import Expected, make_batch, serve, store_batch, verify

from hisparc_datastore.config import Settings
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.writer.pipeline import RetryPolicy, process_keys, sweep

pytestmark = pytest.mark.long

FAST = RetryPolicy(delays=(0.05, 0.1))
STATIONS = (501, 502, 7001)


def put_batches(bucket: Bucket, expected: Expected, indices: range, seed: int = 0
                ) -> list[str]:
    rng = random.Random(seed)
    keys = []
    for index in indices:
        station = rng.choice(STATIONS)
        events = make_batch(index, station)
        keys.append(store_batch(bucket, events, station))
        expected.add(keys[-1], station, events)
    return keys


def assert_exactly_once(bucket: Bucket, settings: Settings, expected: Expected) -> int:
    assert list(bucket.list("incoming/")) == []
    assert list(bucket.list("failed/")) == []
    verdict = verify(settings.data_dir, expected)
    assert verdict.ok, verdict
    return verdict.rows


def test_duplicates_in_one_notification_and_across_notifications(
    bucket: Bucket, settings: Settings
) -> None:
    expected = Expected()
    keys = put_batches(bucket, expected, range(1, 13))
    first = process_keys(keys + keys[::-1] + keys[:3], bucket, settings, retry=FAST)
    assert first.ok and sorted(first.archived) == sorted(keys)
    again = process_keys(keys, bucket, settings, retry=FAST)  # redelivered later
    assert again.ok and again.archived == [] and sorted(again.already_done) == sorted(keys)
    # Redelivered at the same time, from eight threads.
    more = put_batches(bucket, expected, range(13, 25), seed=1)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda n: process_keys(random.Random(n).sample(more, len(more)), bucket, settings,
                                   retry=FAST),
            range(8),
        ))
    assert all(result.ok for result in results)
    # A thread that fetched a key before another archived it archives it again (the ledger
    # skips its rows; the copy is the same bytes): harmless, so only the set is checked.
    assert {key for result in results for key in result.archived} == set(more)
    assert sum(result.rows for result in results) == sum(
        len(expected.batches[key][1]) for key in more)
    assert_exactly_once(bucket, settings, expected)


def test_reordered_notifications(bucket: Bucket, settings: Settings) -> None:
    expected = Expected()
    keys = put_batches(bucket, expected, range(1, 31), seed=2)
    order = keys[::-1]
    random.Random(3).shuffle(order)
    for start in range(0, len(order), 4):
        assert process_keys(order[start:start + 4], bucket, settings, retry=FAST).ok
    assert_exactly_once(bucket, settings, expected)


def test_dropped_notifications_are_caught_by_the_sweep(
    bucket: Bucket, settings: Settings
) -> None:
    expected = Expected()
    keys = put_batches(bucket, expected, range(1, 31), seed=4)
    notified = random.Random(5).sample(keys, 12)
    for key in notified:
        assert process_keys([key], bucket, settings, retry=FAST).ok
    left = sorted(info.key for info in bucket.list("incoming/"))
    assert left == sorted(set(keys) - set(notified))
    result = sweep(bucket, settings, retry=FAST)
    assert result.ok and sorted(result.archived) == left
    assert_exactly_once(bucket, settings, expected)


def test_notifications_for_keys_that_no_longer_exist(bucket: Bucket, settings: Settings) -> None:
    expected = Expected()
    keys = put_batches(bucket, expected, range(1, 7), seed=6)
    assert process_keys(keys, bucket, settings, retry=FAST).ok
    never = [f"incoming/501/{n:032x}.pickle" for n in range(3)]
    stale = process_keys(keys + never, bucket, settings, retry=FAST)
    assert stale.ok and stale.archived == []
    assert sorted(stale.already_done) == sorted(keys + never)
    # A station resends an archived batch (its answer was lost): same key, written once.
    resent = store_batch(bucket, *reversed(expected.batches[keys[0]]))
    assert resent == keys[0]
    result = process_keys([resent], bucket, settings, retry=FAST)
    assert result.ok and result.archived == [resent] and result.rows == 0
    # Keys outside incoming/ (the writer's own moves notify too) are not touched.
    archived = [info.key for info in bucket.list("archive/")]
    assert process_keys([*archived[:2], "failed/501/x.pickle"], bucket, settings).objects == 0
    assert len(list(bucket.list("archive/"))) == len(keys)
    assert_exactly_once(bucket, settings, expected)


def test_notification_storm_through_the_served_writer(
    bucket: Bucket, settings: Settings, datastore_env: dict[str, str], tmp_path: Path
) -> None:
    """Every key notified 0 to 3 times, shuffled, posted by six threads, then a sweep."""
    expected = Expected()
    keys = put_batches(bucket, expected, range(1, 61), seed=7)
    rng = random.Random(8)
    stream = [key for key in keys for _ in range(rng.choice((0, 1, 1, 2, 3)))]
    stream += [f"incoming/502/{n:032x}.pickle" for n in range(6)]  # never stored
    rng.shuffle(stream)
    dropped = len(set(keys) - set(stream))
    bodies = []
    while stream:
        size = rng.randint(1, 5)
        chunk, stream = stream[:size], stream[size:]
        shape = minio_body if rng.random() < 0.5 else aws_body
        bodies.append(shape(bucket.name, chunk))
    writer = serve("writer", datastore_env, tmp_path / "writer.log")
    try:
        with ThreadPoolExecutor(6) as pool:
            statuses = Counter(pool.map(
                lambda body: requests.post(writer.url, data=body, timeout=300,
                                           headers={"Content-Type": "application/json"}
                                           ).status_code,
                bodies,
            ))
        sweep_request = requests.post(
            writer.url, data=b'{"limit": 1000}', timeout=300,
            headers={"Content-Type": "application/json", "ce-specversion": "1.0",
                     "ce-type": "org.hisparc.datastore.sweep", "ce-source": "/test",
                     "ce-id": "1"},
        )
        assert sweep_request.status_code == 202, sweep_request.text  # runs in the background
        deadline = time.monotonic() + 120
        while any(True for _ in bucket.list("incoming/")):
            assert time.monotonic() < deadline, "the background sweep did not finish"
            time.sleep(0.1)
    finally:
        writer.stop()
    assert statuses == Counter({200: len(bodies)}), statuses
    rows = assert_exactly_once(bucket, settings, expected)
    print(f"\nstorm: {len(bodies)} notifications, {len(keys)} batches, {dropped} never "
          f"notified, {rows} rows checked, statuses {dict(statuses)}")
