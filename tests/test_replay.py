"""Replay from the archive against the real S3 server, compared through PyTables.

Batches of all 14 event types over two event days are uploaded the way the upload
function stores them and written by the live writer (one sweep); replay rebuilds the
same days from archive/ into another directory and ``--verify`` must find them identical.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import pickle
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tables
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.cli import main
from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import incoming_key
from hisparc_datastore.format.origin import event_day_span, event_days_text
from hisparc_datastore.format.payload import decode_batch
from hisparc_datastore.ops.replay import (
    archive_days,
    compare_files,
    ledger_key,
    print_comparisons,
    replay,
    verify,
)
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for
from hisparc_datastore.writer.pipeline import process_keys

DAY1 = dt.date(2024, 3, 1)
DAY2 = dt.date(2024, 3, 2)
ALL_TYPES = ("CIC", "ERR", "CFG", "CMP", "SIN", "SAT", "WTR", "WER", "WCG", "LIT", "LER",
             "LCG", "LST", "LNS")


def put_batch(bucket: Bucket, events: list[dict[str, Any]], station: int, cluster: str,
              received: dt.datetime, flavour: str) -> str:
    body = dumps_py2(events) if flavour == "py2" else pickle.dumps(
        samples.numpy_flavour(events), protocol=4
    )
    key = incoming_key(station, hashlib.md5(body).hexdigest())  # noqa: S324
    bucket.put(key, body, metadata_for(Station(station, cluster, "x"), len(events), received))
    return key


def upload_two_days(bucket: Bucket, settings: Settings) -> None:
    """Batches of every type on both days, one crossing midnight, one uploaded late.

    Each object is written as soon as it is stored, as a notification would have it: the
    live files hold the objects in arrival order, which is the order replay rebuilds.
    """
    rng = random.Random(7)
    plan = [
        (501, "Amsterdam", dt.datetime(2024, 3, 1, 5, 0), "py2"),
        (502, "Amsterdam", dt.datetime(2024, 3, 1, 9, 0), "py3"),
        (501, "Amsterdam", dt.datetime(2024, 3, 1, 23, 59, 50), "py3"),  # crosses midnight
        (7001, "Leiden", dt.datetime(2024, 3, 2, 1, 0), "py2"),
        (501, "Amsterdam", dt.datetime(2024, 3, 2, 12, 0), "py2"),
    ]
    uploads: list[tuple[dt.datetime, int, str, list[dict[str, Any]], str]] = []
    for station, cluster, start, flavour in plan:
        events = samples.batch(len(ALL_TYPES), start, rng, kinds=ALL_TYPES,
                               interval=dt.timedelta(seconds=1))
        received = start.replace(tzinfo=dt.UTC) + dt.timedelta(minutes=5)
        uploads.append((received, station, cluster, events, flavour))
    # A station back from an outage: day-1 events uploaded three days later.
    late = samples.batch(6, dt.datetime(2024, 3, 1, 15, 0), rng, kinds=("CIC", "SIN"))
    uploads.append((dt.datetime(2024, 3, 4, 8, 0, tzinfo=dt.UTC), 502, "Amsterdam", late, "py2"))
    # Outside the range: must not appear.
    other = samples.batch(3, dt.datetime(2024, 3, 5, 1, 0), rng)
    uploads.append((dt.datetime(2024, 3, 5, 2, 0, tzinfo=dt.UTC), 501, "Amsterdam", other, "py2"))
    for received, station, cluster, events, flavour in sorted(uploads, key=lambda u: u[0]):
        key = put_batch(bucket, events, station, cluster, received, flavour)
        result = process_keys([key], bucket, settings)
        assert result.archived == [key], result.summary()


@pytest.fixture
def live(bucket: Bucket, settings: Settings) -> Settings:
    upload_two_days(bucket, settings)
    return settings


def table_rows(path: Path) -> dict[str, int]:
    with tables.open_file(path, "r") as h5:
        return {n._v_pathname: n.nrows for n in h5.walk_nodes("/hisparc", classname="Table")}


def test_keys_and_days() -> None:
    assert ledger_key("archive/2024/03/04/501/ab.pickle") == "incoming/501/ab.pickle"
    assert ledger_key("incoming/501/ab.pickle") == "incoming/501/ab.pickle"
    days = archive_days(DAY1, DAY2, 2)
    assert days[0] == dt.date(2024, 2, 29) and days[-1] == dt.date(2024, 3, 4)


def test_replay_equals_live(bucket: Bucket, live: Settings, tmp_path: Path) -> None:
    out = tmp_path / "replay"
    report = replay(bucket, live, DAY1, DAY2, out, late_days=3)
    assert not report.problems
    assert report.files == [day_file_path(out, DAY1), day_file_path(out, DAY2)]
    live_rows = {day: table_rows(day_file_path(live.data_dir, day)) for day in (DAY1, DAY2)}
    assert live_rows == {day: table_rows(day_file_path(out, day)) for day in (DAY1, DAY2)}
    assert sum(map(len, live_rows.values())) > 14  # every type, several stations
    comparisons = verify(live.data_dir, out, DAY1, DAY2, strict_order=True)
    assert [c.differences for c in comparisons] == [[], []]
    assert not day_file_path(out, dt.date(2024, 3, 5)).exists()


def test_late_days_too_short_misses_late_upload(bucket: Bucket, live: Settings,
                                               tmp_path: Path) -> None:
    out = tmp_path / "replay"
    replay(bucket, live, DAY1, DAY1, out, late_days=1, include_incoming=False)
    (comparison,) = verify(live.data_dir, out, DAY1, DAY1)
    assert any("rows live" in line for line in comparison.differences)
    assert any("written live, not replayed" in line for line in comparison.differences)


def test_replay_twice_is_identical(bucket: Bucket, live: Settings, tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    replay(bucket, live, DAY1, DAY2, first, late_days=3)
    replay(bucket, live, DAY1, DAY2, second, late_days=3)
    for day in (DAY1, DAY2):
        comparison = compare_files(day_file_path(first, day), day_file_path(second, day), day,
                                   strict_order=True)
        assert comparison.differences == [] and comparison.notes == []


def test_verify_reports_missing_file_and_extra_row(bucket: Bucket, live: Settings,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "replay"
    replay(bucket, live, DAY1, DAY2, out, late_days=3)
    day1 = day_file_path(live.data_dir, DAY1)
    # An extra row in a live table, as a duplicated batch would leave.
    with h5py.File(day1, "r+") as h5:
        table = h5["/hisparc/cluster_amsterdam/station_501/singles"]
        row = table[-1:]
        table.resize((table.shape[0] + 1,))
        row["event_id"] = table.shape[0]
        table[-1:] = row
        table.attrs["NROWS"] = np.int64(table.shape[0])
    shutil.move(day_file_path(live.data_dir, DAY2), tmp_path / "moved.h5")
    comparisons = verify(live.data_dir, out, DAY1, DAY2)
    day1_diffs, day2_diffs = (c.differences for c in comparisons)
    assert any("station_501/singles: " in d and "rows live" in d for d in day1_diffs)
    assert any("1 rows only live, 0 rows only replayed" in d for d in day1_diffs)
    assert day2_diffs and "live file missing" in day2_diffs[0]


def test_verify_reports_blob_difference_and_order(tmp_path: Path, bucket: Bucket,
                                                  live: Settings) -> None:
    out = tmp_path / "replay"
    replay(bucket, live, DAY1, DAY2, out, late_days=3)
    path = day_file_path(live.data_dir, DAY2)
    station = "/hisparc/cluster_leiden/station_7001"
    with h5py.File(path, "r+") as h5:
        blobs = h5[f"{station}/blobs"]
        blobs[0] = np.frombuffer(b"tampered", dtype=np.uint8)
    (comparison,) = verify(live.data_dir, out, DAY2, DAY2)
    assert any(d.startswith(f"{station}/blobs: blobs differ") for d in comparison.differences)
    assert any("rows only live" in d for d in comparison.differences)


def test_verify_same_rows_other_order_is_a_note(tmp_path: Path, bucket: Bucket,
                                                live: Settings) -> None:
    out = tmp_path / "replay"
    replay(bucket, live, DAY1, DAY2, out, late_days=3)
    path = day_file_path(live.data_dir, DAY1)
    node = "/hisparc/cluster_amsterdam/station_501/singles"
    with h5py.File(path, "r+") as h5:
        table = h5[node]
        rows = table[:]
        swapped = rows[::-1].copy()
        swapped["event_id"] = rows["event_id"]
        table[:] = swapped
    (loose,) = verify(live.data_dir, out, DAY1, DAY1)
    assert loose.differences == [] and any("another order" in n for n in loose.notes)
    (strict,) = verify(live.data_dir, out, DAY1, DAY1, strict_order=True)
    assert any("another order" in d for d in strict.differences)


def test_cli_replay_verify(bucket: Bucket, live: Settings, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = main(["replay", "--from", "2024-03-01", "--to", "2024-03-02", "--out", str(out),
                 "--late-days", "3", "--verify", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "2024-03-01: identical" in printed and "verify: identical" in printed
    # into the same directory again: refused, nothing overwritten
    assert main(["replay", "--from", "2024-03-01", "--to", "2024-03-02", "--out", str(out),
                 "--no-progress"]) == 2
    # into the live data_dir: refused
    assert main(["replay", "--from", "2024-03-01", "--to", "2024-03-01", "--out",
                 str(live.data_dir), "--no-progress"]) == 2


def test_print_comparisons_exit_signal() -> None:
    from io import StringIO

    from hisparc_datastore.ops.replay import FileComparison

    stream = StringIO()
    assert not print_comparisons([FileComparison(DAY1, ["x differs"])], stream)
    assert "verify: DIFFERENT" in stream.getvalue()


def test_small_append_groups_change_nothing(bucket: Bucket, live: Settings, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming in groups of two objects gives the same files as one big group."""
    from hisparc_datastore.ops import replay as replay_module

    monkeypatch.setattr(replay_module, "GROUP_OBJECTS", 2)
    out = tmp_path / "small"
    replay(bucket, live, DAY1, DAY2, out, late_days=3)
    comparisons = verify(live.data_dir, out, DAY1, DAY2, strict_order=True)
    assert [c.differences for c in comparisons] == [[], []]


