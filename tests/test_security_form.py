"""What an unauthenticated body can make the form parser spend (docs/SECURITY.md, R3).

The form is parsed before the station and password are known, so its cost is open to
anyone who can reach the endpoint.  Memory is bounded (fields are counted, pieces are
generated, not listed); CPU was not:

- a body of empty pairs (``&&&...``) was split piece by piece in Python and the empty
  pieces were not counted against ``MAX_FIELDS``: about 0.3 s per MiB;
- a value with an invalid percent escape (``%`` not followed by two hex digits) sent
  ``percent_decode`` from its vectorised path back to the standard library's byte loop:
  about 0.6-0.9 s per MiB.

With the 32 MiB body limit one request cost 10-30 s of a core (the GIL is shared, so
concurrent stations were slowed but served).  Both are fixed (docs/SECURITY.md, R3): the
tests below keep them fixed, and the property tests pin what the fix must keep: the
vectorised decoding equals the standard library's, byte for byte.
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hisparc_datastore.upload import protocol as core

MIB = 1 << 20

_PIECES = st.sampled_from([b"%", b"%4", b"%41", b"%zz", b"%%", b"%e9", b"%E9", b"+", b"a",
                           b"\xff", b"%0", b"%g1", b"%1g"])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(pieces=st.lists(_PIECES, min_size=1, max_size=40), repeat=st.integers(1, 400),
       tail=st.binary(max_size=8))
def test_percent_decode_equals_the_standard_library(pieces: list[bytes], repeat: int,
                                                    tail: bytes) -> None:
    """Both paths (below and above the vector threshold) give unquote_to_bytes's bytes."""
    value = b"".join(pieces) * repeat + tail
    assert core.percent_decode(value) == urllib.parse.unquote_to_bytes(value)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.large_base_example, HealthCheck.data_too_large])
@given(raw=st.binary(min_size=core._VECTOR_MINIMUM, max_size=3 * core._VECTOR_MINIMUM))
def test_percent_decode_inverts_quoting(raw: bytes) -> None:
    assert core.percent_decode(urllib.parse.quote_from_bytes(raw).encode()) == raw


def test_an_invalid_escape_keeps_large_values_on_the_vector_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes: list[int] = []
    slow = urllib.parse.unquote_to_bytes

    def recording(value: bytes | str) -> bytes:
        sizes.append(len(value))
        return slow(value)

    monkeypatch.setattr(urllib.parse, "unquote_to_bytes", recording)
    value = b"%41" * MIB + b"%zz"
    started = time.process_time()
    assert core.percent_decode(value) == slow(value)
    seconds = time.process_time() - started
    assert max(sizes, default=0) < core._VECTOR_MINIMUM, (
        f"{len(value)} bytes went through the byte loop ({seconds:.2f} s of CPU)")


def _cpu_seconds(body: bytes) -> float:
    started = time.process_time()
    with contextlib.suppress(core.FormError):
        core.parse_form(body, "application/x-www-form-urlencoded")
    return time.process_time() - started


@pytest.mark.slow
def test_a_body_of_separators_costs_no_more_than_a_real_form() -> None:
    """Compared with a well-formed form of the same size, on the same machine."""
    size = 8 * MIB
    real = (b"station_id=501&password=x&checksum=0&data="
            + urllib.parse.quote_from_bytes(bytes(range(256)) * (size // 768)).encode())
    separators = b"&" * len(real)
    baseline = min(_cpu_seconds(real) for _ in range(3))
    hostile = _cpu_seconds(separators)
    assert hostile <= 10 * baseline + 0.05, (
        f"{len(separators)} bytes of '&' took {hostile:.2f} s of CPU, a real form of the "
        f"same size {baseline:.2f} s")
