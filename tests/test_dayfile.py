"""The day files, read back with PyTables: layout, attributes, values, exactly-once, repair,
locking.

Every read-back happens with warnings turned into errors, so a node PyTables does not
recognise natively (it would warn and fall back) fails the test.
"""

from __future__ import annotations

import base64
import calendar
import multiprocessing
import os
import random
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import tables
from hisparc_datastore_dev import samples

from hisparc_datastore.format.rows import BatchPart, build_rows, build_table_rows, check_events
from hisparc_datastore.format.schema import EVENT_TYPES, TABLES
from hisparc_datastore.storage import dayfile
from hisparc_datastore.storage.dayfile import (
    AppendReport,
    DayFile,
    DayFileError,
    DayFileLocked,
    day_file_path,
    ledger,
)
from hisparc_datastore.storage.dayfile import dayfile as dayfile_module

DAY = date(2024, 5, 1)
START = datetime(2024, 5, 1, 10, 0, 0)
ALL_TYPES = sorted(EVENT_TYPES)


def part(key: str, events: list[dict], station: int = 501, cluster: str = "Amsterdam",
         etag: str = '"0123456789abcdef"') -> BatchPart:
    checked, _ = check_events(events)
    return BatchPart(key=key, etag=etag, station=station, cluster=cluster, events=checked)


def make_events(n: int, seed: Any, kinds: list[str] | None = None,
                start: datetime = START) -> list[dict]:
    return samples.batch(n, start, random.Random(repr(seed)), kinds=kinds or ["CIC"])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return day_file_path(tmp_path / "data", DAY)


@contextmanager
def pytables(path: Path) -> Iterator[tables.File]:
    """Open read-only like a reader does; any PyTables warning is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = tables.open_file(str(path), "r")
        try:
            for _ in handle.walk_nodes("/"):
                pass
            yield handle
        finally:
            handle.close()


def append(path: Path, parts: list[BatchPart]) -> AppendReport:
    with DayFile(path) as day_file:
        return day_file.write(parts)


def station(handle: tables.File, cluster: str = "amsterdam", number: int = 501) -> Any:
    return handle.get_node(f"/hisparc/cluster_{cluster}/station_{number}")


def assert_nrows_consistent(path: Path) -> None:
    with h5py.File(path, "r") as h5file:
        def check(name: str, node: Any) -> None:
            if isinstance(node, h5py.Dataset) and "NROWS" in node.attrs:
                assert int(node.attrs["NROWS"]) == node.shape[0], name
        h5file.visititems(check)


def expected_rows(parts: list[BatchPart], table: str) -> tuple[np.ndarray, list[bytes]]:
    """What one station's table and blobs should hold after appending ``parts`` in order."""
    rows_list, blobs = [], []
    for p in parts:
        built = build_rows(p.events)
        if table in built:
            rows_list.append(built[table].rows_with_blob_offset(len(blobs)))
        blobs.extend(built.blobs)
    rows = np.concatenate(rows_list)
    rows["event_id"] = np.arange(1, len(rows) + 1)
    return rows, blobs


# -- paths -----------------------------------------------------------------------------------

def test_day_file_path_has_no_zero_padding(tmp_path: Path) -> None:
    assert day_file_path(tmp_path, date(2017, 2, 26)) == tmp_path / "2017/2/2017_2_26.h5"
    assert day_file_path(tmp_path, date(2024, 12, 1)) == tmp_path / "2024/12/2024_12_1.h5"


