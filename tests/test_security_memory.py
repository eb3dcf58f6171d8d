"""Memory a payload can make the decoder spend (docs/SECURITY.md, residual risk R1).

DESIGN.md's target: the writer's peak RSS stays below 4x the largest batch it decodes
plus a fixed base.  Real batches meet it with room to spare (about 2.5-3.3x for 1,000
events with traces).  A batch that holds nothing but empty containers does not: every
one-byte ``}`` or ``]`` opcode becomes a 56-64 byte object plus a pointer, and the whole
thing is a *valid* batch (a list of dicts, allowed types only), so the upload answers
``100`` and stores it, and the writer decodes it again.  Measured here: about 110x, so
the 32 MiB body limit admits a batch that needs about 3.5 GiB to decode, above both
functions' memory limits (upload 2 GiB for 16 requests, writer 1 GiB).

The decoding runs in a fresh interpreter, so the peak (``VmHWM``) is the decoder's.
The hostile cases are expected to fail until the decoder bounds allocations per input
byte; run them with ``--runxfail`` to see the figures.
"""

from __future__ import annotations

import datetime as dt
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hisparc_datastore import samples
from hisparc_datastore.payload import decode_batch
from hisparc_datastore.py2pickle import dumps_py2

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="measures the peak with Linux's /proc/self/status")

#: DESIGN.md: "below 4x the largest batch it decodes plus a fixed base".
FACTOR = 4
BASE = 16 * 1024 * 1024
HOSTILE_SIZE = 4_000_000

# The peak is VmHWM, the high-water mark of this process's own address space.  Not
# ru_maxrss: Linux carries that over fork and exec, so a child of a large pytest process
# would start with its parent's peak and show no growth at all.
_MEASURE = """
import json, sys
from pathlib import Path
from hisparc_datastore.payload import decode_batch

def peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status")

data = Path(sys.argv[1]).read_bytes()
before = peak()
batch = decode_batch(data)
after = peak()
print(json.dumps({"events": len(batch), "peak_bytes": after - before}))
"""


def decode_peak(data: bytes, tmp_path: Path) -> dict[str, int]:
    """Events and peak memory of decode_batch(data), measured in a fresh interpreter."""
    path = tmp_path / "batch.pickle"
    path.write_bytes(data)
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True,
                            text=True, timeout=300, check=True)
    return json.loads(result.stdout)


def real_batches() -> dict[str, bytes]:
    events = samples.realistic_batch(1000, dt.datetime(2024, 5, 1), random.Random(1))
    return {
        "python 2 station, 1000 events": dumps_py2(events),
        "PySPARC numpy flavour, protocol 4": pickle.dumps(samples.numpy_flavour(events),
                                                          protocol=4),
    }


def hostile_batches(size: int = HOSTILE_SIZE) -> dict[str, bytes]:
    """Valid batches (the decoder accepts them) made of empty containers."""
    return {
        "empty dicts as events": b"\x80\x02](" + b"}" * size + b"e.",
        "empty lists in one event": b"\x80\x02]}X\x01\x00\x00\x00x](" + b"]" * size + b"esa.",
        "empty dicts as events, protocol 0": b"(l" + b"(da" * (size // 3) + b".",
    }


def test_the_hostile_batches_are_valid_batches() -> None:
    """They are accepted (the upload would answer 100), so the writer decodes them too."""
    for name, data in hostile_batches(10_000).items():
        batch = decode_batch(data)
        assert isinstance(batch, list) and batch, name


@pytest.mark.parametrize("name", list(real_batches()))
def test_real_batches_decode_within_the_memory_target(name: str, tmp_path: Path) -> None:
    data = real_batches()[name]
    measured = decode_peak(data, tmp_path)
    assert measured["events"] == 1000
    assert measured["peak_bytes"] <= FACTOR * len(data) + BASE, measured


@pytest.mark.xfail(strict=True, reason=(
    "a valid batch of empty containers costs ~110x its size to decode "
    "(docs/SECURITY.md, residual risk R1)"))
@pytest.mark.parametrize("name", list(hostile_batches(1)))
def test_hostile_batches_decode_within_the_memory_target(name: str, tmp_path: Path) -> None:
    data = hostile_batches()[name]
    measured = decode_peak(data, tmp_path)
    assert measured["peak_bytes"] <= FACTOR * len(data) + BASE, (
        f"{name}: {len(data)} bytes of pickle took {measured['peak_bytes']} bytes "
        f"({measured['peak_bytes'] / len(data):.0f}x) for {measured['events']} events")
