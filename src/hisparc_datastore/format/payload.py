"""Decoding of uploaded event batches: the one place where network pickles become objects.

Both the upload function (to answer ``208`` for what can never be stored) and the writer
(to read what it stores) call :func:`decode_batch`.  Unpickling is code execution unless
every global is refused, and even with every global refused CPython's C unpickler can be
driven into harm by a few bytes: a ten-byte ``LONG_BINPUT`` makes it zero 2 GiB of memo,
and a dict key nested 10**6 tuples deep crashes the interpreter when it is hashed.  So a
payload passes three gates, each cheap next to the unpickling itself:

1. **Opcode scan**, before any object exists.  A protocol-0 pickle (what Python 2 stations
   send) is matched by a regular expression of the opcodes such pickles hold; any other
   pickle by runs of a regular expression of safe tokens, with a Python step only for the
   rare token that needs arithmetic.  The expressions are plain greedy ones with nothing
   to backtrack into (no possessive quantifiers: CPython got those wrong before 3.11.5),
   and :func:`self_check` tries the decoder on the running interpreter.  Refused: opcodes
   no station needs (persistent ids, extension codes, out-of-band buffers, sets,
   bytearrays, INST/OBJ/NEWOBJ), lengths that run past the data, memo indices that would
   blow up the memo, ints wider than 128 bits, over 10,000 tuples other than call
   arguments, protocols above 5, bytes after STOP, and more than one container per 4 bytes.
2. **Restricted unpickling** by CPython's C unpickler, whose ``find_class`` knows exactly
   the globals real stations use (docs/FORMAT.md, section 2) and maps each to a stand-in
   that checks its arguments: numpy's own unpickling machinery never runs on network data.
3. **Structure check**: a level-by-level walk in C-level iteration (no recursion: a million
   levels of nesting cannot crash it) that allows only the payload's value types
   (docs/FORMAT.md, 2.2), bounds the depth (which also stops reference cycles), and bounds
   the expanded size of the tree by the input's size, so that shared references ("billion
   laughs") cost steps linear in the input, here and in any caller iterating the batch.

Memory: the unpickler's own memo stays below 16 MiB, and everything else it builds costs at
most a fixed multiple of the input, about 50x: the scan allows one container per 4 bytes
(an empty list is one byte of pickle and 56 of memory), and a pointer costs about 24x its
one-byte opcode.  Real batches cost 2-16x.  The upload's body limit turns the multiple
into a cap (docs/SECURITY.md, R1).
"""

from __future__ import annotations

import datetime as _dt
import gc
import pickle
import pickletools
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, compress, repeat
from operator import is_
from typing import Any

import numpy as np

__all__ = [
    "MAX_DEPTH",
    "PayloadError",
    "decode_batch",
    "decode_pickle",
    "event_datetime",
    "event_datetimes",
    "is_suspicious",
    "self_check",
]


class PayloadError(ValueError):
    """The payload can never be decoded into a batch of events (the upload answers 208).

    The message is a short reason, safe to log: it never contains payload data beyond a
    few escaped characters.
    """


#: Deepest nesting accepted.  Real batches are 4 deep (batch, event, datalist, item).
MAX_DEPTH = 32
#: Expanded tree size allowed per input byte, plus a constant: each value of a pickle
#: without shared references costs at least one byte, so real batches stay far below.
_BUDGET_PER_BYTE = 4
_BUDGET_BASE = 4096


def _short(text: str, limit: int = 80) -> str:
    """Log-safe rendering of a piece of untrusted text: escaped, printable, short."""
    shown = ascii(text[: limit + 1])[1:-1]
    return shown if len(shown) <= limit else shown[:limit] + "..."


# --- gate 1: the opcode scan -----------------------------------------------------------

#: PUT indices let through without a closer look have at most this many digits, LONG_BINPUT
#: indices are below 2**20.  The C unpickler sizes its memo to twice the largest index it
#: meets, so whatever the input, the memo stays below 2**21 slots (16 MiB).  A larger index
#: must not exceed its own offset in the data.
_FAST_MEMO_DIGITS = 6
#: The C unpickler builds everything iteratively, but inserting a dict key hashes it, and
#: hashing a tuple recurses into its items: a key nested 10**6 tuples deep crashes the
#: interpreter (measured: about 64 bytes of C stack per level; a segfault between 10**5
#: and 2*10**5 levels on an 8 MiB stack, between 10**4 and 2*10**4 on 1 MiB).  Each tuple
#: opcode adds at most one level, and one whose tuple goes straight into REDUCE adds none:
#: every callable a pickle can reach here refuses a tuple argument, so a REDUCE that
#: succeeds had a flat tuple.  At most this many other tuple opcodes (10**4 levels, about
#: 640 KiB of stack) are allowed.  Real pickles have one per numpy dtype (its state).
_MAX_FREE_TUPLES = 10_000

_TUPLE_BYTES = frozenset(b"t\x85\x86\x87")  # TUPLE, TUPLE1, TUPLE2, TUPLE3
#: A compiled run regex's ``match``: (data, position) -> the run found there.
_Matcher = Callable[[bytes, int], "re.Match[bytes] | None"]


#: Tokens one call of a run regex takes at most.  CPython's matcher keeps a backtracking
#: frame for every repetition of a group until the call returns, about 200 bytes each:
#: uncapped, one run over 8 MiB of two-byte tokens held 554 MiB.  Capped, a call holds
#: at most 0.85 MiB, and the scan calls again where a run stopped at the cap
#: (:func:`_run_end`).
_RUN_TOKENS = 4096


