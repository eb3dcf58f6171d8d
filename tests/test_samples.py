"""Sample events: every type and upload code of the format, values that fit the columns,
realistic traces, reproducible from a seed."""

from __future__ import annotations

import datetime as dt
import pickle
import random
import statistics
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.format import schema

START = dt.datetime(2024, 5, 1, 23, 59, 30)


def items(event: dict[str, Any]) -> dict[str, Any]:
    return {item["data_uploadcode"]: item["data"] for item in event["datalist"]}


def test_same_seed_same_events_to_the_byte() -> None:
    one = samples.realistic_batch(40, START, random.Random(1))
    two = samples.realistic_batch(40, START, random.Random(1))
    three = samples.realistic_batch(40, START, random.Random(2))
    assert one == two and dumps_py2(one) == dumps_py2(two)
    assert one != three


def test_the_fourteen_types_carry_every_upload_code_of_the_schema() -> None:
    assert set(samples.UPLOAD_CODE_ORDER) == set(schema.EVENT_TYPES)
    rng = random.Random(3)
    for code in samples.UPLOAD_CODE_ORDER:
        event = samples.event_of_type(code, START, rng)
        header = event["header"]
        assert header["eventtype_uploadcode"] == code
        assert isinstance(header["datetime"], dt.datetime) and header["datetime"].tzinfo is None
        sent = [item["data_uploadcode"] for item in event["datalist"]]
        assert len(sent) == len(set(sent))
        assert set(sent) == set(schema.EVENT_TYPES[code].fields), code
        assert tuple(sent) == samples.UPLOAD_CODES[code]


def test_indexed_codes_of_coincidences() -> None:
    codes = samples.UPLOAD_CODES["CIC"]
    for stem in ("BL", "STDDEV", "NP", "PH", "IN", "TR"):
        assert [c for c in codes if c.rstrip("1234") == stem] == [
            f"{stem}{n}" for n in (1, 2, 3, 4)
        ]


def fits(value: Any, column: schema.Column, blob: bool) -> bool:
    """Would a writer store ``value`` in ``column`` without clipping or guessing?"""
    if blob:
        return type(value) is str and value.encode("latin-1") is not None
    kind = np.dtype(column.dtype)
    if kind.kind == "b":
        return type(value) is bool
    if kind.kind in "iu":
        info = np.iinfo(kind)
        return type(value) is int and info.min <= value <= info.max
    if kind.kind == "f":
        return type(value) is float and abs(value) <= np.finfo(kind).max
    raise AssertionError(f"unexpected column dtype {column.dtype}")


@pytest.mark.parametrize("code", samples.UPLOAD_CODE_ORDER)
def test_values_fit_their_columns(code: str) -> None:
    event_type = schema.EVENT_TYPES[code]
    rng = random.Random(code)
    for n in range(20):
        when = START + dt.timedelta(seconds=n)
        event = samples.cic_event(when, rng, samples=200) if code == "CIC" else (
            samples.event_of_type(code, when, rng)
        )  # fmt: skip
        for upload_code, value in items(event).items():
            field = event_type.fields[upload_code]
            column = event_type.column_map[field.column]
            assert fits(value, column, field.blob), (upload_code, value, column)


def test_header_time() -> None:
    rng = random.Random(4)
    when = dt.datetime(2024, 5, 1, 12, 0, 0, 250_000)
    cic = samples.event_of_type("CIC", when, rng)["header"]
    assert cic["datetime"] == when.replace(microsecond=0)
    assert 250_000_000 <= cic["nanoseconds"] < 250_001_000
    cmp_ = samples.event_of_type("CMP", when, rng)["header"]
    assert cmp_["datetime"].microsecond == 0 and cmp_["nanoseconds"] >= 250_000_000
    assert samples.event_of_type("WTR", when, rng)["header"]["nanoseconds"] == 0


def test_blobs_are_text() -> None:
    rng = random.Random(5)
    for code, blob_codes in {
        "ERR": ["ERRMSG"],
        "WER": ["WER_ERRMSG"],
        "LER": ["LER_ERRMSG"],
        "CFG": ["CFG_MAS_VERSION", "CFG_SLV_VERSION", "CFG_PASSWORD", "CFG_BUFFER"],
        "WCG": ["WCG_DATABASE_NAME", "WCG_HELP_URL"],
        "LCG": ["LCG_DATABASE_NAME", "LCG_HELP_URL"],
    }.items():
        values = items(samples.event_of_type(code, START, rng))
        assert all(type(values[b]) is str and values[b] for b in blob_codes), code


