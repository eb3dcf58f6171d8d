"""Events to rows: the semantics of docs/FORMAT.md (2.5 and 4), the skip rules, and the
blob order.

Besides hand-written cases, every event type from ``samples`` is checked against a
deliberately naive oracle: one row at a time, one item at a time, as the reference
writer does it.
"""

from __future__ import annotations

import base64
import calendar
import logging
import random
import zlib
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from hisparc_datastore_dev import samples
from hypothesis import given, settings
from hypothesis import strategies as st

from hisparc_datastore.format.rows import (
    BAD_HEADER,
    BAD_VALUE,
    BEFORE_MINIMUM_YEAR,
    NO_DATETIME,
    UNKNOWN_TYPE,
    build_table_rows,
    convert_values,
    split_by_day,
)
from hisparc_datastore.format.schema import EVENT_TYPES

WHEN = datetime(2024, 5, 1, 12, 30, 15, 250_000)
ALL_TYPES = sorted(EVENT_TYPES)


def event(code: str, when: Any = WHEN, items: list[tuple[Any, Any]] | None = None,
          nanoseconds: Any = 0) -> dict[str, Any]:
    return {
        "header": {"eventtype_uploadcode": code, "datetime": when, "nanoseconds": nanoseconds},
        "datalist": [{"data_uploadcode": c, "data": v} for c, v in items or []],
    }


def trace_text(samples_: list[int]) -> str:
    return base64.b64encode(zlib.compress(",".join(map(str, samples_)).encode())).decode()


def oracle(events: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], list[bytes]]:
    """The reference's algorithm in its plainest form (valid events only)."""
    tables: dict[str, list[np.ndarray]] = {}
    blobs: list[bytes] = []
    for ev in events:
        header = ev["header"]
        event_type = EVENT_TYPES[header["eventtype_uploadcode"]]
        row = np.zeros(1, dtype=event_type.dtype)
        row[0] = event_type.fill_row
        timestamp = calendar.timegm(header["datetime"].utctimetuple())
        row["timestamp"] = timestamp
        if event_type.extended_time:
            row["nanoseconds"] = header["nanoseconds"]
            row["ext_timestamp"] = timestamp * 1_000_000_000 + int(header["nanoseconds"])
        for item in ev["datalist"]:
            code, value = item["data_uploadcode"], item["data"]
            indexed = code[-1].isdigit()
            base = code[:-1] if indexed else code
            if base not in event_type.codes:
                continue
            if base in event_type.blob_codes:
                if base in event_type.base64_codes:
                    value = base64.decodebytes(value.encode("iso-8859-1"))
                else:
                    value = value.encode("iso-8859-1")
                blobs.append(value)
                value = len(blobs) - 1
            column = event_type.codes[base]
            if indexed:
                row[column][0, int(code[-1]) - 1] = value
            else:
                row[column] = value
        tables.setdefault(event_type.table, []).append(row)
    return {name: np.concatenate(rows) for name, rows in tables.items()}, blobs


def assert_same_as_oracle(events: list[dict[str, Any]]) -> None:
    built = build_table_rows(events)
    expected_tables, expected_blobs = oracle(events)
    assert set(built) == set(expected_tables)
    for name, expected in expected_tables.items():
        got = built[name].rows
        assert got.dtype == expected.dtype
        assert got.tobytes() == expected.tobytes(), name
    assert list(built.blobs) == expected_blobs
    assert built.skipped.total == 0


# -- split_by_day -------------------------------------------------------------------------

def test_split_by_day_groups_by_utc_date_in_arrival_order() -> None:
    late = datetime(2024, 5, 1, 23, 59, 59, 999_999)
    events = [
        event("CIC", late, [("PH1", 1)]),
        event("SIN", late + timedelta(microseconds=1), [("MAS_CH1_LOW", 2)]),
        event("ERR", late - timedelta(hours=1), [("ERRMSG", "x")]),
        event("SIN", late + timedelta(seconds=5), [("MAS_CH1_LOW", 3)]),
    ]
    days, skipped = split_by_day(events, 2020)
    assert list(days) == [date(2024, 5, 1), date(2024, 5, 2)]
    assert [c.event for c in days[date(2024, 5, 1)]] == [events[0], events[2]]
    assert [c.event for c in days[date(2024, 5, 2)]] == [events[1], events[3]]
    # Checked once: each carries its type and UTC second, as build_rows takes them.
    first = days[date(2024, 5, 1)][0]
    assert first.event_type.upload_code == "CIC"
    assert first.timestamp == calendar.timegm(late.timetuple())
    assert skipped.total == 0