def _runs(argless: bytes, tokens: bytes) -> re.Pattern[bytes]:
    """Regex for a run of tokens and argumentless opcodes, as long as possible (up to the cap).

    A plain greedy repetition of one token and the argumentless opcodes after it, with no
    possessive quantifier or atomic group: CPython 3.11.0-3.11.4 match those wrongly when
    the repeated group can backtrack (gh-106052, fixed in 3.11.5), and a group of
    alternatives can.  There a run that met a string of 256 characters or more ended one
    byte into it, so every Python 3 pickle with a trace was refused.

    Greedy matches the same, in one pass.  Every alternative of ``tokens`` starts with
    bytes that no other one, and no argumentless opcode, starts with, and each matches in
    one way only, so at most one fits at any position and ``argless*`` can only stop where
    a token or the end of the run begins.  Nothing follows the repetition, so the first
    token that does not fit ends the match where it stands: there is never a choice to go
    back to.
    """
    return re.compile(rb"%s*(?:(?:%s)%s*){0,%d}" % (argless, tokens, argless, _RUN_TOKENS))


def _run_end(run: _Matcher, data: bytes, pos: int) -> int:
    """Where the run of tokens from ``pos`` ends, across as many regex calls as it takes.

    A call takes at most :data:`_RUN_TOKENS` tokens of at least one byte each, so a call
    that advanced fewer bytes than that ended on its own, and the run ends there.
    """
    while True:
        end = run(data, pos).end()  # type: ignore[union-attr]  # a run may be empty
        if end - pos < _RUN_TOKENS:
            return end
        pos = end


def _counted_short(opcode: bytes, lengths: range, width: int = 1) -> bytes:
    """Regex for an opcode with a little-endian length of ``width`` bytes and that many
    bytes of data, for every length in ``lengths`` (< 256): a regex cannot count, but it
    can try one literal length byte after another."""
    padding = b"\\x00" * (width - 1)
    cases = [re.escape(bytes((n,))) + padding + (rb"[\s\S]{%d}" % n if n else b"") for n in lengths]
    return re.escape(opcode) + rb"(?:" + rb"|".join(cases) + rb")"


#: Opcodes with a line argument as protocol 0 writes them: STRING and UNICODE lines (their
#: newlines are always escaped), bounded PUT, bounded INT/FLOAT/LONG/GET, GLOBAL.
_LINE_TOKENS = (
    rb"[SV][^\n]*\n"
    rb"|p[0-9]{1,%d}\n" % _FAST_MEMO_DIGITS + rb"|[IFLg][^\n]{1,44}\n"
    rb"|c[^\n]{1,256}\n[^\n]{1,256}\n"
)
_SMALL_MEMO_PUT = rb"\x94|q[\s\S]|r[\s\S]{2}[\x00-\x0f]\x00|p[0-9]{1,%d}\n" % _FAST_MEMO_DIGITS
#: A tuple that goes straight into REDUCE (after a memo opcode at most): a call's arguments.
_CALL_TUPLE = rb"[t\x85-\x87](?:" + _SMALL_MEMO_PUT + rb")?R"
#: A protocol-0 pickle as Python 2's cPickle and Python 3's pickler write it is runs of
#: these, a TUPLE for other uses now and then (which ends a run, to be counted), and a
#: final STOP.
_TEXT_ARGLESS = rb"[(dlsaRNb]"
_TEXT_TOKENS = _LINE_TOKENS + rb"|" + _CALL_TUPLE
_TEXT_RUN = _runs(_TEXT_ARGLESS, _TEXT_TOKENS)

#: Tokens of any protocol that are safe without a closer look.  Everything else (long
#: strings, 8-byte lengths, large memo indices, refused opcodes, STOP) ends a run and goes
#: through :func:`_step`; other tuple opcodes end a run to be counted.
_ARGUMENT_TOKENS = rb"|".join(
    (  # in the order of how often real pickles hold them: the matcher tries them in turn
        rb"r[\s\S]{2}[\x00-\x0f]\x00",  # LONG_BINPUT below 2**20
        rb"[hKq][\s\S]",  # BINGET, BININT1, BINPUT
        _counted_short(b"C", range(256)),  # SHORT_BINBYTES
        _counted_short(b"X", range(256), 4),  # BINUNICODE, short
        _counted_short(b"\x8c", range(256)),  # SHORT_BINUNICODE
        rb"M[\s\S]{2}|[Jj][\s\S]{4}|G[\s\S]{8}",
        rb"\x80[\x00-\x05]",  # PROTO 0..5
        _counted_short(b"U", range(256)),  # SHORT_BINSTRING
        _counted_short(b"\x8a", range(17)),  # LONG1 up to 128 bits
        _LINE_TOKENS,
    )
)
_SAFE_TOKENS = _ARGUMENT_TOKENS + rb"|" + _CALL_TUPLE
_SAFE_ARGLESS = rb"[(012NRbaedlsu}\])\x88\x89\x93\x94]"
_SAFE_RUN = _runs(_SAFE_ARGLESS, _SAFE_TOKENS)


# Opcode argument kinds for the token-by-token step.
_REFUSED, _ARGLESS, _FIXED, _LINE, _TWO_LINES, _COUNTED, _FRAME, _STOP = range(8)


