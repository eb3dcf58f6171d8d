"""``datastore status``: the layout on fixed figures, and collection from a real bucket and
real day files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from hisparc_datastore.ops import status
from hisparc_datastore.ops.status import DayFileStats, PrefixStats, StatusReport

NOW = dt.datetime(2026, 11, 25, 9, 0, 0, tzinfo=dt.UTC)


def _report(days: list[DayFileStats], prefixes: list[PrefixStats] | None = None,
            error: str | None = None) -> StatusReport:
    if prefixes is None and error is None:
        prefixes = [
            PrefixStats("incoming/", 2, 2048, NOW - dt.timedelta(seconds=5),
                        "incoming/501/a.pickle"),
            PrefixStats("suspicious/", 0, 0),
            PrefixStats("failed/", 1, 300, NOW - dt.timedelta(days=3), "failed/501/b.pickle"),
            PrefixStats("archive/", 1234, 5 * 1024 * 1024 + 1,
                        NOW - dt.timedelta(seconds=12), "archive/2026/11/25/501/c.pickle"),
        ]
    return StatusReport("hisparc-datastore", "http://127.0.0.1:8333", prefixes, error,
                        Path("/srv/data"), days)


def _day(day: dt.date, rows: dict[str, int], stations: int = 2, error: str | None = None,
         modified: dt.datetime | None = None) -> DayFileStats:
    path = Path(f"/srv/data/{day.year}/{day.month}/{day.year}_{day.month}_{day.day}.h5")
    return DayFileStats(day, path, 3 * 1024 * 1024, modified or NOW - dt.timedelta(hours=30),
                        stations, rows, error)


def _columns(line: str) -> list[str]:
    return line.split()


def test_bucket_table_is_aligned_with_numbers_right() -> None:
    text = status.format_report(_report([]), NOW)
    lines = text.splitlines()
    assert lines[0] == "Bucket hisparc-datastore at http://127.0.0.1:8333"
    table = lines[1:6]
    assert _columns(table[0]) == ["prefix", "objects", "bytes", "newest"]
    assert table[1].split()[:4] == ["incoming/", "2", "2.0", "KiB"]
    assert table[2].split()[:4] == ["suspicious/", "0", "0", "B"]
    assert "2026-11-22 09:00:00 UTC (3 days ago)" in table[3]
    assert table[4].split()[:4] == ["archive/", "1234", "5.0", "MiB"]
    assert "2026-11-25 08:59:48 UTC (12 s ago)" in table[4]
    # Counts and sizes are right-aligned (each ends in one column); "newest" starts in one.
    counts = ["2", "0", "1", "1234"]
    sizes = ["2.0 KiB", "0 B", "300 B", "5.0 MiB"]
    assert len({line.index(f" {count} ") + len(count) for line, count in
                zip(table[1:], counts, strict=True)}) == 1
    assert len({line.index(size) + len(size) for line, size in
                zip(table[1:], sizes, strict=True)}) == 1
    assert len({line.index("2026") for line in table[1:] if "2026" in line}) == 1
    assert "datastore failed list" in text  # a hint when failed/ holds objects
    assert "Day files under /srv/data: none yet" in text


def test_newest_write_and_day_table() -> None:
    days = [
        _day(dt.date(2026, 11, 24), {"events": 120000, "singles": 86400, "config": 2}),
        _day(dt.date(2026, 11, 25), {"events": 36, "weather": 5, "lightning_noise": 1},
             stations=1, modified=NOW - dt.timedelta(seconds=11)),
    ]
    text = status.format_report(_report(days), NOW)
    lines = text.splitlines()
    newest = lines[lines.index("Newest write") + 1:lines.index("Newest write") + 3]
    assert newest[0].split()[:2] == ["archive", "object"]
    assert newest[0].endswith("archive/2026/11/25/501/c.pickle")
    assert "2026-11-25 08:59:49 UTC (11 s ago)" in newest[1]
    assert newest[1].endswith("2026/11/2026_11_25.h5")

    start = next(i for i, line in enumerate(lines) if line.startswith("Day files under"))
    assert lines[start] == "Day files under /srv/data: 2 files, 6.0 MiB"
    table = lines[start + 1:]
    assert _columns(table[0]) == ["rows", "per", "table", "2026-11-24", "2026-11-25"]
    body = {line.split()[0]: line.split()[1:] for line in table[1:]}
    # Tables in event-type order (events, config, singles, weather, ..., lightning_noise).
    assert [line.split()[0] for line in table[1:]] == [
        "events", "config", "singles", "weather", "lightning_noise", "stations", "file",
    ]
    assert body["events"] == ["120000", "36"]
    assert body["singles"] == ["86400", "0"]
    assert body["lightning_noise"] == ["0", "1"]
    assert body["stations"] == ["2", "1"]
    assert body["file"] == ["size", "3.0", "MiB", "3.0", "MiB"]
    # Right-aligned: every number of a day column ends where its header ends.
    header_end = table[0].index("2026-11-25") + len("2026-11-25")
    assert all(len(line.rstrip()) == header_end for line in table[1:])


def test_only_the_newest_days_are_shown_and_unreadable_files_are_marked() -> None:
    days = [_day(dt.date(2026, 11, d), {"events": d}) for d in range(1, 11)]
    days[-1] = _day(dt.date(2026, 11, 10), {}, error="unable to lock file")
    text = status.format_report(_report(days), NOW, days=3)
    assert "Day files under /srv/data: 10 files, 30.0 MiB (7 older not shown)" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("rows per table"))
    assert _columns(header)[3:] == ["2026-11-08", "2026-11-09", "2026-11-10"]
    events = next(line for line in lines if line.lstrip().startswith("events"))
    assert _columns(events) == ["events", "8", "9", "?"]
    assert "2026-11-10: could not be read (unable to lock file)" in text


def test_an_unreachable_bucket_is_reported_not_raised() -> None:
    text = status.format_report(_report([], prefixes=None, error="connect timeout"), NOW)
    assert "  unreachable: connect timeout" in text
    assert "archive object  -" in text


def test_human_sizes_and_ages() -> None:
    assert status.human_bytes(0) == "0 B"
    assert status.human_bytes(1023) == "1023 B"
    assert status.human_bytes(1536) == "1.5 KiB"
    assert status.human_bytes(3 * 1024**4) == "3.0 TiB"
    assert status.when(None, NOW) == "-"
    assert status.when(NOW - dt.timedelta(minutes=5), NOW).endswith("(5 min ago)")
    assert status.when(NOW - dt.timedelta(hours=5), NOW).endswith("(5 h ago)")


def test_day_files_are_found_by_the_layout_only(tmp_path: Path) -> None:
    for relative in ["2026/11/2026_11_25.h5", "2026/2/2026_2_3.h5", "2026/02/2026_2_4.h5",
                     "2026/11/notes.h5", "2026/11/2026_11_31.h5", "x.h5"]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = status.find_day_files(tmp_path)
    assert [(day.isoformat(), path.relative_to(tmp_path).as_posix()) for day, path in found] == [
        ("2026-02-03", "2026/2/2026_2_3.h5"),
        ("2026-11-25", "2026/11/2026_11_25.h5"),
    ]


def test_collect_counts_objects_and_sums_rows_over_stations(bucket, tmp_path: Path) -> None:
    """Against the real S3 server and real day files written by the writer's store."""
    import random

    from hisparc_datastore_dev import samples

    from hisparc_datastore.format.rows import BatchPart, check_events
    from hisparc_datastore.storage.dayfile import DayFile, day_file_path

    bucket.put("incoming/501/a.pickle", b"x" * 10, {})
    bucket.put("failed/501/b.pickle", b"y" * 7, {"failure-reason": "not a pickle"})
    for n in range(3):
        bucket.put(f"archive/2024/03/05/501/{n}.pickle", b"z" * 100, {})

    rng = random.Random(5)
    start = dt.datetime(2024, 3, 5, 12)
    day = start.date()
    parts = [
        BatchPart("k1", "e1", 501, "Amsterdam",
                  check_events(samples.batch(6, start, rng, kinds=("CIC", "SIN")))[0]),
        BatchPart("k2", "e2", 502, "Amsterdam",
                  check_events(samples.batch(4, start, rng, kinds=("CIC",)))[0]),
        BatchPart("k3", "e3", 7001, "Leiden",
                  check_events(samples.batch(2, start, rng, kinds=("WTR",)))[0]),
    ]
    with DayFile(day_file_path(tmp_path, day)) as day_file:
        day_file.write(parts)
    (tmp_path / "2024" / "3" / "stray.h5").write_bytes(b"")

    report = status.collect(bucket, tmp_path)
    figures = {p.prefix: (p.objects, p.bytes) for p in report.prefixes}
    assert figures == {"incoming/": (1, 10), "suspicious/": (0, 0), "failed/": (1, 7),
                       "archive/": (3, 300), "deferred/": (0, 0), "retrying/": (0, 0),
                       "legacy-import/": (0, 0)}
    archive = next(p for p in report.prefixes if p.prefix == "archive/")
    assert archive.newest_key is not None and archive.newest_key.startswith("archive/2024/03/05/")
    assert [(d.day, d.stations, d.rows, d.error) for d in report.days] == [
        (day, 3, {"events": 3 + 4, "singles": 3, "weather": 2}, None),
    ]
    text = status.format_report(report, NOW)
    assert "Day files under" in text and "2024-03-05" in text