def test_split_by_day_converts_aware_datetimes_to_utc() -> None:
    cest = timezone(timedelta(hours=2))
    events = [event("SIN", datetime(2024, 5, 2, 1, 30, tzinfo=cest))]
    days, _ = split_by_day(events, 2020)
    assert list(days) == [date(2024, 5, 1)]


def test_split_by_day_skips_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    good = event("SIN", WHEN)
    events = [
        good,
        event("CIC", datetime(2019, 4, 7, 0, 0, 1)),  # GPS cold start
        event("CIC", None),
        event("CIC", "2024-05-01 12:00:00"),
        event("CIC", date(2024, 5, 1)),
        event("XYZ"),
        event(None),
        {"datalist": []},
        {"header": "not a dict", "datalist": []},
        ["not", "an", "event"],
        None,
        {"header": {"datetime": WHEN, "nanoseconds": 0}, "datalist": []},
    ]
    with caplog.at_level(logging.ERROR, logger="hisparc_datastore.format.rows"):
        days, skipped = split_by_day(events, 2020, context="incoming/501/x.pickle")
    assert {day: [c.event for c in found] for day, found in days.items()} == {
        date(2024, 5, 1): [good]}
    assert skipped.counts == {
        BEFORE_MINIMUM_YEAR: 1, NO_DATETIME: 3, UNKNOWN_TYPE: 3, BAD_HEADER: 4,
    }
    assert skipped.total == 11
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11
    assert all("incoming/501/x.pickle" in line for line in lines)


def test_split_by_day_minimum_year_is_a_parameter() -> None:
    events = [event("SIN", datetime(2019, 12, 31, 23, 0)), event("SIN", WHEN)]
    days, skipped = split_by_day(events, 2019)
    assert sum(len(v) for v in days.values()) == 2 and skipped.total == 0
    days, skipped = split_by_day(events, 2025)
    assert days == {} and skipped.counts == {BEFORE_MINIMUM_YEAR: 2}


def test_a_thousand_bad_events_do_not_make_a_thousand_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = [event("CIC", None) for _ in range(1000)]
    with caplog.at_level(logging.ERROR, logger="hisparc_datastore.format.rows"):
        days, skipped = split_by_day(events, 2020)
    assert days == {} and skipped.counts == {NO_DATETIME: 1000}
    assert len(caplog.records) == 11
    assert "990 more" in caplog.records[-1].getMessage()


# -- build_table_rows: semantics ----------------------------------------------------------

def test_cic_row_time_indexed_codes_fills_and_traces() -> None:
    trace = [200, 201, 199, 540, 210]
    ev = event(
        "CIC",
        WHEN,
        [("RED", 1), ("EVENTRATE", 1.25), ("TRIGPATTERN", 17), ("PH3", 812), ("IN1", 70000),
         ("BL2", -3), ("TR2", trace_text(trace))],
        nanoseconds=123_456_789,
    )
    built = build_table_rows([ev])
    assert list(built) == ["events"]
    rows = built["events"].rows
    assert len(rows) == 1
    row = rows[0]
    timestamp = calendar.timegm(WHEN.utctimetuple())
    assert row["event_id"] == 0
    assert row["timestamp"] == timestamp
    assert row["nanoseconds"] == 123_456_789
    assert row["ext_timestamp"] == timestamp * 10**9 + 123_456_789
    assert bool(row["data_reduction"]) is True
    assert row["event_rate"] == np.float32(1.25)
    assert row["trigger_pattern"] == 17
    assert row["pulseheights"].tolist() == [-1, -1, 812, -1]
    assert row["integrals"].tolist() == [70000, -1, -1, -1]
    assert row["baseline"].tolist() == [-1, -3, -1, -1]
    assert row["std_dev"].tolist() == [-1] * 4 and row["n_peaks"].tolist() == [-1] * 4
    assert row["traces"].tolist() == [-1, 0, -1, -1]
    assert len(built.blobs) == 1
    assert zlib.decompress(built.blobs[0]).decode().split(",") == [str(s) for s in trace]
    cells = built["events"].blob_cells
    assert set(cells) == {"traces"}
    assert cells["traces"].tolist() == [[False, True, False, False]]


