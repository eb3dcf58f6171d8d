"""The writer core against the real S3 server: objects in, PyTables-readable rows out.

Objects are stored the way the upload function stores them (key from the payload's md5,
metadata from ``upload.metadata_for``); files are read back with PyTables only.
"""

from __future__ import annotations

import base64
import calendar
import dataclasses
import datetime as dt
import hashlib
import pickle
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tables
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.config import Settings
from hisparc_datastore.format import schema
from hisparc_datastore.format.keys import archive_key, failed_key, incoming_key, station_from_key
from hisparc_datastore.format.origin import BadOrigin, object_origin, received_time
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket, ObjectInfo
from hisparc_datastore.upload.protocol import metadata_for
from hisparc_datastore.writer.pipeline import (
    RetryPolicy,
    chunked,
    oldest_first,
    process_keys,
    short_reason,
    station_windows,
    sweep,
)
from hisparc_datastore.writer.retries import Backoff

FAST = RetryPolicy(delays=(0.01, 0.01))
NOW = Backoff(first=0.0, longest=0.0)  # deferred objects are due again at once
RECEIVED = dt.datetime(2024, 3, 2, 7, 30, tzinfo=dt.UTC)
STATION_PATH = "/hisparc/cluster_amsterdam/station_501"


def put_batch(
    bucket: Bucket,
    events: list[dict[str, Any]],
    flavour: str = "py2",
    station: int = 501,
    cluster: str = "Amsterdam",
    received: dt.datetime = RECEIVED,
    metadata: bool = True,
    body: bytes | None = None,
) -> str:
    """Store a batch as the upload function does; returns its incoming/ key."""
    if body is None:
        if flavour == "py2":
            body = dumps_py2(events)
        else:
            body = pickle.dumps(samples.numpy_flavour(events), protocol=4)
    key = incoming_key(station, hashlib.md5(body).hexdigest())  # noqa: S324
    meta = metadata_for(Station(station, cluster, "x"), len(events), received)
    bucket.put(key, body, meta if metadata else {})
    return key


def keys_under(bucket: Bucket, prefix: str) -> list[str]:
    return [info.key for info in bucket.list(prefix)]


def read_table(path: Path, node: str) -> np.ndarray:
    with tables.open_file(path, "r") as h5:
        return h5.get_node(node).read()


def row_counts(data_dir: Path) -> dict[str, int]:
    """Table path -> rows, over every day file below ``data_dir``."""
    counts: dict[str, int] = {}
    for path in sorted(data_dir.rglob("*.h5")):
        with tables.open_file(path, "r") as h5:
            for node in h5.walk_nodes("/hisparc", classname="Table"):
                counts[f"{path.name}:{node._v_pathname}"] = node.nrows
    return counts


def assert_event_ids_sequential(data_dir: Path) -> None:
    for path in data_dir.rglob("*.h5"):
        with tables.open_file(path, "r") as h5:
            for node in h5.walk_nodes("/hisparc", classname="Table"):
                ids = node.col("event_id")
                assert ids.tolist() == list(range(1, len(ids) + 1)), node._v_pathname


# ------------------------------------------------------------------- expected values


def expected_row(event: dict[str, Any]) -> tuple[str, dict[str, Any], dict[tuple, bytes]]:
    """(table, column values, blob bytes per (column, element)), per docs/FORMAT.md 2.5, 4."""
    event_type = schema.EVENT_TYPES[event["header"]["eventtype_uploadcode"]]
    values: dict[str, Any] = {}
    for column in event_type.columns:
        if column.name != "event_id":  # numbered by the store, checked by position
            values[column.name] = np.full(column.shape, column.fill, dtype=column.dtype)
    when = event["header"]["datetime"]
    timestamp = calendar.timegm(when.utctimetuple())
    values["timestamp"] = np.int32(timestamp)
    if event_type.extended_time:
        nanoseconds = int(event["header"]["nanoseconds"])
        values["nanoseconds"] = np.uint32(nanoseconds)
        values["ext_timestamp"] = np.uint64(timestamp * 1_000_000_000 + nanoseconds)
    blobs: dict[tuple, bytes] = {}
    for item in event["datalist"]:
        field = event_type.fields.get(item["data_uploadcode"])
        assert field is not None, f"samples sent {item['data_uploadcode']}, unknown to schema"
        if field.blob:
            value = item["data"]
            data = base64.b64decode(value) if field.base64 else value.encode("latin-1")
            blobs[(field.column, field.element)] = data
            continue
        dtype = event_type.column_map[field.column].np_dtype
        if field.element is None:
            values[field.column] = np.array(item["data"]).astype(dtype)
        else:
            values[field.column][field.element] = np.array(item["data"]).astype(dtype)
    return event_type.table, values, blobs


