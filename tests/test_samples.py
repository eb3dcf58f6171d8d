"""Sample events: every type and upload code of the format, values that fit the columns,
realistic traces, reproducible from a seed."""

from __future__ import annotations

import datetime as dt
import itertools
import pickle
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hisparc_datastore_dev import samples, showers
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
        event = samples.cic_event(when, rng, samples=(48, 200)[n % 2]) if code == "CIC" else (
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
    """HiSPARC III: 2,400 samples of 2.5 ns, baselines of 25-32, noise of 1-2 counts,
    positive pulses around the trigger (sample 400), and the DAQ's numbers from them."""
    rng = random.Random(6)
    for _ in range(20):
        values = items(samples.cic_event(START, rng))
        pattern = values["TRIGPATTERN"]
        highs = lows = 0
        for channel in (1, 2, 3, 4):
            blob = values[f"TR{channel}"]
            assert blob.isascii()
            trace = np.array(samples.decode_trace(blob))
            assert len(trace) == samples.TRACE_SAMPLES == 2400  # 6 us at 2.5 ns a sample
            assert trace.min() >= 0 and trace.max() <= samples.ADC_MAX
            baseline = values[f"BL{channel}"]
            assert 25 <= baseline <= 32
            assert baseline == round(trace[:26].mean())
            assert abs(np.median(trace[:300]) - baseline) <= 2
            assert 300 <= values[f"STDDEV{channel}"] <= 3000  # milli-ADC
            assert values[f"PH{channel}"] == trace.max() - baseline
            if values[f"PH{channel}"] > 60:  # a particle: its pulse near the trigger
                assert 300 <= int(trace.argmax()) <= 700
                assert values[f"IN{channel}"] > 0 and values[f"NP{channel}"] >= 1
            else:
                assert values[f"IN{channel}"] == 0 and values[f"NP{channel}"] == 0
            low = bool(pattern >> (channel - 1) & 1)
            high = bool(pattern >> (channel + 3) & 1)
            assert low == (trace.max() >= 81) and high == (trace.max() >= 150)
            lows, highs = lows + low, highs + high
        assert lows >= 3 or highs >= 2  # 3 low or 2 high: the station triggered


def test_the_stored_numbers_follow_from_the_traces() -> None:
    """Recomputed from the traces (SAPPHiRE's definitions), the numbers are those sent."""
    from hisparc_datastore_dev import electronics

    rng = random.Random(13)
    for _ in range(30):
        values = items(samples.cic_event(START, rng))
        adc = np.array([samples.decode_trace(values[f"TR{n}"]) for n in (1, 2, 3, 4)])
        found = electronics.observables(adc)
        for code, column in (("BL", found.baseline), ("STDDEV", found.std_dev),
                             ("NP", found.n_peaks), ("PH", found.pulseheights),
                             ("IN", found.integrals)):
            assert [values[f"{code}{n}"] for n in (1, 2, 3, 4)] == list(column), code
        # The trigger condition is first met at sample 400, as SAPPHiRE reconstructs it.
        assert electronics.trigger_sample(adc, electronics.TriggerSettings()) == 400


def test_peaks_rise_and_fall_by_more_than_the_threshold() -> None:
    from hisparc_datastore_dev.electronics import count_peaks

    assert count_peaks(np.array([0, 5, 2, -3, 1])) == 0
    assert count_peaks(np.array([0, 60, 10, 0])) == 1
    assert count_peaks(np.array([0, 60, 20, 80, 0])) == 1  # fell 40: still one peak
    assert count_peaks(np.array([0, 60, 5, 70, 0])) == 2
    assert count_peaks(np.array([0, 53, 0])) == 1 and count_peaks(np.array([0, 52, 0])) == 0
    assert count_peaks(np.array([-9, 100, 60, 48, 100])) == 1  # fell 52, not more
    assert count_peaks(np.array([-9, 100, 60, 47, 100])) == 2  # fell 53: a new peak


def test_trigger_conditions() -> None:
    from hisparc_datastore_dev.electronics import TriggerSettings, trigger_sample

    def crossing(*firsts: int | None, level: int = 100) -> np.ndarray:
        adc = np.full((4, 50), 30)
        for channel, first in enumerate(firsts):
            if first is not None:
                adc[channel, first:] = level
        return adc

    default = TriggerSettings()  # 3 low (81) or 2 high (150)
    assert trigger_sample(crossing(10, 20, 30, None), default) == 30  # the third low
    assert trigger_sample(crossing(10, 20, None, None), default) is None
    assert trigger_sample(crossing(10, 20, None, None, level=200), default) == 20  # two high
    both = TriggerSettings(n_low=2, n_high=1, and_or=False)  # 2 low and 1 high: 3 over low
    assert trigger_sample(crossing(10, 20, None, None, level=200), both) is None
    assert trigger_sample(crossing(10, 20, 30, None, level=200), both) == 30
    assert trigger_sample(crossing(5, None, None, None, level=200),
                          TriggerSettings(n_low=0, n_high=1)) == 5


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


def test_a_stations_showers_come_on_top_of_its_own_events() -> None:
    """Showers add coincidences and change nothing else; the stream stays in time order,
    also from a start with microseconds and across midnight."""
    start = dt.datetime(2024, 5, 1, 23, 58, 30, 654_321)
    busy = samples.StationModel.create(501, None, showers.ShowerStream(2, 3.0))
    quiet = samples.StationModel.create(501)

    def stream(model: samples.StationModel) -> list[dict[str, Any]]:
        return list(itertools.islice(
            samples.event_stream(start, random.Random(3), traces=False, station=model), 400))

    with_showers, without = stream(busy), stream(quiet)
    times = [samples.event_time_ns(e) for e in with_showers]
    assert times == sorted(times) and times[0] >= samples.epoch_ns(start)
    assert dt.datetime.fromtimestamp(times[-1] / 1e9, dt.UTC).date() > start.date()
    added = [e for e in with_showers if e not in without]
    assert len(added) >= 10
    assert all(e["header"]["eventtype_uploadcode"] == "CIC" for e in added)
    rest = [e for e in with_showers if e in without]
    assert rest == without[: len(rest)]


def test_a_station_is_the_same_hardware_in_every_run() -> None:
    one, again = samples.StationModel.create(501), samples.StationModel.create(501)
    assert one.electronics == again.electronics
    assert one.electronics != samples.StationModel.create(502).electronics
    for channel in one.electronics.channels:
        assert 26 <= channel.baseline <= 31 and 1 <= channel.noise <= 2
    values = items(one.config_event(START, random.Random(4)))
    assert values["CFG_GPS_LAT"] == showers.CLUSTER_MIDDLE.latitude
    event_type = schema.EVENT_TYPES["CFG"]
    for code, value in values.items():  # the station's settings still fit their columns
        field = event_type.fields[code]
        assert fits(value, event_type.column_map[field.column], field.blob), (code, value)