def test_blob_order_follows_events_then_datalist_across_tables() -> None:
    events = [
        event("ERR", items=[("ERRMSG", "first")]),
        event("CIC", items=[("TR3", trace_text([3])), ("TR1", trace_text([1]))]),
        event("CFG", items=[("CFG_PASSWORD", "pw"), ("CFG_MAS_VERSION", "mas 1.2")]),
        event("ERR", items=[("ERRMSG", "second")]),
    ]
    built = build_table_rows(events)
    assert [zlib.decompress(b).decode() if i in (1, 2) else b
            for i, b in enumerate(built.blobs)] == [b"first", "3", "1", b"pw", b"mas 1.2",
                                                     b"second"]
    assert built["errors"].rows["messages"].tolist() == [0, 5]
    assert built["events"].rows["traces"].tolist() == [[2, -1, 1, -1]]
    config = built["config"].rows
    assert config["password"].tolist() == [3] and config["mas_version"].tolist() == [4]
    assert config["slv_version"].tolist() == [-1] and config["buffer"].tolist() == [-1]
    assert built.row_count == 4
    assert_same_as_oracle(events)


def test_blob_offset_is_added_only_to_blob_cells() -> None:
    built = build_table_rows([event("CIC", items=[("TR2", trace_text([5])), ("PH1", 9)])])
    shifted = built["events"].rows_with_blob_offset(100)
    assert shifted["traces"].tolist() == [[-1, 100, -1, -1]]
    assert shifted["pulseheights"].tolist() == [[9, -1, -1, -1]]
    assert built["events"].rows["traces"].tolist() == [[-1, 0, -1, -1]]  # not changed


def test_unknown_codes_warn_once_per_type_and_code(caplog: pytest.LogCaptureFixture) -> None:
    events = [
        event("CIC", items=[("PH1", 5), ("XX", 1), ("PH5", 7), ("PH0", 7), ("PH", 2)]),
        event("CIC", items=[("XX", 2), ("PH2", 6)]),
        event("SIN", items=[("XX", 3), ("RED", 1)]),
    ]
    with caplog.at_level(logging.WARNING, logger="hisparc_datastore.format.rows"):
        built = build_table_rows(events, context="k")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 6  # CIC: XX PH5 PH0 PH; SIN: XX RED
    assert all("not known on server side" in w for w in warnings)
    assert built["events"].rows["pulseheights"].tolist() == [[5, -1, -1, -1], [-1, 6, -1, -1]]
    assert len(built["singles"]) == 1
    assert built.skipped.total == 0


def test_blob_text_is_latin1_bytes_and_bytes_stay_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = [
        event("ERR", items=[("ERRMSG", "caf\xe9 \x00\xff")]),
        event("ERR", items=[("ERRMSG", b"\x01raw")]),
        event("ERR", items=[("ERRMSG", "snow \u2603")]),
        event("ERR", items=[("ERRMSG", "")]),
    ]
    with caplog.at_level(logging.WARNING, logger="hisparc_datastore.format.rows"):
        built = build_table_rows(events)
    assert list(built.blobs) == [
        b"caf\xe9 \x00\xff", b"\x01raw", "snow \u2603".encode(), b"",
    ]
    assert built["errors"].rows["messages"].tolist() == [0, 1, 2, 3]
    assert any("UTF-8" in r.getMessage() for r in caplog.records)


def test_traces_decode_like_the_reference_lenient_base64() -> None:
    text = trace_text(list(range(300)))
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"
    events = [
        event("CIC", items=[("TR1", wrapped), ("TR2", text.encode()), ("TR3", text)]),
    ]
    built = build_table_rows(events)
    assert len(set(built.blobs)) == 1
    assert zlib.decompress(built.blobs[0]).decode() == ",".join(map(str, range(300)))