def assert_rows_match(path: Path, events: list[dict[str, Any]], station_path: str) -> None:
    """Every event is its table's row, in order, with the exact values and blob bytes."""
    with tables.open_file(path, "r") as h5:
        blobs_node = h5.get_node(f"{station_path}/blobs")
        assert isinstance(blobs_node, tables.VLArray)
        assert blobs_node.title == "HiSPARC binary data"
        stored_blobs = blobs_node.read()
        seen: dict[str, int] = {}
        for event in events:
            table_name, values, blobs = expected_row(event)
            table = h5.get_node(f"{station_path}/{table_name}")
            assert isinstance(table, tables.Table)
            event_type = schema.TABLES[table_name]
            assert table.title == event_type.title
            assert table.dtype == event_type.dtype
            position = seen.get(table_name, 0)
            seen[table_name] = position + 1
            row = table.read(position, position + 1)[0]
            assert row["event_id"] == position + 1
            for column, expected in values.items():
                if any(column == blob_column for blob_column, _ in blobs):
                    continue
                np.testing.assert_array_equal(row[column], expected, err_msg=column)
            for (column, element), data in blobs.items():
                index = row[column] if element is None else row[column][element]
                assert stored_blobs[int(index)] == data, (table_name, column, element)


# ------------------------------------------------------------------------------ tests


def test_every_event_type_written_with_exact_values(bucket: Bucket, settings: Settings) -> None:
    rng = random.Random(3)
    start = dt.datetime(2024, 3, 1, 12, 0, 0, 250_000)
    events = [
        samples.event_of_type(code, start + dt.timedelta(seconds=n), rng)
        for n, code in enumerate(samples.UPLOAD_CODE_ORDER)
    ]
    events += [samples.event_of_type(code, start + dt.timedelta(minutes=5), rng)
               for code in ("CIC", "LIT", "WCG")]  # second rows: event_id continues
    key = put_batch(bucket, events)

    result = process_keys([key], bucket, settings, retry=FAST)

    assert result.ok and result.archived == [key]
    assert result.rows == len(events) and result.skipped_events == 0
    path = day_file_path(settings.data_dir, start.date())
    assert_rows_match(path, events, STATION_PATH)
    with tables.open_file(path, "r") as h5:
        assert h5.get_node("/hisparc")._v_title == "HiSPARC data"
        assert h5.get_node("/hisparc/cluster_amsterdam")._v_title == (
            "HiSPARC cluster Amsterdam data"
        )
        assert {node._v_name for node in h5.list_nodes(STATION_PATH)} == {
            *(schema.EVENT_TYPES[code].table for code in samples.UPLOAD_CODE_ORDER), "blobs"
        }
    archived = archive_key(key, RECEIVED)
    assert keys_under(bucket, "incoming/") == []
    assert keys_under(bucket, "archive/") == [archived]
    assert archived.startswith("archive/2024/03/02/501/")
    assert bucket.get(archived).body == dumps_py2(events)  # the upload's bytes, unchanged


def walk(path: Path) -> dict[str, tuple]:
    """Every node under /hisparc: class, title, attributes and data."""
    nodes: dict[str, tuple] = {}
    with tables.open_file(path, "r") as h5:
        for node in h5.walk_nodes("/hisparc"):
            attrs = {name: node._v_attrs[name] for name in node._v_attrs._f_list("all")}
            if isinstance(node, tables.Table):
                data: Any = node.read()
            elif isinstance(node, tables.VLArray):
                data = node.read()
            else:
                data = None
            nodes[node._v_pathname] = (type(node).__name__, node._v_title, attrs, data)
    return nodes