def test_traces_look_like_hisparc_traces() -> None:
    rng = random.Random(6)
    event = samples.cic_event(START, rng)
    values = items(event)
    for channel in (1, 2, 3, 4):
        blob = values[f"TR{channel}"]
        assert blob.isascii()
        trace = samples.decode_trace(blob)
        assert len(trace) == samples.TRACE_SAMPLES == 2400  # 6 us at 2.5 ns a sample
        assert all(0 <= v <= samples.ADC_MAX for v in trace)
        baseline = values[f"BL{channel}"]
        assert 180 <= baseline <= 220
        assert abs(statistics.median(trace[:300]) - baseline) <= 2
        assert values[f"PH{channel}"] == max(trace) - baseline
        if values[f"NP{channel}"]:
            peak = trace.index(max(trace))
            assert samples.TRIGGER_SAMPLE - 40 <= peak <= samples.TRIGGER_SAMPLE + 500
            assert values[f"IN{channel}"] > 0
        assert 300 <= values[f"STDDEV{channel}"] <= 2000  # milli-ADC


def test_trace_size_is_realistic() -> None:
    """A real station's batch: 36 coincidences (two-detector station) in ~137 kB of pickle."""
    blob = samples.make_trace(random.Random(7))
    assert 800 <= len(blob) <= 3000


def test_make_trace_and_encode_trace_agree() -> None:
    adc = [200, 201, 4095, 0, 199]
    assert samples.decode_trace(samples.encode_trace(adc)) == adc
    assert samples.decode_trace(samples.encode_trace(np.array(adc))) == adc
    assert samples.decode_trace(samples.encode_trace([-1, 5000])) == [-1, 5000]
    assert len(samples.decode_trace(samples.make_trace(random.Random(8), samples=64))) == 64


def test_batch_cycles_kinds_at_an_interval() -> None:
    events = samples.batch(
        6, START, random.Random(9), kinds=("CIC", "SIN", "WTR"), interval=dt.timedelta(minutes=1),
        traces=False,
    )  # fmt: skip
    assert [e["header"]["eventtype_uploadcode"] for e in events] == ["CIC", "SIN", "WTR"] * 2
    assert [e["header"]["datetime"] for e in events][1::3] == [
        START + dt.timedelta(minutes=1),
        START + dt.timedelta(minutes=4),
    ]
    assert not {"TR1", "TR2", "TR3", "TR4"} & set(items(events[0]))


def test_realistic_batch_is_a_station_queue() -> None:
    events = samples.realistic_batch(300, START, random.Random(10))
    assert len(events) == 300
    times = [
        e["header"]["datetime"] + dt.timedelta(microseconds=e["header"]["nanoseconds"] // 1000)
        for e in events
    ]
    assert times == sorted(times)
    kinds = Counter(e["header"]["eventtype_uploadcode"] for e in events)
    assert kinds["SIN"] > kinds["CIC"] > 50
    assert kinds["SIN"] + kinds["CIC"] < 300  # and now and then something else
    assert times[-1].date() > START.date()  # this one crosses midnight
    coincidences = [items(e) for e in events if e["header"]["eventtype_uploadcode"] == "CIC"]
    assert all("TR4" in values for values in coincidences)


def test_numpy_flavour_is_equal_but_numpy() -> None:
    rng = random.Random(11)
    events = [samples.event_of_type(code, START, rng) for code in samples.UPLOAD_CODE_ORDER]
    flavoured = samples.numpy_flavour(events)
    assert flavoured == events
    kinds = {type(item["data"]) for event in flavoured for item in event["datalist"]}
    assert kinds == {np.bool_, np.int32, np.float64, str}
    assert all(type(e["header"]["nanoseconds"]) is np.int64 for e in flavoured)
    assert all(type(e["header"]["nanoseconds"]) is int for e in events)  # untouched
    assert type(samples.numpy_flavour([{"header": {}, "datalist": [{"data": 2**40}]}])[0][
        "datalist"][0]["data"]) is np.int64  # fmt: skip
    assert pickle.loads(pickle.dumps(flavoured, protocol=4)) == events


def test_unknown_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="XYZ"):
        samples.event_of_type("XYZ", START, random.Random(12))