def _opcode_table() -> tuple[list[int], list[int], list[str]]:
    """Per opcode byte: argument kind, parameter (size, width or length cap), name."""
    kinds = [_REFUSED] * 256
    params = [0] * 256
    names = [f"0x{code:02x}" for code in range(256)]
    unlimited = -1
    spec: dict[str, tuple[int, int]] = {
        # name: (kind, parameter)
        "MARK": (_ARGLESS, 0), "STOP": (_STOP, 0), "POP": (_ARGLESS, 0),
        "POP_MARK": (_ARGLESS, 0), "DUP": (_ARGLESS, 0), "NONE": (_ARGLESS, 0),
        "REDUCE": (_ARGLESS, 0), "BUILD": (_ARGLESS, 0), "APPEND": (_ARGLESS, 0),
        "APPENDS": (_ARGLESS, 0), "DICT": (_ARGLESS, 0), "EMPTY_DICT": (_ARGLESS, 0),
        "LIST": (_ARGLESS, 0), "EMPTY_LIST": (_ARGLESS, 0), "SETITEM": (_ARGLESS, 0),
        "SETITEMS": (_ARGLESS, 0), "TUPLE": (_ARGLESS, 0), "EMPTY_TUPLE": (_ARGLESS, 0),
        "TUPLE1": (_ARGLESS, 0), "TUPLE2": (_ARGLESS, 0), "TUPLE3": (_ARGLESS, 0),
        "NEWTRUE": (_ARGLESS, 0), "NEWFALSE": (_ARGLESS, 0), "STACK_GLOBAL": (_ARGLESS, 0),
        "MEMOIZE": (_ARGLESS, 0),
        "BININT": (_FIXED, 4), "BININT1": (_FIXED, 1), "BININT2": (_FIXED, 2),
        "BINFLOAT": (_FIXED, 8), "BINGET": (_FIXED, 1), "LONG_BINGET": (_FIXED, 4),
        "BINPUT": (_FIXED, 1), "LONG_BINPUT": (_FIXED, 4), "PROTO": (_FIXED, 1),
        "INT": (_LINE, 44), "LONG": (_LINE, 44), "FLOAT": (_LINE, 44), "GET": (_LINE, 44),
        "PUT": (_LINE, 44), "STRING": (_LINE, unlimited), "UNICODE": (_LINE, unlimited),
        "GLOBAL": (_TWO_LINES, 256),
        "SHORT_BINSTRING": (_COUNTED, 1), "SHORT_BINBYTES": (_COUNTED, 1),
        "SHORT_BINUNICODE": (_COUNTED, 1), "BINSTRING": (_COUNTED, 4),
        "BINBYTES": (_COUNTED, 4), "BINUNICODE": (_COUNTED, 4),
        "BINUNICODE8": (_COUNTED, 8), "BINBYTES8": (_COUNTED, 8),
        "LONG1": (_COUNTED, 1), "LONG4": (_COUNTED, 4),
        "FRAME": (_FRAME, 8),
    }  # fmt: skip
    for op in pickletools.opcodes:  # the interpreter's own list: names and bytes agree
        code = op.code.encode("latin-1")[0]
        names[code] = op.name
        if op.name in spec:
            kinds[code], params[code] = spec[op.name]
    return kinds, params, names


_KINDS, _PARAMS, _NAMES = _opcode_table()
_OP = {name: code for code, name in enumerate(_NAMES)}
_STOP_BYTE = _OP["STOP"]
_PROTO, _PUT, _LONG_BINPUT = _OP["PROTO"], _OP["PUT"], _OP["LONG_BINPUT"]
_LONG1, _LONG4 = _OP["LONG1"], _OP["LONG4"]
#: Widest int accepted, in bytes of two's complement (LONG1/LONG4): 128 bits.
_MAX_INT_BYTES = 16


def _step(data: bytes, pos: int) -> int:
    """Check the one opcode at ``pos`` (not STOP); return where the next one starts.

    Lengths must stay inside the data: the C unpickler allocates some objects at their
    claimed size before reading them (BINBYTES, BINBYTES8).
    """
    size = len(data)
    op = data[pos]
    pos += 1
    kind = _KINDS[op]
    if kind == _ARGLESS:
        return pos
    if kind == _FIXED:
        pos += _PARAMS[op]
        if pos > size:
            raise PayloadError("truncated pickle")
        if op == _LONG_BINPUT and int.from_bytes(data[pos - 4 : pos], "little") > pos:
            raise PayloadError("memo index beyond the size of the data")
        if op == _PROTO and data[pos - 1] > pickle.HIGHEST_PROTOCOL:
            raise PayloadError("unsupported pickle protocol")
        return pos
    if kind == _LINE:
        end = data.find(b"\n", pos)
        if end < 0:
            raise PayloadError("truncated pickle")
        if 0 <= _PARAMS[op] < end - pos:
            raise PayloadError(f"{_NAMES[op]} argument too long")
        if op == _PUT:
            digits = data[pos:end]
            if not digits.isdigit() or int(digits) > pos:
                raise PayloadError("memo index beyond the size of the data")
        return end + 1
    if kind == _COUNTED:
        width = _PARAMS[op]
        length = int.from_bytes(data[pos : pos + width], "little")
        pos += width + length
        if pos > size:
            raise PayloadError(f"{_NAMES[op]} length runs past the end of the data")
        if op in (_LONG1, _LONG4) and length > _MAX_INT_BYTES:
            raise PayloadError("integer too large")
        return pos
    if kind == _FRAME:  # the frame's opcodes follow and are checked one by one
        length = int.from_bytes(data[pos : pos + 8], "little")
        pos += 8
        if pos + length > size:
            raise PayloadError("FRAME length runs past the end of the data")
        return pos
    if kind == _TWO_LINES:
        for _ in range(2):
            end = data.find(b"\n", pos)
            if end < 0 or end - pos > _PARAMS[op]:
                raise PayloadError("truncated or oversized GLOBAL")
            pos = end + 1
        return pos
    raise PayloadError(f"pickle opcode {_NAMES[op]} not allowed")


def _free_tuple(free: int) -> int:
    """Count one more tuple opcode whose tuple is not a call's arguments."""
    if free >= _MAX_FREE_TUPLES:
        raise PayloadError("too many tuples (nesting could crash the unpickler)")
    return free + 1


def _scan_text(data: bytes) -> bool:
    """True for a plain protocol-0 pickle (all checks passed); False if ``data`` is not one."""
    size = len(data)
    run = _TEXT_RUN.match
    free = pos = 0
    while True:
        pos = _run_end(run, data, pos)
        if pos >= size:
            return False
        if data[pos] == 0x74:  # TUPLE
            pos += 1
            free = _free_tuple(free)
            continue
        return data[pos] == _STOP_BYTE and pos == size - 1


