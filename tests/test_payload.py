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
import re
import string
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from re import _constants as sre  # the regex parser's own opcodes (3.11+)
from re import _parser as sre_parse
from typing import Any

import numpy as np
import pytest
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import Py2Long, Py2Unicode, dumps_py2
from hostile_pickles import HOSTILE, MARKER
from hypothesis import given, settings
from hypothesis import strategies as st

from hisparc_datastore.format import payload
from hisparc_datastore.format.payload import (
    MAX_DEPTH,
    PayloadError,
    decode_batch,
    decode_pickle,
    event_datetime,
    event_datetimes,
    is_suspicious,
)

START = dt.datetime(2024, 3, 1, 12, 0, 0)


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    """A station's queue: coincidences with traces, singles, now and then something else,
    and one event of each of the 14 types."""
    rng = random.Random(11)
    batch = samples.realistic_batch(60, START, rng)
    later = START + dt.timedelta(minutes=5)
    batch += [samples.event_of_type(code, later, rng) for code in samples.UPLOAD_CODE_ORDER]
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
        from hisparc_datastore.format.payload import PayloadError, decode_batch

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


# --- the opcode scan on every interpreter the project admits (gh-106052) ----------------


@pytest.mark.parametrize("length", [255, 256, 257, 4096, 65_536])
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_strings_longer_than_one_token_decode(protocol: int, length: int) -> None:
    """255 characters is the longest string a run takes as one token; a longer one takes a
    step of the scan, where CPython 3.11.0-3.11.4 refused every Python 3 pickle (208)."""
    batch = wrap(["t" * length, b"b" * length, "\u00e9" * length])
    assert decode_batch(pickle.dumps(batch, protocol=protocol)) == batch
    assert decode_batch(dumps_py2(batch))[0]["datalist"][0]["data"][0] == "t" * length


def test_self_check_passes_on_this_interpreter_in_a_few_milliseconds() -> None:
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        assert payload.self_check() is None
        timings.append(time.perf_counter() - started)
    assert min(timings) < 0.05  # measured 1-2 ms; both functions run it at start-up


def test_self_check_names_the_interpreter_and_what_was_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scan as CPython 3.11.0-3.11.4 ran it: a run that met a long string ended one
    byte into it, and the string's length bytes were taken for opcodes."""
    real_run_end = payload._run_end

    def run_end_before_3_11_5(run: Any, data: bytes, pos: int) -> int:
        end = real_run_end(run, data, pos)
        return end + 1 if data[end : end + 1] == b"X" else end

    monkeypatch.setattr(payload, "_run_end", run_end_before_3_11_5)
    with pytest.raises(RuntimeError) as failed:
        payload.self_check()
    message = str(failed.value)
    version = ".".join(map(str, sys.version_info[:3]))
    assert message.startswith(f"decoder self-check failed on Python {version}: ")
    assert "a Python 3 protocol-3 batch was refused (PayloadError: pickle opcode 0x01" in message
    assert "a Python 3 protocol-4 batch was refused" in message
    assert "protocol-0 batch" not in message  # text pickles never stop at an X


def test_self_check_notices_a_refusal_for_another_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    harmless = payload._Global("system", lambda *args: "did not run")
    monkeypatch.setitem(payload._GLOBALS, ("os", "system"), harmless)
    with pytest.raises(
        RuntimeError,
        match=r"os\.system in a protocol-0 pickle was refused for "
        r"another reason \(payload is a str, not a list\)",
    ):
        payload.self_check()


#: The scan's run regexes: (compiled, argumentless opcodes, tokens) as _runs got them.
RUNS = {
    "text": (payload._TEXT_RUN, payload._TEXT_ARGLESS, payload._TEXT_TOKENS),
    "safe": (payload._SAFE_RUN, payload._SAFE_ARGLESS, payload._SAFE_TOKENS),
    "uncounted": (payload._UNCOUNTED_RUN, payload._UNCOUNTED_ARGLESS, payload._ARGUMENT_TOKENS),
}
_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)


def _walk(items: Any) -> Iterator[tuple[Any, Any]]:
    """Every (opcode, argument) of a parsed regex, nested ones included."""
    for op, av in items:
        yield op, av
        if op in _REPEATS:
            yield from _walk(av[2])
        elif op is sre.BRANCH:
            for alternative in av[1]:
                yield from _walk(alternative)
        elif op is sre.SUBPATTERN:
            yield from _walk(av[3])
        elif op is sre.ATOMIC_GROUP:
            yield from _walk(av)
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            yield from _walk(av[1])


def _set_bytes(members: Any) -> set[int]:
    """The bytes a parsed character set ([...]) matches."""
    found: set[int] = set()
    negate = False
    for op, av in members:
        if op is sre.LITERAL:
            found.add(av)
        elif op is sre.RANGE:
            found.update(range(av[0], av[1] + 1))
        elif op is sre.NEGATE:
            negate = True
        elif op is sre.CATEGORY and av in (sre.CATEGORY_SPACE, sre.CATEGORY_NOT_SPACE):
            space = set(b" \t\n\r\f\v")
            found.update(space if av is sre.CATEGORY_SPACE else set(range(256)) - space)
        else:
            raise AssertionError(f"unexpected {op} {av} in a character set")
    return set(range(256)) - found if negate else found