def assert_same_nodes(left: dict[str, tuple], right: dict[str, tuple]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        (lclass, ltitle, lattrs, ldata), (rclass, rtitle, rattrs, rdata) = left[name], right[name]
        assert (lclass, ltitle) == (rclass, rtitle), name
        assert lattrs.keys() == rattrs.keys(), name
        for attr in lattrs:
            np.testing.assert_array_equal(lattrs[attr], rattrs[attr], err_msg=f"{name} {attr}")
        if isinstance(ldata, np.ndarray):
            assert ldata.dtype == rdata.dtype, name
            assert ldata.tobytes() == rdata.tobytes(), name
        else:
            assert ldata == rdata, name


def test_python2_and_python3_payloads_give_identical_files(
    bucket: Bucket, settings: Settings, tmp_path: Path
) -> None:
    rng = random.Random(11)
    start = dt.datetime(2024, 5, 17, 8, 0, 0, 123_456)
    events = samples.realistic_batch(150, start, rng)
    events += [samples.event_of_type(code, start + dt.timedelta(minutes=3), rng)
               for code in samples.UPLOAD_CODE_ORDER]
    py2_key = put_batch(bucket, events, "py2")
    py3_key = put_batch(bucket, events, "py3")
    assert py2_key != py3_key  # different bytes, different objects

    py3_settings = dataclasses.replace(settings, data_dir=tmp_path / "py3")
    py3_settings.data_dir.mkdir()
    assert process_keys([py2_key], bucket, settings, retry=FAST).archived == [py2_key]
    assert process_keys([py3_key], bucket, py3_settings, retry=FAST).archived == [py3_key]

    day = start.date()
    py2_nodes = walk(day_file_path(settings.data_dir, day))
    py3_nodes = walk(day_file_path(py3_settings.data_dir, day))
    assert len(py2_nodes) > 10
    assert_same_nodes(py2_nodes, py3_nodes)
    assert_rows_match(day_file_path(settings.data_dir, day), events, STATION_PATH)


def test_midnight_spanning_batch_lands_in_two_files_and_is_archived_once(
    bucket: Bucket, settings: Settings
) -> None:
    rng = random.Random(5)
    start = dt.datetime(2024, 12, 31, 23, 59, 30)
    events = samples.batch(60, start, rng, kinds=("CIC", "SIN"), traces=False)
    key = put_batch(bucket, events)

    result = process_keys([key], bucket, settings, retry=FAST)

    assert result.archived == [key] and result.rows == 60
    before = [e for e in events if e["header"]["datetime"].date() == start.date()]
    after = [e for e in events if e["header"]["datetime"].date() != start.date()]
    assert len(before) == len(after) == 30
    assert_rows_match(day_file_path(settings.data_dir, start.date()), before, STATION_PATH)
    next_day = dt.date(2025, 1, 1)
    assert_rows_match(day_file_path(settings.data_dir, next_day), after, STATION_PATH)
    assert keys_under(bucket, "archive/") == [archive_key(key, RECEIVED)]
    assert keys_under(bucket, "incoming/") == []


def three_batches(bucket: Bucket, seed: int = 8) -> tuple[list[str], int]:
    rng = random.Random(seed)
    start = dt.datetime(2024, 6, 1, 10, 0, 0)
    keys, total = [], 0
    for n in range(3):
        events = samples.batch(20, start + dt.timedelta(minutes=n), rng, kinds=("CIC", "SIN"),
                               traces=False)
        keys.append(put_batch(bucket, events))
        total += len(events)
    return keys, total


def test_duplicate_and_reordered_notifications_write_no_duplicate_rows(
    bucket: Bucket, settings: Settings
) -> None:
    (a, b, c), total = three_batches(bucket)

    # reordered and repeated
    first = process_keys([c, c, a], bucket, settings, retry=FAST)
    second = process_keys([a, b, c, b], bucket, settings, retry=FAST)
    third = process_keys([b], bucket, settings, retry=FAST)

    assert sorted(first.archived) == sorted([a, c]) and first.already_done == []
    assert second.archived == [b] and sorted(second.already_done) == sorted([a, c])
    assert third.already_done == [b] and third.rows == 0 and third.ok
    assert sum(row_counts(settings.data_dir).values()) == total
    assert_event_ids_sequential(settings.data_dir)
    assert keys_under(bucket, "incoming/") == []


def test_object_seen_again_before_archive_writes_nothing_twice(
    bucket: Bucket, settings: Settings
) -> None:
    """A crash after the append but before the archive: the ledger makes the retry a no-op."""
    (a, b, _), _ = three_batches(bucket)
    assert process_keys([a], bucket, settings, retry=FAST).rows == 20
    # Put the archived object back where it was, as if the move never happened.
    body = bucket.get(archive_key(a, RECEIVED))
    bucket.put(a, body.body, body.metadata)

    result = process_keys([a, b], bucket, settings, retry=FAST)

    assert sorted(result.archived) == sorted([a, b]) and result.rows == 20
    assert sum(row_counts(settings.data_dir).values()) == 40
    assert_event_ids_sequential(settings.data_dir)


def test_resent_batch_after_archive_is_archived_again_without_duplicate_rows(
    bucket: Bucket, settings: Settings
) -> None:
    rng = random.Random(9)
    events = samples.batch(30, dt.datetime(2024, 7, 4, 1, 2, 3), rng)
    key = put_batch(bucket, events)
    assert process_keys([key], bucket, settings, retry=FAST).rows == 30

    later = RECEIVED + dt.timedelta(days=1)
    again = put_batch(bucket, events, received=later)  # the station resends: same md5
    assert again == key
    result = process_keys([key], bucket, settings, retry=FAST)

    assert result.archived == [key] and result.rows == 0
    assert sum(row_counts(settings.data_dir).values()) == 30
    assert sorted(keys_under(bucket, "archive/")) == sorted(
        {archive_key(key, RECEIVED), archive_key(key, later)}
    )
    assert keys_under(bucket, "incoming/") == []


@pytest.mark.parametrize(
    "body",
    [
        b"this is not a pickle",
        b"cos\nsystem\n(S'echo owned'\ntR.",  # code execution attempt
        pickle.dumps({"not": "a list"}, protocol=2),
        b"",
    ],
    ids=["text", "os.system", "not-a-list", "empty"],
)
def test_undecodable_object_is_quarantined_once(
    bucket: Bucket, settings: Settings, body: bytes
) -> None:
    key = put_batch(bucket, [], body=body)

    first = process_keys([key], bucket, settings, retry=FAST)
    assert first.ok and list(first.quarantined) == [key]
    failed = failed_key(key)
    assert keys_under(bucket, "failed/") == [failed]
    stored = bucket.get(failed)
    assert stored.body == body
    reason = stored.metadata["failure-reason"]
    assert reason.startswith("undecodable") and reason.isascii() and len(reason) <= 200
    assert stored.metadata["station"] == "501"  # the upload's metadata is kept

    second = process_keys([key], bucket, settings, retry=FAST)
    swept = sweep(bucket, settings, retry=FAST)
    assert second.already_done == [key] and not second.quarantined
    assert swept.objects == 0
    assert keys_under(bucket, "failed/") == [failed]
    assert bucket.get(failed).metadata["failure-reason"] == reason
    assert not any(settings.data_dir.rglob("*.h5"))


def test_batch_with_only_skipped_events_is_archived(bucket: Bucket, settings: Settings) -> None:
    rng = random.Random(4)
    events = samples.batch(5, dt.datetime(2019, 12, 31, 23, 0, 0), rng, traces=False)
    events.append({"header": {"eventtype_uploadcode": "XYZ",
                              "datetime": dt.datetime(2024, 1, 1), "nanoseconds": 0},
                   "datalist": []})
    key = put_batch(bucket, events)

    result = process_keys([key], bucket, settings, retry=FAST)

    assert result.archived == [key] and result.rows == 0 and result.skipped_events == 6
    assert keys_under(bucket, "incoming/") == []
    assert not any(settings.data_dir.rglob("*.h5"))


def test_missing_metadata_falls_back_to_key_and_station_list(
    bucket: Bucket, settings: Settings
) -> None:
    rng = random.Random(6)
    events = samples.batch(3, dt.datetime(2024, 8, 1, 5, 0, 0), rng, traces=False)
    leiden = put_batch(bucket, events, station=7001, metadata=False)
    unknown = put_batch(bucket, events, station=999, metadata=False)

    result = process_keys([leiden, unknown], bucket, settings, retry=FAST)

    assert result.ok and result.archived == [leiden]  # one gap never stalls the others
    assert list(result.deferred) == [unknown]  # a configuration gap: it waits in incoming/
    assert "no cluster" in result.deferred[unknown].reason
    assert keys_under(bucket, "incoming/") == [unknown]
    assert len(keys_under(bucket, "deferred/objects/")) == 1  # its retry record
    path = day_file_path(settings.data_dir, dt.date(2024, 8, 1))
    assert_rows_match(path, events, "/hisparc/cluster_leiden/station_7001")
    # The archive date falls back to the object's LastModified: today.
    archived = keys_under(bucket, "archive/")
    assert len(archived) == 1 and archived[0].endswith(leiden.removeprefix("incoming/"))


def test_a_day_folder_that_cannot_be_made_keeps_its_objects_waiting(
    bucket: Bucket, settings: Settings
) -> None:
    """One day's path is blocked, the volume is fine: 2xx, objects wait, then get written."""
    (a, b, c), _ = three_batches(bucket)
    blocker = settings.data_dir / "2024"
    blocker.write_text("not a directory")  # the year folder cannot be made

    result = process_keys([a, b], bucket, settings, retry=FAST, backoff=NOW)

    assert result.ok and sorted(result.deferred) == sorted([a, b])
    assert result.archived == [] and result.quarantined == {} and result.failed == {}
    assert "NotADirectoryError" in result.deferred[a].reason
    assert sorted(keys_under(bucket, "incoming/")) == sorted([a, b, c])
    assert keys_under(bucket, "deferred/days/") == ["deferred/days/2024-06-01.json"]
    blocker.unlink()
    swept = sweep(bucket, settings, retry=FAST, backoff=NOW)
    assert swept.ok and len(swept.archived) == 3 and swept.rows == 60
    assert keys_under(bucket, "incoming/") == []
    assert keys_under(bucket, "deferred/") == []  # the day's record is gone with the fix


def test_a_full_or_missing_volume_is_an_outage(bucket: Bucket, settings: Settings) -> None:
    """Nothing can be written anywhere: 5xx (the sender retries), nothing moves."""
    (a, b, _), _ = three_batches(bucket)
    settings.data_dir.rmdir()
    settings.data_dir.write_text("the volume is not mounted")
    try:
        result = process_keys([a, b], bucket, settings, retry=FAST)
        assert not result.ok and sorted(result.failed) == sorted([a, b])
        assert not result.deferred and not result.quarantined
        assert keys_under(bucket, "deferred/") == []
    finally:
        settings.data_dir.unlink()
        settings.data_dir.mkdir()
    again = process_keys([a, b], bucket, settings, retry=FAST)
    assert again.ok and sorted(again.archived) == sorted([a, b])


def test_unreachable_bucket_is_a_transient_failure(settings: Settings) -> None:
    down = Bucket("nowhere", endpoint="http://127.0.0.1:9", access_key="a", secret_key="b",
                  connect_timeout=0.2, read_timeout=0.2, max_attempts=1)
    key = "incoming/501/" + "0" * 32 + ".pickle"
    result = process_keys([key], down, settings, retry=FAST)
    assert not result.ok and list(result.failed) == [key]
    swept = sweep(down, settings, retry=FAST)
    assert not swept.ok and swept.errors


def test_sweep_writes_many_one_event_objects(
    bucket: Bucket, settings: Settings
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(12)
    start = dt.datetime(2024, 9, 9, 9, 0, 0)
    batches = [samples.batch(1, start + dt.timedelta(seconds=n), rng, kinds=("CIC",))
               for n in range(240)]
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda events: put_batch(bucket, events), batches))

    result = sweep(bucket, settings, retry=FAST)

    assert result.ok and sorted(result.archived) == sorted(keys) and result.rows == 240
    assert keys_under(bucket, "incoming/") == []
    counts = row_counts(settings.data_dir)
    assert counts == {"2024_9_9.h5:/hisparc/cluster_amsterdam/station_501/events": 240}
    assert_event_ids_sequential(settings.data_dir)