def test_directories_are_created_0755(path: Path) -> None:
    old = os.umask(0o022)
    try:
        append(path, [part("k1", make_events(1, 1))])
    finally:
        os.umask(old)
    for folder in (path.parent, path.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755


# -- layout and attributes -------------------------------------------------------------------

def test_every_type_opens_natively_in_pytables(path: Path) -> None:
    events = samples.batch(28, START, random.Random(3), kinds=ALL_TYPES)
    report = append(path, [part("incoming/501/a.pickle", events)])
    assert report.written == ["incoming/501/a.pickle"]
    assert report.rows == {f"cluster_amsterdam/station_501/{t}": 2 for t in TABLES}
    with pytables(path) as handle:
        assert handle.root._v_attrs.PYTABLES_FORMAT_VERSION == "2.1"
        assert handle.root.hisparc._v_title == "HiSPARC data"
        cluster = handle.root.hisparc.cluster_amsterdam
        assert isinstance(cluster, tables.Group)
        assert cluster._v_title == "HiSPARC cluster Amsterdam data"
        node = station(handle)
        assert node._v_title == "HiSPARC station 501 data"
        assert sorted(node._v_children) == sorted([*TABLES, "blobs"])
        for name, event_type in TABLES.items():
            table = node._f_get_child(name)
            assert isinstance(table, tables.Table), name
            assert table.title == event_type.title
            assert table.dtype == event_type.dtype
            assert table.colnames == [c.name for c in event_type.columns]
            assert table.nrows == 2
            for column in event_type.columns:
                assert table.coldflts[column.name] == column.fill, (name, column.name)
            assert table.filters.complib is None or table.filters.complevel == 0
        blobs = node.blobs
        assert isinstance(blobs, tables.VLArray)
        assert isinstance(blobs.atom, tables.VLStringAtom)
        assert blobs.title == "HiSPARC binary data"
        assert all(type(blob) is bytes for blob in blobs.read())
        assert not any(n._v_pathname.startswith("/hisparc/_") for n in handle.walk_nodes("/"))
    assert_nrows_consistent(path)


def test_ptdump_shows_no_warnings(path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tables.scripts import ptdump

    append(path, [part("k", samples.batch(14, START, random.Random(5), kinds=ALL_TYPES))])
    monkeypatch.setattr("sys.argv", ["ptdump", "-av", str(path)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ptdump.main()
    out = capsys.readouterr().out
    assert "/hisparc/cluster_amsterdam/station_501/events (Table(" in out
    assert "/hisparc/cluster_amsterdam/station_501/blobs (VLArray(" in out
    assert "UnImplemented" not in out and "Warning" not in out


def _attribute_signature(node: Any) -> dict[str, tuple]:
    signature = {}
    for name in node.attrs:
        attr = node.attrs.get_id(name)
        kind = attr.get_type()
        described: tuple = (kind.get_class(), kind.get_size(),
                            attr.get_space().get_simple_extent_type())
        if kind.get_class() == h5py.h5t.STRING:
            described += (kind.get_strpad(), kind.get_cset())
        value = node.attrs[name]
        signature[name] = (*described, repr(value))
    return signature


def test_nodes_are_byte_for_byte_what_pytables_writes(path: Path, tmp_path: Path) -> None:
    """Same HDF5 types, attributes (with their HDF5 types), chunks and fills as PyTables."""
    events = samples.batch(14, START, random.Random(4), kinds=ALL_TYPES)
    append(path, [part("k", events)])
    reference = tmp_path / "pytables.h5"
    with tables.open_file(str(reference), "w") as handle:
        hisparc = handle.create_group("/", "hisparc", "HiSPARC data")
        cluster = handle.create_group(
            hisparc, "cluster_amsterdam", "HiSPARC cluster Amsterdam data"
        )
        group = handle.create_group(cluster, "station_501", "HiSPARC station 501 data")
        for name, event_type in TABLES.items():
            description = {
                c.name: tables.Col.from_dtype(np.dtype((c.np_dtype, c.shape)), dflt=c.fill, pos=i)
                for i, c in enumerate(event_type.columns)
            }
            handle.create_table(group, name, description, event_type.title)
        handle.create_vlarray(group, "blobs", tables.VLStringAtom(), "HiSPARC binary data")
    station_path = "hisparc/cluster_amsterdam/station_501"
    with h5py.File(path, "r") as ours, h5py.File(reference, "r") as theirs:
        for node in ("/", "hisparc", "hisparc/cluster_amsterdam", station_path):
            assert _attribute_signature(ours[node]) == _attribute_signature(theirs[node]), node
        for name in TABLES:
            mine, ref = ours[f"{station_path}/{name}"], theirs[f"{station_path}/{name}"]
            assert mine.id.get_type() == ref.id.get_type(), name
            assert mine.chunks == ref.chunks and mine.maxshape == (None,)
            assert mine.compression is None
            assert mine.fillvalue.tobytes() == ref.fillvalue.tobytes(), name
            a, b = _attribute_signature(mine), _attribute_signature(ref)
            a["NROWS"] = b["NROWS"] = None
            assert a == b, name
        mine, ref = ours[f"{station_path}/blobs"], theirs[f"{station_path}/blobs"]
        assert mine.id.get_type() == ref.id.get_type()
        assert mine.maxshape == (None,) and mine.compression is None
        assert _attribute_signature(mine) == _attribute_signature(ref)


# -- values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ALL_TYPES)
def test_values_read_back_exactly(path: Path, code: str) -> None:
    first = part("k1", make_events(7, (code, 1), [code]))
    second = part("k2", make_events(5, (code, 2), [code], START + timedelta(hours=1)))
    append(path, [first])
    append(path, [second])
    table_name = EVENT_TYPES[code].table
    expected, expected_blobs = expected_rows([first, second], table_name)
    with pytables(path) as handle:
        table = station(handle)._f_get_child(table_name)
        got = table.read()
        assert got.dtype == EVENT_TYPES[code].dtype
        assert got.tobytes() == expected.tobytes()
        assert got["event_id"].tolist() == list(range(1, 13))
        blobs = station(handle).blobs.read()
        assert blobs == expected_blobs


def test_traces_decompress_to_the_original_samples(path: Path) -> None:
    events = make_events(20, "traces")
    append(path, [part("k", events)])
    with pytables(path) as handle:
        rows = station(handle).events.read()
        blobs = station(handle).blobs
        for row, ev in zip(rows, events, strict=True):
            header = ev["header"]
            assert row["timestamp"] == calendar.timegm(header["datetime"].utctimetuple())
            assert int(row["ext_timestamp"]) == (
                int(row["timestamp"]) * 10**9 + header["nanoseconds"]
            )
            sent = {i["data_uploadcode"]: i["data"] for i in ev["datalist"]}
            for channel in range(4):
                index = int(row["traces"][channel])
                stored = zlib.decompress(blobs[index]).decode().split(",")
                original = zlib.decompress(base64.b64decode(sent[f"TR{channel + 1}"]))
                assert stored == original.decode().split(",")
                assert [int(v) for v in stored] == samples.decode_trace(sent[f"TR{channel + 1}"])
                assert row["pulseheights"][channel] == sent[f"PH{channel + 1}"]


def test_absent_codes_read_back_as_fills(path: Path) -> None:
    events = [{
        "header": {"eventtype_uploadcode": code, "datetime": START, "nanoseconds": 5},
        "datalist": [],
    } for code in ALL_TYPES]
    append(path, [part("k", events)])
    with pytables(path) as handle:
        for name, event_type in TABLES.items():
            row = station(handle)._f_get_child(name)[0]
            for column in event_type.columns[2:]:
                if column.name in ("nanoseconds", "ext_timestamp"):
                    continue
                assert np.all(row[column.name] == column.fill), (name, column.name)
        assert station(handle).blobs.nrows == 0


def test_blob_bytes_survive_exactly(path: Path) -> None:
    messages = ["", "caf\xe9", "\x00\x01\xff", "x" * 100_000, "same", "same"]
    events = [{
        "header": {"eventtype_uploadcode": "ERR", "datetime": START, "nanoseconds": 0},
        "datalist": [{"data_uploadcode": "ERRMSG", "data": text}],
    } for text in messages]
    append(path, [part("k", events)])
    with pytables(path) as handle:
        assert station(handle).blobs.read() == [m.encode("latin-1") for m in messages]
        assert station(handle).errors.col("messages").tolist() == list(range(6))


# -- event ids, blobs offsets, reopen, many parts ------------------------------------------------

def test_event_ids_and_blob_indices_continue_across_appends_and_reopens(path: Path) -> None:
    parts = [part(f"k{i}", make_events(3, i, ["CIC", "ERR", "SIN"])) for i in range(4)]
    append(path, parts[:1])
    with DayFile(path) as day_file:
        day_file.write(parts[1:2])
        day_file.write(parts[2:3])
    append(path, parts[3:])
    for table in ("events", "errors", "singles"):
        expected, expected_blobs = expected_rows(parts, table)
        with pytables(path) as handle:
            got = station(handle)._f_get_child(table).read()
            assert got.tobytes() == expected.tobytes(), table
            assert station(handle).blobs.read() == expected_blobs
    assert_nrows_consistent(path)


def test_thousands_of_one_event_objects_in_one_append(path: Path) -> None:
    rng = random.Random(11)
    parts = []
    for i in range(2000):
        when = START + timedelta(seconds=i)
        kind = "CIC" if i % 2 else "SIN"
        ev = samples.cic_event(when, rng, samples=64) if kind == "CIC" else (
            samples.event_of_type("SIN", when, rng))
        parts.append(part(f"incoming/{600 + i % 3}/{i:032x}.pickle", [ev], station=600 + i % 3,
                          cluster="Leiden"))
    report = append(path, parts)
    assert len(report.written) == 2000 and not report.skipped_duplicates
    assert sum(report.rows.values()) == 2000
    with pytables(path) as handle:
        for number in (600, 601, 602):
            mine = [p for p in parts if p.station == number]
            node = station(handle, "leiden", number)
            for table in ("events", "singles"):
                expected, expected_blobs = expected_rows(mine, table)
                assert node._f_get_child(table).read().tobytes() == expected.tobytes()
            assert node.blobs.read() == expected_blobs
        keys = handle.root._datastore.keys.read()
        assert len(keys) == 2000 and set(keys["state"].tolist()) == {ledger.COMMITTED}
        assert keys["key"].tolist() == [p.key.encode() for p in parts]
        ranges = handle.root._datastore.ranges.read()
        by_key = {}
        for r in ranges:
            by_key.setdefault(int(r["key_row"]), []).append(r)
        assert len(by_key) == 2000
    assert_nrows_consistent(path)


def test_ledger_ranges_point_at_each_objects_rows(path: Path) -> None:
    one = part("incoming/501/one.pickle", make_events(3, "a", ["CIC", "ERR"]))
    two = part("incoming/502/two.pickle", make_events(4, "b", ["CIC"]), station=502)
    append(path, [one, two])
    with pytables(path) as handle:
        keys = handle.root._datastore.keys.read()
        ranges = handle.root._datastore.ranges.read()
    assert keys["key"].tolist() == [b"incoming/501/one.pickle", b"incoming/502/two.pickle"]
    assert keys["events"].tolist() == [3, 4]
    assert keys["etag"].tolist() == [b'"0123456789abcdef"'] * 2
    found = {(int(r["key_row"]), r["node"].decode()): (int(r["start"]), int(r["count"]))
             for r in ranges}
    assert found == {
        (0, "cluster_amsterdam/station_501/events"): (0, 2),
        (0, "cluster_amsterdam/station_501/errors"): (0, 1),
        (0, "cluster_amsterdam/station_501/blobs"): (0, 9),
        (1, "cluster_amsterdam/station_502/events"): (0, 4),
        (1, "cluster_amsterdam/station_502/blobs"): (0, 16),
    }


# -- exactly once ------------------------------------------------------------------------------

def test_committed_keys_are_skipped(path: Path) -> None:
    first = part("incoming/501/x.pickle", make_events(5, 1))
    report = append(path, [first])
    assert report.written == [first.key] and report.events == {first.key: 5}
    with DayFile(path) as day_file:
        assert day_file.ingested(first.key)
        assert not day_file.ingested("incoming/501/other.pickle")
        again = day_file.write([first, part("incoming/501/y.pickle", make_events(2, 2)),
                                 part("incoming/501/y.pickle", make_events(2, 2))])
    assert again.written == ["incoming/501/y.pickle"]
    assert again.skipped_duplicates == [first.key, "incoming/501/y.pickle"]
    with pytables(path) as handle:
        assert station(handle).events.nrows == 7
    assert append(path, [first]).skipped_duplicates == [first.key]


def test_an_object_whose_events_are_all_skipped_is_still_ingested(path: Path) -> None:
    bad = [{"header": {"eventtype_uploadcode": "CIC", "datetime": START, "nanoseconds": 1},
            "datalist": [{"data_uploadcode": "PH1", "data": "nope"}]}]
    report = append(path, [part("bad", bad)])
    assert report.written == ["bad"] and report.rows == {}
    assert report.skipped_events.total == 1
    with DayFile(path) as day_file:
        assert day_file.ingested("bad")
    with pytables(path) as handle:
        assert "cluster_amsterdam" not in handle.root.hisparc


# -- crash safety ------------------------------------------------------------------------------

def _snapshot(path: Path) -> dict[str, Any]:
    """Every dataset's contents under /hisparc and the committed ledger."""
    found: dict[str, Any] = {}
    with pytables(path) as handle:
        for node in handle.walk_nodes("/hisparc"):
            if isinstance(node, tables.Table):
                found[node._v_pathname] = node.read().tobytes()
            elif isinstance(node, tables.VLArray):
                found[node._v_pathname] = node.read()
            else:
                found[node._v_pathname] = "group"
        found["keys"] = handle.root._datastore.keys.read().tobytes()
        found["ranges"] = handle.root._datastore.ranges.read().tobytes()
    return found


@pytest.mark.parametrize("stage", ["intent", "created", "data"])
def test_unfinished_append_is_rolled_back_on_open(path: Path, stage: str) -> None:
    before = [part("k0", make_events(4, 0, ["CIC", "ERR"]))]
    append(path, before)
    snapshot = _snapshot(path)
    crashed = [
        part("k1", make_events(3, 1, ["CIC", "CFG"])),  # new rows in an existing table
        part("k2", make_events(2, 2, ["WTR"]), station=7001, cluster="Leiden"),  # new groups
    ]
    write_then_die(path, crashed, stage)
    # The half-done state must still be a file PyTables opens without complaint.
    with pytables(path) as handle:
        assert handle.root._datastore.intent.nrows > 0
    assert_nrows_consistent(path)

    with DayFile(path) as day_file:
        assert not day_file.ingested("k1") and not day_file.ingested("k2")
    assert _snapshot(path) == snapshot
    with pytables(path) as handle:
        assert handle.root._datastore.intent.nrows == 0
        assert "cluster_leiden" not in handle.root.hisparc
        assert "config" not in station(handle)

    report = append(path, crashed)
    assert report.written == ["k1", "k2"]
    with pytables(path) as handle:
        for table in ("events", "config", "errors"):
            expected, expected_blobs = expected_rows(before + crashed[:1], table)
            assert station(handle)._f_get_child(table).read().tobytes() == expected.tobytes()
        assert station(handle).blobs.read() == expected_blobs
        assert station(handle, "leiden", 7001).weather.nrows == 2
    assert_nrows_consistent(path)


def test_a_commit_cut_short_after_emptying_the_intent_counts_as_committed(path: Path) -> None:
    append(path, [part("k0", make_events(2, 0))])
    write_then_die(path, [part("k1", make_events(3, 1))], "data")
    with h5py.File(path, "r+") as h5file:  # the intent's truncation reached disk, state did not
        intent = h5file["_datastore/intent"]
        intent.resize((0,))
        intent.attrs["NROWS"] = np.int64(0)
    with DayFile(path) as day_file:
        assert day_file.ingested("k1")
        assert day_file.write([part("k1", make_events(3, 1))]).skipped_duplicates == ["k1"]
    with pytables(path) as handle:
        assert handle.root._datastore.keys.col("state").tolist() == [1, 1]
        assert station(handle).events.read()["event_id"].tolist() == [1, 2, 3, 4, 5]


def test_failed_append_rolls_back_at_once(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    append(path, [part("k0", make_events(2, 0))])
    snapshot = _snapshot(path)

    real = dayfile_module.append_rows

    def broken(dataset: Any, rows: Any) -> int:
        if dataset.name.endswith("/events"):  # blobs and other tables are written by now
            raise OSError("disk full")
        return real(dataset, rows)

    new_parts = [part("k1", make_events(2, 1, ["ERR", "CIC"])),
                 part("k2", make_events(1, 2, ["SIN"]), station=502)]
    with DayFile(path) as day_file:
        monkeypatch.setattr(dayfile_module, "append_rows", broken)
        with pytest.raises(OSError, match="disk full"):
            day_file.write(new_parts)
        monkeypatch.undo()
        assert not day_file.ingested("k1")
    assert _snapshot(path) == snapshot
    assert_nrows_consistent(path)
    with DayFile(path) as day_file:
        assert day_file.write(new_parts).written == ["k1", "k2"]
    with pytables(path) as handle:
        assert station(handle).events.nrows == 3
        assert station(handle).errors.nrows == 1
        assert station(handle, number=502).singles.nrows == 1


#: An append dies after its step ``stage``: the step that would come next kills it.
NEXT_STEP = {"intent": "_create_nodes", "created": "_write_data", "data": "_commit"}


def _write_then_die(path: str, parts: list[BatchPart], stage: str) -> None:
    """In a forked child: flush what the append has done by ``stage``, then die holding
    the file open (no close, no unlock, no rollback), as a SIGKILL there would."""

    def die(self: DayFile, *args: Any) -> None:
        self.file.flush()
        os._exit(0)

    setattr(DayFile, NEXT_STEP[stage], die)
    with DayFile(Path(path)) as day_file:
        day_file.write(parts)


def write_then_die(path: Path, parts: list[BatchPart], stage: str) -> None:
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_write_then_die, args=(str(path), parts, stage))
    child.start()
    child.join(60)
    assert child.exitcode == 0


def _crash_in_child(path: str, key: str, stage: str) -> None:
    _write_then_die(path, [part(key, make_events(3, key))], stage)


@pytest.mark.parametrize("stage", ["created", "data"])
def test_a_killed_writer_leaves_a_file_that_repairs(path: Path, stage: str) -> None:
    append(path, [part("k0", make_events(2, 0))])
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_crash_in_child, args=(str(path), "k1", stage))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    with pytables(path) as handle:
        assert station(handle).events.nrows in (2, 5)
    report = append(path, [part("k1", make_events(3, "k1"))])
    assert report.written == ["k1"]
    with pytables(path) as handle:
        assert station(handle).events.read()["event_id"].tolist() == [1, 2, 3, 4, 5]
        assert handle.root._datastore.keys.nrows == 2
    assert_nrows_consistent(path)


def _forge_killed_blob_append(path: Path, clear: bool = True) -> None:
    """What a writer killed mid-append can leave: past the extent, blob references into a
    heap collection that never reached the disk, and its intent."""
    with h5py.File(path, "r+") as h5file:
        blobs = h5file["hisparc/cluster_amsterdam/station_501/blobs"]
        length = blobs.shape[0]
        mask, raw = blobs.id.read_direct_chunk((0,))
        bogus = struct.pack("<IQI", 1200, 2**40, 7)  # length, heap address, object index
        kept = length * len(bogus)
        blobs.id.write_direct_chunk((0,), raw[:kept] + bogus * (len(raw) // 16 - length), mask)
        intent = h5file["_datastore/intent"]
        intent.resize((1,))
        row = np.zeros(1, dtype=ledger.INTENT_DTYPE)
        row[0] = (9, blobs.name.encode(), length, length + 8, 0)
        intent[0:1] = row
        intent.attrs["NROWS"] = np.int64(1)


def test_repair_clears_heap_references_of_a_killed_append(path: Path) -> None:
    append(path, [part("k0", make_events(1, 0))])
    _forge_killed_blob_append(path)
    # Without the repair's clearing, HDF5 chases the stale references ("bad heap index").
    report = append(path, [part("k1", make_events(2, 1))])
    assert report.written == ["k1"]
    expected, expected_blobs = expected_rows(
        [part("k0", make_events(1, 0)), part("k1", make_events(2, 1))], "events"
    )
    with pytables(path) as handle:
        assert station(handle).events.read().tobytes() == expected.tobytes()
        assert station(handle).blobs.read() == expected_blobs


def test_incomplete_ledger_is_rebuilt(path: Path) -> None:
    append(path, [part("k0", make_events(1, 0))])
    with h5py.File(path, "r+") as h5file:
        del h5file["_datastore/ranges"]
    with DayFile(path) as day_file:
        assert not day_file.ingested("k0")  # the ledger was unusable: start afresh
    with pytables(path) as handle:
        assert handle.root._datastore.keys.nrows == 0


# -- files from elsewhere ------------------------------------------------------------------------

def test_appends_to_a_file_the_reference_wrote(path: Path) -> None:
    """A PyTables file without a ledger, with the reference's Time32 timestamps: rows
    continue after the existing ones and read back the same."""
    old = make_events(3, "old")
    built = build_table_rows(old)
    path.parent.mkdir(parents=True)
    with tables.open_file(str(path), "w") as handle:
        group = handle.create_group("/", "hisparc", "HiSPARC data")
        group = handle.create_group(group, "cluster_amsterdam", "HiSPARC cluster Amsterdam data")
        group = handle.create_group(group, "station_501", "HiSPARC station 501 data")
        event_type = TABLES["events"]
        description = {
            c.name: tables.Col.from_dtype(np.dtype((c.np_dtype, c.shape)), dflt=c.fill, pos=i)
            for i, c in enumerate(event_type.columns)
        }
        description["timestamp"] = tables.Time32Col(pos=1)
        table = handle.create_table(group, "events", description, event_type.title)
        rows = built["events"].rows.copy()
        rows["event_id"] = [1, 2, 3]
        table.append(rows)
        blobs = handle.create_vlarray(group, "blobs", tables.VLStringAtom(), "HiSPARC binary data")
        for blob in built.blobs:
            blobs.append(blob)
    new = part("k", make_events(2, "new", start=START + timedelta(hours=2)))
    append(path, [new])
    expected, expected_blobs = expected_rows([part("old", old), new], "events")
    with pytables(path) as handle:
        got = station(handle).events.read()
        assert station(handle).events.coltypes["timestamp"] == "time32"
        assert got["event_id"].tolist() == [1, 2, 3, 4, 5]
        assert got["traces"][3].tolist() == [12, 13, 14, 15]
        assert got.tobytes() == expected.tobytes()
        assert station(handle).blobs.read() == expected_blobs


def test_a_table_with_other_columns_is_refused(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with tables.open_file(str(path), "w") as handle:
        group = handle.create_group("/", "hisparc", "HiSPARC data")
        group = handle.create_group(group, "cluster_amsterdam", "x")
        group = handle.create_group(group, "station_501", "x")
        handle.create_table(group, "errors", {"event_id": tables.UInt32Col(pos=0),
                                              "other": tables.Int8Col(pos=1)}, "old")
    with DayFile(path) as day_file, pytest.raises(DayFileError, match="errors"):
        day_file.write([part("k", make_events(1, 1, ["ERR"]))])
    with pytables(path) as handle:
        assert handle.root._datastore.intent.nrows == 0
        assert handle.root._datastore.keys.nrows == 0


# -- locking -----------------------------------------------------------------------------------

def test_second_thread_waits_or_times_out(path: Path) -> None:
    result: dict[str, Any] = {}
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with DayFile(path):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    try:
        with pytest.raises(DayFileLocked), DayFile(path, lock_timeout=0.05):
            pass

        def wait_for_it() -> None:
            with DayFile(path) as day_file:
                result["report"] = day_file.write([part("k", make_events(1, 1))])

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
    finally:
        release.set()
        holder.join(30)
    waiter.join(30)
    assert result["report"].written == ["k"]


def _hold_lock(path: str, holding: Any, release: Any) -> None:
    with DayFile(Path(path)):
        holding.set()
        release.wait(60)


def test_another_process_holding_the_file_times_out(path: Path) -> None:
    context = multiprocessing.get_context("fork")
    holding, release = context.Event(), context.Event()
    child = context.Process(target=_hold_lock, args=(str(path), holding, release))
    child.start()
    try:
        assert holding.wait(60)
        with pytest.raises(DayFileLocked, match="locked"), DayFile(path, lock_timeout=0.05):
            pass
    finally:
        release.set()
        child.join(60)
    with DayFile(path, lock_timeout=60) as day_file:
        assert day_file.write([part("k", make_events(1, 1))]).written == ["k"]


def _append_many(path: str, prefix: str, count: int) -> None:
    for number in range(count):
        events = make_events(2, (prefix, number), ["CIC", "SIN"])
        with DayFile(Path(path), lock_timeout=120) as day_file:
            day_file.write([part(f"{prefix}/{number}", events)])


def test_two_processes_append_to_one_file(path: Path) -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), prefix, 15))
               for prefix in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    with pytables(path) as handle:
        keys = handle.root._datastore.keys.read()
        assert sorted(keys["key"].tolist()) == sorted(
            f"{p}/{n}".encode() for p in "ab" for n in range(15)
        )
        events = station(handle).events.read()
        singles = station(handle).singles.read()
        assert events["event_id"].tolist() == list(range(1, 31))
        assert singles["event_id"].tolist() == list(range(1, 31))
        blobs = station(handle).blobs.read()
        assert len(blobs) == 120
        assert sorted(events["traces"].ravel().tolist()) == list(range(120))
        stored = sorted(
            (int(row["ext_timestamp"]), row["pulseheights"].tolist(),
             [blobs[i] for i in row["traces"]])
            for row in events
        )
    expected = []
    for prefix in "ab":
        for number in range(15):
            built = build_table_rows(make_events(2, (prefix, number), ["CIC", "SIN"]))
            for row in built["events"].rows:
                expected.append((int(row["ext_timestamp"]), row["pulseheights"].tolist(),
                                 [built.blobs[i] for i in row["traces"]]))
    assert stored == sorted(expected)
    assert_nrows_consistent(path)


# -- readers, long keys, the volume ----------------------------------------------------------

READER = """\
import sys, time, tables
path, seconds = sys.argv[1], float(sys.argv[2])
h5 = tables.open_file(path, "r")
print("open", flush=True)
time.sleep(seconds)
h5.close()
"""


@contextmanager
def reader_holding(path: Path, seconds: float = 60.0) -> Iterator[Any]:
    """A PyTables reader in another process, holding ``path`` open."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", READER, str(path), str(seconds)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "open"
        yield process
    finally:
        process.kill()
        process.wait(10)


def test_a_reader_holding_the_file_makes_it_busy_at_once(path: Path) -> None:
    """HDF5's own lock: the writer is told at once (no retry loop), nothing is changed."""
    append(path, [part("first", make_events(2, 1))])
    assert not dayfile.held_open(path)
    with reader_holding(path):
        assert dayfile.held_open(path)
        started = time_now()
        with pytest.raises(dayfile.DayFileBusy, match="held open"), DayFile(path):
            pass
        assert time_now() - started < 1.0  # no lock wait: the reader may hold it for hours
    assert not dayfile.held_open(path)
    assert append(path, [part("second", make_events(2, 2))]).written == ["second"]


def time_now() -> float:
    import time

    return time.monotonic()


def test_keys_longer_than_the_ledger_column_are_written_once(path: Path) -> None:
    long_key = "incoming/501/" + "x" * 400 + ".pickle"
    assert dayfile.ledger_entry(long_key).startswith(b"sha256:")
    assert dayfile.ledger_entry("incoming/501/a.pickle") == b"incoming/501/a.pickle"
    events = make_events(3, 9)
    assert append(path, [part(long_key, events)]).written == [long_key]
    assert append(path, [part(long_key, events)]).skipped_duplicates == [long_key]
    with DayFile(path) as day_file:
        assert day_file.ingested(long_key)


def test_volume_probe_and_failure_kinds(tmp_path: Path) -> None:
    import errno as errnos

    assert dayfile.probe_volume(tmp_path) is None
    assert not list(tmp_path.iterdir())  # the probe leaves nothing behind
    assert "not a directory" in str(dayfile.probe_volume(tmp_path / "missing"))
    full = dayfile.DayFileIOError(errnos.ENOSPC, "x.h5: disk full")
    assert dayfile.is_volume_failure(full)
    assert dayfile.is_volume_failure(RuntimeError("Can't write data (errno = 30, ...)"))
    assert not dayfile.is_volume_failure(IsADirectoryError(errnos.EISDIR, "a directory"))
    assert not dayfile.is_volume_failure(OSError("file signature not found"))


CONSISTENT = """\
import sys, time, tables
path, until = sys.argv[1], time.time() + float(sys.argv[2])
opened = refused = raced = inconsistent = 0
while time.time() < until:
    try:
        h5 = tables.open_file(path, "r")
    except tables.HDF5ExtError as exc:
        if "unable to lock file" in str(exc):
            refused += 1
        elif "truncated file" in str(exc):
            raced += 1  # HDF5 sized the file before it got the lock: reopen
        else:
            raise
        continue
    with h5:
        opened += 1
        keys = h5.root._datastore.keys.read()
        if h5.root._datastore.intent.nrows:
            inconsistent += 1
        for table in h5.walk_nodes("/hisparc", classname="Table"):
            ids = table.col("event_id").tolist()
            if ids != list(range(1, len(ids) + 1)):
                inconsistent += 1
        rows = sum(int(n) for n in keys["events"])
        tables_rows = sum(t.nrows for t in h5.walk_nodes("/hisparc", classname="Table"))
        if rows != tables_rows:
            inconsistent += 1
print(opened, refused, raced, inconsistent, flush=True)
"""


@pytest.mark.parametrize("pause", [0.0, 0.02], ids=["back-to-back", "every-20-ms"])
def test_readers_opening_during_appends_see_a_whole_file_or_a_clear_error(
    path: Path, pause: float
) -> None:
    """What HDF5's file locking gives PyTables readers: while the writer appends, an open
    fails at once with "unable to lock file"; rarely, when it starts just as an append
    ends, with "truncated file" (HDF5 takes the file's size before its lock); both are
    worth a retry.  Otherwise the reader sees only committed appends, every table's rows
    matching the ledger.  Appends back to back are the worst case (a sweep catching up);
    one every 20 ms is a busy live day."""
    import subprocess
    import sys
    import time

    append(path, [part("seed", make_events(2, "seed"))])
    reader = subprocess.Popen([sys.executable, "-c", CONSISTENT, str(path), "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    appended = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        try:
            with DayFile(path, lock_timeout=5) as day_file:
                day_file.write([part(f"k{appended}", make_events(5, appended,
                                                                   ["CIC", "SIN"]))])
            appended += 1
            time.sleep(pause)
        except dayfile.DayFileBusy:  # the reader had it open at that moment
            time.sleep(0.001)
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    opened, refused, raced, inconsistent = (int(x) for x in out.split())
    assert inconsistent == 0
    assert opened > 0 and appended > 0
    tries = opened + refused + raced
    print(f"\nreaders during appends ({pause * 1000:.0f} ms apart): {tries} opens: {opened} saw "
          f"whole appends, {refused} were told 'unable to lock file' ({refused / tries:.1%}), "
          f"{raced} 'truncated file' ({raced / tries:.2%}); {appended} appends in 4 s")
