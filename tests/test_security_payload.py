"""BUILD applied to what the allowlisted globals return (docs/SECURITY.md, the allowlist).

BUILD is an allowed opcode, because numpy pickles its dtype state with it, and the
stand-ins guard themselves (``_DType`` checks its state, ``_Global`` refuses).  But BUILD
applies to whatever value is below it on the stack, and the values the stand-ins return
are real ``datetime`` and numpy scalar objects.  ``datetime`` has neither ``__setstate__``
nor ``__dict__``, so BUILD on it fails (208), as on a list, dict or str, unless the
state is ``None``, which CPython skips.  A numpy scalar does have ``__setstate__``:
numpy's own C method runs with a state the payload chooses.  In the numpy this project
pins it does nothing and the value is unchanged; this test pins that, so a numpy upgrade
that gives scalars a real ``__setstate__`` is noticed here before it reaches stations.
"""

from __future__ import annotations

import pytest
from hostile_pickles import (
    _PLAIN_STATE,
    dtype_ops,
    glob,
    in_event,
    raw_bytes,
    scalar_ops,
    text,
)

from hisparc_datastore.format.payload import PayloadError, decode_batch

ONE = b"\x00\x00\x00\x00\x00\x00\xf0?"  # 1.0 as a little-endian float64
WHEN = raw_bytes(b"\x07\xe8\x05\x01\x0c\x00\x00\x00\x00\x00")
STATES = {
    "a dict": b"}" + text("real") + b"K\x02s",
    "a tuple": b"K\x01K\x02\x86",
    "None": b"N",
    "a (None, slots) pair": b"N}" + text("real") + b"K\x02s\x86",
    "a numpy scalar": scalar_ops(dtype_ops("f8", _PLAIN_STATE), ONE),
}


def value_of(data: bytes) -> object:
    return decode_batch(data)[0]["datalist"][0]["data"]


@pytest.mark.parametrize("state", list(STATES.values()), ids=list(STATES))
def test_build_on_a_numpy_scalar_changes_nothing(state: bytes) -> None:
    scalar = scalar_ops(dtype_ops("f8", _PLAIN_STATE), ONE)
    plain = value_of(in_event(scalar))
    built = value_of(in_event(scalar + state + b"b"))
    assert type(built) is type(plain) and built == plain == 1.0


REFUSED_STATES = {name: state for name, state in STATES.items() if name != "None"}


@pytest.mark.parametrize("state", list(REFUSED_STATES.values()), ids=list(REFUSED_STATES))
@pytest.mark.parametrize("target", [
    glob("datetime", "datetime") + WHEN + b"\x85R",
    b"]",
    b"}",
    text("x"),
], ids=["datetime", "list", "dict", "str"])
def test_build_on_other_values_is_refused(target: bytes, state: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_batch(in_event(target + state + b"b"))


def test_build_with_no_state_is_a_no_op_on_anything() -> None:
    """CPython skips a ``None`` state when there is no ``__setstate__``."""
    for target in (b"]", b"}", text("x"), glob("datetime", "datetime") + WHEN + b"\x85R"):
        assert value_of(in_event(target + b"Nb")) == value_of(in_event(target))
