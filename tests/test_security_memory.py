"""Memory a payload can make the decoder spend (docs/SECURITY.md, residual risk R1).

The target (docs/ARCHITECTURE.md): the writer's peak RSS stays below 4x the largest batch it decodes
plus a fixed base.  Batches with traces meet it with room to spare (about 2.5-3.3x for
1,000 events).  Batches without traces do not, and cannot: a pickle of small numbers is
already compact, and Python objects are not (measured 2-16x, numpy flavour highest).

Hostile pickles went further: every one-byte ``}`` or ``]`` became a 56-64 byte object
plus a pointer, and a batch of nothing but empty containers was a *valid* batch (110x:
32 MiB of body needed 3.5 GiB).  The scan now allows one container per 4 bytes plus a
base (the densest real batch has one per 7.5), so no valid pickle costs more than about
50x its size: the price of a pickle of ``None``s (one pointer on the unpickler's stack,
one in the list) with a dict in every fourth byte.  The body limit turns that factor into
a cap, and the writer's memory limit must hold it (checked below).

The decoding runs in a fresh interpreter, so the peak (``VmHWM``) is the decoder's.
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
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.format import payload
from hisparc_datastore.format.payload import PayloadError, decode_batch

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="measures the peak with Linux's /proc/self/status")

#: docs/ARCHITECTURE.md: "below 4x the largest batch it decodes plus a fixed base".
FACTOR = 4
BASE = 16 * 1024 * 1024
HOSTILE_SIZE = 4_000_000

# The peak is VmHWM, the high-water mark of this process's own address space.  Not
# ru_maxrss: Linux carries that over fork and exec, so a child of a large pytest process
# would start with its parent's peak and show no growth at all.
_MEASURE = """
import json, sys
from pathlib import Path
from hisparc_datastore.format.payload import PayloadError, decode_batch

def peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status")

data = Path(sys.argv[1]).read_bytes()
before = peak()
try:
    events = len(decode_batch(data))
except PayloadError:
    events = -1  # refused