@pytest.mark.parametrize(
    ("code", "items", "why"),
    [
        ("CIC", [("PH1", "12")], "text in an int column"),
        ("CIC", [("PH1", None)], "None"),
        ("CIC", [("PH1", 40000)], "int16 overflow"),
        ("CIC", [("TRIGPATTERN", -1)], "negative into uint32"),
        ("CIC", [("EVENTRATE", 1e39)], "beyond float32"),
        ("CIC", [("PH1", float("nan"))], "NaN into an int column"),
        ("CIC", [("PH1", 2**70)], "huge Python int"),
        ("CIC", [("PH1", np.uint64(2**63))], "huge numpy int"),
        ("CIC", [("PH1", [1, 2])], "a list"),
        ("CIC", [("PH1", complex(1, 1))], "complex"),
        ("CIC", [("TR1", "abc")], "bad base64 padding"),
        ("CIC", [("TR1", 12345)], "trace not text"),
        ("CIC", [("TR1", "\u2603AAAA")], "trace not latin-1"),
        ("ERR", [("ERRMSG", 5)], "blob not text"),
        ("CFG", [("CFG_SPAREBYTES", 256)], "uint8 overflow"),
        ("CFG", [("CFG_GPS_LAT", "52.1")], "text in a float column"),
        ("WTR", [("WTR_UV", 1 << 15)], "int16 overflow"),
        ("LCG", [("LCG_NOISE_BEEP", "yes")], "text in a bool column"),
    ],
)
def test_a_value_that_does_not_fit_skips_only_its_event(
    code: str, items: list[tuple[str, Any]], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = EVENT_TYPES[code].table
    first = event(code, WHEN, [])
    bad = event(code, WHEN + timedelta(seconds=1), items)
    last = event(code, WHEN + timedelta(seconds=2), [])
    with caplog.at_level(logging.ERROR, logger="hisparc_datastore.format.rows"):
        built = build_table_rows([first, bad, last], context="incoming/501/y.pickle")
    rows = built[table].rows
    assert len(rows) == 2, why
    assert rows["timestamp"].tolist() == [
        calendar.timegm(WHEN.utctimetuple()), calendar.timegm(WHEN.utctimetuple()) + 2
    ]
    assert built.skipped.counts == {BAD_VALUE: 1}
    assert built.blobs == []
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(messages) == 1 and "#1" in messages[0] and "incoming/501/y.pickle" in messages[0]


def test_a_skipped_event_leaves_no_blobs_and_later_indices_close_up() -> None:
    events = [
        event("CIC", items=[("TR1", trace_text([1])), ("TR2", trace_text([2]))]),
        event("ERR", items=[("ERRMSG", "kept")]),
        event("CIC", items=[("TR1", trace_text([3])), ("TR2", trace_text([4])),
                            ("PH1", "bad")]),
        event("ERR", items=[("ERRMSG", "dropped"), ("ERRMSG", 17)]),
        event("CIC", items=[("TR1", trace_text([5])), ("TR4", trace_text([6]))]),
        event("ERR", items=[("ERRMSG", "also kept")]),
    ]
    built = build_table_rows(events)
    texts = [zlib.decompress(b).decode() if b[:1] == b"x" else b.decode() for b in built.blobs]
    assert texts == ["1", "2", "kept", "5", "6", "also kept"]
    assert built["events"].rows["traces"].tolist() == [[0, 1, -1, -1], [3, -1, -1, 4]]
    assert built["errors"].rows["messages"].tolist() == [2, 5]
    assert built.skipped.counts == {BAD_VALUE: 2}
    assert_same_as_oracle([events[i] for i in (0, 1, 4, 5)])


def test_conversions_follow_numpy_assignment() -> None:
    ev = event(
        "CFG",
        items=[
            ("CFG_DETNUM", 3.9),  # uint16: truncated like numpy and the reference
            ("CFG_TRIGANDOR", 2),  # bool from a number
            ("CFG_USEFILTER", 0.0),
            ("CFG_REDUCE", np.bool_(True)),
            ("CFG_SPAREBYTES", np.uint8(255)),
            ("CFG_TRIGLOWSIG", np.int64(2**32 - 1)),
            ("CFG_GPS_LAT", np.float32(52.25)),
            ("CFG_GPS_LONG", 4),
            ("CFG_PRECTIME", float("inf")),
            ("CFG_CTIME", float("nan")),
            ("CFG_DELAYSCREEN", True),
        ],
    )
    row = build_table_rows([ev])["config"].rows[0]
    assert row["detnum"] == 3
    assert bool(row["trig_and_or"]) is True and bool(row["use_filter"]) is False
    assert bool(row["reduce_data"]) is True
    assert row["spare_bytes"] == 255 and row["trig_low_signals"] == 2**32 - 1
    assert row["gps_latitude"] == 52.25 and row["gps_longitude"] == 4.0
    assert np.isinf(row["precoinctime"]) and np.isnan(row["coinctime"])
    assert row["delay_screen"] == 1.0
    assert row["mas_version"] == -1 and row["password"] == -1  # absent blob codes


def test_a_code_sent_twice_keeps_the_last_value_and_both_blobs() -> None:
    ev = event("CIC", items=[("PH1", 1), ("TR1", trace_text([1])), ("PH1", 2),
                             ("TR1", trace_text([2]))])
    built = build_table_rows([ev])
    assert built["events"].rows["pulseheights"].tolist() == [[2, -1, -1, -1]]
    assert built["events"].rows["traces"].tolist() == [[1, -1, -1, -1]]
    assert len(built.blobs) == 2
    assert_same_as_oracle([ev])


@pytest.mark.parametrize(
    "mangle",
    [
        lambda ev: ev.update(datalist=None),
        lambda ev: ev.update(datalist="PH1=5"),
        lambda ev: ev.pop("datalist"),
        lambda ev: ev["datalist"].append({"data_uploadcode": "PH2"}),
        lambda ev: ev["datalist"].append({"data": 5}),
        lambda ev: ev["datalist"].append(("PH2", 5)),
        lambda ev: ev["datalist"].append({"data_uploadcode": ["PH2"], "data": 5}),
        lambda ev: ev["header"].pop("nanoseconds"),
        lambda ev: ev["header"].update(nanoseconds=-5),
        lambda ev: ev["header"].update(nanoseconds="5"),
        lambda ev: ev["header"].update(datetime=datetime(2038, 1, 20)),
    ],
)
def test_malformed_events_are_skipped(mangle: Any) -> None:
    bad = event("CIC", items=[("PH1", 5)], nanoseconds=10)
    mangle(bad)
    good = event("CIC", items=[("PH1", 6)], nanoseconds=20)
    built = build_table_rows([bad, good])
    rows = built["events"].rows
    assert rows["pulseheights"][:, 0].tolist() == [6]
    assert rows["nanoseconds"].tolist() == [20]
    assert built.skipped.total == 1


def test_nanoseconds_are_only_needed_for_extended_time_types() -> None:
    ev = event("SIN", items=[("MAS_CH1_LOW", 7)])
    del ev["header"]["nanoseconds"]
    assert build_table_rows([ev])["singles"].rows["mas_ch1_low"].tolist() == [7]


def test_headers_are_checked_again() -> None:
    built = build_table_rows([event("CIC", None), event("ZZZ"), None, event("LNS")])
    assert list(built) == ["lightning_noise"]
    assert built.skipped.counts == {NO_DATETIME: 1, UNKNOWN_TYPE: 1, BAD_HEADER: 1}


def test_lightning_codes_land_in_the_readers_columns() -> None:
    events = [
        event("LIT", items=[("LIT_UNCORR_ANGLE", 12.5), ("LIT_CORR_ANGLE", 13.5),
                            ("LIT_CORR_DIST", 4)]),
        event("LCG", items=[("LCG_SQUELCH_SETTING", 3)]),
        event("LST", items=[("LST_SEVERE_ALARM", True), ("LST_CLOSE_ALARM", False)]),
    ]
    built = build_table_rows(events)
    lit = built["lightning"].rows[0]
    assert (lit["uncorr_angle"], lit["corr_angle"], lit["corr_distance"]) == (12.5, 13.5, 4)
    assert built["lightning_config"].rows[0]["squelch_seting"] == 3
    assert bool(built["lightning_status"].rows[0]["sever_alarm"]) is True


def test_empty_batch() -> None:
    built = build_table_rows([])
    assert dict(built) == {} and list(built.blobs) == [] and built.skipped.total == 0


# -- every type, against the oracle ----------------------------------------------------------

@pytest.mark.parametrize("code", ALL_TYPES)
def test_every_type_matches_the_oracle(code: str) -> None:
    rng = random.Random(code)
    events = samples.batch(20, datetime(2024, 5, 1, 10), rng, kinds=[code])
    assert_same_as_oracle(events)


def test_mixed_realistic_batch_and_numpy_flavour_match_the_oracle() -> None:
    rng = random.Random(7)
    events = samples.realistic_batch(300, datetime(2024, 5, 1, 10), rng)
    events += samples.batch(28, datetime(2024, 5, 1, 11), rng, kinds=ALL_TYPES)
    assert_same_as_oracle(events)
    flavoured = samples.numpy_flavour(events)
    built, plain = build_table_rows(flavoured), build_table_rows(events)
    assert set(built) == set(plain)
    for name in plain:
        assert built[name].rows.tobytes() == plain[name].rows.tobytes()
    assert list(built.blobs) == list(plain.blobs)


# -- convert_values --------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(["|u1", "<u2", "<u4", "<i2", "<i4"]),
    values=st.lists(
        st.one_of(st.integers(-(2**40), 2**40), st.booleans(),
                  st.floats(allow_nan=True, allow_infinity=True)),
        max_size=20,
    ),
)
def test_integer_conversion_agrees_with_a_per_value_check(dtype: str, values: list) -> None:
    target = np.dtype(dtype)
    converted, unfit = convert_values(values, target)
    info = np.iinfo(target)
    for value, got, bad in zip(values, converted.tolist(), unfit.tolist(), strict=True):
        if isinstance(value, float) and not np.isfinite(value):
            assert bad
            continue
        whole = int(value)  # truncation toward zero
        fits = info.min <= whole <= info.max
        assert bad is (not fits)
        if fits:
            assert got == whole


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, width=64), max_size=20))
def test_float32_conversion_rejects_only_overflow(values: list[float]) -> None:
    converted, unfit = convert_values(values, np.dtype("<f4"))
    limit = float(np.finfo(np.float32).max)
    for value, got, bad in zip(values, converted.tolist(), unfit.tolist(), strict=True):
        with np.errstate(over="ignore"):
            overflow = np.isinf(np.float32(value)) and np.isfinite(value)
        assert bad is bool(overflow)
        if not bad and abs(value) <= limit:
            assert got == float(np.float32(value))