def test_sweep_limit_leaves_the_rest(bucket: Bucket, settings: Settings) -> None:
    rng = random.Random(13)
    start = dt.datetime(2024, 9, 10, 9, 0, 0)
    for n in range(7):
        put_batch(bucket, samples.batch(1, start + dt.timedelta(seconds=n), rng, traces=False))

    first = sweep(bucket, settings, limit=3, retry=FAST)
    assert len(first.archived) == 3 and len(keys_under(bucket, "incoming/")) == 4
    rest = sweep(bucket, settings, retry=FAST)
    assert len(rest.archived) == 4 and keys_under(bucket, "incoming/") == []


# ------------------------------------------------------------------- pure helpers


def info(key: str, second: int, size: int = 10) -> ObjectInfo:
    when = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=second)
    return ObjectInfo(key=key, etag="e", size=size, last_modified=when)


def test_oldest_first_then_key() -> None:
    infos = [info("incoming/1/c", 5), info("incoming/1/b", 1), info("incoming/1/a", 5)]
    assert [i.key for i in oldest_first(infos)] == ["incoming/1/b", "incoming/1/a",
                                                     "incoming/1/c"]


def test_chunks_bounded_by_count_and_bytes() -> None:
    infos = [info(f"incoming/1/{n}", n, size=40) for n in range(10)]
    assert [len(c) for c in chunked(infos, max_objects=4, max_bytes=10_000)] == [4, 4, 2]
    assert [len(c) for c in chunked(infos, max_objects=100, max_bytes=100)] == [2] * 5
    big = [info("incoming/1/big", 0, size=500), info("incoming/1/small", 1)]
    assert [len(c) for c in chunked(big, max_objects=100, max_bytes=100)] == [1, 1]


