"""``datastore failed``: list, show and retry quarantined objects, on the real S3 server."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from pathlib import Path

import pytest
import tables
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.cli import main
from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import archive_key, failed_key, incoming_key
from hisparc_datastore.ops.failed import (
    failed_key_of,
    list_failed,
    retry,
    summarize_body,
)
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for
from hisparc_datastore.writer.pipeline import process_keys

RECEIVED = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)
START = dt.datetime(2024, 3, 1, 10, 0)
# A batch the allowlist refuses: a global no station sends.
POISON = b"cos\nsystem\n(S'echo hi'\ntR."


def good_body(seed: int = 1) -> bytes:
    events = samples.batch(4, START, random.Random(seed), kinds=("CIC", "SIN", "ERR"))
    return dumps_py2(events)


def quarantine(bucket: Bucket, settings: Settings, body: bytes, tag: str) -> str:
    """Store ``body`` under the key of the good batch ``tag`` names, and let it fail."""
    md5 = hashlib.md5(tag.encode()).hexdigest()  # noqa: S324
    key = incoming_key(501, md5)
    bucket.put(key, body, metadata_for(Station(501, "Amsterdam", ""), 4, RECEIVED))
    result = process_keys([key], bucket, settings)
    assert list(result.quarantined) == [key]
    return failed_key(key)


def test_key_forms() -> None:
    for text in ("failed/501/ab.pickle", "501/ab.pickle", "incoming/501/ab.pickle"):
        assert failed_key_of(text) == "failed/501/ab.pickle"


def test_summary_of_good_and_bad_bodies() -> None:
    good = summarize_body(good_body())
    assert good["events"] == 4 and good["types"] == {"CIC": 2, "ERR": 1, "SIN": 1}
    assert good["first_event"] == "2024-03-01T10:00:00"
    assert good["last_event"] == "2024-03-01T10:00:03"
    bad = summarize_body(POISON)
    assert "refused" in bad["decode_error"] and "events" not in bad


def test_list_show_fix_retry(bucket: Bucket, settings: Settings,
                             capsys: pytest.CaptureFixture[str]) -> None:
    failed = quarantine(bucket, settings, POISON, "one")
    (entry,) = list_failed(bucket)
    assert entry.key == failed and "undecodable" in entry.reason and entry.size == len(POISON)

    assert main(["failed", "list"]) == 0
    printed = capsys.readouterr().out
    assert failed in printed and "undecodable" in printed and "1 objects" in printed

    assert main(["failed", "show", failed]) == 0
    printed = capsys.readouterr().out
    assert "reason: undecodable" in printed and "decode: FAILS" in printed
    assert "metadata station: 501" in printed

    # Retrying the unfixed object: quarantined again, exit status 1.
    assert main(["failed", "retry", failed]) == 1
    assert "quarantined again" in capsys.readouterr().out
    assert [e.key for e in list_failed(bucket)] == [failed]

    # The fix: the good batch under the failed key (its metadata kept).
    metadata = bucket.metadata(failed) or {}
    body = good_body()
    bucket.put(failed, body, metadata)
    assert main(["failed", "show", failed.removeprefix("failed/")]) == 0
    assert "decode: ok, 4 events (CIC 2, ERR 1, SIN 1)" in capsys.readouterr().out

    assert main(["failed", "retry", failed]) == 0
    printed = capsys.readouterr().out
    incoming = "incoming/" + failed.removeprefix("failed/")
    assert f"written and archived: {incoming}" in printed
    assert list_failed(bucket) == []
    archived = bucket.get(archive_key(incoming, RECEIVED))
    assert archived.body == body
    assert "failure-reason" not in archived.metadata
    assert archived.metadata["retried-after"].startswith("undecodable")
    with tables.open_file(day_file_path(settings.data_dir, START.date())) as h5:
        station = "/hisparc/cluster_amsterdam/station_501"
        assert h5.get_node(f"{station}/events").nrows == 2
        assert h5.get_node(f"{station}/singles").nrows == 1
        assert h5.get_node(f"{station}/errors").nrows == 1


def test_retry_all(bucket: Bucket, settings: Settings, tmp_path: Path) -> None:
    fixed = quarantine(bucket, settings, POISON, "fixed")
    broken = quarantine(bucket, settings, POISON, "broken")
    bucket.put(fixed, good_body(2), bucket.metadata(fixed) or {})
    result = retry(bucket, settings, [fixed, broken, "failed/501/missing.pickle"])
    assert result.archived == ["incoming/" + fixed.removeprefix("failed/")]
    assert list(result.quarantined) == ["incoming/" + broken.removeprefix("failed/")]
    assert result.failed == {"failed/501/missing.pickle": "not in failed/"}
    assert main(["failed", "retry", "--all"]) == 1  # the broken one fails again
    assert [e.key for e in list_failed(bucket)] == [broken]


def test_cli_usage(settings: Settings, bucket: Bucket,
                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["failed", "list"]) == 0
    assert "failed/: empty" in capsys.readouterr().out
    assert main(["failed", "retry"]) == 2
    assert main(["failed", "show", "501/none.pickle"]) == 1


def test_live_writer_racing_the_retry_loses_nothing(
    bucket: Bucket, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy into incoming/ notifies the live writer, which may finish first."""
    poisoned = quarantine(bucket, settings, POISON, "race-bad")
    fixed = quarantine(bucket, settings, POISON, "race-good")
    bucket.put(fixed, good_body(3), bucket.metadata(fixed) or {})
    original_move = bucket.move

    def move_then_live_writer(source: str, target: str, metadata: object = None) -> None:
        original_move(source, target, metadata)  # type: ignore[arg-type]
        if target.startswith("incoming/"):
            process_keys([target], bucket, settings)  # the notified writer

    monkeypatch.setattr(bucket, "move", move_then_live_writer)
    result = retry(bucket, settings, [poisoned, fixed])
    assert list(result.quarantined) == ["incoming/" + poisoned.removeprefix("failed/")]
    assert result.by_live_writer == {"incoming/" + poisoned.removeprefix("failed/"),
                                     "incoming/" + fixed.removeprefix("failed/")}
    assert result.archived == ["incoming/" + fixed.removeprefix("failed/")]
    assert [e.key for e in list_failed(bucket)] == [poisoned]  # still there, not lost
    assert [info.key for info in bucket.list("retrying/")] == []


def test_retry_all_resumes_an_interrupted_retry(bucket: Bucket, settings: Settings) -> None:
    failed = quarantine(bucket, settings, POISON, "interrupted")
    holding = "retrying/" + failed.removeprefix("failed/")
    bucket.put(holding, good_body(4), bucket.metadata(failed) or {})
    bucket.delete(failed)  # as a crash right after the first step leaves it
    assert main(["failed", "retry", "--all"]) == 0
    assert [info.key for info in bucket.list("retrying/")] == []
    assert [info.key for info in bucket.list("archive/")] == [
        archive_key("incoming/" + failed.removeprefix("failed/"), RECEIVED)
    ]