def test_an_interrupted_retry_is_pointed_out() -> None:
    prefixes = [PrefixStats(prefix, 0, 0, None, None) for prefix in status.STATUS_PREFIXES]
    prefixes[status.STATUS_PREFIXES.index("retrying/")] = PrefixStats(
        "retrying/", 2, 20, NOW - dt.timedelta(minutes=5), "retrying/501/a.pickle")
    text = status.format_report(_report([], prefixes=prefixes), NOW)
    assert "retrying/" in text and "datastore failed retry" in text


def test_why_objects_wait_is_shown() -> None:
    from hisparc_datastore.writer.retries import RetryRecord

    moment = NOW.timestamp()
    records = [
        RetryRecord("day", "2026-11-21", 3, moment - 600, moment - 30, moment + 50,
                    "2026_11_21.h5: OSError: file signature not found"),
        RetryRecord("object", "incoming/999/x.pickle", 1, moment - 5, moment - 5,
                    moment + 5, "station 999: no cluster in the station list"),
    ]
    held = [_day(dt.date(2026, 11, 25), {})]
    report = _report([], None)
    report = StatusReport(report.bucket, report.endpoint, report.prefixes, None,
                          report.data_dir, [], records, held)
    text = " ".join(status.format_report(report, NOW).split())  # columns: padding varies
    assert ("Waiting in incoming/ (2 objects): 1 day files held open by readers, 1 day files "
            "and 1 objects with retry records") in text
    assert "day 2026-11-25 2026_11_25.h5 is held open by a reader" in text
    assert ("day 2026-11-21 attempt 3 of 12, next in 50 s (since 2026-11-25 08:50:00 UTC): "
            "2026_11_21.h5: OSError: file signature not found") in text
    assert "incoming/999/x.pickle attempt 1 of 12, next in 5 s" in text
    # Nothing waits: no section.
    assert "Waiting in" not in status.format_report(_report([]), NOW)


def test_counters_from_the_metrics_endpoints_are_summed_and_shown() -> None:
    text = """# HELP datastore_uploads_total Uploads answered
# TYPE datastore_uploads_total counter
datastore_uploads_total{code="100"} 41.0
datastore_uploads_total{code="203"} 2.0
datastore_writer_objects_total{outcome="archived"} 40.0
datastore_writer_objects_total{outcome="deferred"} 1.0
datastore_writer_rows_total 1234.0
datastore_writer_lag_seconds_count 40.0
datastore_writer_lag_seconds_sum 6.0
"""
    samples = status.parse_metrics(text) + status.parse_metrics(
        'datastore_uploads_total{code="100"} 1.0\n')
    lines = [" ".join(line.split()) for line in status.format_counters(samples)]
    assert "uploads by answer 100 x42, 203 x2" in lines
    assert "writer objects archived 40, deferred 1" in lines
    assert "rows written 1234" in lines
    assert "lag, bucket to HDF5 mean 0.15 s over 40 objects" in lines
    assert status.format_counters([]) == []
    assert status.read_metrics(["http://127.0.0.1:9/metrics"], timeout=0.2) == []
