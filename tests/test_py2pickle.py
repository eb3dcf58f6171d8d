"""dumps_py2 writes what CPython 2.7's cPickle.dumps(obj) writes (protocol 0).

The expected bytes below are cPickle's layout: MARK + DICT/LIST/TUPLE, a PUT after every
memoised object with sequential indices, GET for an object met again, Python 2's repr of
byte strings, cPickle's raw-unicode-escape, and datetimes as a REDUCE of their state.
Decoding uses the standard library (our own trusted bytes, in a test only) and the
restricted decoder.
"""

from __future__ import annotations

import datetime as dt
import io
import pickle
import pickletools
import random
from typing import Any

import pytest
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import Py2Long, Py2Unicode, dumps_py2

from hisparc_datastore.format.payload import decode_batch


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"N."),
        (True, b"I01\n."),
        (False, b"I00\n."),
        (0, b"I0\n."),
        (-42, b"I-42\n."),
        (2**63 - 1, b"I9223372036854775807\n."),
        (2**63, b"L9223372036854775808L\n."),
        (Py2Long(5), b"L5L\n."),
        (1.5, b"F1.5\n."),
        (1e-06, b"F1e-06\n."),
        (1.0, b"F1.0\n."),
        (float("inf"), b"Finf\n."),
        ("", b"S''\np0\n."),
        ("CIC", b"S'CIC'\np0\n."),
        (b"\x00\xff", b"S'\\x00\\xff'\np0\n."),
        (Py2Unicode("ab"), b"Vab\np0\n."),
        ((), b"(tp0\n."),
        ((1, 2), b"(I1\nI2\ntp0\n."),
        ([], b"(lp0\n."),
        ({}, b"(dp0\n."),
    ],
)
def test_single_values(value: Any, expected: bytes) -> None:
    assert dumps_py2(value) == expected


@pytest.mark.parametrize(
    ("text", "python2_repr"),
    [
        ("plain", b"'plain'"),
        ("it's", b'"it\'s"'),  # only a single quote inside: double quotes, nothing escaped
        ('say "hi"', b"'say \"hi\"'"),
        ("both ' and \"", b"'both \\' and \"'"),  # both: single quotes, the single escaped
        ("tab\there\nnew\rline\\", b"'tab\\there\\nnew\\rline\\\\'"),
        ("\x00\x1f\x7f\x80\xe9\xff", b"'\\x00\\x1f\\x7f\\x80\\xe9\\xff'"),
        ("Température", b"'Temp\\xe9rature'"),
    ],
)
def test_byte_strings_are_escaped_as_python2_repr(text: str, python2_repr: bytes) -> None:
    assert dumps_py2(text) == b"S" + python2_repr + b"\np0\n."


def test_unicode_uses_cpickles_raw_unicode_escape() -> None:
    value = Py2Unicode("a\\b\nc\xe9\u20ac\U0001f600")
    expected = b"Va\\u005cb\\u000ac\xe9\\u20ac\\U0001f600\np0\n."
    assert dumps_py2(value) == expected
    assert pickle.loads(expected) == value


def test_text_latin1_cannot_encode_is_sent_as_unicode() -> None:
    assert dumps_py2("5 €") == b"V5 \\u20ac\np0\n."


def test_containers_and_memo() -> None:
    assert dumps_py2([{"a": 1}]) == b"(lp0\n(dp1\nS'a'\np2\nI1\nsa."
    shared = "x"
    assert dumps_py2([shared, shared]) == b"(lp0\nS'x'\np1\nag1\na."
    inner = [1]
    assert dumps_py2((inner, inner)) == b"((lp0\nI1\nag0\ntp1\n."


def test_datetime_is_a_reduce_of_its_state() -> None:
    when = dt.datetime(2017, 2, 26, 12, 0, 0, 5)
    state = b"'\\x07\\xe1\\x02\\x1a\\x0c\\x00\\x00\\x00\\x00\\x05'"
    assert dumps_py2(when) == (b"cdatetime\ndatetime\np0\n(S" + state + b"\np1\ntp2\nRp3\n.")
    # the datetime class is memoised once; every datetime gets its own state and tuple
    two = dumps_py2([when, when.replace(second=1)])
    assert two.count(b"cdatetime\ndatetime\n") == 1
    assert b"g1\n(S" in two