after = peak()
print(json.dumps({"events": events, "peak_bytes": after - before}))
"""


def decode_peak(data: bytes, tmp_path: Path) -> dict[str, int]:
    """Events (-1: refused) and peak memory of decode_batch(data), in a fresh interpreter."""
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


#: No valid pickle may cost more than this many times its size to decode (measured: 46x
#: for a dict and three ``None``s per 4 bytes, the densest the container bound allows).
WORST_FACTOR = 50
#: Headroom the writer needs besides decoding: interpreter, h5py, numpy, one chunk.
WRITER_BASE = 256 * 1024 * 1024


def _events(unit: bytes, size: int) -> bytes:
    """A valid batch: one event whose datalist holds ``unit`` repeated to about ``size``."""
    return b"\x80\x02]}X\x01\x00\x00\x00x](" + unit * (size // len(unit)) + b"esa."


def hostile_batches(size: int = HOSTILE_SIZE) -> dict[str, bytes]:
    """Pickles that cost the most memory per byte (each a list of dicts when accepted)."""
    return {
        "empty dicts as events": b"\x80\x02](" + b"}" * size + b"e.",
        "empty lists in one event": _events(b"]", size),
        "empty dicts as events, protocol 0": b"(l" + b"(da" * (size // 3) + b".",
        "a dict and three Nones per 4 bytes": _events(b"}NNN", size),
        "a dict and three memo entries per 4 bytes": _events(b"}\x94\x94\x94", size),
        "protocol 0 dicts with one memo entry": b"(l" + b"(da\x94" * (size // 4) + b".",
        "Nones": _events(b"N", size),
        "two-character strings": _events(b"\x8c\x02AB", size),
        "4-byte integers": _events(b"J\x01\x02\x03\x04", size),
    }


def test_the_hostile_batches_are_valid_batches_or_refused() -> None:
    """The dense ones are refused by the scan; what is accepted is a list of dicts."""
    refused = []
    for name, data in hostile_batches(1_000_000).items():
        try:
            batch = decode_batch(data)
        except PayloadError:
            refused.append(name)
            continue
        assert isinstance(batch, list) and all(type(e) is dict for e in batch), name
    assert refused == ["empty dicts as events", "empty lists in one event",
                       "empty dicts as events, protocol 0"]


@pytest.mark.parametrize("name", list(real_batches()))
def test_real_batches_decode_within_the_memory_target(name: str, tmp_path: Path) -> None:
    data = real_batches()[name]
    measured = decode_peak(data, tmp_path)
    assert measured["events"] == 1000
    assert measured["peak_bytes"] <= FACTOR * len(data) + BASE, measured


@pytest.mark.parametrize("name", list(hostile_batches(1)))
def test_no_valid_pickle_costs_more_than_the_worst_factor(name: str, tmp_path: Path) -> None:
    data = hostile_batches()[name]
    measured = decode_peak(data, tmp_path)
    ratio = measured["peak_bytes"] / len(data)
    print(f"{name}: {'refused' if measured['events'] < 0 else 'decoded'}, peak {ratio:.1f}x")
    assert measured["peak_bytes"] <= WORST_FACTOR * len(data) + BASE, (
        f"{name}: {len(data)} bytes of pickle took {measured['peak_bytes']} bytes ({ratio:.0f}x)")


def test_the_writer_memory_limit_holds_the_worst_decode_of_the_largest_body() -> None:
    """A stored object the writer cannot decode within its limit is OOM-killed on every try
    and never reaches failed/: the limit must hold the worst case of the largest body."""
    import configparser

    import yaml

    root = Path(__file__).resolve().parents[1]
    config = configparser.ConfigParser()
    config.read(root / "functions" / "config.ini")
    max_body = config.getint("Upload", "max_body_bytes")
    manifest = root / "infra" / "knative" / "base" / "writer-service.yaml"
    service = yaml.safe_load(manifest.read_text())
    limit = service["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    units = {"Mi": 2**20, "Gi": 2**30}
    limit_bytes = int(limit[:-2]) * units[limit[-2:]]
    assert limit_bytes >= WORST_FACTOR * max_body + WRITER_BASE, (limit, max_body)


# --- the container bound must never refuse a real batch --------------------------------


def _flavours(events: list[dict]) -> dict[str, bytes]:
    numpy_events = samples.numpy_flavour(events)
    return {
        "python 2 station": dumps_py2(events),
        "protocol 2": pickle.dumps(events, protocol=2),
        "numpy flavour, protocol 2": pickle.dumps(numpy_events, protocol=2),
        "numpy flavour, protocol 4": pickle.dumps(numpy_events, protocol=4),
    }


#: Margin between the densest real batch and the bound, in containers per byte.
DENSITY_MARGIN = 1.5


@pytest.mark.parametrize("kind", [*samples.UPLOAD_CODE_ORDER, "realistic", "realistic, no traces"])
def test_real_batches_of_every_type_stay_well_inside_the_container_bound(kind: str) -> None:
    """Refusing a real batch would block the station's queue for good: every event type
    in every flavour keeps a margin from the bound, without the base's help."""
    rng, start = random.Random(7), dt.datetime(2024, 5, 1)
    if kind.startswith("realistic"):
        events = samples.realistic_batch(300, start, rng, traces=kind == "realistic")
    else:
        events = samples.batch(300, start, rng, kinds=(kind,), traces=False)
    for flavour, data in _flavours(events).items():
        containers = payload._count_containers(data, len(data))
        allowed = len(data) / payload._BYTES_PER_CONTAINER
        assert containers * DENSITY_MARGIN <= allowed, (kind, flavour, len(data) / containers)
        assert len(decode_batch(data)) == 300


def test_braces_inside_strings_are_not_counted_as_containers() -> None:
    """The byte count is only a bound: over the limit, the opcodes are counted exactly."""
    events = [{"header": {"eventtype_code": "ERR"},
               "datalist": [{"data_code": "ERRMSG", "data": "}](" * 80 + str(n)}]}
              for n in range(2000)]
    for flavour, data in _flavours(events).items():
        limit = len(data) // payload._BYTES_PER_CONTAINER + payload._CONTAINER_BASE
        assert len(data.translate(None, payload._NOT_CONTAINER_OPCODES)) > limit, flavour
        assert decode_batch(data) == events, flavour


def test_a_pickle_one_container_over_the_bound_is_refused() -> None:
    size = 4_000_000
    limit = lambda data: len(data) // payload._BYTES_PER_CONTAINER + payload._CONTAINER_BASE  # noqa: E731
    unit = b"}NNN"
    data = _events(unit, size)
    assert payload._count_containers(data, len(data)) <= limit(data)
    decode_batch(data)
    denser = _events(b"}NN", size)
    assert payload._count_containers(denser, len(denser)) > limit(denser)
    with pytest.raises(PayloadError, match="container"):
        decode_batch(denser)
