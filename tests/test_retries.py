"""Retry records and the serving process's backlog and watchdog.

The records are stored in the session's real S3 server; the backlog probes real day files
held open by a real PyTables reader in another process.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time

import h5py
import pytest

from hisparc_datastore.config import Settings
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.writer.pipeline import Deferral, WriteResult
from hisparc_datastore.writer.retries import Backoff, RetryBook, RetryRecord, record_key
from hisparc_datastore.writer.service import Backlog, Watchdog


def test_backoff_doubles_up_to_the_longest() -> None:
    backoff = Backoff(first=10, longest=600, attempts=12)
    assert [backoff.delay(n) for n in (1, 2, 3, 6, 7, 12)] == [10, 20, 40, 320, 600, 600]
    assert sum(backoff.delay(n) for n in range(1, 12)) / 3600 == pytest.approx(1.05, abs=0.05)


def test_a_record_survives_json_and_says_what_it_waits_for() -> None:
    record = RetryRecord("object", "incoming/501/\x00x.pickle", 2, 100.0, 110.0, 130.0, "why")
    assert RetryRecord.from_json(record.to_json()) == record
    assert record.key.startswith("deferred/objects/") and "\x00" not in record.key
    assert record_key("day", "2026-12-01") == "deferred/days/2026-12-01.json"
    assert not record.due(129.0) and record.due(130.0)
    assert record.describe(Backoff(attempts=5), now=120.0).startswith(
        "attempt 2 of 5, next in 10 s (since 1970-01-01 00:01:40 UTC): why")
    with pytest.raises(ValueError):
        RetryRecord.from_json(b'{"subject": "nonsense"}')


def test_the_book_counts_attempts_across_processes(bucket: Bucket) -> None:
    backoff = Backoff(first=1, longest=4, attempts=3)
    one, other = RetryBook(bucket, backoff), RetryBook(bucket, backoff)
    first = one.failed("day", "2026-12-01", "corrupt", now=1000.0)
    assert (first.attempts, first.next_try) == (1, 1001.0)
    second = other.failed("day", "2026-12-01", "still corrupt", now=1002.0)  # reads it first
    assert (second.attempts, second.next_try, second.first_failure) == (2, 1004.0, 1000.0)
    third = one.failed("day", "2026-12-01", "still", now=1005.0)
    assert third.attempts == 3 and third.exhausted(backoff)

    fresh = RetryBook(bucket, backoff)
    fresh.load()
    assert fresh.day(dt.date(2026, 12, 1)) == third
    fresh.cleared("day", "2026-12-01")
    assert [info.key for info in bucket.list("deferred/")] == []
    other.cleared("day", "2026-12-01")  # known here too: deleting twice is harmless


def test_orphan_object_records_are_dropped(bucket: Bucket) -> None:
    book = RetryBook(bucket)
    book.failed("object", "incoming/501/a.pickle", "no cluster")
    book.failed("object", "incoming/501/b.pickle", "no cluster")
    book.failed("day", "2026-12-01", "a directory")
    assert book.drop_orphans({"incoming/501/a.pickle"}) == 1
    fresh = RetryBook(bucket)
    fresh.load()
    assert [(r.subject, r.name) for r in fresh.records()] == [
        ("day", "2026-12-01"), ("object", "incoming/501/a.pickle")]


def test_a_stray_object_under_deferred_is_ignored(bucket: Bucket) -> None:
    bucket.put("deferred/days/junk.json", b"not json", {})
    book = RetryBook(bucket)
    book.load()
    assert book.records() == []


HOLD = """\
import sys, tables
h5 = tables.open_file(sys.argv[1], "r")
print("open", flush=True)
sys.stdin.readline()
"""


def test_the_backlog_releases_a_held_day_when_the_reader_closes(settings: Settings) -> None:
    day = dt.date(2026, 12, 1)
    path = day_file_path(settings.data_dir, day)
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w"):
        pass
    backlog = Backlog(settings.data_dir, tick=0.05)
    result = WriteResult(deferred={
        "incoming/501/held.pickle": Deferral("held open", busy=frozenset({day})),
        "incoming/501/later.pickle": Deferral("no cluster", next_try=time.time() + 60),
        "incoming/501/soon.pickle": Deferral("no cluster", next_try=time.time() - 1),
    })
    reader = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "open"
        backlog.update(result)
        time.sleep(0.1)
        assert backlog.due() == ["incoming/501/soon.pickle"]
        assert backlog.waiting("incoming/501/held.pickle") is not None  # a sweep passes it
        assert backlog.waiting("incoming/501/soon.pickle") is None
    finally:
        reader.kill()
        reader.wait(10)
    assert sorted(backlog.due()) == ["incoming/501/held.pickle", "incoming/501/soon.pickle"]
    assert backlog.reasons() == {"held open": 1, "no cluster": 2}

    backlog.update(WriteResult(archived=["incoming/501/held.pickle"],
                               quarantined={"incoming/501/soon.pickle": "after 12 attempts"}))
    assert len(backlog) == 1 and backlog.due() == []


def test_the_watchdog_tells_a_stuck_run_from_a_long_one() -> None:
    watchdog = Watchdog(stall_seconds=0.2)
    assert watchdog.stalled_for() == 0.0
    run = watchdog.begin()
    for _ in range(5):  # a long run that makes progress stays healthy
        time.sleep(0.05)
        watchdog.tick(run)
    assert watchdog.stalled_for() < 0.2
    time.sleep(0.25)  # no progress: stuck
    assert watchdog.stalled_for() >= 0.2
    watchdog.end(run)
    assert watchdog.stalled_for() == 0.0


def test_health_fails_only_for_a_stuck_run(settings: Settings, bucket: Bucket) -> None:
    from hisparc_datastore.writer.service import WriterService

    service = WriterService(settings, lambda: bucket, stall_seconds=0.2, tick=0.05)
    try:
        assert service.request_sweep() == "started"  # the thread runs, the sweep too
        healthy, document = service.health()
        assert healthy and document["background_thread"] == "running"
        run = service.watchdog.begin()  # a run that hangs in I/O
        time.sleep(0.3)
        healthy, document = service.health()
        assert not healthy and document["seconds_without_progress"] >= 0.2
        service.watchdog.end(run)
        assert service.health()[0]
    finally:
        service.stop()
