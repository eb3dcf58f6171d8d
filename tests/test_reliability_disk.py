"""Reliability target 6: the writer's volume full or read-only.

The served writer function gets a data directory on a small tmpfs mounted for the test
(we run as root, so permissions would not stop a write; a real full or read-only
filesystem does).  While the volume is full or read-only, notifications are answered
5xx and the objects stay in ``incoming/``; the files already there stay readable and
hold exactly what they held; when space returns (or the volume is writable again) a
notification and a sweep write everything exactly once.  Without permission to mount,
the tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from notification_bodies import minio_body
from reliability_support import DAY0, Expected, Served, make_batch, serve, store_batch, verify

from hisparc_datastore.config import Settings
from hisparc_datastore.storage.store import Bucket

pytestmark = pytest.mark.long

STATIONS = (501, 502, 7001)


def mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs, unmounted afterwards."""
    point = tmp_path / "volume"
    point.mkdir()
    done = mount("-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(point))
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
        print(reason)
        pytest.skip(reason)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def fill(path: Path, limit: int | None = None) -> int:
    """Write zeros until the volume is full (or ``limit`` bytes); returns the bytes written."""
    written = 0
    block = bytes(64 * 1024)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (len(block), 4096, 512, 1):
            while limit is None or written + size <= limit:
                try:
                    written += os.write(fd, block[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


def notify(writer: Served, bucket: Bucket, keys: list[str]) -> int:
    return requests.post(writer.url, data=minio_body(bucket.name, keys), timeout=300,
                         headers={"Content-Type": "application/json"}).status_code


def batch(index: int) -> tuple[int, list[dict]]:
    """Batches 7..22 grow the first files, 23.. fall on days that need new files."""
    station = STATIONS[index % 3]
    first_day = DAY0 if index < 23 else DAY0 + dt.timedelta(days=10)
    return station, make_batch(index, station, events=8, first_day=first_day)


def put(bucket: Bucket, expected: Expected, indices: range) -> list[str]:
    keys = []
    for index in indices:
        station, events = batch(index)
        keys.append(store_batch(bucket, events, station))
        expected.add(keys[-1], station, events)
    return keys


def incoming(bucket: Bucket) -> set[str]:
    return {info.key for info in bucket.list("incoming/")}


@pytest.fixture
def writer(volume: Path, datastore_env: dict[str, str], tmp_path: Path) -> Iterator[Served]:
    served = serve("writer", {**datastore_env, "DATASTORE_GENERAL_DATA_DIR": str(volume)},
                   tmp_path / "writer.log")
    try:
        yield served
    finally:
        served.stop()


def test_disk_full_answers_5xx_keeps_objects_and_recovers(
    volume: Path, writer: Served, bucket: Bucket, settings: Settings
) -> None:
    expected = Expected()
    first = put(bucket, expected, range(1, 7))
    assert notify(writer, bucket, first) == 200
    before = verify(volume, expected)
    assert before.ok, before

    filler = volume / "filler"
    reserve = volume / "reserve"  # written first, so the filler leaves its room
    fill(reserve, limit=48 * 1024)
    fill(filler)
    reserve.unlink()  # a little room: some appends start and run out of space half-way
    later = put(bucket, Expected(), range(7, 40))
    statuses = [notify(writer, bucket, later)]
    # Again while full: now the open must repair the unfinished append and cannot write.
    statuses.append(notify(writer, bucket, later[::-1]))
    assert statuses == [503, 503], statuses
    assert list(bucket.list("failed/")) == []  # never quarantined for want of space
    failed_keys = incoming(bucket)
    assert failed_keys, "the full volume refused nothing"
    # What was written before the disk filled is intact; nothing half is visible (an
    # append whose rollback could not be written yet is finished by the next open).
    partial = Expected({k: v for k, v in expected.batches.items()})
    for key in set(later) - failed_keys:
        partial.add(key, *_batch_of(key, later))
    during = verify(volume, partial, allow_intent=True)
    assert during.ok, during

    filler.unlink()  # space returns
    assert notify(writer, bucket, sorted(failed_keys)) == 200
    assert incoming(bucket) == set()
    for key in later:
        expected.add(key, *_batch_of(key, later))
    after = verify(volume, expected)
    assert after.ok, after
    print(f"\ndisk full: {len(failed_keys)} of {len(later)} objects refused while full "
          f"(statuses {statuses}), {after.rows} rows checked after recovery")


def _batch_of(key: str, keys: list[str]) -> tuple[int, list[dict]]:
    return batch(range(7, 40)[keys.index(key)])


def test_read_only_volume_answers_5xx_and_recovers(
    volume: Path, writer: Served, bucket: Bucket
) -> None:
    expected = Expected()
    first = put(bucket, expected, range(1, 4))
    assert notify(writer, bucket, first) == 200
    later = put(bucket, expected, range(4, 10))
    assert mount("-o", "remount,ro", str(volume)).returncode == 0
    try:
        assert notify(writer, bucket, later) == 503
        assert incoming(bucket) == set(later)
    finally:
        with contextlib.suppress(Exception):
            mount("-o", "remount,rw", str(volume))
    assert notify(writer, bucket, later) == 200
    assert incoming(bucket) == set()
    verdict = verify(volume, expected)
    assert verdict.ok, verdict
