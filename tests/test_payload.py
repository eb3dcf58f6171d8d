"""decode_batch: what stations send decodes to equal values; everything else is refused.

Positive cases are real pickles of realistic batches (Python 2 protocol 0 from py2pickle,
Python 3 protocols 0-5, with and without numpy scalars).  Negative cases are the hostile
corpus of ``hostile_pickles``, run here and, once more, in a fresh interpreter whose exit
status and peak memory are checked (a crash there must not take the test run with it).
"""

from __future__ import annotations

import datetime as dt
import json
import pickle
import random
import string
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile_pickles import HOSTILE, MARKER
from hypothesis import given, settings
from hypothesis import strategies as st

from hisparc_datastore import payload, samples
from hisparc_datastore.payload import (
    MAX_DEPTH,
    PayloadError,
    decode_batch,
    event_datetime,
    event_datetimes,
    is_suspicious,
)
from hisparc_datastore.py2pickle import Py2Long, Py2Unicode, dumps_py2

START = dt.datetime(2024, 3, 1, 12, 0, 0)


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    """A station's queue: coincidences with traces, singles, now and then something else,
    and one event of each of the 14 types."""
    rng = random.Random(11)
    batch = samples.realistic_batch(60, START, rng)
    later = START + dt.timedelta(minutes=5)
    batch += [samples.event_of_type(code, later, rng) for code in samples.EVENT_TYPES]
    return batch


def wrap(value: Any) -> list[dict[str, Any]]:
    return [{"header": {"eventtype_uploadcode": "CIC"}, "datalist": [{"data": value}]}]


# --- what stations send --------------------------------------------------------------------


def test_python2_protocol0_batch_decodes_to_the_events(events: list[dict[str, Any]]) -> None:
    assert decode_batch(dumps_py2(events)) == events


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_python3_batch_decodes_to_the_events(events: list[dict[str, Any]], protocol: int) -> None:
    assert decode_batch(pickle.dumps(events, protocol=protocol)) == events


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_flavoured_batch_decodes_equal_to_python2(
    events: list[dict[str, Any]], protocol: int
) -> None:
    flavoured = samples.numpy_flavour(events)
    decoded = decode_batch(pickle.dumps(flavoured, protocol=protocol))
    assert decoded == events == decode_batch(dumps_py2(events))
    sent = [type(item["data"]) for event in flavoured for item in event["datalist"]]
    got = [type(item["data"]) for event in decoded for item in event["datalist"]]
    assert got == sent  # numpy scalars stay numpy scalars of the same type
    assert {np.int32, np.float64, np.bool_, str} <= set(got)


NUMERIC = [
    np.bool_(True), np.bool_(False), np.int8(-8), np.int16(-1600), np.int32(-3_200_000),
    np.int64(-(2**62)), np.uint8(255), np.uint16(65535), np.uint32(2**32 - 1),
    np.uint64(2**64 - 1), np.float16(1.5), np.float32(-2.25), np.float64(1e-300),
]  # fmt: skip


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_allowed_numpy_scalar_type(protocol: int) -> None:
    decoded = decode_batch(pickle.dumps(wrap(NUMERIC), protocol=protocol))
    values = decoded[0]["datalist"][0]["data"]
    assert [type(v) for v in values] == [type(v) for v in NUMERIC]
    assert [v.tobytes() for v in values] == [v.tobytes() for v in NUMERIC]


def test_big_endian_numpy_scalar() -> None:
    data = pickle.dumps(wrap(np.int32(7)), protocol=2)
    little = b"X\x01\x00\x00\x00<"
    assert data.count(little) == 1 and data.count(b"\x07\x00\x00\x00") == 1
    data = data.replace(little, b"X\x01\x00\x00\x00>").replace(b"\x07\x00\x00\x00", b"\0\0\0\x07")
    value = decode_batch(data)[0]["datalist"][0]["data"]
    assert type(value) is np.int32 and value == 7