def _scan_any(data: bytes) -> None:
    """Check a pickle of any protocol; PayloadError on anything refused.

    Runs of safe tokens go by one regex call each; only the rare token that needs
    arithmetic (a long string, a large memo index) takes a Python step, and those steps
    are bounded too, so that no input costs more than a few passes over it.
    """
    size = len(data)
    run = _SAFE_RUN.match
    steps_left = size // 128 + 1024  # real pickles need one per string >= 256 bytes
    free = pos = 0
    while True:
        pos = _run_end(run, data, pos)
        if pos >= size:
            raise PayloadError("truncated pickle (no STOP)")
        op = data[pos]
        if op in _TUPLE_BYTES:
            pos += 1
            free = _free_tuple(free)
            continue
        if op == _STOP_BYTE:
            if pos + 1 != size:
                raise PayloadError("data after the end of the pickle")
            return
        steps_left -= 1
        if steps_left < 0:
            raise PayloadError("pickle too irregular to check")
        pos = _step(data, pos)


#: Opcodes that create a container: EMPTY_DICT, EMPTY_LIST, TUPLE1-3, and MARK, which
#: DICT, LIST and TUPLE each consume one of.  (EMPTY_TUPLE is a shared singleton, and a
#: REDUCE that allocates anything needs a counted tuple for its arguments.)
_CONTAINER_OPCODES = b"}](\x85\x86\x87"
_NOT_CONTAINER_OPCODES = bytes(range(256)).translate(None, _CONTAINER_OPCODES)
#: Containers allowed per byte of pickle, and a base for small batches.  An empty dict is
#: one byte of pickle and 64 bytes of memory plus a pointer: a pickle of nothing else
#: costs 110 times its size to decode, where the densest real batches (PySPARC's numpy
#: flavour without traces: config, weather config) create one container per 7.5 bytes,
#: and batches with traces one per 50-150 bytes.  One per 4 bytes keeps a factor 1.9 from
#: the densest real batch, and brings the worst case near what a pickle of nothing but
#: ``None`` or short strings costs anyway (about 25x; docs/SECURITY.md, R1).
_BYTES_PER_CONTAINER = 4
_CONTAINER_BASE = 65_536
_CONTAINER_BYTES = frozenset(_CONTAINER_OPCODES)
#: :data:`_SAFE_RUN` with the counted opcodes taken out, to stop on each of them.
_UNCOUNTED_ARGLESS = rb"[012NRbaedlsu)\x88\x89\x93\x94]"
_UNCOUNTED_RUN = _runs(_UNCOUNTED_ARGLESS, _ARGUMENT_TOKENS)


def _count_containers(data: bytes, limit: int) -> int:
    """Container opcodes in a pickle that passed the scan, counted up to ``limit + 1``.

    One Python step per container, so this runs only when the byte count (an upper
    bound) is over the limit, which no real batch comes near: a stray ``}`` inside a
    string would otherwise refuse a station's batch, and that blocks its queue for good.
    """
    run = _UNCOUNTED_RUN.match
    count = pos = 0
    while count <= limit:
        pos = _run_end(run, data, pos)
        op = data[pos]
        if op in _CONTAINER_BYTES:
            count += 1
            pos += 1
        elif op == _STOP_BYTE:  # the scan made sure it is the last byte
            break
        else:
            pos = _step(data, pos)
    return count


def _check_containers(data: bytes) -> None:
    """Refuse a pickle that would build more containers than its size allows."""
    limit = len(data) // _BYTES_PER_CONTAINER + _CONTAINER_BASE
    if len(data.translate(None, _NOT_CONTAINER_OPCODES)) <= limit:
        return  # every counted opcode is one of these bytes: the common, fast case
    if _count_containers(data, limit) > limit:
        raise PayloadError(
            f"more than one container per {_BYTES_PER_CONTAINER} bytes "
            "(would take far more memory than a real batch)"
        )


def _scan(data: bytes) -> None:
    """Raise PayloadError unless every opcode is allowed, bounded and inside the data,
    and the pickle creates no more containers than its size allows."""
    if not _scan_text(data):
        _scan_any(data)
    _check_containers(data)


# --- gate 2: restricted unpickling -----------------------------------------------------

#: numpy type codes a pickled numpy scalar may have: bool, ints, floats.
_NUMERIC_CODES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
_BYTE_ORDERS = ("<", ">", "=", "|")
#: (byte order, code) -> real numpy dtype, built here from trusted constants only.
_NUMPY_DTYPES: dict[tuple[str, str], np.dtype[Any]] = {
    (order, code): np.dtype(("=" if order == "|" else order) + code)
    for order in _BYTE_ORDERS
    for code in _NUMERIC_CODES
}
_NUMPY_SCALAR_TYPES = frozenset(dtype.type for dtype in _NUMPY_DTYPES.values())


class _DType:
    """Stand-in for ``numpy.dtype`` while unpickling: a checked type code, nothing more.

    numpy pickles a dtype as ``dtype(code, False, True)`` followed by BUILD with a state
    tuple ``(3, byte_order, None, None, None, -1, -1, 0)`` (version 4 adds metadata).  Only
    that shape, for numeric codes, is accepted; structured, object, string and datetime
    dtypes, sub-arrays, field names and metadata are refused.
    """

    __slots__ = ("code", "order")

    def __init__(self, code: object, align: object = False, copy: object = True) -> None:
        if type(code) is not str or code not in _NUMERIC_CODES:
            shown = _short(code, 12) if type(code) is str else type(code).__name__
            raise PayloadError(f"numpy dtype {shown} not allowed")
        if type(align) not in (bool, int) or align != 0 or type(copy) not in (bool, int):
            raise PayloadError("unexpected numpy dtype arguments")
        self.code = code
        self.order = "="

    def __setstate__(self, state: object) -> None:
        if type(state) is not tuple or len(state) not in (8, 9) or state[0] != len(state) - 5:
            raise PayloadError("unexpected numpy dtype state")
        order, subarray, names, fields, elsize, alignment, flags = state[1:8]
        metadata = state[8] if len(state) == 9 else None
        if (
            type(order) is not str
            or order not in _BYTE_ORDERS
            or subarray is not None
            or names is not None
            or fields is not None
            or metadata is not None
            or type(elsize) is not int
            or type(alignment) is not int
            or type(flags) is not int
            or (elsize, alignment, flags) != (-1, -1, 0)
        ):
            raise PayloadError("numpy dtype state not allowed (only plain numeric types)")
        self.order = order


