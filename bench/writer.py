"""Writer benchmark: the full path against the naive design and against the limit, one run.

What is measured, all in this process and this run (best of ``--repeat``):

- full path: object bytes -> ``payload.decode_batch`` -> ``rows.split_by_day`` ->
  ``DayFile.write`` (which builds the numpy rows and writes them), for a 1000-event CIC
  batch with 4 realistic traces per event, Python 2 (protocol 0, ``dumps_py2``) and
  Python 3 (protocol 4 of the numpy flavour) payloads, into a fresh day file and into a
  large one (``--large`` batches already in it);
- the limit: the same run's restricted unpickling (``decode_batch``) + base64 decoding
  of the traces + one bulk h5py write of the same rows and blob bytes (one dataset per
  table and one vlen blob array, written whole into a new file);
- the HDF5 part of the full path: ``DayFile.append`` of rows built beforehand, against
  the bulk write above;
- the naive baseline: the same rows appended with PyTables row by row (``table.row`` /
  ``row.append()`` and a blob ``append`` per value, ``flush()`` per event, like the
  reference writer);
- objects/s: 1-event CIC batches (with traces) through ``writer.sweep`` against a local
  SeaweedFS started for the run, through the writer's one S3 client.

Targets (docs/ARCHITECTURE.md): full path >= 0.6x the limit, HDF5 part >= 0.5x the bulk write,
sweep >= 500 objects/s.  Run: ``.venv/bin/python bench/writer.py`` (``--quick`` for a
smaller run).  Figures depend on what else the machine is doing: the load average is
printed with them.
"""

from __future__ import annotations

import argparse
import binascii
import datetime as dt
import hashlib
import json
import os
import pickle
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import tables
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2
from hisparc_datastore_dev.s3server import SeaweedS3

from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import incoming_key
from hisparc_datastore.format.payload import decode_batch
from hisparc_datastore.format.rows import (
    BatchPart,
    BatchRows,
    StationBatch,
    build_table_rows,
    check_events,
    split_by_day,
)
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.dayfile import DayFile, day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for
from hisparc_datastore.writer.pipeline import sweep

START = dt.datetime(2024, 6, 21, 11, 0, 0)
DAY = START.date()
STATION, CLUSTER = 501, "Amsterdam"
TRACE_CODES = {"TR1", "TR2", "TR3", "TR4"}


@dataclass
class Line:
    label: str
    value: float
    unit: str
    ratio: str = ""


def best(repeat: int, action: Callable[[], Any], setup: Callable[[], Any] | None = None) -> float:
    """Best wall time of ``repeat`` runs (``setup`` runs untimed before each)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


# --- the full path ----------------------------------------------------------------------


def full_path(body: bytes, path: Path, key: str) -> None:
    events = decode_batch(body)
    days, _ = split_by_day(events, 2020, context=key)
    for day, day_events in days.items():
        assert day == DAY
        with DayFile(path) as day_file:
            day_file.write([BatchPart(key, "etag", STATION, CLUSTER, day_events)])


def fill_large(path: Path, events: list[dict[str, Any]], batches: int) -> None:
    checked, _ = check_events(events)
    with DayFile(path) as day_file:
        for number in range(batches):
            day_file.write([BatchPart(f"incoming/{STATION}/fill-{number}.pickle", "e",
                                      STATION, CLUSTER, checked)])


# --- the limit ----------------------------------------------------------------------------


def trace_texts(events: list[dict[str, Any]]) -> list[str]:
    return [item["data"] for event in events for item in event["datalist"]
            if item["data_uploadcode"] in TRACE_CODES]


def b64_traces(texts: list[str]) -> None:
    for text in texts:
        binascii.a2b_base64(text)


def bulk_write(path: Path, built: BatchRows) -> None:
    """One dataset per table and one blob array, each written whole: the floor."""
    with h5py.File(path, "w") as h5:
        group = h5.create_group(f"/hisparc/cluster_{CLUSTER.lower()}/station_{STATION}")
        for name, table in built.tables.items():
            group.create_dataset(name, data=table.rows, maxshape=(None,), chunks=True)
        blobs = np.empty(len(built.blobs), dtype=object)
        blobs[:] = [np.frombuffer(blob, dtype=np.uint8) for blob in built.blobs]
        group.create_dataset("blobs", data=blobs, maxshape=(None,), chunks=(4096,),
                             dtype=h5py.vlen_dtype(np.uint8))


# --- the naive design -----------------------------------------------------------------------


def naive_rows(path: Path, built: BatchRows) -> None:
    """PyTables row by row, a flush per event: the reference writer's way."""
    with tables.open_file(path, "w") as h5:
        group = h5.create_group("/", "hisparc", createparents=True)
        blob_array = h5.create_vlarray(group, "blobs", tables.VLStringAtom())
        for name, table_rows in built.tables.items():
            table = h5.create_table(group, name, description=table_rows.rows.dtype)
            columns = table_rows.rows.dtype.names or ()
            blob_columns = set(table_rows.blob_cells)
            for record in table_rows.rows:
                row = table.row
                for column in columns:
                    value = record[column]
                    if column in blob_columns:
                        for index in np.atleast_1d(value):
                            if 0 <= index < len(built.blobs):
                                blob_array.append(built.blobs[int(index)])
                    row[column] = value
                row.append()
                table.flush()
                blob_array.flush()