def test_windows_cut_only_between_stations() -> None:
    infos = [info(f"incoming/{station}/{n}", n) for station in (1, 2, 3) for n in range(3)]
    windows = list(station_windows(infos, window=2))
    assert [[i.key.split("/")[1] for i in w] for w in windows] == [
        ["1", "1", "1"], ["2", "2", "2"], ["3", "3", "3"]
    ]
    assert len(list(station_windows(infos, window=100))) == 1


def test_origin_and_received_time() -> None:
    def lookup(number: int) -> str | None:
        return {501: "Amsterdam"}.get(number)

    assert station_from_key("incoming/501/abc.pickle") == 501
    assert station_from_key("incoming/x/abc.pickle") is None
    assert object_origin("incoming/501/a.pickle", {"station": "501", "cluster": "S%C3%A9"},
                         lookup) == (501, "Sé")
    assert object_origin("incoming/501/a.pickle", {}, lookup) == (501, "Amsterdam")
    assert object_origin("archive/2024/01/02/7/a.pickle", {"station": "7", "cluster": "X"},
                         lookup) == (7, "X")
    last_modified = dt.datetime(2024, 1, 2, tzinfo=dt.UTC)
    assert received_time({"received": "2024-03-02T07:30:00.000000+00:00"}, last_modified) == (
        RECEIVED
    )
    assert received_time({"received": "garbage"}, last_modified) == last_modified
    assert received_time({}, last_modified) == last_modified