def test_objects_still_in_incoming_are_replayed(bucket: Bucket, live: Settings,
                                                tmp_path: Path) -> None:
    waiting = samples.batch(3, dt.datetime(2024, 3, 2, 20, 0), random.Random(11),
                            kinds=("SIN",))
    key = put_batch(bucket, waiting, 501, "Amsterdam",
                    dt.datetime(2024, 3, 2, 20, 5, tzinfo=dt.UTC), "py2")
    with_incoming, without = tmp_path / "with", tmp_path / "without"
    replay(bucket, live, DAY2, DAY2, with_incoming, late_days=3)
    replay(bucket, live, DAY2, DAY2, without, late_days=3, include_incoming=False)
    (comparison,) = verify(live.data_dir, with_incoming, DAY2, DAY2)
    assert f"ledger: {key} replayed, not in the live ledger" in comparison.differences
    assert any("0 rows only live, 3 rows only replayed" in d for d in comparison.differences)
    (comparison,) = verify(live.data_dir, without, DAY2, DAY2)
    assert comparison.differences == []
    assert [info.key for info in bucket.list("incoming/")] == [key]  # never moved


def test_verify_reports_a_live_file_that_cannot_be_opened(bucket: Bucket, live: Settings,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "replay"
    replay(bucket, live, DAY1, DAY1, out, late_days=3)
    day_file_path(live.data_dir, DAY1).write_bytes(b"damaged beyond repair" * 50)
    (comparison,) = verify(live.data_dir, out, DAY1, DAY1)
    assert len(comparison.differences) == 1
    assert "the live file cannot be opened" in comparison.differences[0]


def test_parallel_replay_writes_the_same_rows_as_one_process(
    bucket: Bucket, live: Settings, tmp_path: Path
) -> None:
    """--jobs 2: a worker process per block of days, each with its own files: every table
    byte for byte what one process writes (event ids included).  Objects in both blocks'
    late windows are read twice, their rows written once."""
    one, two = tmp_path / "one", tmp_path / "two"
    first = replay(bucket, live, DAY1, DAY2, one, late_days=3)
    second = replay(bucket, live, DAY1, DAY2, two, late_days=3, jobs=2)
    assert (second.rows, second.events_in_range) == (first.rows, first.events_in_range)
    assert {p.relative_to(two): n for p, n in second.file_rows.items()} == {
        p.relative_to(one): n for p, n in first.file_rows.items()}
    assert second.objects > first.objects and not second.problems
    for day in (DAY1, DAY2):
        with tables.open_file(day_file_path(one, day)) as a, \
                tables.open_file(day_file_path(two, day)) as b:
            nodes_a = {n._v_pathname: n for n in a.walk_nodes("/hisparc")
                       if isinstance(n, tables.Leaf)}
            nodes_b = {n._v_pathname: n for n in b.walk_nodes("/hisparc")
                       if isinstance(n, tables.Leaf)}
            assert nodes_a.keys() == nodes_b.keys() and nodes_a
            for path, node in nodes_a.items():
                if isinstance(node, tables.Table):
                    assert node.read().tobytes() == nodes_b[path].read().tobytes(), path
                else:
                    assert node.read() == nodes_b[path].read(), path
        comparison = compare_files(day_file_path(one, day), day_file_path(two, day), day,
                                   strict_order=True)
        assert comparison.differences == [] and comparison.notes == []


def test_shards_split_the_days_into_blocks() -> None:
    from hisparc_datastore.ops.replay import shard_days

    first, last = dt.date(2024, 1, 1), dt.date(2024, 12, 31)
    blocks = [shard_days(first, last, index, 50) for index in range(50)]
    assert blocks[0] == (first, dt.date(2024, 1, 7)) and blocks[-1][1] == last
    covered = [b[0] + dt.timedelta(days=n) for b in blocks for n in range((b[1] - b[0]).days + 1)]
    assert covered == [first + dt.timedelta(days=n) for n in range(366)]
    assert {(b[1] - b[0]).days + 1 for b in blocks} == {7, 8}
    assert shard_days(first, dt.date(2024, 1, 2), 3, 5) is None


def test_cli_replays_one_shard_with_workers(bucket: Bucket, live: Settings,
                                            tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    done = subprocess.run([".venv/bin/datastore", "replay", "--from", str(DAY1), "--to",
                           str(DAY2), "--late-days", "3", "--out", str(out), "--jobs", "2",
                           "--shard", "1/2", "--no-progress"],
                          capture_output=True, text=True, timeout=300, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert f"shard 1/2: {DAY2}..{DAY2}" in done.stdout
    assert not day_file_path(out, DAY1).exists() and day_file_path(out, DAY2).exists()


def replay_cli(out: Path, *extra: str) -> int:
    """Late days 3: the batch of DAY1 uploaded on DAY1 + 3 is in a one-day shard's window."""
    return main(["replay", "--from", str(DAY1), "--to", str(DAY2), "--late-days", "3",
                 "--out", str(out), "--no-progress", *extra])


def test_sharded_replay_is_verified_shard_by_shard_and_against_live(
    bucket: Bucket, live: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cluster run (infra/knative/replay/): shards into one volume, then --verify-only.
    Two days in three shards: shard 0 has no days, 1 and 2 one day each."""
    out = tmp_path / "sharded"
    assert replay_cli(out, "--shard", "0/3") == 0
    assert replay_cli(out, "--shard", "1/3") == 0
    capsys.readouterr()
    assert replay_cli(out, "--verify-only") == 1
    printed = capsys.readouterr().out
    assert "1 of 3 shards did not finish (no report): 2" in printed, printed
    assert "verify: DIFFERENT" in printed

    assert replay_cli(out, "--shard", "2/3") == 0
    report = json.loads(
        (out / "replay-reports" / f"{DAY1}_{DAY2}" / "shard-0002-of-0003.json").read_text()
    )
    assert report["days"] == [str(DAY2), str(DAY2)] and report["problems"] == {}
    assert report["files"] == {str(day_file_path(out, DAY2).relative_to(out)): report["rows"]}
    capsys.readouterr()
    assert replay_cli(out, "--verify-only") == 0
    printed = capsys.readouterr().out
    assert "shards: 3 expected" in printed and "verify: identical" in printed, printed
    assert f"{DAY1}: identical" in printed and f"{DAY2}: identical" in printed

    # A finished shard is not run again by accident; --replace runs it again.
    assert replay_cli(out, "--shard", "2/3") == 2
    assert "finished already" in capsys.readouterr().err
    assert replay_cli(out, "--shard", "2/3", "--replace") == 0
    assert replay_cli(out, "--verify-only") == 0


def test_verify_only_without_live_files_checks_each_rebuilt_file(
    bucket: Bucket, live: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """After a lost volume there is nothing to compare with: each rebuilt file must open,
    read through and hold the rows its shard's report names."""
    out = tmp_path / "rebuilt"
    assert replay_cli(out, "--shard", "0/2") == 0
    assert replay_cli(out, "--shard", "1/2") == 0
    empty = tmp_path / "new-volume"
    empty.mkdir()
    monkeypatch.setenv("DATASTORE_GENERAL_DATA_DIR", str(empty))
    capsys.readouterr()
    assert replay_cli(out, "--verify-only") == 0
    printed = capsys.readouterr().out
    assert "checked on its own" in printed and "verify: identical" in printed, printed

    # A report that does not match its file (a shard cut short, a file swapped) is caught.
    path = out / "replay-reports" / f"{DAY1}_{DAY2}" / "shard-0001-of-0002.json"
    record = json.loads(path.read_text())
    (name, rows), = record["files"].items()
    record["files"][name] = rows + 1
    path.write_text(json.dumps(record))
    assert replay_cli(out, "--verify-only") == 1
    assert f"{rows} table rows, its shard wrote {rows + 1}" in capsys.readouterr().out

    # A damaged file: reported, not a traceback.
    day_file_path(out, DAY1).write_bytes(b"\0" * 4096)
    assert replay_cli(out, "--verify-only") == 1
    assert "cannot be read through" in capsys.readouterr().out


def test_reports_of_two_different_shard_counts_are_a_difference(
    bucket: Bucket, live: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mixed"
    assert replay_cli(out, "--shard", "0/2") == 0
    assert replay_cli(out, "--replace") == 0  # all days again, as shard 0 of 1
    capsys.readouterr()
    assert replay_cli(out, "--verify-only") == 1
    assert "different shard counts [1, 2]" in capsys.readouterr().out


def test_verify_only_of_a_range_never_replayed(
    live: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert replay_cli(tmp_path / "nothing", "--verify-only") == 1
    assert "no shard report" in capsys.readouterr().out


def test_a_day_s_file_does_not_depend_on_the_range_replayed(
    bucket: Bucket, live: Settings, tmp_path: Path
) -> None:
    """The late window counts from each event day, so DAY1 alone, DAY1 with DAY2, or any
    shard holding DAY1 give the same file, row for row."""
    alone, both = tmp_path / "alone", tmp_path / "both"
    replay(bucket, live, DAY1, DAY1, alone, late_days=3)
    replay(bucket, live, DAY1, DAY2, both, late_days=3)
    comparison = compare_files(day_file_path(both, DAY1), day_file_path(alone, DAY1), DAY1,
                               strict_order=True)
    assert comparison.differences == []
    # With one late day less the batch uploaded three days after DAY1 is left out, from
    # a replay of DAY1 alone and of both days alike.
    short_alone, short_both = tmp_path / "short-alone", tmp_path / "short-both"
    replay(bucket, live, DAY1, DAY1, short_alone, late_days=2)
    replay(bucket, live, DAY1, DAY2, short_both, late_days=2)
    assert compare_files(day_file_path(short_both, DAY1), day_file_path(short_alone, DAY1),
                         DAY1, strict_order=True).differences == []
    assert compare_files(day_file_path(both, DAY1), day_file_path(short_both, DAY1),
                         DAY1).differences != []


def test_upload_day_and_the_late_window() -> None:
    from hisparc_datastore.ops.replay import in_late_window, upload_day

    assert upload_day("archive/2024/03/04/502/ab.pickle", {}) == dt.date(2024, 3, 4)
    assert upload_day("incoming/502/ab.pickle",
                      {"received": "2024-03-04T23:30:00-02:00"}) == dt.date(2024, 3, 5)
    assert upload_day("incoming/502/ab.pickle", {}) is None
    assert upload_day("incoming/502/ab.pickle", {"received": "yesterday"}) is None
    assert [in_late_window(DAY1, DAY1 + dt.timedelta(days=n), 3) for n in (-2, -1, 0, 3, 4)] == [
        False, True, True, True, False]
    assert in_late_window(DAY1, None, 0)


def test_objects_whose_event_days_are_out_of_range_are_passed_over(
    bucket: Bucket, live: Settings, tmp_path: Path
) -> None:
    """The upload records each batch's event days; replay does not fetch an object whose
    days it does not rebuild (or whose upload is outside their late windows), and the
    files are the same as when it decodes them all."""
    from hisparc_datastore.format.origin import EVENT_DAYS
    from hisparc_datastore.ops.replay import wanted

    days = frozenset({DAY2})
    assert wanted("archive/2024/03/02/501/a.pickle", {EVENT_DAYS: f"{DAY2}/{DAY2}"}, days, 3)
    assert not wanted("archive/2024/03/02/501/a.pickle", {EVENT_DAYS: f"{DAY1}/{DAY1}"}, days, 3)
    assert wanted("archive/2024/03/02/501/a.pickle", {EVENT_DAYS: f"{DAY1}/{DAY2}"}, days, 3)
    # Uploaded a week after DAY2: outside its late window of 3 days.
    assert not wanted("archive/2024/03/09/501/a.pickle", {EVENT_DAYS: f"{DAY2}/{DAY2}"}, days, 3)
    assert wanted("archive/2024/03/09/501/a.pickle", {}, days, 3)  # no metadata: decoded
    assert wanted("archive/2024/03/09/501/a.pickle", {EVENT_DAYS: "junk"}, days, 3)

    without = tmp_path / "all-decoded"
    for info in list(bucket.list("archive/")):  # as if stored before event-days existed
        stored = bucket.get(info.key)
        if EVENT_DAYS in stored.metadata:
            bucket.put(info.key, stored.body,
                       {k: v for k, v in stored.metadata.items() if k != EVENT_DAYS})
    decoded = replay(bucket, live, DAY2, DAY2, without, late_days=3)
    assert decoded.passed_over == 0
    archived = [  # the same objects, with the metadata the upload writes
        info.key for info in bucket.list("archive/")]
    for key in archived:
        stored = bucket.get(key)
        span = event_day_span(decode_batch(stored.body))
        if span is not None:
            bucket.put(key, stored.body, {**stored.metadata, EVENT_DAYS: event_days_text(span)})
    with_days = tmp_path / "passed-over"
    report = replay(bucket, live, DAY2, DAY2, with_days, late_days=3)
    assert report.passed_over > 0 and report.objects == decoded.objects - report.passed_over
    assert report.rows == decoded.rows
    assert compare_files(day_file_path(without, DAY2), day_file_path(with_days, DAY2), DAY2,
                         strict_order=True).differences == []
    assert "passed over" in report.summary()
