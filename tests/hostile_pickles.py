"""Malicious and malformed pickles: every one must be refused (PayloadError, upload ``208``).

``HOSTILE`` is a list of ``(name, bytes)``, built by hand from opcodes where no pickler
would write the bytes.  The code-execution cases would create the file ``MARKER`` if they
ran; the tests that feed them in (here, and over HTTP in the upload tests) assert that it
never appears.  The resource cases are the attacks on the C unpickler itself: memo indices
that make it zero gigabytes, claimed lengths it would allocate, dict keys nested deep
enough to crash the interpreter when hashed, nesting and sharing bombs, huge ints.
"""

from __future__ import annotations

import datetime as dt
import pickle
import random
import struct
import tempfile
from pathlib import Path

import numpy as np
from hisparc_datastore_dev import samples

#: Created by any of the code-execution cases that was wrongly run.
MARKER = Path(tempfile.gettempdir()) / "hisparc-datastore-hostile-pickle-marker"
_TOUCH = f"touch {MARKER}"
_PY_TOUCH = f"open({str(MARKER)!r}, 'w').close()"

DEEP = 10**6


# --- opcode helpers --------------------------------------------------------------------


def p2(*ops: bytes) -> bytes:
    """A protocol-2 pickle of ``ops``, with its STOP."""
    return b"\x80\x02" + b"".join(ops) + b"."


def p4(*ops: bytes) -> bytes:
    return b"\x80\x04" + b"".join(ops) + b"."


