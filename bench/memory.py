"""Writer memory: peak RSS against the largest batch it decodes.

Target (docs/ARCHITECTURE.md): the writer's peak RSS stays below 4x the largest batch it decodes
plus a fixed base.  Measured in a fresh process per scenario, through the real path
(``writer.sweep`` against a local SeaweedFS: list, get, decode, rows, HDF5, archive):

- base: the peak RSS (``VmHWM``) after the imports, the S3 clients and one warm-up sweep of a
  1-event object (libraries, HDF5 and thread pools all touched once);
- peak: the same after sweeping the scenario's objects;
- growth = peak - base, compared with the largest object's bytes (the pickle the writer
  decodes) and with the bytes of the chunk the sweep works on at once (objects are
  grouped up to ``writer.CHUNK_BYTES``, so a catch-up sweep decodes several batches
  together; a single object larger than that is a chunk of its own).

Run: ``.venv/bin/python bench/memory.py`` (``--quick`` for smaller batches).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = dt.datetime(2024, 6, 1, 2, 0, 0)
STATION, CLUSTER = 501, "Amsterdam"


@dataclass(frozen=True)
class Scenario:
    name: str
    events: int  # per object
    objects: int


@dataclass
class Result:
    scenario: str
    largest_object_mb: float
    chunk_mb: float
    base_mb: float
    peak_mb: float
    growth_mb: float
    growth_per_object: float  # growth / largest object bytes
    growth_per_chunk: float  # growth / bytes decoded together
    target_met: bool  # growth < 4 x the largest decoded batch (chunk)


def maxrss_mb() -> float:
    """This process's peak RSS (``VmHWM``).

    Not ``ru_maxrss``: Linux carries that across ``exec`` from the parent that forked us,
    so a child of a large parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict[str, str]) -> None:
    """The measured process: one warm-up sweep, then the scenario's sweep."""
    from hisparc_datastore.config import Settings
    from hisparc_datastore.storage.store import Bucket
    from hisparc_datastore.writer.pipeline import sweep

    bucket = Bucket(spec["bucket"], endpoint=spec["endpoint"], access_key=spec["access"],
                    secret_key=spec["secret"])
    work = Path(spec["work"])
    settings = Settings(
        log="", loglevel="warning", station_list=work / "stations.csv",
        data_dir=work / "data", minimum_year=2020, writer_sleep=1,
        bucket_endpoint=spec["endpoint"], bucket_name=spec["bucket"],
        bucket_region="us-east-1", max_body_bytes=32 << 20,
        aws_access_key_id=spec["access"], aws_secret_access_key=spec["secret"],
    )
    put_objects(bucket, 1, 1, seed=999, when=START - dt.timedelta(hours=1))
    warm = sweep(bucket, settings)
    assert warm.ok, warm.summary()
    base = maxrss_mb()
    # The parent puts the scenario's objects now, so building them costs nothing here.
    print("ready", flush=True)
    sys.stdin.readline()
    result = sweep(bucket, settings)
    assert result.ok, result.summary()
    print(json.dumps({"base": base, "peak": maxrss_mb()}), flush=True)


def put_objects(bucket: object, events: int, objects: int, seed: int, when: dt.datetime) -> int:
    """Put the scenario's objects; the bodies are dropped before the sweep starts."""
    from hisparc_datastore_dev import samples
    from hisparc_datastore_dev.py2pickle import dumps_py2

    from hisparc_datastore.format.keys import incoming_key
    from hisparc_datastore.stations import Station
    from hisparc_datastore.upload.protocol import metadata_for

    rng = random.Random(seed)
    metadata = metadata_for(Station(STATION, CLUSTER, "x"), events, dt.datetime.now(dt.UTC))
    largest = 0
    for index in range(objects):
        start = when + dt.timedelta(seconds=index * events * 2)
        body = dumps_py2(samples.batch(events, start, rng, kinds=("CIC",)))
        largest = max(largest, len(body))
        key = incoming_key(STATION, hashlib.md5(body).hexdigest())  # noqa: S324
        bucket.put(key, body, metadata)  # type: ignore[attr-defined]
        del body
    return largest


def measure(scenario: Scenario, endpoint: str, access: str, secret: str) -> Result:
    from hisparc_datastore.storage.store import Bucket
    from hisparc_datastore.writer.pipeline import CHUNK_BYTES

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    (work / "stations.csv").write_text(f"{STATION},{CLUSTER},x\n")
    (work / "data").mkdir()  # the volume: the writer refuses to start without it
    name = "memory-" + uuid.uuid4().hex[:8]
    Bucket(name, endpoint=endpoint, access_key=access, secret_key=secret).ensure_exists()
    spec = {"bucket": name, "endpoint": endpoint, "access": access, "secret": secret,
            "work": str(work), "events": str(scenario.events),
            "objects": str(scenario.objects)}
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("the measured writer process did not start")
    bucket = Bucket(name, endpoint=endpoint, access_key=access, secret_key=secret)
    size = put_objects(bucket, scenario.events, scenario.objects, seed=1, when=START)
    process.stdin.write("go\n")
    process.stdin.flush()
    figures = json.loads(process.stdout.readline())
    if process.wait() != 0:
        raise RuntimeError("the measured writer process failed")
    per_chunk = max(1, min(scenario.objects, CHUNK_BYTES // size)) if size < CHUNK_BYTES else 1
    chunk = size * per_chunk
    growth = figures["peak"] - figures["base"]
    return Result(
        scenario=scenario.name, largest_object_mb=size / 2**20,
        chunk_mb=chunk / 2**20, base_mb=figures["base"], peak_mb=figures["peak"],
        growth_mb=growth, growth_per_object=growth / (size / 2**20),
        growth_per_chunk=growth / (chunk / 2**20), target_met=growth < 4 * chunk / 2**20,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    from hisparc_datastore_dev.s3server import SeaweedS3

    scale = 5 if args.quick else 1
    scenarios = [
        Scenario("one 1000-event batch", 1000 // scale, 1),
        Scenario("one 4000-event batch (near the 32 MiB body limit)", 4000 // scale, 1),
        Scenario("catch-up: 10 x 1000-event batches", 1000 // scale, 10),
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-memory-s3-"))
    server = SeaweedS3(work / "s3", "bench", "bench-" + uuid.uuid4().hex)
    server.start()
    try:
        results = []
        for scenario in scenarios:
            print(f"{scenario.name} ...", file=sys.stderr)
            results.append(measure(scenario, server.endpoint, server.access_key,
                                   server.secret_key))
    finally:
        server.stop()
    print(f"\nwriter memory (peak RSS of a fresh writer process; CIC events with 4 traces, "
          f"protocol-0 pickles); load average {os.getloadavg()[0]:.2f}")
    header = (f"  {'scenario':<50} {'object MB':>9} {'chunk MB':>9} {'base MB':>8} "
              f"{'peak MB':>8} {'growth':>8} {'x chunk':>8}")
    print(header)
    for r in results:
        print(f"  {r.scenario:<50} {r.largest_object_mb:>9.1f} {r.chunk_mb:>9.1f} "
              f"{r.base_mb:>8.0f} {r.peak_mb:>8.0f} {r.growth_mb:>8.0f} "
              f"{r.growth_per_chunk:>7.2f}x  (target < 4x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