def test_numpy_1_module_name() -> None:
    data = pickle.dumps(wrap(np.int64(5)), protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert decode_batch(data) == wrap(5)


def test_python2_numpy_scalar() -> None:
    """numpy under Python 2 writes the dtype code and the scalar's bytes as byte strings."""
    data = (
        b"(lp0\n(dp1\nS'data'\np2\ncnumpy.core.multiarray\nscalar\np3\n(cnumpy\ndtype\np4\n"
        b"(S'i8'\np5\nI0\nI1\ntp6\nRp7\n(I3\nS'<'\np8\nNNNI-1\nI-1\nI0\ntp9\nb"
        b"S'\\x05\\x00\\x00\\x00\\x00\\x00\\x00\\x00'\np10\ntp11\nRp12\nsa."
    )
    value = decode_batch(data)[0]["data"]
    assert type(value) is np.int64 and value == 5


def test_python2_protocol2_pickle() -> None:
    """cPickle.dumps(batch, 2): byte strings as SHORT_BINSTRING/BINSTRING, loaded as latin-1."""
    state = b"\x07\xe8\x03\x01\x0c\x00\x00\x00\x00\x01"
    long_blob = b"\xe9" * 300
    data = (
        b"\x80\x02]q\x00}q\x01(U\x08datetimeq\x02cdatetime\ndatetime\nq\x03U\n" + state
        + b"q\x04\x85q\x05Rq\x06U\x04blobq\x07T" + len(long_blob).to_bytes(4, "little")
        + long_blob + b"q\x08U\x04flagq\tI01\nua."
    )  # fmt: skip
    assert decode_batch(data) == [
        {
            "datetime": dt.datetime(2024, 3, 1, 12, 0, 0, 1),
            "blob": long_blob.decode("latin-1"),
            "flag": True,
        }
    ]


def test_python2_byte_strings_become_their_latin1_text() -> None:
    """Every byte maps to one code point, so a writer storing latin-1 gets the bytes back."""
    raw = bytes(range(256))
    decoded = decode_batch(dumps_py2([{"blob": raw, "text": "Température"}]))
    assert decoded == [{"blob": raw.decode("latin-1"), "text": "Température"}]
    assert decoded[0]["blob"].encode("latin-1") == raw


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_python3_bytes_stay_bytes(protocol: int) -> None:
    batch = [{"blob": bytes(range(256)), "empty": b"", "text": "Température €"}]
    assert decode_batch(pickle.dumps(batch, protocol=protocol)) == batch


def test_python2_unicode_and_long() -> None:
    batch = [{"u": Py2Unicode("a\\b\nc €"), "n": Py2Long(5), "big": 2**100, "neg": -(2**70)}]
    assert decode_batch(dumps_py2(batch)) == batch


@pytest.mark.parametrize("protocol", [None, *range(pickle.HIGHEST_PROTOCOL + 1)])
def test_empty_batch_is_accepted(protocol: int | None) -> None:
    data = dumps_py2([]) if protocol is None else pickle.dumps([], protocol=protocol)
    assert decode_batch(data) == []


def test_odd_events_are_accepted_for_the_writer_to_skip() -> None:
    odd = [
        {},
        {"header": {"eventtype_uploadcode": "XYZ", "datetime": START}, "datalist": []},
        {"header": {"eventtype_uploadcode": "CIC", "datetime": None}, "datalist": []},
        {"header": {"eventtype_uploadcode": "CIC"}, "datalist": [{"data_uploadcode": "PH9"}]},
        {"datalist": [{"data_uploadcode": "PH1", "data": 1}]},
        {"header": {"eventtype_uploadcode": "SIN", "datetime": START}},
        {"header": "not a dict", "datalist": ("a", "tuple"), 3: None},
    ]
    for data in (dumps_py2(odd), pickle.dumps(odd, protocol=4)):
        assert decode_batch(data) == odd


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_datetimes_keep_every_field(protocol: int) -> None:
    whens = [
        dt.datetime(2024, 12, 31, 23, 59, 59, 999_999),
        dt.datetime(1, 1, 1),
        dt.datetime(2024, 3, 31, 2, 30, fold=1),
    ]
    decoded = decode_batch(pickle.dumps(wrap(whens), protocol=protocol))[0]["datalist"][0]
    assert decoded["data"] == whens
    assert decode_batch(dumps_py2(wrap(whens)))[0]["datalist"][0]["data"] == whens


def test_nesting_up_to_the_limit_is_accepted() -> None:
    value: Any = 1
    for _ in range(MAX_DEPTH - 2):  # the batch and the event are two levels of containers
        value = [value]
    event = {"datalist": value}
    assert decode_batch(pickle.dumps([event], protocol=4)) == [event]
    too_deep = {"datalist": [value]}
    with pytest.raises(PayloadError, match="deeper"):
        decode_batch(pickle.dumps([too_deep], protocol=4))


def test_shared_references_within_the_budget_are_accepted(events: list[dict[str, Any]]) -> None:
    """Python's pickler writes the same object twice as a memo reference: allowed."""
    item = {"data_uploadcode": "PH1", "data": 100}
    shared = [{"header": events[0]["header"], "datalist": [item, item, item]}] * 3
    assert decode_batch(pickle.dumps(shared, protocol=2)) == shared
    assert decode_batch(dumps_py2(shared)) == shared


def test_tuples_as_values_and_keys_are_accepted() -> None:
    batch = [{"datalist": (1, (2, 3)), (1, "key"): ((),)}]
    for data in (dumps_py2(batch), pickle.dumps(batch, protocol=4)):
        assert decode_batch(data) == batch


def test_decoding_takes_bytearray_and_memoryview_but_not_text(events: list[dict]) -> None:
    data = dumps_py2(events[:3])
    assert decode_batch(bytearray(data)) == decode_batch(memoryview(data)) == events[:3]
    with pytest.raises(PayloadError):
        decode_batch(data.decode("latin-1"))  # type: ignore[arg-type]


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**100), 2**100)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
    | st.binary(max_size=300)
    | st.datetimes(),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(string.ascii_letters, max_size=8), children, max_size=5)
        | st.tuples(children, children)
    ),
    max_leaves=30,
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.dictionaries(st.text(max_size=10), JSONISH, max_size=4), max_size=4),
    st.integers(0, pickle.HIGHEST_PROTOCOL),
)
def test_any_batch_of_allowed_types_round_trips(batch: list[dict], protocol: int) -> None:
    assert decode_batch(pickle.dumps(batch, protocol=protocol)) == batch


