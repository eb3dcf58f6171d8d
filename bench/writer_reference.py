"""The writer against the reference: HiSPARC's old writer on its queue files, against the
writer function on a notification, side by side in one run.

Both sides get the same workload, fresh day files and the same machine, round after round
in turn (so a change of load hits both):

- **workload**: ``--batches`` (6) batches of ``--events`` (1000) events of realistic
  station traffic (``samples.realistic_batch``: a singles message (SIN) per second,
  coincidences (CIC) at 0.5/s, now and then a CFG, ERR, CMP, SAT or WTR message), from
  three stations in turn: two four-detector stations (CIC with 4 traces) and one
  two-detector station (CIC with the codes of channels 1 and 2 only, 2 traces).  Each
  batch is pickled as a Python 2 station sends it (protocol 0, ``dumps_py2``).  Every
  round writes another UTC day, so each side starts every round with fresh day files.
- **the reference** (HiSPARC/datastore, ``writer/writer_app.py``, ``store_events.py`` and
  ``storage.py``, its Python 3 version, reproduced below from what they do): the reference
  upload app decoded each station pickle and pickled ``{'station_id', 'cluster',
  'event_list'}`` again with Python 3's default protocol into its queue folder (done
  here untimed, as its upload's work).  Its writer, timed: for each entry of ``incoming/``,
  rename it into ``partial/``, ``pickle.load`` it, store its events one by one (per event:
  look up the station group, table and ``blobs`` by name, fill a PyTables row from the
  column defaults and the datalist, base64-decode traces and append each blob, append
  the row, flush the table and ``blobs``), close the day file, delete the entry.  The day
  files have the reference's layout (``<YYYY>/<M>/<YYYY>_<M>_<D>.h5``, the same groups,
  tables, titles and column descriptions, ``blobs`` a ``VLStringAtom`` VLArray).  Plain
  ``pickle.load`` of network data is the reference's defect that the new writer removes;
  here it only ever reads the benchmark's own generated batches.
- **ours**: the same station pickles are put into a local SeaweedFS as the upload
  function stores them (``incoming/<station>/<md5>.pickle``, its metadata), untimed.
  Timed: one MinIO webhook notification per object (MinIO sends one per object), each
  handed in this process to the writer function's entry point (``functions/writer/main.py``
  ``writer(request)``, through a Flask request context: token check, notification
  parsing, ``WriterService.notify``), which gets the object, decodes it through the
  allowlist, appends the rows in one transaction, copies it to ``archive/`` and deletes it
  from ``incoming/``; every answer must be 200 with the object archived.

Round 0 warms both sides up and is not counted; after it, both day files are read back
with PyTables and must hold the same groups, tables, titles, rows and blobs (row order
aside: the reference takes its queue in directory order), every event once.

Reported: events/s of each side (median of ``--rounds`` rounds), the ratio ours /
reference (the median of the rounds' ratios; target: at least 3), and CPU per 1000 events
(this process; SeaweedFS's own CPU beside it), which does not depend on the load.
``--profile`` adds cProfile's top entries of each side's timed part (one extra round,
not counted).

Run: ``.venv/bin/python bench/writer_reference.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import base64
import calendar
import contextlib
import cProfile
import datetime as dt
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import pstats
import random
import resource
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import flask
import numpy as np
import tables
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2
from hisparc_datastore_dev.s3server import SeaweedS3

from hisparc_datastore.format.keys import archive_key, incoming_key
from hisparc_datastore.format.schema import BLOBS_NODE, BLOBS_TITLE, EVENT_TYPES, TABLES
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for

ROOT = Path(__file__).resolve().parents[1]
WRITER_MAIN = ROOT / "functions" / "writer" / "main.py"
#: (station, cluster, detectors): who sends the batches, in turn.
STATIONS = ((501, "Amsterdam", 4), (502, "Amsterdam", 2), (7001, "Leiden", 4))
FIRST_DAY = dt.date(2024, 6, 1)
#: Codes a two-detector station does not send (the slave's channels 3 and 4).
_CHANNELS_3_4 = frozenset(f"{code}{n}" for code in ("BL", "STDDEV", "NP", "PH", "IN", "TR")
                          for n in (3, 4))


# --- the workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    station: int
    cluster: str
    events: list[dict[str, Any]]
    body: bytes  # the station's pickle: Python 2, protocol 0

    @property
    def md5(self) -> str:
        return hashlib.md5(self.body).hexdigest()  # noqa: S324


def two_detectors(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events as a two-detector station sends them: no channel 3 and 4 in CIC."""
    for event in events:
        if event["header"]["eventtype_uploadcode"] == "CIC":
            event["datalist"] = [item for item in event["datalist"]
                                 if item["data_uploadcode"] not in _CHANNELS_3_4]
    return events