def test_event_layout_matches_cpickle() -> None:
    event = {
        "header": {
            "eventtype_uploadcode": "CIC",
            "datetime": dt.datetime(2020, 1, 2, 3, 4, 5),
            "nanoseconds": 7,
        },
        "datalist": [{"data_uploadcode": "PH1", "data": 123}],
    }
    assert dumps_py2([event]) == (
        b"(lp0\n(dp1\nS'header'\np2\n(dp3\nS'eventtype_uploadcode'\np4\nS'CIC'\np5\n"
        b"sS'datetime'\np6\ncdatetime\ndatetime\np7\n"
        b"(S'\\x07\\xe4\\x01\\x02\\x03\\x04\\x05\\x00\\x00\\x00'\np8\ntp9\nRp10\n"
        b"sS'nanoseconds'\np11\nI7\nssS'datalist'\np12\n(lp13\n(dp14\n"
        b"S'data_uploadcode'\np15\nS'PH1'\np16\nsS'data'\np17\nI123\nsasa."
    )


@pytest.fixture(scope="module")
def station_batch() -> list[dict[str, Any]]:
    rng = random.Random(5)
    start = dt.datetime(2024, 6, 30, 23, 59, 0)  # crosses midnight
    batch = samples.realistic_batch(80, start, rng)
    return batch + [samples.event_of_type(code, start, rng) for code in samples.UPLOAD_CODE_ORDER]


def test_round_trip_through_the_standard_library_and_decode_batch(
    station_batch: list[dict[str, Any]],
) -> None:
    data = dumps_py2(station_batch)
    assert pickle.loads(data, encoding="latin1") == station_batch  # our own bytes: trusted
    assert decode_batch(data) == station_batch


def ascii_events() -> list[dict[str, Any]]:
    """Station events that Python 3's pickletools can show.

    pickletools decodes a STRING argument as ASCII after undoing its escapes, so it fails
    on any Python 2 byte string with a byte >= 0x80: the state of a 2024 datetime
    (``\\x07\\xe8...``) or a latin-1 error message.  Real cPickle output fails the same way.
    Dates in 2050 (``\\x08\\x02``) at whole seconds and ASCII text avoid it.
    """
    rng = random.Random(6)
    start = dt.datetime(2050, 1, 2, 3, 4, 5)
    batch = samples.realistic_batch(30, start, rng)
    batch += [samples.event_of_type(code, start, rng) for code in samples.UPLOAD_CODE_ORDER]
    for event in batch:
        header = event["header"]
        header["datetime"] = header["datetime"].replace(microsecond=0)
        for item in event["datalist"]:
            if isinstance(item["data"], str):
                item["data"] = item["data"].encode("ascii", "replace").decode("ascii")
    batch.append({"extra": [Py2Unicode("é €"), Py2Long(3), -(2**70), None, (1.5, "t")]})
    return batch


def test_only_protocol_0_opcodes() -> None:
    batch = ascii_events()
    data = dumps_py2(batch)
    pickletools.dis(data, out=io.StringIO())  # well-formed: stack, marks and memo all agree
    ops = [(op.name, op.proto, arg) for op, arg, _ in pickletools.genops(data)]
    assert {proto for _, proto, _ in ops} == {0}
    assert {name for name, _, _ in ops} == {
        "MARK", "DICT", "LIST", "TUPLE", "SETITEM", "APPEND", "STRING", "UNICODE", "INT",
        "LONG", "FLOAT", "NONE", "GLOBAL", "REDUCE", "PUT", "GET", "STOP",
    }  # fmt: skip
    puts = [arg for name, _, arg in ops if name == "PUT"]
    assert puts == list(range(len(puts)))  # sequential memo, as cPickle numbers it
    assert decode_batch(data) == batch


def test_station_pickles_are_ascii(station_batch: list[dict[str, Any]]) -> None:
    """Byte strings are escaped: a Python 2 station's pickle is plain ASCII text."""
    assert dumps_py2(station_batch).isascii()


def test_deterministic(station_batch: list[dict[str, Any]]) -> None:
    assert dumps_py2(station_batch) == dumps_py2(station_batch)


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        bytearray(b"x"),
        dt.date(2024, 1, 1),
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        object(),
    ],
)
def test_what_a_python2_station_cannot_send_is_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        dumps_py2([value])