# --- what is refused ---------------------------------------------------------------------


@pytest.mark.timeout(60)  # a hang guard, not a speed test
@pytest.mark.parametrize(("name", "data"), HOSTILE, ids=[name for name, _ in HOSTILE])
def test_hostile_pickle_is_refused(name: str, data: bytes) -> None:
    with pytest.raises(PayloadError) as refused:
        decode_batch(data)
    assert not MARKER.exists()
    message = str(refused.value)
    assert 0 < len(message) <= 200 and message.isascii() and message.isprintable()


def test_hostile_corpus_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """No case crashes the interpreter or makes it allocate much, and none runs code."""
    script = textwrap.dedent(
        """
        import json, resource, sys, time
        sys.path.insert(0, sys.argv[1])
        from hostile_pickles import HOSTILE
        from hisparc_datastore.payload import PayloadError, decode_batch

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results = []
        for name, data in HOSTILE:
            start = time.perf_counter()
            try:
                decode_batch(data)
                outcome = "accepted"
            except PayloadError:
                outcome = "refused"
            results.append((name, outcome, time.perf_counter() - start))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"results": results, "growth_kib": peak - base}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert [name for name, outcome, _ in report["results"] if outcome != "refused"] == []
    # The corpus holds megabyte-sized nesting bombs: their objects cost tens of MiB.  A memo
    # or length attack that got through would cost GiBs.
    assert report["growth_kib"] < 512 * 1024
    assert not MARKER.exists()


def test_memory_error_is_not_disguised_as_a_bad_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Running out of memory is the server's trouble: the caller answers 5xx, not 208."""

    def exhausted(self: object) -> None:
        raise MemoryError

    monkeypatch.setattr(payload._RestrictedUnpickler, "load", exhausted)
    with pytest.raises(MemoryError):
        decode_batch(dumps_py2([]))


def test_payload_error_is_a_value_error() -> None:
    assert issubclass(PayloadError, ValueError)


def test_gc_is_enabled_again_after_decoding() -> None:
    import gc

    assert gc.isenabled()
    decode_batch(dumps_py2([]))
    with pytest.raises(PayloadError):
        decode_batch(b"\x80\x02N\x85\x85.")
    assert gc.isenabled()


def test_both_ways_of_listing_children_agree() -> None:
    """gc.get_referents skips only the str keys of str-keyed dicts, which are allowed."""
    containers = [{"a": 1, "b": [2]}, {3: "x", (4,): None}, [5, "y"], (6.0, b"z")]
    dicts = [c for c in containers if type(c) is dict]
    sequences = [c for c in containers if type(c) is not dict]
    fast = payload._children_referents(dicts, sequences)
    full = payload._children_iterated(dicts, sequences)
    missing = [x for x in full if not any(x is y for y in fast)]
    assert missing == ["a", "b"]
    assert all(any(x is y for y in full) for x in fast)
    assert payload._children is payload._children_referents


# --- questions about decoded events ----------------------------------------------------


def test_event_datetimes_and_suspicious_batches() -> None:
    old = dt.datetime(2019, 4, 7, 0, 0, 1)  # a GPS cold start
    batch = [
        {"header": {"datetime": START}},
        {"header": {"datetime": None}},
        {"header": {}},
        {},
        {"header": {"datetime": "2019-04-07"}},  # not a datetime: ignored
    ]
    assert event_datetimes(batch) == [START, None, None, None, None]
    assert event_datetime({"header": {"datetime": old}}) == old
    assert not is_suspicious(batch, 2020)
    assert is_suspicious([*batch, {"header": {"datetime": old}}], 2020)
    assert not is_suspicious([{"header": {"datetime": old}}], 2019)
    assert not is_suspicious([], 2020)