def _first_bytes(items: Any) -> set[int]:
    """The bytes a match of a parsed sequence can start with; it must not match empty."""
    found: set[int] = set()
    for op, av in items:
        if op is sre.LITERAL:
            return found | {av}
        if op is sre.NOT_LITERAL:
            return found | (set(range(256)) - {av})
        if op is sre.IN:
            return found | _set_bytes(av)
        if op is sre.BRANCH:
            return found | set().union(*map(_first_bytes, av[1]))
        if op is sre.SUBPATTERN:
            return found | _first_bytes(av[3])
        if op is sre.MAX_REPEAT:
            found |= _first_bytes(av[2])
            if av[0] > 0:
                return found
            continue
        raise AssertionError(f"unexpected {op}")
    raise AssertionError("this part of the regex can match nothing at all")


@pytest.mark.parametrize("name", list(RUNS))
def test_runs_have_no_possessive_repeat_or_atomic_group_and_are_capped(name: str) -> None:
    """Possessive repeats and atomic groups are wrong on 3.11.0-3.11.4; a greedy repetition
    of a group holds a frame per repetition, so it must have a cap."""
    tree = sre_parse.parse(RUNS[name][0].pattern)
    for op, av in _walk(tree):
        assert op not in (sre.POSSESSIVE_REPEAT, sre.ATOMIC_GROUP)
        if op in _REPEATS and av[2].getwidth() != (1, 1):
            assert av[1] <= payload._RUN_TOKENS


@pytest.mark.parametrize("name", list(RUNS))
def test_run_alternatives_start_with_bytes_of_their_own(name: str) -> None:
    """What makes the greedy runs match what possessive ones did: at any position at most
    one alternative, or the argumentless opcodes, can fit (see payload._runs)."""
    run, argless, _ = RUNS[name]
    (lead, (_, _, lead_item)), (repeat_op, (low, high, body)) = sre_parse.parse(run.pattern)
    (branch, (_, alternatives)), (tail, (_, _, tail_item)) = body
    assert (lead, repeat_op, branch, tail) == (sre.MAX_REPEAT, sre.MAX_REPEAT, sre.BRANCH,
                                               sre.MAX_REPEAT)  # fmt: skip
    assert (low, high) == (0, payload._RUN_TOKENS)
    assert (
        _first_bytes(lead_item)
        == _first_bytes(tail_item)
        == _set_bytes(sre_parse.parse(argless)[0][1])
    )
    starts = [_first_bytes(lead_item), *map(_first_bytes, alternatives)]
    assert len(starts) >= 6  # the argumentless opcodes and at least five tokens
    for index, start in enumerate(starts):
        for other in starts[index + 1 :]:
            assert not start & other, sorted(start & other)


def _scan_inputs() -> list[bytes]:
    rng = random.Random(106052)
    batch = samples.realistic_batch(30, START, rng)
    flavoured = samples.numpy_flavour(batch)
    inputs = [dumps_py2(batch)]
    inputs += [pickle.dumps(flavoured, protocol=protocol) for protocol in (2, 3, 4, 5)]
    inputs += [data for _, data in HOSTILE if len(data) < 50_000]
    inputs += [rng.randbytes(20_000), bytes(rng.choice(b"(]}qhKXC\x8c\x94r0aesu.") for _ in
               range(20_000))]  # fmt: skip
    inputs.append(b"(l" + b"I7\na" * (payload._RUN_TOKENS + 10) + b".")
    return inputs


@pytest.mark.skipif(
    sys.version_info < (3, 11, 5),
    reason="the possessive runs, the reference here, are wrong before 3.11.5 (gh-106052)",
)
@pytest.mark.parametrize("name", list(RUNS))
def test_runs_end_where_the_possessive_runs_they_replace_end(name: str) -> None:
    """From every position where a run ends (and the byte after it), on real, hostile and
    random bytes: the greedy, capped runs stop exactly where the possessive ones did."""
    run, argless, tokens = RUNS[name]
    possessive = tokens.replace(rb"[^\n]*\n", rb"[^\n]*+\n")
    reference = re.compile(rb"(?:%s*+(?:%s))*+%s*+" % (argless, possessive, argless)).match
    compared = 0
    for data in _scan_inputs():
        pos = 0
        while pos < len(data):
            end = payload._run_end(run.match, data, pos)
            assert end == reference(data, pos).end(), (data[:40], pos)  # type: ignore[union-attr]
            compared += 1
            pos = end + 1
    assert compared > 10_000


@pytest.mark.parametrize(
    "tokens",
    [payload._RUN_TOKENS - 1, payload._RUN_TOKENS, payload._RUN_TOKENS + 1,
     2 * payload._RUN_TOKENS + 1],
)  # fmt: skip
def test_runs_longer_than_one_regex_call(tokens: int) -> None:
    text = b"(l" + b"I7\na" * tokens + b"."
    binary = b"\x80\x02]" + b"K\x07a" * tokens + b"."
    assert decode_pickle(text) == decode_pickle(binary) == [7] * tokens
    # What comes after a cap is checked like anything else.
    for data in (text[:-1] + b"Pid\n.", binary[:-1] + b"\x82\x01."):
        with pytest.raises(PayloadError, match="not allowed"):
            decode_pickle(data)


def test_a_long_run_holds_little_memory() -> None:
    """The matcher keeps a frame per repetition until the call returns (about 200 bytes):
    without the cap, this 2 MiB run alone would hold about 140 MiB."""
    data = b"\x80\x02]" + b"K\x07a" * 700_000 + b"."
    tracemalloc.start()
    try:
        payload._scan(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


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