def _scalar(dtype: object, data: object = None) -> Any:
    """Stand-in for numpy's ``multiarray.scalar``: the value from exactly its own bytes."""
    if type(dtype) is not _DType:
        raise PayloadError("numpy scalar without an allowed dtype")
    if type(data) is str:
        # A Python 2 numpy pickle holds the bytes in a byte string, loaded as latin-1 text.
        data = data.encode("latin-1")
    numpy_dtype = _NUMPY_DTYPES[dtype.order, dtype.code]
    if type(data) is not bytes or len(data) != numpy_dtype.itemsize:
        raise PayloadError("numpy scalar data of the wrong size")
    if dtype.code == "b1" and data not in (b"\x00", b"\x01"):
        raise PayloadError("numpy bool scalar out of range")
    return np.frombuffer(data, dtype=numpy_dtype)[0]


def _encode(text: object, encoding: object) -> bytes:
    """Stand-in for ``_codecs.encode``: how Python 3 protocols <= 2 spell a bytes object."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise PayloadError("only latin-1 encoding of a string is allowed")
    return text.encode("latin-1")


def _datetime(state: object, tzinfo: object = None) -> _dt.datetime:
    """Stand-in for ``datetime.datetime`` accepting only its pickled (naive) state.

    The constructor's state path checks little (day 0 or hour 25 get through), so the
    fields are checked by building the value again from them.
    """
    if type(state) not in (bytes, str) or len(state) != 10 or tzinfo is not None:
        raise PayloadError("datetime state not allowed")
    value = _dt.datetime(state)  # type: ignore[call-overload]
    try:
        _dt.datetime(
            value.year, value.month, value.day, value.hour, value.minute, value.second,
            value.microsecond,
        )  # fmt: skip
    except ValueError:
        raise PayloadError("datetime out of range") from None
    return value


class _Global:
    """What ``find_class`` hands out: a callable that nothing in a pickle can change.

    A plain function or class would do, but for BUILD: applied to whatever a GLOBAL pushed,
    it sets attributes (a function's ``__defaults__``, say), and the change would outlive
    the request.  This object has no ``__dict__``, refuses attribute assignment, and its
    ``__setstate__`` refuses BUILD.
    """

    __slots__ = ("_make", "name")

    def __init__(self, name: str, make: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_make", make)

    def __call__(self, *args: Any) -> Any:
        return self._make(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise PayloadError("attribute assignment on a global refused")

    def __delattr__(self, name: str) -> None:
        raise PayloadError("attribute deletion on a global refused")

    def __setstate__(self, state: Any) -> None:
        raise PayloadError("BUILD on a global refused")


def _empty_bytes() -> bytes:
    """Stand-in for ``bytes()``: Python 3 protocols <= 2 spell ``b""`` as a call of it."""
    return b""


#: (module, name) -> what ``find_class`` returns: the globals of docs/FORMAT.md, section 2, and the
#: one other global Python 3 needs for a value of the payload's types (``b""``, protocol <= 2).
_GLOBALS: dict[tuple[str, str], _Global] = {
    ("datetime", "datetime"): _Global("datetime", _datetime),
    ("numpy.core.multiarray", "scalar"): _Global("scalar", _scalar),
    ("numpy._core.multiarray", "scalar"): _Global("scalar", _scalar),
    ("numpy", "dtype"): _Global("dtype", _DType),
    ("_codecs", "encode"): _Global("encode", _encode),
    ("__builtin__", "bytes"): _Global("bytes", _empty_bytes),
    ("builtins", "bytes"): _Global("bytes", _empty_bytes),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """CPython's C unpickler with every global outside :data:`_GLOBALS` refused."""

    def find_class(self, module: str, name: str) -> Any:
        found = _GLOBALS.get((module, name))
        if found is None:
            raise PayloadError(f"global {_short(str(module), 40)}.{_short(str(name), 40)} refused")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise PayloadError("persistent ids are not allowed")


class _Source:
    """The file the C unpickler reads: all of the data at once, through ``peek``.

    The C unpickler only takes a file; given one with ``peek`` it works from the peeked
    buffer at the speed of ``pickle.loads`` (an io.BytesIO costs a Python call per line
    of a protocol-0 pickle).  ``read`` never returns more than is there, so a claimed
    length cannot make it allocate, and ``pos`` tells where the pickle ended.
    """

    __slots__ = ("pos", "view")

    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.pos = 0

    def peek(self, size: int = 0) -> memoryview:
        return self.view[self.pos :]  # all of it: the unpickler then never calls back

    def read(self, size: int = -1) -> memoryview:
        start = self.pos
        end = len(self.view) if size < 0 else min(start + size, len(self.view))
        self.pos = end
        return self.view[start:end]

    def readline(self) -> memoryview:
        end = self.view.obj.find(b"\n", self.pos)  # type: ignore[union-attr]
        return self.read(-1 if end < 0 else end + 1 - self.pos)

    def readinto(self, buffer: memoryview) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _unpickle(data: bytes) -> Any:
    """Run the restricted unpickler; every failure except memory exhaustion -> PayloadError.

    Python 2 byte strings are loaded as latin-1 text, so a station's bytes map one to one
    onto code points 0-255 (and back, for blobs) and a batch decodes to the same values
    whether a Python 2 or a Python 3 client pickled it.

    ``MemoryError`` is not converted: after the opcode scan no payload can make the
    unpickler allocate more than a small multiple of its own size (plus a memo of at most
    16 MiB), so running out of memory is the server's transient trouble, not a property
    of the payload.  The caller answers with a server error and the station retries,
    rather than the batch being refused for good.  KeyboardInterrupt and SystemExit are
    not Exceptions and pass through as well.
    """
    source = _Source(data)
    # The cyclic GC, triggered again and again while a million containers are built,
    # makes unpickling up to ten times slower, to find nothing: it is paused meanwhile.
    # (Process-wide: a thread that sees it paused just does not pause it again.)
    pause_gc = gc.isenabled()
    if pause_gc:
        gc.disable()
    try:
        batch = _RestrictedUnpickler(source, encoding="latin1").load()
    except PayloadError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise PayloadError(f"cannot unpickle: {type(exc).__name__}: {_short(str(exc))}") from None
    finally:
        if pause_gc:
            gc.enable()
    if source.pos != len(data):
        raise PayloadError("data after the end of the pickle")
    return batch


# --- gate 3: the structure check -------------------------------------------------------

#: Value types allowed anywhere in a batch.
_CONTAINERS = (dict, list, tuple)
_ALLOWED: frozenset[type] = frozenset(
    {*_CONTAINERS, str, bytes, int, float, bool, type(None), _dt.datetime} | _NUMPY_SCALAR_TYPES
)


def _children_iterated(dicts: list[dict[Any, Any]], sequences: list[Any]) -> list[Any]:
    """Keys and values of ``dicts`` and items of ``sequences``, iterated in C."""
    return [
        *chain.from_iterable(dicts),
        *chain.from_iterable(map(dict.values, dicts)),
        *chain.from_iterable(sequences),
    ]


def _children_referents(dicts: list[dict[Any, Any]], sequences: list[Any]) -> list[Any]:
    """The same in one C call: what the containers' ``tp_traverse`` visits.

    That is every item of a list or tuple and every value of a dict, and the keys of a
    dict unless they are all ``str`` (which is an allowed type: nothing is missed).  Four
    times faster than chained iterators, which allocate two views per dict.
    """
    return gc.get_referents(*dicts, *sequences)


def _referents_are_complete() -> bool:
    """Whether this interpreter's gc.get_referents shows what _check_tree must see."""
    key, value, item = (1, 2), 3.5, b"x"
    probe: list[Any] = [{key: value, "k": None}, [item], (item, value)]
    found = gc.get_referents(*probe)
    return all(any(x is y for y in found) for x in (key, value, item, None))


_children = _children_referents if _referents_are_complete() else _children_iterated


def _check_tree(batch: list[Any], budget: int) -> None:
    """Allowed types only, depth <= MAX_DEPTH, expanded size <= ``budget``.

    The walk goes level by level, and each level is handled by C-level iteration
    (:func:`_children`, map, compress): no recursion, and no Python bytecode per value,
    which keeps it a small fraction of the unpickling time.  Every reference is followed,
    so a container shared n times counts n times: the budget bounds this walk and any
    later walk over the batch, and a level's size is checked before it is built.  A
    reference cycle never ends and is caught by the depth bound.
    """
    dicts: list[dict[Any, Any]] = []
    sequences: list[list[Any] | tuple[Any, ...]] = [batch]
    depth = 1
    while dicts or sequences:
        if depth > MAX_DEPTH:
            raise PayloadError(f"nested deeper than {MAX_DEPTH} levels")
        budget -= 2 * sum(map(len, dicts)) + sum(map(len, sequences))
        if budget < 0:
            raise PayloadError("payload expands far beyond its size (shared references?)")
        children = _children(dicts, sequences)
        kinds = list(map(type, children))
        present = set(kinds)
        if not present <= _ALLOWED:
            refused = min(kind.__name__ for kind in present - _ALLOWED)
            raise PayloadError(f"value of type {_short(refused, 40)} not allowed")
        dicts = list(compress(children, map(is_, kinds, repeat(dict)))) if dict in present else []
        sequences = []
        for kind in (list, tuple):
            if kind in present:
                sequences += compress(children, map(is_, kinds, repeat(kind)))
        depth += 1


def _gated(data: bytes) -> tuple[Any, int]:
    """Gates 1 and 2: the unpickled value, and the tree budget gate 3 allows for it."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError("payload is not bytes")
    data = bytes(data)
    if not data:
        raise PayloadError("empty payload")
    _scan(data)
    return _unpickle(data), _BUDGET_PER_BYTE * len(data) + _BUDGET_BASE


def decode_pickle(data: bytes) -> Any:
    """Decode any untrusted pickle through the three gates, whatever its top-level value.

    For pickles that wrap a batch, such as the reference datastore's queue files
    (:mod:`hisparc_datastore.ops.import_legacy`); the same allowlist, bounds and budget apply.
    """
    value, budget = _gated(data)
    _check_tree([value], budget)
    return value


def decode_batch(data: bytes) -> list[dict[str, Any]]:
    """Decode an uploaded pickle into its list of events, or raise :class:`PayloadError`.

    Accepted: a list (possibly empty) of dicts, holding only dicts, lists, tuples, str,
    bytes, int, float, bool, None, naive datetimes and numpy bool/int/float scalars.
    What is inside each event is not judged here: an event of an unknown type, without
    header, datetime or datalist is the writer's to skip, not a reason to refuse a batch
    (refusing blocks the station's upload queue for good).
    """
    batch, budget = _gated(data)
    if type(batch) is not list:
        raise PayloadError(f"payload is a {_short(type(batch).__name__, 40)}, not a list")
    for event in batch:
        if type(event) is not dict:
            raise PayloadError("an event is not a dict")
    _check_tree(batch, budget)
    return batch


# --- questions about decoded events ----------------------------------------------------


def event_datetime(event: Any) -> _dt.datetime | None:
    """The event's header datetime, or None when it has none (the writer skips those)."""
    header = event.get("header") if type(event) is dict else None
    value = header.get("datetime") if type(header) is dict else None
    return value if type(value) is _dt.datetime else None


def event_datetimes(events: Sequence[Any]) -> list[_dt.datetime | None]:
    """Per event, its header datetime or None; in the order of ``events``."""
    return [event_datetime(event) for event in events]


def is_suspicious(events: Iterable[Any], minimum_year: int) -> bool:
    """True if any event's datetime lies before ``minimum_year`` (a GPS cold start).

    Events without a usable datetime do not count: the writer skips them anyway.
    """
    for event in events:
        when = event_datetime(event)
        if when is not None and when.year < minimum_year:
            return True
    return False


# --- self-check ------------------------------------------------------------------------

#: A trace as stations send it (base64 text), 304 characters: more than the 255 a run
#: takes as one token, so each payload below takes the scan's step for a long string,
#: which is where CPython 3.11.0-3.11.4 refused them all.
_CHECK_TRACE = "eJzt" + "0123456789+/" * 25
_CHECK_TRACE_BYTES = _CHECK_TRACE.encode("ascii")
_CHECK_WHEN = _dt.datetime(2024, 5, 1, 12, 0, 7)

#: One coincidence as hsmonitor's Python 2 cPickle.dumps writes it: protocol 0.
_CHECK_PY2 = (
    b"(lp0\n(dp1\nS'header'\np2\n(dp3\nS'eventtype_uploadcode'\np4\nS'CIC'\np5\nsS'datetime'\np6"
    b"\ncdatetime\ndatetime\np7\n(S'\\x07\\xe8\\x05\\x01\\x0c\\x00\\x07\\x00\\x00\\x00'\np8\ntp9"
    b"\nRp10\nsS'nanoseconds'\np11\nI123456789\nssS'datalist'\np12\n(lp13\n(dp14\nS'data_"
    b"uploadcode'\np15\nS'TR1'\np16\nsS'data'\np17\nS'"
    + _CHECK_TRACE_BYTES
    + b"'\np18\nsa(dp19\ng15\nS'PH1'\np20\nsg17\nI812\nsa(dp21\ng15\nS'EVENTRATE'\np22\nsg17\nF0."
    b"8125\nsa(dp23\ng15\nS'RED'\np24\nsg17\nI00\nsasa."
)

#: The same as PySPARC sends it: protocol 3, numbers as numpy scalars (numpy 1 spelling).
_CHECK_PY3 = (
    b"\x80\x03]q\x00}q\x01(X\x06\x00\x00\x00headerq\x02}q\x03(X\x14\x00\x00\x00eventtype_"
    b"uploadcodeq\x04X\x03\x00\x00\x00CICq\x05X\x08\x00\x00\x00datetimeq\x06cdatetime\ndatetime\n"
    b"q\x07C\n\x07\xe8\x05\x01\x0c\x00\x07\x00\x00\x00q\x08\x85q\x09Rq\nX\x0b\x00\x00\x00"
    b"nanosecondsq\x0bcnumpy.core.multiarray\nscalar\nq\x0ccnumpy\ndtype\nq\x0dX\x02\x00\x00\x00"
    b"i8q\x0e\x89\x88\x87q\x0fRq\x10(K\x03X\x01\x00\x00\x00<q\x11NNNJ\xff\xff\xff\xffJ\xff\xff"
    b"\xff\xffK\x00tq\x12bC\x08\x15\xcd[\x07\x00\x00\x00\x00q\x13\x86q\x14Rq\x15uX\x08\x00\x00"
    b"\x00datalistq\x16]q\x17(}q\x18(X\x0f\x00\x00\x00data_uploadcodeq\x19X\x03\x00\x00\x00"
    b"TR1q\x1aX\x04\x00\x00\x00dataq\x1bX0\x01\x00\x00"
    + _CHECK_TRACE_BYTES
    + b"q\x1cu}q\x1d(h\x19X\x03\x00\x00\x00PH1q\x1eh\x1bh\x0ch\x0dX\x02\x00\x00\x00i4q\x1f\x89"
    b'\x88\x87q Rq!(K\x03h\x11NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq"bC\x04,\x03\x00\x00q'
    b"#\x86q$Rq%u}q&(h\x19X\x09\x00\x00\x00EVENTRATEq'h\x1bh\x0ch\x0dX\x02\x00\x00\x00f8q(\x89"
    b"\x88\x87q)Rq*(K\x03h\x11NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq+bC\x08\x00\x00\x00"
    b"\x00\x00\x00\xea?q,\x86q-Rq.u}q/(h\x19X\x03\x00\x00\x00REDq0h\x1bh\x0ch\x0dX\x02\x00\x00"
    b"\x00b1q1\x89\x88\x87q2Rq3(K\x03X\x01\x00\x00\x00|q4NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff"
    b"K\x00tq5bC\x01\x00q6\x86q7Rq8ueua."
)

#: The same pickled by Python 3.8+ with numpy 2: protocol 4 (framed, MEMOIZE, STACK_GLOBAL).
_CHECK_PY4 = (
    b"\x80\x04\x95\x02\x03\x00\x00\x00\x00\x00\x00]\x94}\x94(\x8c\x06header\x94}\x94(\x8c\x14"
    b"eventtype_uploadcode\x94\x8c\x03CIC\x94\x8c\x08datetime\x94h\x06\x8c\x08datetime\x94\x93"
    b"\x94C\n\x07\xe8\x05\x01\x0c\x00\x07\x00\x00\x00\x94\x85\x94R\x94\x8c\x0bnanoseconds\x94"
    b"\x8c\x16numpy._core.multiarray\x94\x8c\x06scalar\x94\x93\x94\x8c\x05numpy\x94\x8c\x05"
    b"dtype\x94\x93\x94\x8c\x02i8\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01<\x94NNNJ\xff\xff\xff\xff"
    b"J\xff\xff\xff\xffK\x00t\x94bC\x08\x15\xcd[\x07\x00\x00\x00\x00\x94\x86\x94R\x94u\x8c\x08"
    b"datalist\x94]\x94(}\x94(\x8c\x0fdata_uploadcode\x94\x8c\x03TR1\x94\x8c\x04data\x94X0\x01"
    b"\x00\x00"
    + _CHECK_TRACE_BYTES
    + b"\x94u}\x94(h\x1e\x8c\x03PH1\x94h h\x0fh\x12\x8c\x02i4\x94\x89\x88\x87\x94R\x94(K\x03h\x16"
    b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94bC\x04,\x03\x00\x00\x94\x86\x94R\x94u}\x94("
    b"h\x1e\x8c\x09EVENTRATE\x94h h\x0fh\x12\x8c\x02f8\x94\x89\x88\x87\x94R\x94(K\x03h\x16NNNJ"
    b"\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94bC\x08\x00\x00\x00\x00\x00\x00\xea?\x94\x86\x94"
    b"R\x94u}\x94(h\x1e\x8c\x03RED\x94h h\x0fh\x12\x8c\x02b1\x94\x89\x88\x87\x94R\x94(K\x03"
    b"\x8c\x01|\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94bC\x01\x00\x94\x86\x94R\x94ueua."
)


def _check_batch(numpy_scalars: bool) -> list[dict[str, Any]]:
    """What the three payloads above decode to, with their numbers as numpy scalars or not."""
    nanoseconds, height, rate, red = 123456789, 812, 0.8125, False
    if numpy_scalars:
        nanoseconds, height, rate, red = (
            np.int64(nanoseconds),
            np.int32(height),
            np.float64(rate),
            np.bool_(red),
        )
    header = {"eventtype_uploadcode": "CIC", "datetime": _CHECK_WHEN, "nanoseconds": nanoseconds}
    datalist = [
        {"data_uploadcode": code, "data": value}
        for code, value in (("TR1", _CHECK_TRACE), ("PH1", height), ("EVENTRATE", rate),
                            ("RED", red))
    ]  # fmt: skip
    return [{"header": header, "datalist": datalist}]


def _leaf_types(value: Any) -> list[type]:
    """Types of the values in a small trusted tree: an equal value of another type differs."""
    if type(value) is dict:
        return [t for key, item in value.items() for t in (type(key), *_leaf_types(item))]
    if type(value) in (list, tuple):
        return [t for item in value for t in _leaf_types(item)]
    return [type(value)]


def _check_cases() -> tuple[list[tuple[str, bytes, Any]], list[tuple[str, bytes, str]]]:
    """(what, payload, batch) that must decode; (what, payload, reason) that must be refused."""
    tokens = 5000  # in one run: more than one regex call takes (_RUN_TOKENS)
    good = [
        ("a Python 2 protocol-0 batch", _CHECK_PY2, _check_batch(False)),
        ("a Python 3 protocol-3 batch", _CHECK_PY3, _check_batch(True)),
        ("a Python 3 protocol-4 batch", _CHECK_PY4, _check_batch(True)),
        (f"a protocol-0 run of {tokens} tokens", b"(l" + b"p1\n" * tokens + b".", []),
        (f"a protocol-2 run of {tokens} tokens", b"\x80\x02]" + b"q\x01" * tokens + b".", []),
    ]
    trace_at = _CHECK_PY3.index(_CHECK_TRACE_BYTES)
    refused = [
        ("os.system in a protocol-0 pickle", b"cos\nsystem\n(S'true'\ntR.",
         "global os.system refused"),
        ("INST", b"(S'true'\nios\nsystem\n.", "pickle opcode INST not allowed"),
        ("a memo index of 2**21", b"\x80\x02Nr\x00\x00\x20\x00.",
         "memo index beyond the size of the data"),
        ("a protocol-3 batch cut inside its trace", _CHECK_PY3[: trace_at + 100],
         "BINUNICODE length runs past the end of the data"),
        ("a protocol-4 batch with a byte after STOP", _CHECK_PY4 + b"\x00",
         "data after the end of the pickle"),
        ("a batch that is a dict", b"(dp0\n.", "payload is a dict, not a list"),
    ]  # fmt: skip
    return good, refused


def self_check() -> None:
    """Decode known-good payloads and refuse known-bad ones; RuntimeError if any goes wrong.

    Decoding leans on the interpreter's regular-expression engine and C unpickler, whose
    behaviour has changed between patch releases: on CPython 3.11.0-3.11.4 the possessive
    quantifiers this module once used refused every Python 3 pickle with a trace
    (gh-106052).  An upload function that decodes wrongly answers ``208``, and a station
    resends its oldest batch until it gets ``100``: one wrong refusal blocks its queue for
    good.  So both functions call this at start-up and refuse to start rather than refuse
    stations.  It takes one or two milliseconds.  The message names the interpreter's
    version and every case that failed.
    """
    good, refused = _check_cases()
    failures: list[str] = []
    for what, data, expected in good:
        try:
            value = decode_batch(data)
        except Exception as exc:
            failures.append(f"{what} was refused ({type(exc).__name__}: {_short(str(exc))})")
            continue
        if value != expected or _leaf_types(value) != _leaf_types(expected):
            failures.append(f"{what} decoded to other values than it holds")
    for what, data, reason in refused:
        try:
            decode_batch(data)
        except PayloadError as exc:
            if not str(exc).startswith(reason):
                failures.append(f"{what} was refused for another reason ({_short(str(exc))})")
        except Exception as exc:
            failures.append(f"{what} raised {type(exc).__name__}: {_short(str(exc))}")
        else:
            failures.append(f"{what} was accepted")
    if failures:
        version = ".".join(map(str, sys.version_info[:3]))
        raise RuntimeError(f"decoder self-check failed on Python {version}: " + "; ".join(failures))
