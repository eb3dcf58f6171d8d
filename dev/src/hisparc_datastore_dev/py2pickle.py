"""Protocol-0 pickles laid out the way CPython 2.7's ``cPickle.dumps(obj)`` writes them.

Most stations run Python 2 station software, so the bulk of real uploads are these text
pickles.  Tests need them as fixtures and ``datastore simulate`` needs them to behave like
an old station, and no Python 2 is at hand: this module assembles the same opcodes.

Mapping from Python 3 values to what a Python 2 station would have held:

* ``str`` -> Python 2 byte string ``S'...'`` (latin-1 encoded, repr-escaped the way
  Python 2's ``repr(str)`` escapes); a ``str`` that latin-1 cannot encode, and any
  :class:`Py2Unicode`, -> unicode ``V...`` (raw-unicode-escape as cPickle modifies it).
* ``bytes`` -> byte string ``S'...'`` as well (Python 2 had only the one type).
* ``bool`` -> ``I01``/``I00``; ``int`` in the C long range -> ``I...``; larger ints and
  :class:`Py2Long` -> ``L...L``; ``float`` -> ``F`` + repr; ``None`` -> ``N``.
* ``dict`` -> ``(d`` + ``s`` per item (insertion order, where Python 2 used hash order),
  ``list`` -> ``(l`` + ``a`` per item, ``tuple`` -> ``(`` ... ``t``.
* naive ``datetime.datetime`` -> ``cdatetime\\ndatetime`` and a REDUCE of its 10-byte state.

Each memoisable object (strings, containers, the ``datetime`` class, each datetime, its
state and argument tuple) is followed by ``p<n>`` with sequential ``n``; an object met again
(the same object, not an equal one) is written as ``g<n>``, as cPickle does.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

__all__ = ["Py2Long", "Py2Unicode", "dumps_py2"]

#: Range of a C long on the 64-bit platforms stations run on: Python 2 ``int`` values.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


class Py2Long(int):
    """An int a Python 2 station held as ``long`` (pickled as ``L...L``)."""


class Py2Unicode(str):
    """A string a Python 2 station held as ``unicode`` (pickled as ``V...``)."""


def _py2_string_repr(raw: bytes) -> bytes:
    """Python 2 ``repr()`` of a byte string: the argument of cPickle's STRING opcode."""
    quote = b'"' if b"'" in raw and b'"' not in raw else b"'"
    out = bytearray(quote)
    for byte in raw:
        if byte == quote[0] or byte == 0x5C:  # the quote in use, or a backslash
            out += b"\\" + bytes((byte,))
        elif byte == 0x09:
            out += b"\\t"
        elif byte == 0x0A:
            out += b"\\n"
        elif byte == 0x0D:
            out += b"\\r"
        elif byte < 0x20 or byte >= 0x7F:
            out += b"\\x%02x" % byte
        else:
            out.append(byte)
    out += quote
    return bytes(out)


def _py2_raw_unicode_escape(text: str) -> bytes:
    """cPickle's modified raw-unicode-escape: UNICODE opcode argument without its newline.

    Code points below 256 are written raw (latin-1), except backslash and newline, which
    become ``\\u005c`` and ``\\u000a`` so that the line stays one line.
    """
    out = bytearray()
    for char in text:
        point = ord(char)
        if point >= 0x10000:
            out += b"\\U%08x" % point
        elif point >= 0x100 or char in "\\\n":
            out += b"\\u%04x" % point
        else:
            out.append(point)
    return bytes(out)


def _datetime_state(value: _dt.datetime) -> bytes:
    """The 10-byte state Python 2's ``datetime.__reduce__`` hands to the pickler."""
    us = value.microsecond
    return bytes(
        (
            value.year >> 8,
            value.year & 0xFF,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            us >> 16,
            (us >> 8) & 0xFF,
            us & 0xFF,
        )
    )


class _Writer:
    """One dump: the output, and the memo from object identity to PUT index."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        # id -> (index, object); the object is kept so its id cannot be reused mid-dump.
        self.memo: dict[int, tuple[int, Any]] = {}

    def put(self, obj: Any) -> None:
        index = len(self.memo)
        self.memo[id(obj)] = (index, obj)
        self.out.append(b"p%d\n" % index)

    def get(self, obj: Any) -> bool:
        entry = self.memo.get(id(obj))
        if entry is None:
            return False
        self.out.append(b"g%d\n" % entry[0])
        return True

    def save(self, obj: Any) -> None:
        out = self.out
        kind = type(obj)
        if obj is None:
            out.append(b"N")
        elif kind is bool:
            out.append(b"I01\n" if obj else b"I00\n")
        elif kind is Py2Long:
            out.append(b"L%dL\n" % obj)
        elif kind is int:
            out.append(b"I%d\n" % obj if _INT_MIN <= obj <= _INT_MAX else b"L%dL\n" % obj)
        elif kind is float:
            out.append(b"F" + repr(obj).encode("ascii") + b"\n")
        elif self.get(obj):
            pass
        elif kind is str or kind is bytes:
            self.save_string(obj)
        elif kind is Py2Unicode:
            out.append(b"V" + _py2_raw_unicode_escape(obj) + b"\n")
            self.put(obj)
        elif kind is dict:
            out.append(b"(d")
            self.put(obj)
            for key, value in obj.items():
                self.save(key)
                self.save(value)
                out.append(b"s")
        elif kind is list:
            out.append(b"(l")
            self.put(obj)
            for item in obj:
                self.save(item)
                out.append(b"a")
        elif kind is tuple:
            out.append(b"(")
            for item in obj:
                self.save(item)
            out.append(b"t")
            self.put(obj)
        elif kind is _dt.datetime:
            self.save_datetime(obj)
        else:
            raise TypeError(f"a Python 2 station cannot send {kind.__name__} values")

    def save_string(self, obj: str | bytes) -> None:
        if isinstance(obj, str):
            try:
                raw = obj.encode("latin-1")
            except UnicodeEncodeError:
                # Not a byte string in Python 2 terms: the station would have sent unicode.
                self.out.append(b"V" + _py2_raw_unicode_escape(obj) + b"\n")
                self.put(obj)
                return
        else:
            raw = obj
        self.out.append(b"S" + _py2_string_repr(raw) + b"\n")
        self.put(obj)

    def save_datetime(self, value: _dt.datetime) -> None:
        if value.tzinfo is not None:
            raise TypeError("stations send naive datetimes (UTC); got an aware one")
        if not self.get(_dt.datetime):
            self.out.append(b"cdatetime\ndatetime\n")
            self.put(_dt.datetime)
        state = _datetime_state(value)
        args = (state,)
        self.out.append(b"(S" + _py2_string_repr(state) + b"\n")
        self.put(state)
        self.out.append(b"t")
        self.put(args)
        self.out.append(b"R")
        self.put(value)


def dumps_py2(obj: Any) -> bytes:
    """``obj`` pickled as CPython 2.7's ``cPickle.dumps(obj)`` (protocol 0) would.

    The saver recurses like cPickle does; station payloads are a few levels deep.
    """
    writer = _Writer()
    writer.save(obj)
    writer.out.append(b".")
    return b"".join(writer.out)