def text(value: str) -> bytes:
    """BINUNICODE."""
    raw = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def short_text(value: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    raw = value.encode("utf-8")
    return b"\x8c" + bytes((len(raw),)) + raw


def raw_bytes(value: bytes) -> bytes:
    """SHORT_BINBYTES."""
    return b"C" + bytes((len(value),)) + value


def glob(module: str, name: str) -> bytes:
    """GLOBAL."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4)."""
    return short_text(module) + short_text(name) + b"\x93"


def in_event(*value_ops: bytes) -> bytes:
    """Protocol 2: ``[{'datalist': [{'data_uploadcode': 'PH1', 'data': <value>}]}]``.

    The attack sits where real values sit, so the top-level checks do not stop it first.
    """
    return p2(
        b"]}",
        text("datalist"),
        b"]}",
        text("data_uploadcode"),
        text("PH1"),
        b"s",
        text("data"),
        *value_ops,
        b"sasa",
    )


def dtype_ops(code: str, state: bytes) -> bytes:
    """``numpy.dtype(code, False, True)`` with BUILD ``state`` (protocol 2 ops)."""
    return glob("numpy", "dtype") + text(code) + b"\x89\x88\x87R" + state + b"b"


_PLAIN_STATE = b"(K\x03" + text("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"


def scalar_ops(dtype: bytes, data: bytes) -> bytes:
    return glob("numpy._core.multiarray", "scalar") + dtype + raw_bytes(data) + b"\x86R"


def _valid_batches() -> tuple[bytes, bytes]:
    events = samples.batch(3, dt.datetime(2024, 5, 1, 12), random.Random(7), traces=False)
    from hisparc_datastore_dev.py2pickle import dumps_py2

    return dumps_py2(events), pickle.dumps(samples.numpy_flavour(events), protocol=4)


def _bomb(levels: int, fan_out: int) -> bytes:
    """Lists of ``fan_out`` references to the level below: fan_out**levels paths."""
    ops = [b"]q\x00"]  # level 0: an empty list, in memo slot 0
    for level in range(1, levels + 1):
        refs = (b"h" + bytes((level - 1,))) * fan_out
        ops.append(b"0(" + refs + b"lq" + bytes((level,)))  # POP the level below first
    return in_event(*ops)


def _dict_bomb(levels: int, fan_out: int) -> bytes:
    """Dicts whose every value is the dict below: distinct keys, shared values."""
    ops = [b"}q\x00"]
    for level in range(1, levels + 1):
        items = b"".join(b"K" + bytes((n,)) + b"h" + bytes((level - 1,)) for n in range(fan_out))
        ops.append(b"0}(" + items + b"uq" + bytes((level,)))
    return in_event(*ops)


def _corpus() -> list[tuple[str, bytes]]:
    py2_batch, p4_batch = _valid_batches()
    cases: list[tuple[str, bytes]] = []

    def add(name: str, data: bytes) -> None:
        cases.append((name, data))

    touch, py_touch = _TOUCH.encode(), _PY_TOUCH.encode()
    call1, call2 = b"\x85R", b"\x86R"  # TUPLE1/TUPLE2 then REDUCE: f(a), f(a, b)
    when = raw_bytes(b"\x07\xe8\x05\x01\x0c\x00\x00\x00\x00\x00")  # a datetime state
    datetime_ = glob("datetime", "datetime")
    encode = glob("_codecs", "encode")
    scalar = glob("numpy._core.multiarray", "scalar")
    plain_i8 = dtype_ops("i8", _PLAIN_STATE)
    minus_one = b"J\xff\xff\xff\xff"

    # --- code execution: every global outside the allowlist ---------------------------
    add("os.system, protocol 0", b"cos\nsystem\n(S'" + touch + b"'\ntR.")
    add("posix.system, protocol 0", b"cposix\nsystem\n(S'" + touch + b"'\ntR.")
    add("os.system, protocol 2", p2(glob("os", "system"), text(_TOUCH), call1))
    add("os.system, protocol 4", p4(stack_glob("os", "system"), short_text(_TOUCH), call1))
    add("os.system inside an event", in_event(glob("os", "system"), text(_TOUCH), call1))
    add("builtins.eval", p2(glob("builtins", "eval"), text(_PY_TOUCH), call1))
    add("__builtin__.eval, Python 2 spelling", b"c__builtin__\neval\n(V" + py_touch + b"\ntR.")
    add(
        "builtins.exec, protocol 4",
        p4(stack_glob("builtins", "exec"), short_text(_PY_TOUCH), call1),
    )
    popen_args = b"(" + text("touch") + text(str(MARKER)) + b"l"
    add("subprocess.Popen", p2(glob("subprocess", "Popen"), popen_args, call1))
    add(
        "subprocess.check_call, protocol 4",
        p4(stack_glob("subprocess", "check_call"), popen_args, call1),
    )
    import_os = glob("builtins", "__import__") + text("os") + call1
    add(
        "builtins.getattr on __import__",
        p2(glob("builtins", "getattr"), import_os, text("system"), call2, text(_TOUCH), call1),
    )
    obj = glob("builtins", "object")
    add("copyreg._reconstructor", p2(glob("copyreg", "_reconstructor"), obj, obj, b"N\x87R"))
    add("copy_reg._reconstructor, Python 2 spelling", b"ccopy_reg\n_reconstructor\n(tR.")
    add("INST os.system", b"(V" + touch + b"\nios\nsystem\n.")
    add("OBJ os.system", b"(cos\nsystem\nV" + touch + b"\no.")
    add("NEWOBJ subprocess.Popen", p2(glob("subprocess", "Popen"), popen_args, b"\x85\x81"))
    add("NEWOBJ_EX on an allowed global", p4(stack_glob("datetime", "datetime"), b")}\x92"))
    add("NEWOBJ on an allowed global", p2(glob("numpy", "dtype"), b")\x81"))
    add("pickle.loads nested", p2(glob("pickle", "loads"), raw_bytes(b"N."), call1))
    add("GLOBAL module name not UTF-8", b"c\xff\xfe\nsystem\n(tR.")
    add("GLOBAL line too long", b"c" + b"m" * 100_000 + b"\nsystem\n.")

    # --- the allowlisted globals, misused ----------------------------------------------
    defaults = b"N}" + text("__defaults__") + b"K\x07\x85s\x86b"  # (None, {...: (7,)})
    add("BUILD on a global (would rewrite a function's __defaults__)", p2(datetime_, defaults))
    add("BUILD with a __dict__ on a global", p2(datetime_, b"}", text("x"), b"K\x07sb"))
    add("an allowed global as a value", in_event(datetime_))
    add("numpy.dtype object as a value", in_event(plain_i8))
    add("_codecs.encode with rot13", in_event(encode, text("abc"), text("rot13"), call2))
    add("_codecs.encode with utf-8", in_event(encode, text("abc"), text("utf-8"), call2))
    add(
        "_codecs.decode",
        in_event(glob("_codecs", "decode"), raw_bytes(b"ab"), text("latin1"), call2),
    )
    utc = glob("datetime", "timezone") + glob("datetime", "timedelta") + b"K\x01" + call1 + call1
    add("datetime with a tzinfo", in_event(datetime_, when, utc, call2))
    add("datetime with a second argument", in_event(datetime_, when, text("x"), call2))
    hour_25 = raw_bytes(b"\x07\xe8\x05\x01\x19\x00\x00\x00\x00\x00")
    add("datetime state hour 25", in_event(datetime_, hour_25, call1))
    add("datetime state of 9 bytes", in_event(datetime_, raw_bytes(b"\x07" * 9), call1))

    # --- numpy beyond plain numeric scalars --------------------------------------------
    objects = np.array([1, "x"], dtype=object)
    add("numpy object array", pickle.dumps(objects, protocol=2))
    add("numpy object array, protocol 0", pickle.dumps(objects, protocol=0))
    add("numpy array holding functions", pickle.dumps(np.array([print, len]), protocol=4))
    add("numpy._reconstruct (any ndarray)", pickle.dumps(np.arange(4), protocol=2))
    add(
        "numpy.core.multiarray._reconstruct, numpy 1 spelling",
        pickle.dumps(np.arange(4), protocol=2).replace(b"numpy._core.", b"numpy.core."),
    )
    add(
        "numpy scalar of object dtype",
        in_event(scalar_ops(dtype_ops("O8", _PLAIN_STATE), b"\0" * 8)),
    )
    add(
        "numpy scalar of void dtype", in_event(scalar_ops(dtype_ops("V8", _PLAIN_STATE), b"\0" * 8))
    )
    fields = b"(" + text("a") + b"t}" + text("a") + b"(" + plain_i8 + b"K\x00ts"
    with_fields = b"(K\x03" + text("|") + b"N" + fields + b"K\x08K\x01K\x10t"
    add("numpy dtype with fields", in_event(scalar_ops(dtype_ops("i8", with_fields), b"\0" * 8)))
    metadata = b"}" + text("evil") + b"K\x01s"
    with_metadata = b"(K\x04" + text("<") + b"NNN" + minus_one * 2 + b"K\x00" + metadata + b"t"
    add(
        "numpy dtype with metadata", in_event(scalar_ops(dtype_ops("i8", with_metadata), b"\0" * 8))
    )
    add("numpy datetime64 scalar", pickle.dumps(np.datetime64("2024-05-01T12:00"), protocol=2))
    add("numpy str scalar", pickle.dumps(np.str_("abc"), protocol=2))
    add("numpy complex scalar", pickle.dumps(np.complex128(1 + 2j), protocol=4))
    add("numpy scalar with too few bytes", in_event(scalar_ops(plain_i8, b"\0" * 3)))
    add("numpy bool scalar byte 2", in_event(scalar_ops(dtype_ops("b1", _PLAIN_STATE), b"\x02")))
    add("numpy scalar without a dtype", in_event(scalar, text("i8"), raw_bytes(b"\0" * 8), call2))

    # --- structure ----------------------------------------------------------------------
    add("top level is a dict", p2(b"}"))
    add("top level is None", p2(b"N"))
    add("top level is a string", b"S'hello'\n.")
    add("events that are ints", p2(b"(K\x01K\x02l"))
    add("an event that is a list", p2(b"]]a"))
    add("a set in an event", in_event(b"\x8f(K\x01\x90"))
    add("a frozenset in an event", p4(b"]}", short_text("x"), b"(K\x01\x91sa"))
    add("a bytearray in an event", p4(b"]}", short_text("x"), b"\x96\x01\0\0\0\0\0\0\0xsa"))
    add("reference cycle", in_event(b"]q\x00h\x00a"))

    # --- the C unpickler's own resources ------------------------------------------------
    add("memo bomb: LONG_BINPUT 2**27", p2(b"Nr\x00\x00\x00\x08"))
    add("memo bomb: LONG_BINPUT 2**32-1", p2(b"Nr\xff\xff\xff\xff"))
    add("memo bomb: PUT 10**9, protocol 0", b"(lp1000000000\n.")
    add("memo bomb: PUT 10**8 in a real batch", py2_batch[:-1] + b"p100000000\n.")
    add("BINBYTES8 claiming 2**60 bytes", p4(b"\x8e" + struct.pack("<Q", 2**60)))
    add("BINBYTES8 claiming 8 GiB", p4(b"\x8e" + struct.pack("<Q", 2**33)))
    add("BINUNICODE8 claiming 2**60 bytes", p4(b"\x8d" + struct.pack("<Q", 2**60)))
    add("BINBYTES claiming 4 GiB", p2(b"B\xff\xff\xff\xff"))
    add("BINUNICODE claiming 2 GiB", p2(b"X\x00\x00\x00\x80"))
    add("BINSTRING negative length", p2(b"T\xff\xff\xff\xff"))
    add("BYTEARRAY8 claiming 2**40 bytes", b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b".")
    add("FRAME claiming 2**60 bytes", p4(b"\x95" + struct.pack("<Q", 2**60), b"]"))
    add("SHORT_BINUNICODE longer than the data", b"\x80\x04\x8c\xffabc.")
    add("LONG4 claiming 2 GiB", p2(b"\x8b\x00\x00\x00\x80"))
    add("deep nesting: lists, 10**6", in_event(b"]" * DEEP + b"a" * (DEEP - 1)))
    add("deep nesting: protocol 0 lists, 10**6", b"(l" * DEEP + b"a" * (DEEP - 1) + b".")
    add("deep nesting: dicts, 10**6", in_event(b"}" + (b"K\x00}" * (DEEP - 1)) + b"s" * (DEEP - 1)))
    add("deep nesting: tuples as a value, 10**6", in_event(b"N" + b"\x85" * DEEP))
    add("deep nesting: tuple as a dict key, 10**6", p2(b"]}N" + b"\x85" * DEEP + b"Nsa"))
    add(
        "deep nesting: tuple key built through the memo",
        p2(b"N\x85q\x00" + b"h\x00\x85q\x00" * 200_000 + b"]}h\x00Nsa"),
    )
    add("shared-reference bomb: lists, 2**64 paths", _bomb(16, 16))
    add("shared-reference bomb: dicts", _dict_bomb(20, 8))
    add("shared-reference bomb: DUP", in_event(b"]" + b"2\x86" * 60))
    big_list = b"(" + b"K\x01" * 5000 + b"lq\x000"
    add("shared references: 1000 x one big list", in_event(big_list, b"(" + b"h\x00" * 1000 + b"l"))
    add("int with a million digits, protocol 0", b"(lI" + b"9" * DEEP + b"\na.")
    add("long with a million digits, protocol 0", b"(lL" + b"9" * DEEP + b"L\na.")
    add("LONG4 of a megabyte", in_event(b"\x8b" + struct.pack("<I", DEEP) + b"\x01" * DEEP))
    add("LONG1 of 255 bytes", in_event(b"\x8a\xff" + b"\x01" * 255))

    # --- opcodes no station sends --------------------------------------------------------
    add("NEXT_BUFFER", b"\x80\x05]\x97a.")
    add("READONLY_BUFFER", b"\x80\x05]]\x98a.")
    add("PERSID", b"(lPsome-id\na.")
    add("BINPERSID", p2(b"]", text("some-id"), b"Qa"))
    add("EXT1", p2(b"]\x82\x01a"))
    add("EXT2", p2(b"]\x83\x01\x00a"))
    add("EXT4", p2(b"]\x84\x01\x00\x00\x00a"))
    add("protocol 6", b"\x80\x06].")
    add("unknown opcode", p2(b"]\xffa"))

    # --- not a whole pickle -----------------------------------------------------------------
    add("empty payload", b"")
    add("just PROTO", b"\x80\x02")
    add("not a pickle: text", b"station_id=501&password=x")
    add("not a pickle: every byte", bytes(range(256)))
    add("truncated protocol-0 batch", py2_batch[: len(py2_batch) // 2])
    add("protocol-0 batch without STOP", py2_batch[:-1])
    add("truncated protocol-4 batch", p4_batch[: len(p4_batch) // 2])
    add("protocol-4 batch without STOP", p4_batch[:-1])
    add("garbage after STOP, protocol 0", py2_batch + b"garbage")
    add("garbage after STOP, protocol 4", p4_batch + b"\x00")
    add("two pickles back to back", py2_batch + p4_batch)
    add("newline after STOP", py2_batch + b"\n")
    return cases


HOSTILE: list[tuple[str, bytes]] = _corpus()

assert len({name for name, _ in HOSTILE}) == len(HOSTILE), "case names must be unique"