def test_short_reason_is_ascii_single_line_and_bounded() -> None:
    reason = short_reason(ValueError("bad\nbyte \u00e9 " + "x" * 500))
    assert reason.isascii() and "\n" not in reason and len(reason) == 200
    assert reason.startswith("ValueError: bad byte ? x")


# ------------------------------------------------------------ faults that are not transient


def test_object_that_trips_the_decoder_is_quarantined(
    bucket: Bucket, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a, b, _), _ = three_batches(bucket)
    from hisparc_datastore.format import origin as writer

    real = writer.decode_batch
    poison = bucket.get(a).body

    def flaky(body: bytes) -> list[dict[str, Any]]:
        if body == poison:
            raise ZeroDivisionError("a bug, not a bad payload")
        return real(body)

    monkeypatch.setattr(writer, "decode_batch", flaky)
    result = process_keys([a, b], bucket, settings, retry=FAST)

    assert result.ok and result.archived == [b]
    assert result.quarantined[a].startswith("decoder error: ZeroDivisionError")
    assert keys_under(bucket, "failed/") == [failed_key(a)]


@pytest.mark.parametrize(("metadata", "reason"), [
    ({"station": "502", "cluster": "Amsterdam"}, "differs from the key"),
    ({"station": "501", "cluster": "Amsterdam%2F..%2Fother"}, "cannot name an HDF5 group"),
    ({"station": "501", "cluster": "Ams%0Aterdam"}, "cannot name an HDF5 group"),
])
def test_metadata_that_contradicts_the_key_or_breaks_a_group_name_is_quarantined(
    bucket: Bucket, settings: Settings, metadata: dict[str, str], reason: str
) -> None:
    """docs/SECURITY.md R10: only the upload writes incoming/, and it never does this."""
    with pytest.raises(BadOrigin, match=reason):
        object_origin("incoming/501/a.pickle", metadata, lambda number: None)
    key = put_batch(bucket, samples.batch(3, dt.datetime(2024, 6, 1), random.Random(3)))
    stored = bucket.get(key)
    bucket.put(key, stored.body, {**stored.metadata, **metadata})
    result = process_keys([key], bucket, settings, retry=FAST)
    assert result.ok and list(result.quarantined) == [key]
    assert reason in result.quarantined[key]
    assert keys_under(bucket, "failed/") == [failed_key(key)]
    assert not list(settings.data_dir.rglob("*.h5"))