def test_datetimes_with_timezones_give_utc_timestamps() -> None:
    aware = datetime(2024, 5, 1, 14, 30, 15, tzinfo=timezone(timedelta(hours=2)))
    built = build_table_rows([event("SIN", aware), event("SIN", aware.astimezone(UTC))])
    assert built["singles"].rows["timestamp"].tolist() == [
        calendar.timegm((2024, 5, 1, 12, 30, 15, 0, 0, 0))
    ] * 2


def test_batches_built_per_object_and_merged_equal_one_build_of_all() -> None:
    """Replay builds rows per object in worker processes and merges them per station:
    the result must be exactly what building all the objects' events at once gives."""
    from hisparc_datastore.format.rows import BatchPart, check_events, gather, merge_batches

    rng = random.Random(11)
    parts = []
    for number in range(5):
        events = samples.batch(7, datetime(2024, 5, 1, 10, number), rng,
                               kinds=["CIC", "SIN", "CFG", "WTR", "ERR"])
        if number == 2:  # one event whose value does not fit: skipped in both builds
            events[0]["datalist"][0]["data"] = "not a number"
        checked, _ = check_events(events)
        parts.append(BatchPart(f"incoming/501/{number}.pickle", "e", 501, "Amsterdam", checked))
    (whole,) = gather(parts)
    merged = merge_batches([gather([part])[0] for part in parts])
    assert merged.starts == whole.starts and merged.events == whole.events
    assert [p.key for p in merged.parts] == [p.key for p in whole.parts]
    assert merged.rows.blobs == whole.rows.blobs
    assert merged.rows.blob_positions.tolist() == whole.rows.blob_positions.tolist()
    assert merged.rows.skipped.counts == whole.rows.skipped.counts
    assert set(merged.rows) == set(whole.rows)
    for name in whole.rows:
        a, b = merged.rows[name], whole.rows[name]
        assert a.rows.tobytes() == b.rows.tobytes(), name
        assert a.positions.tolist() == b.positions.tolist(), name
        assert {c: m.tolist() for c, m in a.blob_cells.items()} == {
            c: m.tolist() for c, m in b.blob_cells.items()}, name
    for positions in (whole.rows["events"].positions, whole.rows.blob_positions):
        assert merged.owners(positions) == whole.owners(positions)