def workload(day: dt.date, batches: int, events: int, seed: int) -> list[Batch]:
    """``batches`` realistic batches of ``events`` events on ``day``, stations in turn."""
    rng = random.Random(seed)
    result = []
    for number in range(batches):
        station, cluster, detectors = STATIONS[number % len(STATIONS)]
        start = dt.datetime.combine(day, dt.time(6)) + dt.timedelta(
            minutes=20 * (number // len(STATIONS)))
        batch = samples.realistic_batch(events, start, rng)
        if detectors == 2:
            batch = two_detectors(batch)
        result.append(Batch(station, cluster, batch, dumps_py2(batch)))
    return result


def event_counts(batches: list[Batch]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for batch in batches:
        for event in batch.events:
            code = event["header"]["eventtype_uploadcode"]
            counts[code] = counts.get(code, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


# --- the reference writer --------------------------------------------------------------------
#
# Written from what HiSPARC/datastore's Python 3 writer does (writer_app.process_data,
# store_events.store_event_list / store_event, storage.open_or_create_file /
# get_or_create_*); the tables, titles and code mapping come from our schema, which
# reproduces the reference's (with its lightning mapping mended, docs/FORMAT.md, 5).

reference_log = logging.getLogger("bench.reference.writer")


def _reference_upload_codes() -> dict[str, dict[str, Any]]:
    """The reference's ``eventtype_upload_codes``: per type, table, blob codes, ext time
    and upload code (without its digit) -> column."""
    return {
        code: {"_tablename": kind.table, "_blobs": sorted(kind.blob_codes),
               "_has_ext_time": kind.extended_time, **kind.codes}
        for code, kind in EVENT_TYPES.items()
    }


def _reference_description(table: str) -> dict[str, tables.Col]:
    """The table's ``IsDescription`` as the reference declares it (Time32 timestamps)."""
    description: dict[str, tables.Col] = {}
    for position, column in enumerate(TABLES[table].columns):
        if column.name == "timestamp":
            description[column.name] = tables.Time32Col(pos=position)
        else:
            description[column.name] = tables.Col.from_dtype(
                np.dtype((column.dtype, column.shape)), dflt=column.fill, pos=position)
    return description


UPLOAD_CODES = _reference_upload_codes()
DESCRIPTIONS = {name: _reference_description(name) for name in TABLES}


def open_or_create_file(data_dir: Path, date: dt.date) -> tables.File:
    directory = data_dir / f"{date.year}/{date.month}"
    file = directory / f"{date.year}_{date.month}_{date.day}.h5"
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    return tables.open_file(file, "a")


def get_or_create_cluster_group(file: tables.File, cluster: str) -> tables.Group:
    try:
        hisparc = file.get_node("/", "hisparc")
    except tables.NoSuchNodeError:
        hisparc = file.create_group("/", "hisparc", "HiSPARC data")
        file.flush()
    node_name = "cluster_" + cluster.lower()
    try:
        group = file.get_node(hisparc, node_name)
    except tables.NoSuchNodeError:
        group = file.create_group(hisparc, node_name, f"HiSPARC cluster {cluster} data")
        file.flush()
    return group


def get_or_create_station_group(file: tables.File, cluster: str, station: int) -> tables.Group:
    parent = get_or_create_cluster_group(file, cluster)
    node_name = f"station_{station}"
    try:
        group = file.get_node(parent, node_name)
    except tables.NoSuchNodeError:
        group = file.create_group(parent, node_name, f"HiSPARC station {station} data")
        file.flush()
    return group


def get_or_create_node(file: tables.File, parent: tables.Group, name: str) -> Any:
    try:
        node = file.get_node(parent, name)
    except tables.NoSuchNodeError:
        if name == BLOBS_NODE:
            node = file.create_vlarray(parent, name, tables.VLStringAtom(), BLOBS_TITLE)
        else:
            node = file.create_table(parent, name, DESCRIPTIONS[name], TABLES[name].title)
        file.flush()
    return node


def data_is_blob(uploadcode: str, blob_types: list[str]) -> bool:
    if uploadcode[-1].isdigit():
        return uploadcode[:-1] in blob_types
    return uploadcode in blob_types


def store_event(datafile: tables.File, cluster: str, station_id: int,
                event: dict[str, Any]) -> None:
    header = event["header"]
    datalist = event["datalist"]
    eventtype = header["eventtype_uploadcode"]
    try:
        upload_codes = UPLOAD_CODES[eventtype]
    except KeyError:
        reference_log.error(f"Unknown event type: {eventtype}, discarding event "
                            f"(station: {station_id})")
        return
    parent = get_or_create_station_group(datafile, cluster, station_id)
    table = get_or_create_node(datafile, parent, upload_codes["_tablename"])
    blobs = get_or_create_node(datafile, parent, BLOBS_NODE)

    row = table.row
    row["event_id"] = table.nrows + 1
    timestamp = calendar.timegm(header["datetime"].utctimetuple())
    nanoseconds = header["nanoseconds"]
    ext_timestamp = timestamp * 1_000_000_000 + nanoseconds
    row["timestamp"] = timestamp
    if upload_codes["_has_ext_time"]:
        row["nanoseconds"] = nanoseconds
        row["ext_timestamp"] = ext_timestamp

    data = {}
    for key, value in upload_codes.items():
        if key[0] != "_":
            data[key] = row[value]  # the column's default (an array for array columns)

    for item in datalist:
        uploadcode = item["data_uploadcode"]
        value = item["data"]
        if data_is_blob(uploadcode, upload_codes["_blobs"]):
            if uploadcode[:-1] == "TR":
                value = base64.decodebytes(value.encode("iso-8859-1"))
            else:
                value = value.encode("iso-8859-1")
            blobs.append(value)
            value = len(blobs) - 1
        if uploadcode[-1].isdigit():
            key, index = uploadcode[:-1], int(uploadcode[-1]) - 1
            if key in data:
                data[key][index] = value
            else:
                reference_log.warning(f"Datatype not known on server side: {key} ({eventtype})")
        elif uploadcode in data:
            data[uploadcode] = value
        else:
            reference_log.warning(f"Datatype not known on server side: {uploadcode} "
                                  f"({eventtype})")

    for key, value in upload_codes.items():
        if key[0] != "_":
            row[value] = data[key]
    row.append()
    table.flush()
    blobs.flush()


class ReferenceFailures(logging.Handler):
    """Counts the events the reference discards with a traceback (there must be none)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def store_event_list(data_dir: Path, station_id: int, cluster: str,
                     event_list: list[dict[str, Any]]) -> None:
    minimum_year = 2020
    prev_date = None
    datafile = None
    for event in event_list:
        try:
            timestamp = event["header"]["datetime"]
            if timestamp:
                date = timestamp.date()
                if date.year < minimum_year:
                    reference_log.error(f"Old event ({date}), discarding event "
                                        f"(station: {station_id})")
                    continue
                if date != prev_date:
                    if datafile:
                        datafile.close()
                    datafile = open_or_create_file(data_dir, date)
                    prev_date = date
                store_event(datafile, cluster, station_id, event)
            else:
                reference_log.error(f"Strange event (no timestamp!), discarding event "
                                    f"(station: {station_id})")
        except Exception:
            reference_log.exception(f"Cannot process event, discarding event "
                                    f"(station: {station_id})")
    if datafile:
        datafile.close()


def _decode_object(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return {_decode_object(k): _decode_object(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_object(item) for item in value]
    return value


def process_data(file: Path, data_dir: Path) -> None:
    with file.open("rb") as handle:
        try:
            data = pickle.load(handle)  # the bench's own queue files only
        except UnicodeDecodeError:  # a Python 2 queue file with non-ASCII byte strings
            handle.seek(0)  # (the reference forgets this; never reached here)
            data = _decode_object(pickle.load(handle, encoding="bytes"))
    reference_log.debug(f"Processing data for station {data['station_id']}")
    store_event_list(data_dir, data["station_id"], data["cluster"], data["event_list"])


def reference_writer(data_dir: Path) -> int:
    """One pass of the reference writer's loop over its queue; the entries written."""
    queue, partial = data_dir / "incoming", data_dir / "partial"
    done = 0
    for entry in queue.iterdir():
        partial_path = partial / entry.name
        entry.rename(partial_path)
        process_data(partial_path, data_dir)
        partial_path.unlink()
        done += 1
    return done


def reference_queue(data_dir: Path, batches: list[Batch]) -> None:
    """What the reference upload app leaves in its queue for ``batches`` (untimed).

    It unpickled the station's pickle and pickled the station, cluster and event list
    again with Python 3's default protocol (``wsgi_app.store_data``), via ``tmp/``.
    Decoding: latin-1 for Python 2 byte strings, as bench/reference_upload.py does (the
    reference's own fallback, UTF-8, fails on a station's latin-1 error message).
    """
    for folder in ("incoming", "partial", "tmp"):
        (data_dir / folder).mkdir(parents=True, exist_ok=True)
    for batch in batches:
        event_list = pickle.loads(batch.body, encoding="latin1")  # the bench's own data only
        with tempfile.NamedTemporaryFile(dir=data_dir / "tmp", delete=False) as file:
            pickle.dump({"station_id": batch.station, "cluster": batch.cluster,
                         "event_list": event_list}, file)
        shutil.move(file.name, data_dir / "incoming")


# --- ours: the writer function on notifications ------------------------------------------


def minio_notification(bucket: str, key: str, size: int, etag: str) -> bytes:
    """The body of MinIO's webhook for one new object (its key query-escaped)."""
    record = {
        "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
        "eventTime": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "eventName": "s3:ObjectCreated:Put",
        "userIdentity": {"principalId": "datastore"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "datastore"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": {"key": urllib.parse.quote(key, safe=""), "size": size,
                          "eTag": etag, "contentType": "application/x-python-pickle"}},
        "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64)"},
    }
    return json.dumps({"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}",
                       "Records": [record]}).encode()


class OurWriter:
    """The writer function loaded in this process against a local SeaweedFS."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.s3 = SeaweedS3(work / "s3", "bench", "bench-secret-" + uuid.uuid4().hex)
        self.token = "bench-token-" + uuid.uuid4().hex
        self.bucket_name = "bench-reference"
        self.data_dir = work / "ours"
        self.module: ModuleType | None = None
        self.app = flask.Flask("bench_writer_reference")

    def start(self) -> None:
        self.s3.start()
        self.bucket = Bucket(self.bucket_name, endpoint=self.s3.endpoint,
                             access_key=self.s3.access_key, secret_key=self.s3.secret_key)
        self.bucket.ensure_exists()
        self.data_dir.mkdir()
        stations = self.work / "stations.csv"
        stations.write_text("".join(f"{number},{cluster},x-{number}\n"
                                    for number, cluster, _ in STATIONS))
        config = self.work / "writer.ini"
        config.write_text(textwrap.dedent(f"""\
            [General]
            log = {self.work / "writer.log"}
            loglevel = info
            station_list = {stations}
            data_dir = {self.data_dir}
            minimum_year = 2020

            [Bucket]
            endpoint = {self.s3.endpoint}
            name = {self.bucket_name}
            """))
        for name in list(os.environ):
            if name.startswith(("DATASTORE_", "AWS_")) or name == "PROMETHEUS_MULTIPROC_DIR":
                del os.environ[name]
        os.environ.update(DATASTORE_CONFIG=str(config), AWS_ACCESS_KEY_ID=self.s3.access_key,
                          AWS_SECRET_ACCESS_KEY=self.s3.secret_key,
                          DATASTORE_WRITER_AUTH_TOKEN=self.token)
        spec = importlib.util.spec_from_file_location("bench_writer_function", WRITER_MAIN)
        assert spec is not None and spec.loader is not None
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)

    def stop(self) -> None:
        if self.module is not None:
            self.module.SERVICE.stop()
        self.s3.stop()

    def upload(self, batches: list[Batch]) -> list[tuple[str, int, str]]:
        """Store the batches as the upload function does: (key, size, etag) of each."""
        self.received = dt.datetime.now(dt.UTC)
        stored = []
        for batch in batches:
            key = incoming_key(batch.station, batch.md5)
            etag = self.bucket.put(key, batch.body, metadata_for(
                Station(batch.station, batch.cluster, "x"), len(batch.events), self.received))
            stored.append((key, len(batch.body), etag))
        return stored

    def notify(self, key: str, size: int, etag: str) -> dict[str, Any]:
        """One notification through the function's entry point; its answer, checked."""
        assert self.module is not None
        body = minio_notification(self.bucket_name, key, size, etag)
        with self.app.test_request_context(
            "/", method="POST", data=body,
            headers={"Content-Type": "application/json",
                     "Authorization": f"Bearer {self.token}"},
        ):
            response = self.module.writer(flask.request)
            answer = json.loads(b"".join(response.response))
        if response.status_code != 200 or answer.get("archived") != 1:
            raise RuntimeError(f"writer answered {response.status_code}: {answer}")
        return answer

    def check_archived(self, stored: list[tuple[str, int, str]]) -> None:
        """Every object moved: gone from incoming/, present in archive/."""
        for key, size, _ in stored:
            archived = self.bucket.head(archive_key(key, self.received))
            if self.bucket.head(key) is not None or archived is None or archived.size != size:
                raise RuntimeError(f"{key} was not moved to archive/")

    def server_cpu(self) -> float:
        assert self.s3.process is not None
        fields = Path(f"/proc/{self.s3.process.pid}/stat").read_text().split(")")[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the two sides wrote the same ------------------------------------------------------------


def _records(table: tables.Table, blobs: list[bytes]) -> list[tuple[Any, ...]]:
    """A table's rows without ``event_id``, blob columns holding the blobs themselves,
    sorted: what a day file says, whatever order its objects were written in."""
    blob_columns = {field.column for field in TABLES[table.name].fields.values() if field.blob}
    rows = table.read()
    columns = []
    for name in rows.dtype.names or ():
        if name == "event_id":
            continue
        values = rows[name].tolist()
        if name in blob_columns:
            values = [tuple(blobs[i] if i >= 0 else None for i in value)
                      if isinstance(value, list) else (blobs[value] if value >= 0 else None)
                      for value in values]
        elif rows[name].ndim > 1:
            values = [tuple(value) for value in values]
        columns.append(values)
    return sorted(zip(*columns, strict=True), key=repr)


def same_contents(reference: Path, ours: Path) -> int:
    """Compare two day files with PyTables; the rows compared.

    Every station group must hold the same tables, with the same titles, and every table
    the same rows, with the same values in every column, blob columns compared by the
    blobs they point to, and ``event_id`` running 1..n.  The order of the rows may differ:
    the reference takes its queue files in directory order, ours in notification order.
    Our ledger is left out.  Raises RuntimeError at the first difference.
    """
    compared = 0
    with tables.open_file(reference) as left, tables.open_file(ours) as right:
        for group in left.walk_groups("/hisparc"):
            other = right.get_node(group._v_pathname)
            if other._v_title != group._v_title:
                raise RuntimeError(f"{group._v_pathname}: title {other._v_title!r}")
            leaves = {node._v_name: node for node in group._f_iter_nodes("Leaf")}
            mine = {node._v_name: node for node in other._f_iter_nodes("Leaf")}
            if set(leaves) != set(mine):
                raise RuntimeError(f"{group._v_pathname}: nodes {sorted(mine)}")
            if not leaves:
                continue
            expected_blobs, found_blobs = leaves[BLOBS_NODE].read(), mine[BLOBS_NODE].read()
            if sorted(expected_blobs) != sorted(found_blobs):
                raise RuntimeError(f"{group._v_pathname}: blobs differ")
            for name, node in leaves.items():
                if mine[name]._v_title != node._v_title:
                    raise RuntimeError(f"{node._v_pathname}: title {mine[name]._v_title!r}")
                if name == BLOBS_NODE:
                    continue
                if list(mine[name].col("event_id")) != list(range(1, node.nrows + 1)):
                    raise RuntimeError(f"{node._v_pathname}: event_id is not 1..n")
                if _records(node, expected_blobs) != _records(mine[name], found_blobs):
                    raise RuntimeError(f"{node._v_pathname}: rows differ")
                compared += node.nrows
    return compared


# --- measuring --------------------------------------------------------------------------------


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Timing:
    seconds: float
    cpu: float
    server_cpu: float = 0.0


def timed(action: Callable[[], Any], server_cpu: Callable[[], float] | None = None) -> Timing:
    server0 = server_cpu() if server_cpu else 0.0
    cpu0 = own_cpu()
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    cpu = own_cpu() - cpu0
    return Timing(seconds, cpu, (server_cpu() - server0) if server_cpu else 0.0)


@contextlib.contextmanager
def profiled(enabled: bool, title: str, top: int) -> Iterator[None]:
    if not enabled:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profile, stream=out).strip_dirs().sort_stats(order).print_stats(top)
            print(f"\n--- profile of {title}, by {order} ---")
            print(out.getvalue().split("\n", 6)[-1].rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile both sides in one extra round and print the top")
    parser.add_argument("--top", type=int, default=25, help="profile entries shown")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 3

    failures = ReferenceFailures()
    reference_log.addHandler(failures)
    reference_log.propagate = False
    work = Path(tempfile.mkdtemp(prefix="bench-writer-reference-"))
    ours = OurWriter(work)
    load_before = os.getloadavg()
    events_per_round = args.batches * args.events
    rows: dict[str, list[Timing]] = {"reference": [], "ours": []}
    try:
        ours.start()
        # Round 0 warms both sides up (imports, first files, the retry records); not counted.
        plan = [(number, False) for number in range(args.rounds + 1)]
        if args.profile:
            plan.append((args.rounds + 1, True))
        mix: dict[str, int] = {}
        for number, profile in plan:
            day = FIRST_DAY + dt.timedelta(days=number)
            batches = workload(day, args.batches, args.events, seed=number)
            mix = event_counts(batches)

            reference_dir = work / f"reference-{number}"
            reference_queue(reference_dir, batches)
            with profiled(profile, "the reference writer", args.top):
                reference = timed(lambda reference_dir=reference_dir: reference_writer(
                    reference_dir))
            if any((reference_dir / "incoming").iterdir()) or failures.count:
                raise RuntimeError("the reference writer left entries or failed events")

            stored = ours.upload(batches)
            with profiled(profile, "the writer function on notifications", args.top):
                our = timed(lambda stored=stored: [ours.notify(*item) for item in stored],
                            ours.server_cpu)
            ours.check_archived(stored)
            if number == 0:  # both sides wrote the same rows and blobs (checked once)
                compared = same_contents(day_file_path(reference_dir, day),
                                         day_file_path(ours.data_dir, day))
                if compared != events_per_round:
                    raise RuntimeError(f"{compared} rows compared, {events_per_round} sent")
            if number and not profile:
                rows["reference"].append(reference)
                rows["ours"].append(our)
                print(f"round {number}: reference {events_per_round / reference.seconds:,.0f} "
                      f"events/s, ours {events_per_round / our.seconds:,.0f} events/s "
                      f"({reference.seconds / our.seconds:.2f}x); load "
                      f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    finally:
        ours.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def rate(side: str) -> float:
        return statistics.median(events_per_round / t.seconds for t in rows[side])

    def cpu_ms(side: str, field: str = "cpu") -> float:
        return statistics.median(getattr(t, field) for t in rows[side]) / events_per_round * 1e6

    reference_rate, our_rate = rate("reference"), rate("ours")
    # Each round's sides ran back to back, under about the same load: the median of the
    # rounds' ratios is steadier than the ratio of the medians when the load moves.
    round_ratios = [r.seconds / o.seconds for r, o in zip(rows["reference"], rows["ours"],
                                                         strict=True)]
    ratio = statistics.median(round_ratios)
    cpu_ratio = cpu_ms("reference") / (cpu_ms("ours") + cpu_ms("ours", "server_cpu"))
    own_cpu_ratio = cpu_ms("reference") / cpu_ms("ours")
    load_after = os.getloadavg()
    print(f"\nwriter against the reference: {args.batches} batches x {args.events} events "
          f"(Python 2 protocol 0, {sum(mix.values())} events: "
          f"{', '.join(f'{code} {n}' for code, n in mix.items())}); median of {args.rounds} "
          f"rounds; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
          f"on {os.cpu_count()} CPUs")
    print(f"  reference writer (queue files, PyTables row by row)  {reference_rate:>9,.0f} "
          f"events/s  CPU {cpu_ms('reference'):.1f} ms per 1000 events")
    print(f"  writer function (notification, S3 get and archive)   {our_rate:>9,.0f} "
          f"events/s  CPU {cpu_ms('ours'):.1f} ms per 1000 events + SeaweedFS "
          f"{cpu_ms('ours', 'server_cpu'):.1f} ms")
    print(f"  ours / reference: {ratio:.2f}x, median of the rounds (target 3); per round "
          f"{', '.join(f'{r:.2f}' for r in round_ratios)}")
    print(f"  by CPU: {cpu_ratio:.2f}x with SeaweedFS's share on these cores, "
          f"{own_cpu_ratio:.2f}x with the S3 server on other machines")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "figures": {
                "reference events/s": reference_rate,
                "ours events/s": our_rate,
                "ours / reference": ratio,
                "ours / reference by CPU": cpu_ratio,
                "ours / reference by CPU, S3 server elsewhere": own_cpu_ratio,
            },
            "round_ratios": round_ratios,
            "cpu_ms_per_1000_events": {
                "reference": cpu_ms("reference"), "ours": cpu_ms("ours"),
                "seaweedfs": cpu_ms("ours", "server_cpu")},
            "events_per_round": events_per_round,
            "mix": mix,
            "load_average": [load_before[0], load_after[0]],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