def test_running_out_of_memory_while_decoding_leaves_the_object_for_a_later_try(
    bucket: Bucket, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory is the writer's trouble, not the batch's: no quarantine, a 5xx, then a retry."""
    (a, b, _), _ = three_batches(bucket)
    from hisparc_datastore.format import origin as writer

    real = writer.decode_batch
    big = bucket.get(a).body

    def short_of_memory(body: bytes) -> list[dict[str, Any]]:
        if body == big:
            raise MemoryError
        return real(body)

    monkeypatch.setattr(writer, "decode_batch", short_of_memory)
    result = process_keys([a, b], bucket, settings, retry=FAST)
    assert not result.ok and result.archived == [b] and not result.quarantined
    assert list(result.failed) == [a] and "memory" in result.failed[a]
    assert keys_under(bucket, "failed/") == [] and a in keys_under(bucket, "incoming/")

    monkeypatch.setattr(writer, "decode_batch", real)
    again = process_keys([a], bucket, settings, retry=FAST)
    assert again.ok and again.archived == [a]


def test_rows_one_object_cannot_write_quarantine_only_that_object(
    bucket: Bucket, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, _ = three_batches(bucket)
    rng = random.Random(77)
    marked = samples.batch(20, dt.datetime(2024, 6, 1, 10, 30, 0, 424_242), rng,
                           kinds=("CIC", "SIN"), traces=False)
    b = put_batch(bucket, marked)
    from hisparc_datastore.format import rows

    real = rows.build_rows

    def poisoned(events: Any, *, context: Any = "") -> Any:
        if any(item.event["header"]["datetime"].microsecond == 424_242 for item in events):
            raise TypeError("cannot build these rows")
        return real(events, context=context)

    monkeypatch.setattr(rows, "build_rows", poisoned)
    result = sweep(bucket, settings, retry=FAST)

    assert result.ok and sorted(result.archived) == sorted(good) and result.rows == 60
    assert list(result.quarantined) == [b]
    assert result.quarantined[b].startswith("write failed: TypeError")
    assert sum(row_counts(settings.data_dir).values()) == 60
    assert_event_ids_sequential(settings.data_dir)


def test_day_file_that_needs_an_operator_keeps_objects_waiting(
    bucket: Bucket, settings: Settings
) -> None:
    import h5py

    (a, _, _), _ = three_batches(bucket)
    path = day_file_path(settings.data_dir, dt.date(2024, 6, 1))
    path.parent.mkdir(parents=True)
    with h5py.File(path, "w") as h5:  # a table that is not what the writer would write
        h5.create_dataset(f"{STATION_PATH}/events", data=np.zeros(3), maxshape=(None,))

    result = process_keys([a], bucket, settings, retry=FAST)

    assert result.ok and list(result.deferred) == [a] and not result.quarantined
    assert "differs from the schema" in result.deferred[a].reason
    assert a in keys_under(bucket, "incoming/")


@pytest.mark.parametrize("damage", ["directory", "garbage", "truncated"])
def test_a_broken_day_file_defers_then_quarantines_with_its_reason(
    bucket: Bucket, settings: Settings, damage: str
) -> None:
    """Bounded: after Backoff.attempts failed attempts its objects go to failed/."""
    (a, b, _), _ = three_batches(bucket)
    path = day_file_path(settings.data_dir, dt.date(2024, 6, 1))
    path.parent.mkdir(parents=True)
    if damage == "directory":
        path.mkdir()
    elif damage == "garbage":
        path.write_bytes(b"not hdf5 at all" * 100)
    else:
        other = path.with_name("whole.h5")
        process_keys([a], bucket, settings, retry=FAST)  # a real file, written once
        path.rename(other)
        path.write_bytes(other.read_bytes()[: other.stat().st_size // 2])
        a = put_batch(bucket, samples.batch(
            20, dt.datetime(2024, 6, 1, 10, 0, 7), random.Random(3), traces=False))
    policy = Backoff(first=0.0, longest=0.0, attempts=3)

    outcomes = []
    for _ in range(3):
        result = process_keys([a, b], bucket, settings, retry=FAST, backoff=policy)
        assert result.ok, result.summary()
        outcomes.append((sorted(result.deferred), sorted(result.quarantined)))
    assert outcomes[0] == (sorted([a, b]), []) and outcomes[1] == (sorted([a, b]), [])
    assert outcomes[2] == ([], sorted([a, b]))
    reason = bucket.get(failed_key(a)).metadata["failure-reason"]
    assert reason.startswith("day file unusable after 3 attempts: 2024_6_1.h5")
    waiting = keys_under(bucket, "incoming/")
    assert a not in waiting and b not in waiting  # nothing lost: both in failed/
    assert {failed_key(a), failed_key(b)} <= set(keys_under(bucket, "failed/"))


def test_large_objects_are_archived_by_server_side_copy(
    bucket: Bucket, settings: Settings
) -> None:
    from hisparc_datastore.writer.pipeline import ARCHIVE_PUT_BYTES

    rng = random.Random(21)
    events = samples.batch(60, dt.datetime(2024, 2, 29, 23, 59, 50), rng, kinds=("CIC",))
    key = put_batch(bucket, events)
    original = bucket.get(key)
    assert len(original.body) > ARCHIVE_PUT_BYTES

    result = process_keys([key], bucket, settings, retry=FAST)

    assert result.archived == [key] and result.rows == 60
    archived = bucket.get(archive_key(key, RECEIVED))
    assert archived.body == original.body and archived.metadata == original.metadata
    assert keys_under(bucket, "incoming/") == []


def test_a_station_number_beyond_uint32_is_bad_metadata() -> None:
    from hisparc_datastore.stations import MAX_STATION

    with pytest.raises(BadOrigin, match="larger than"):
        object_origin("incoming/x.pickle", {"station": str(MAX_STATION + 1),
                                            "cluster": "Amsterdam"}, lambda number: None)


_MAPPED_BLOCKS_PROBE = """
import ctypes, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "writer":
    from hisparc_datastore.writer import pipeline
    assert pipeline.keep_large_blocks_mapped() and pipeline.keep_large_blocks_mapped()
large = bytearray(4 << 20)  # mapped, and freed: glibc would now raise its threshold
del large
before = libc.mallinfo2().hblks
block = bytearray(1 << 20)
print(libc.mallinfo2().hblks - before)
"""


def _mapped_blocks_after_a_large_free(mode: str) -> int:
    answer = subprocess.run([sys.executable, "-c", _MAPPED_BLOCKS_PROBE, mode],
                            capture_output=True, text=True, check=True)
    return int(answer.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_writer_keeps_large_blocks_mapped_after_a_large_batch() -> None:
    """After a large block is freed, a 1 MiB block is still mapped of its own in the
    writer (so freeing it hands its pages back), where glibc alone would put it on the
    heap: the fix behind bench/memory.py's catch-up figure (docs/PERFORMANCE.md)."""
    assert _mapped_blocks_after_a_large_free("plain") == 0
    assert _mapped_blocks_after_a_large_free("writer") == 1