# --- objects/s through the sweep ------------------------------------------------------------


def sweep_rate(objects: int, work: Path) -> tuple[float, float, float]:
    """(objects/s, writer CPU ms/object, S3 server CPU ms/object)."""
    import resource

    server = SeaweedS3(data_dir=work / "s3", access_key="bench",
                       secret_key="bench-" + uuid.uuid4().hex)
    server.start()
    try:
        bucket = Bucket("bench", endpoint=server.endpoint, access_key=server.access_key,
                        secret_key=server.secret_key)
        bucket.ensure_exists()
        rng = random.Random(7)
        bodies = [dumps_py2(samples.batch(1, START + dt.timedelta(seconds=n), rng))
                  for n in range(objects)]
        metadata = metadata_for(Station(STATION, CLUSTER, "x"), 1, dt.datetime.now(dt.UTC))

        def put(body: bytes) -> None:
            bucket.put(incoming_key(STATION, hashlib.md5(body).hexdigest()), body, metadata)  # noqa: S324

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, bodies))
        (work / "sweep").mkdir()
        settings = Settings(
            log="", loglevel="warning", station_list=work / "stations.csv",
            data_dir=work / "sweep", minimum_year=2020, writer_sleep=1,
            bucket_endpoint=server.endpoint, bucket_name="bench", bucket_region="us-east-1",
            max_body_bytes=1 << 20, aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
        )

        def server_cpu() -> float:
            assert server.process is not None
            fields = Path(f"/proc/{server.process.pid}/stat").read_text().split(")")[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def own_cpu() -> float:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return usage.ru_utime + usage.ru_stime

        cpu0, server0 = own_cpu(), server_cpu()
        started = time.perf_counter()
        result = sweep(bucket, settings)
        elapsed = time.perf_counter() - started
        assert result.ok and len(result.archived) == objects, result.summary()
        return (objects / elapsed, (own_cpu() - cpu0) / objects * 1000,
                (server_cpu() - server0) / objects * 1000)
    finally:
        server.stop()


# --- the run ------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--large", type=int, default=40, help="batches in the large file")
    parser.add_argument("--objects", type=int, default=3000, help="1-event objects swept")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.large, args.objects, args.repeat = 5, 600, 2

    work = Path(tempfile.mkdtemp(prefix="bench-writer-"))
    rng = random.Random(1)
    events = samples.batch(args.events, START, rng, kinds=("CIC",))
    payloads = {
        "Python 2": dumps_py2(events),
        "Python 3": pickle.dumps(samples.numpy_flavour(events), protocol=4),
    }
    built = build_table_rows(events)
    assert built.row_count == args.events
    counter = iter(range(10**9))
    lines: list[Line] = []
    figures: dict[str, float] = {}  # the target ratios and rates, for bench/run.py

    def fresh_path() -> Path:
        return day_file_path(work / f"fresh-{next(counter)}", DAY)

    large = day_file_path(work / "large", DAY)
    fill_large(large, events, args.large)
    large_size = large.stat().st_size

    # The floor: one bulk write of the same rows and blobs.
    bulk = best(args.repeat, lambda: bulk_write(work / f"bulk-{next(counter)}.h5", built))
    rows_time = best(args.repeat, lambda: build_table_rows(events))
    texts = trace_texts(events)
    b64 = best(args.repeat, lambda: b64_traces(texts))

    for flavour, body in payloads.items():
        unpickle = best(args.repeat, lambda body=body: decode_batch(body))
        limit = unpickle + b64 + bulk
        lines.append(Line(f"limit {flavour}: unpickle {unpickle * 1e3:.0f} ms + base64 "
                          f"{b64 * 1e3:.0f} ms + bulk write {bulk * 1e3:.0f} ms",
                          args.events / limit, "events/s"))
        for target in ("fresh", "large"):
            if target == "fresh":
                paths: list[Path] = []
                elapsed = best(
                    args.repeat,
                    lambda body=body, paths=paths: full_path(body, paths[-1], "incoming/x"),
                    setup=lambda paths=paths: paths.append(fresh_path()),
                )
            else:
                elapsed = best(
                    args.repeat,
                    lambda body=body: full_path(
                        body, large, f"incoming/{STATION}/{uuid.uuid4().hex}.pickle"),
                )
            figures[f"full path {flavour}, {target} day file / limit"] = limit / elapsed
            lines.append(Line(f"full path {flavour}, {target} day file", args.events / elapsed,
                              "events/s", f"{limit / elapsed:.2f}x the limit (target 0.6)"))

    # The HDF5 part alone: DayFile.append of the rows built beforehand.
    checked, _ = check_events(events)
    prebuilt = BatchPart("incoming/x", "e", STATION, CLUSTER, checked)

    def append_prebuilt(path: Path) -> None:
        with DayFile(path) as day_file:
            day_file.append([StationBatch(CLUSTER, STATION, [prebuilt], [0], built)])

    append_paths: list[Path] = []
    hdf5_part = best(args.repeat, lambda: append_prebuilt(append_paths[-1]),
                     setup=lambda: append_paths.append(fresh_path()))
    figures["HDF5 part / bulk write"] = bulk / hdf5_part
    lines.append(Line("bulk h5py write of the same rows and blobs", args.events / bulk,
                      "events/s"))
    lines.append(Line(f"HDF5 part of DayFile.append (open, ledger, nodes, write, commit; "
                      f"rows prebuilt in {rows_time * 1e3:.0f} ms)", args.events / hdf5_part,
                      "events/s", f"{bulk / hdf5_part:.2f}x the bulk write (target 0.5)"))
    naive = best(max(1, args.repeat // 2),
                 lambda: naive_rows(work / f"naive-{next(counter)}.h5", built))
    lines.append(Line("naive: PyTables row by row, flush per event", args.events / naive,
                      "events/s", f"HDF5 part is {naive / hdf5_part:.1f}x faster"))

    rate, writer_cpu, server_cpu = sweep_rate(args.objects, work)
    figures["sweep objects/s"] = rate
    # What the CPU cost allows when the machine is not shared (load moves the rate).
    cpus = os.cpu_count() or 1
    capacity = cpus * 1000 / (writer_cpu + server_cpu)
    figures["CPU ms/object, writer + S3 server"] = writer_cpu + server_cpu
    lines.append(Line(f"sweep of 1-event objects (CPU/object: writer {writer_cpu:.2f} ms + "
                      f"S3 server {server_cpu:.2f} ms: {cpus} idle CPUs allow {capacity:.0f}/s)",
                      rate, "objects/s", f"{rate / 500:.2f}x the target of 500"))

    load = os.getloadavg()
    print(f"\nwriter benchmark: {args.events}-event CIC batches with 4 traces "
          f"({len(payloads['Python 2']) / 1e6:.1f} MB protocol-0, "
          f"{len(payloads['Python 3']) / 1e6:.1f} MB protocol-4); large file "
          f"{args.large} batches, {large_size / 1e6:.0f} MB; {args.objects} objects swept; "
          f"best of {args.repeat}; load average {load[0]:.1f} on {os.cpu_count()} CPUs")
    width = max(len(line.label) for line in lines)
    for line in lines:
        print(f"  {line.label:<{width}}  {line.value:>9,.0f} {line.unit:<9}  {line.ratio}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "figures": figures,
            "lines": [{"label": line.label, "value": line.value, "unit": line.unit,
                       "ratio": line.ratio} for line in lines],
            "load_average": load[0],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
