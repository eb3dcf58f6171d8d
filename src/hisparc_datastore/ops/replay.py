"""``datastore replay``: rebuild daily HDF5 files from the bucket's archive, and compare.

The archive holds every batch ever written, byte for byte as the station sent it, so the
day files can always be rebuilt from it: after a damaged volume, a writer bug, or to check
that the live files hold exactly what was uploaded.  Replay never touches the live files
and never moves an object: it reads ``archive/`` (and ``incoming/``, what the live writer
has not reached yet) and writes into a separate directory with the data_dir layout.

Which objects.  An archive day is the *upload* date, not the events' dates, and uploads
come after the events: a batch of events just before midnight arrives just after it, and
a station that was offline uploads days of backlog at once.  So replay reads the archive
days from ``--from`` minus one (a station clock a little ahead of the server's) up to
``--to`` plus ``--late-days`` (default 7), and keeps only the events whose UTC date is in
range.  A batch uploaded later than that is missed, and ``--verify`` names it (its key is
in the live file's ledger, not in the replayed one's).

Order, and what "identical" means.  Event ids and blob indices depend on the order in
which objects are appended, per station table.  The live writer appends in arrival
order (notifications; the sweep goes oldest-first by station).  Replay appends archive
day by archive day, and within a day station by station, each station's objects sorted
by their ``received`` metadata (then key): arrival order, reconstructed.  So when the live
writer saw objects in arrival order, replay equals live row for row.  It cannot always:
concurrent notifications, a retried failed object, an object that waited in ``incoming/``
during an outage all land later than they arrived.  Hence ``--verify`` compares the
content of every table as a multiset of rows, ``event_id`` left out and every blob index
replaced by the blob's bytes; rows in another order are reported as a note, not a
difference (``--strict-order`` makes them one).  HDF5 files are not byte-identical
between runs (h5py writes no timestamps, but the ledger records commit times), so
"replaying twice gives identical files" is content equality in the same sense; replay's
own order is deterministic, so two replays also agree row for row.

The same code turns objects into rows as in the live writer:
:func:`~hisparc_datastore.format.origin.plan_object`, rows built per object and merged
per station (:func:`~hisparc_datastore.format.rows.merge_batches`: the same rows one build
gives), then :meth:`DayFile.append`, with
the object's ``incoming/`` key as the ledger key, so a batch archived twice (a station
that resent it on another day) is written once, as live.

Memory stays flat: listings are read page by page and held one (archive day, station)
group at a time, bodies are fetched a few at a time and appended in bounded groups.

Scale.  ``--jobs N`` decodes and builds rows in N worker processes while this process
fetches and appends, in the same order: the same rows as one process (tested), faster
where decoding is the cost.  ``--shard I/N`` rebuilds only the I-th of N blocks of
consecutive days of ``--from``..``--to``: different days are different files, so shards
run anywhere at once (a Kubernetes Indexed Job: infra/replay/) into one output volume.
Each reads the archive days its own days need, so a shard of D days reads D +
``--late-days`` + 1 archive days: fewer, longer shards read less twice.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import multiprocessing
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from hisparc_datastore.config import Settings, load_settings, require_s3_credentials
from hisparc_datastore.format.keys import ARCHIVE, INCOMING
from hisparc_datastore.format.origin import NoCluster, plan_object, received_time
from hisparc_datastore.format.payload import PayloadError
from hisparc_datastore.format.rows import (
    BatchPart,
    RowsError,
    StationBatch,
    gather,
    merge_batches,
)
from hisparc_datastore.format.schema import BLOBS_NODE, ROOT_GROUP, TABLES, cluster_node
from hisparc_datastore.logs import setup_logging
from hisparc_datastore.stations import cluster_lookup
from hisparc_datastore.storage.dayfile import AppendReport, DayFile, day_file_path
from hisparc_datastore.storage.store import (
    S3_THREADS,
    Bucket,
    BucketError,
    ObjectInfo,
    StoredObject,
)
from hisparc_datastore.writer.pipeline import short_reason

log = logging.getLogger(__name__)

DEFAULT_LATE_DAYS = 7
#: An append group holds at most this many objects or body bytes (then it is written).
GROUP_OBJECTS = 500
GROUP_BYTES = 8 * 1024 * 1024
#: Concurrent S3 requests (HEAD for the order, GET for the bodies).


# ----------------------------------------------------------------------------- keys


def archive_day_prefix(day: dt.date) -> str:
    return f"{ARCHIVE}{day:%Y/%m/%d}/"


def ledger_key(key: str) -> str:
    """The ``incoming/`` key an archived object had: the key the live ledger recorded."""
    if key.startswith(ARCHIVE):
        parts = key.split("/", 4)  # archive, YYYY, MM, DD, <station>/<md5>.pickle
        if len(parts) == 5:
            return INCOMING + parts[4]
    return key


def archive_days(first: dt.date, last: dt.date, late_days: int) -> list[dt.date]:
    """Upload days whose archive may hold events of ``first``..``last``."""
    start, end = first - dt.timedelta(days=1), last + dt.timedelta(days=late_days)
    return [start + dt.timedelta(days=n) for n in range((end - start).days + 1)]


def event_days(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


def _station_prefix(info: ObjectInfo) -> str:
    return info.key.rsplit("/", 1)[0]


# ----------------------------------------------------------------------------- progress


class Progress:
    """Objects, events, bytes, rate and ETA on stderr; silent when disabled or no tqdm.

    While the bar runs, log lines go through it (tqdm's logging redirect), so a warning
    does not tear the bar apart.
    """

    def __init__(self, total: int | None, total_bytes: int | None, enabled: bool,
                 description: str, unit: str = "obj") -> None:
        self.events = 0
        self.bytes = 0
        self.total_bytes = total_bytes
        self._bar: Any = None
        self._redirect: Any = None
        if enabled:
            try:
                from tqdm import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm
            except ImportError:  # progress is a convenience, never a reason to fail
                return
            self._bar = tqdm(total=total, unit=unit, desc=description, file=sys.stderr,
                             dynamic_ncols=True, mininterval=0.5)
            self._redirect = logging_redirect_tqdm(
                loggers=[logging.getLogger("hisparc_datastore")], tqdm_class=tqdm
            )
            self._redirect.__enter__()

    def advance(self, objects: int = 1, events: int = 0, nbytes: int = 0) -> None:
        self.events += events
        self.bytes += nbytes
        if self._bar is not None:
            shown = f"{self.bytes / 1e6:.1f}"
            if self.total_bytes:
                shown += f"/{self.total_bytes / 1e6:.1f}"
            self._bar.set_postfix_str(f"events={self.events} MB={shown}", refresh=False)
            self._bar.update(objects)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ----------------------------------------------------------------------------- rebuild


@dataclass
class ReplayReport:
    """What a replay read and wrote."""

    objects: int = 0
    bytes: int = 0
    events_in_range: int = 0
    rows: int = 0
    duplicates: int = 0  # objects whose key was already written (archived twice)
    skipped_events: int = 0
    problems: dict[str, str] = field(default_factory=dict)  # key -> why it was not used
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.objects / self.seconds if self.seconds else 0.0
        return (
            f"replay: {self.objects} objects ({self.bytes / 1e6:.1f} MB) read, "
            f"{self.events_in_range} events in range, {self.rows} rows written to "
            f"{len(self.files)} day files, {self.duplicates} duplicate objects, "
            f"{self.skipped_events} events skipped, {len(self.problems)} unusable objects; "
            f"{self.seconds:.1f} s ({rate:.0f} objects/s)"
        )


@dataclass(frozen=True)
class Prepared:
    """One object, decoded and built into rows: per day in range, its station's batch.

    The batches carry no events (only the rows built from them), so what a worker process
    sends back is numpy arrays and blob bytes, cheap to pickle.
    """

    key: str
    batches: dict[dt.date, StationBatch]
    size: int
    events: int
    problem: str | None = None


def prepare(key: str, body: bytes, metadata: dict[str, str], etag: str,
            days: frozenset[dt.date], minimum_year: int, station_list: Path) -> Prepared:
    """The live writer's plan of an object (:func:`plan_object`), its days in range built
    into rows.  A plain function of plain values: it runs in replay's worker processes.

    The ledger key is the object's ``incoming/`` key, as the live writer recorded it.
    """
    try:
        plan = plan_object(ledger_key(key), body, metadata, etag, minimum_year=minimum_year,
                           cluster_of=cluster_lookup(station_list), context=key)
        batches = {}
        events = 0
        for day, part in plan.parts.items():
            if day not in days:
                continue
            (batch,) = gather([part])
            events += len(part.events)
            light = BatchPart(part.key, part.etag, part.station, part.cluster, ())
            batches[day] = StationBatch(batch.cluster, batch.station, [light], [0],
                                        batch.rows, batch.events)
    except (PayloadError, NoCluster, RowsError) as exc:
        return Prepared(key, {}, len(body), 0, short_reason(exc))
    return Prepared(key, batches, len(body), events)


class _Appender:
    """Collects prepared objects and appends them in bounded groups, in the order given.

    Per day file, each station's objects are merged into one batch
    (:func:`merge_batches`), so a group costs one resize and one write per dataset, and
    the rows are exactly those one build of all their events gives.
    """

    def __init__(self, out: Path, report: ReplayReport) -> None:
        self.out = out
        self.report = report
        self.pending: dict[dt.date, list[StationBatch]] = {}
        self.objects = 0
        self.size = 0

    def add(self, prepared: Prepared) -> None:
        for day, batch in prepared.batches.items():
            self.pending.setdefault(day, []).append(batch)
        self.objects += 1
        self.size += prepared.size
        if self.objects >= GROUP_OBJECTS or self.size >= GROUP_BYTES:
            self.flush()

    def flush(self) -> None:
        for day in sorted(self.pending):
            path = day_file_path(self.out, day)
            with DayFile(path) as day_file:
                appended = self._append(day_file, self.pending[day])
            self.report.rows += sum(appended.rows.values())
            self.report.skipped_events += appended.skipped_events.total
            self.report.duplicates += len(appended.skipped_duplicates)
            if path not in self.report.files:
                self.report.files.append(path)
        self.pending.clear()
        self.objects = self.size = 0

    @staticmethod
    def _append(day_file: DayFile, batches: list[StationBatch]) -> AppendReport:
        parts = [batch.parts[0] for batch in batches]
        new, duplicates = day_file.new_parts(parts)
        fresh = {id(part) for part in new}
        stations: dict[tuple[str, int], list[StationBatch]] = {}
        for batch in batches:
            if id(batch.parts[0]) in fresh:
                stations.setdefault((cluster_node(batch.cluster), batch.station),
                                    []).append(batch)
        merged = [merge_batches(group) for group in stations.values()]
        appended = day_file.append(merged, order=new) if new else AppendReport()
        appended.skipped_duplicates = duplicates
        return appended


def _ordered_groups(bucket: Bucket, prefixes: Sequence[str],
                    pool: ThreadPoolExecutor) -> Iterator[list[str]]:
    """Keys per (prefix, station), each group in arrival order (``received``, key)."""

    def arrival(info: ObjectInfo) -> tuple[dt.datetime, str]:
        metadata = bucket.metadata(info.key) or {}
        return received_time(metadata, info.last_modified), info.key

    for prefix in prefixes:
        for _, group in groupby(bucket.list(prefix), key=_station_prefix):
            infos = list(group)
            yield [key for _, key in sorted(pool.map(arrival, infos))]


def _count(bucket: Bucket, prefixes: Sequence[str]) -> tuple[int, int]:
    objects = size = 0
    for prefix in prefixes:
        for info in bucket.list(prefix):
            objects += 1
            size += info.size
    return objects, size


def replay(
    bucket: Bucket,
    settings: Settings,
    first: dt.date,
    last: dt.date,
    out: Path,
    *,
    late_days: int = DEFAULT_LATE_DAYS,
    include_incoming: bool = True,
    progress: bool = False,
    jobs: int = 1,
) -> ReplayReport:
    """Rebuild the day files of ``first``..``last`` into ``out`` (see the module doc).

    ``jobs`` > 1 decodes and builds rows in that many worker processes; this process
    fetches the objects and appends, in the same order, so the files hold the same rows.
    """
    started = time.perf_counter()
    if last < first:
        raise ValueError("--to is before --from")
    if Path(out).resolve() == Path(settings.data_dir).resolve():
        raise ValueError("the output directory is the live data_dir; replay never writes there")
    days = set(event_days(first, last))
    existing = [p for p in map(lambda d: day_file_path(out, d), sorted(days)) if p.exists()]
    if existing:
        raise ValueError(f"{existing[0]} already exists; replay into an empty directory")
    prefixes = [archive_day_prefix(day) for day in archive_days(first, last, late_days)]
    if include_incoming:
        prefixes.append(INCOMING)
    report = ReplayReport()
    total, total_bytes = _count(bucket, prefixes) if progress else (None, None)
    bar = Progress(total, total_bytes, progress, "replay")
    appender = _Appender(Path(out), report)
    frozen = frozenset(days)
    workers = _workers(jobs)
    in_flight: deque[tuple[str, Future[Prepared] | Prepared | Exception]] = deque()
    window = max(S3_THREADS * 2, 4 * jobs)

    def settle(limit: int) -> None:
        while len(in_flight) > limit:
            key, work = in_flight.popleft()
            if isinstance(work, Future):
                work = work.result()
            _take(key, work, appender, report, bar)

    try:
        with ThreadPoolExecutor(S3_THREADS, thread_name_prefix="replay-s3") as pool:
            for keys in _ordered_groups(bucket, prefixes, pool):
                # Bodies a few at a time, in order: map() keeps the order and its look-ahead
                # is bounded by the slice; decoding runs ``window`` objects ahead at most.
                for start in range(0, len(keys), S3_THREADS * 2):
                    chunk = keys[start:start + S3_THREADS * 2]
                    for key, stored in zip(chunk, pool.map(_get(bucket), chunk), strict=True):
                        if isinstance(stored, Exception):
                            in_flight.append((key, stored))
                        else:
                            args = (key, stored.body, stored.metadata, stored.etag, frozen,
                                    settings.minimum_year, settings.station_list)
                            in_flight.append((key, workers.submit(prepare, *args)
                                              if workers else prepare(*args)))
                        settle(window)
            settle(0)
            appender.flush()
    finally:
        if workers is not None:
            workers.shutdown(cancel_futures=True)
        bar.close()
    report.files.sort()
    report.seconds = time.perf_counter() - started
    return report


def _get(bucket: Bucket) -> Callable[[str], StoredObject | Exception]:
    def get(key: str) -> StoredObject | Exception:
        try:
            return bucket.get(key)
        except BucketError as exc:
            return exc

    return get


def _workers(jobs: int) -> ProcessPoolExecutor | None:
    """Worker processes for decoding, started fresh (``spawn``): this process has S3
    clients and threads, which a forked child must not inherit (obstore is not
    fork-safe)."""
    if jobs <= 1:
        return None
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def _take(key: str, work: Prepared | Exception, appender: _Appender, report: ReplayReport,
          bar: Progress) -> None:
    if isinstance(work, Exception):
        report.problems[key] = short_reason(work)
        bar.advance()
        return
    report.objects += 1
    report.bytes += work.size
    if work.problem is not None:
        log.error("%s: not replayed: %s", key, work.problem)
        report.problems[key] = work.problem
        bar.advance(nbytes=work.size)
        return
    report.events_in_range += work.events
    if work.batches:
        appender.add(work)
    bar.advance(events=work.events, nbytes=work.size)


@dataclass
class FileComparison:
    """Differences between one live and one replayed day file."""

    day: dt.date
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _import_tables() -> Any:
    try:
        import tables
    except ImportError:
        raise SystemExit(
            "datastore replay --verify needs PyTables: pip install 'hisparc-datastore[dev]' "
            "(or pip install tables)"
        ) from None
    return tables


def _blob_columns(table: str) -> list[str]:
    event_type = TABLES.get(table)
    if event_type is None:
        return []
    return sorted({f.column for f in event_type.fields.values() if f.blob})


def _canonical_rows(rows: np.ndarray, blob_columns: Sequence[str],
                    blobs: Sequence[bytes]) -> list[tuple[bytes, tuple[Any, ...]]]:
    """Per row: its bytes without ``event_id`` and blob indices, and its blobs' bytes.

    Bytes, not values, so NaN equals NaN and every column type compares the same way.
    """
    if not len(rows):
        return []
    plain = rows.copy()
    plain["event_id"] = 0
    resolved: list[list[Any]] = [[] for _ in range(len(rows))]
    for column in blob_columns:
        indices = rows[column].reshape(len(rows), -1)
        plain[column] = 0
        for row, cells in enumerate(indices.tolist()):
            resolved[row].extend(
                blobs[i] if 0 <= i < len(blobs) else (None if i < 0 else f"missing blob {i}")
                for i in cells
            )
    raw = plain.tobytes()
    size = plain.dtype.itemsize
    return [(raw[i * size:(i + 1) * size], tuple(resolved[i])) for i in range(len(rows))]


def _show_row(rows: np.ndarray, index: int) -> str:
    row = rows[index]
    names = rows.dtype.names or ()
    shown = ", ".join(f"{name}={row[name].tolist()!r}" for name in names[:6])
    return f"row {index} ({shown}{', ...' if len(names) > 6 else ''})"


def _compare_table(node: str, live: np.ndarray, rebuilt: np.ndarray, blobs_live: Sequence[bytes],
                   blobs_rebuilt: Sequence[bytes], result: FileComparison) -> None:
    if len(live) != len(rebuilt):
        result.differences.append(f"{node}: {len(live)} rows live, {len(rebuilt)} replayed")
    if live.dtype != rebuilt.dtype:
        result.differences.append(f"{node}: columns differ ({live.dtype} vs {rebuilt.dtype})")
        return
    blob_columns = _blob_columns(node.rsplit("/", 1)[-1])
    a = _canonical_rows(live, blob_columns, blobs_live)
    b = _canonical_rows(rebuilt, blob_columns, blobs_rebuilt)
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if first is None and len(a) == len(b):
        if not np.array_equal(live["event_id"], rebuilt["event_id"]):
            result.differences.append(f"{node}: event_id columns differ")
        return
    if sorted(a) == sorted(b):
        result.notes.append(
            f"{node}: same rows in another order (first at live {_show_row(live, first or 0)})"
        )
        if not np.array_equal(np.sort(live["event_id"]), np.sort(rebuilt["event_id"])):
            result.differences.append(f"{node}: event_id values differ")
        return
    only_live = _multiset_minus(a, b)
    only_rebuilt = _multiset_minus(b, a)
    if first is not None:
        result.differences.append(
            f"{node}: first differing row {first}: live {_show_row(live, first)}, "
            f"replayed {_show_row(rebuilt, first)}"
        )
    result.differences.append(
        f"{node}: {len(only_live)} rows only live, {len(only_rebuilt)} rows only replayed"
    )


def _multiset_minus(a: list[Any], b: list[Any]) -> list[Any]:
    from collections import Counter

    return list((Counter(a) - Counter(b)).elements())


def _compare_blobs(node: str, live: Sequence[bytes], rebuilt: Sequence[bytes],
                   result: FileComparison) -> None:
    if list(live) == list(rebuilt):
        return
    if len(live) != len(rebuilt):
        result.differences.append(f"{node}: {len(live)} blobs live, {len(rebuilt)} replayed")
    if sorted(live) == sorted(rebuilt):
        result.notes.append(f"{node}: same blobs in another order")
        return
    first = next((i for i, (x, y) in enumerate(zip(live, rebuilt, strict=False)) if x != y),
                 min(len(live), len(rebuilt)))
    result.differences.append(f"{node}: blobs differ, first at index {first}")


def _nodes(h5: Any) -> dict[str, Any]:
    if f"/{ROOT_GROUP}" not in h5:
        return {}
    return {node._v_pathname: node for node in h5.walk_nodes(f"/{ROOT_GROUP}")}


def compare_files(live_path: Path, rebuilt_path: Path, day: dt.date,
                  strict_order: bool = False, ledger: bool = True) -> FileComparison:
    """Every difference between two day files, through PyTables (see the module doc).

    ``ledger=False`` compares the station data only, not which bucket keys wrote it.
    """
    tables = _import_tables()
    result = FileComparison(day)
    if not live_path.exists() and not rebuilt_path.exists():
        return result
    if not live_path.exists():
        result.differences.append(f"{live_path}: live file missing (replay has {rebuilt_path})")
        return result
    if not rebuilt_path.exists():
        result.differences.append(f"{rebuilt_path}: not rebuilt (the live file exists)")
        return result
    opened = []
    for which, path in (("live", live_path), ("rebuilt", rebuilt_path)):
        try:
            opened.append(tables.open_file(path, "r"))
        except (OSError, tables.HDF5ExtError) as exc:
            for h5 in opened:
                h5.close()
            problem = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            result.differences.append(f"{path}: the {which} file cannot be opened ({problem})")
            return result
    with opened[0] as h5_live, opened[1] as h5_re:
        live_nodes, rebuilt_nodes = _nodes(h5_live), _nodes(h5_re)
        for path in sorted(live_nodes.keys() - rebuilt_nodes.keys()):
            result.differences.append(f"{path}: only in the live file")
        for path in sorted(rebuilt_nodes.keys() - live_nodes.keys()):
            result.differences.append(f"{path}: only in the replayed file")
        blob_cache: dict[tuple[int, str], list[bytes]] = {}

        def blobs_of(which: int, nodes: dict[str, Any], station: str) -> list[bytes]:
            cached = blob_cache.get((which, station))
            if cached is None:
                node = nodes.get(f"{station}/{BLOBS_NODE}")
                cached = blob_cache[(which, station)] = [] if node is None else list(node.read())
            return cached

        for path in sorted(live_nodes.keys() & rebuilt_nodes.keys()):
            a, b = live_nodes[path], rebuilt_nodes[path]
            if type(a) is not type(b):
                result.differences.append(
                    f"{path}: {type(a).__name__} live, {type(b).__name__} replayed"
                )
                continue
            if getattr(a, "title", None) != getattr(b, "title", None):
                result.differences.append(f"{path}: titles differ ({a.title!r} vs {b.title!r})")
            station = path.rsplit("/", 1)[0]
            if isinstance(a, tables.Table):
                _compare_table(path, a.read(), b.read(), blobs_of(0, live_nodes, station),
                               blobs_of(1, rebuilt_nodes, station), result)
            elif isinstance(a, tables.VLArray):
                _compare_blobs(path, blobs_of(0, live_nodes, station),
                               blobs_of(1, rebuilt_nodes, station), result)
        if ledger:
            _compare_ledgers(h5_live, h5_re, result)
    if strict_order:
        result.differences += result.notes
        result.notes = []
    return result


def _compare_ledgers(h5_live: Any, h5_rebuilt: Any, result: FileComparison) -> None:
    """Objects written into one file but not the other: names the batch behind a gap."""
    def keys(h5: Any) -> set[bytes]:
        node = "/_datastore/keys"
        return set(h5.get_node(node).col("key").tolist()) if node in h5 else set()

    live, rebuilt = keys(h5_live), keys(h5_rebuilt)
    for key in sorted(live - rebuilt)[:20]:
        result.differences.append(f"ledger: {key.decode()} written live, not replayed")
    for key in sorted(rebuilt - live)[:20]:
        result.differences.append(f"ledger: {key.decode()} replayed, not in the live ledger")


def verify(data_dir: Path, out: Path, first: dt.date, last: dt.date,
           strict_order: bool = False) -> list[FileComparison]:
    return [
        compare_files(day_file_path(data_dir, day), day_file_path(out, day), day, strict_order)
        for day in event_days(first, last)
    ]


# ----------------------------------------------------------------------------- CLI


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not int(index) < int(count):
        raise argparse.ArgumentTypeError("must be I/N with 0 <= I < N, e.g. 3/50")
    return int(index), int(count)


def shard_days(first: dt.date, last: dt.date, index: int, count: int
               ) -> tuple[dt.date, dt.date] | None:
    """The ``index``-th of ``count`` blocks of consecutive days (sizes differ by one at
    most), or None when there are fewer days than shards and this one gets none."""
    days = (last - first).days + 1
    begin = index * days // count
    end = (index + 1) * days // count
    if end <= begin:
        return None
    return first + dt.timedelta(days=begin), first + dt.timedelta(days=end - 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="first", type=_date, required=True, metavar="DATE",
                        help="first event date (UTC, YYYY-MM-DD)")
    parser.add_argument("--to", dest="last", type=_date, required=True, metavar="DATE",
                        help="last event date (UTC, inclusive)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="where to write the rebuilt files (data_dir layout)")
    parser.add_argument("--verify", action="store_true",
                        help="compare with the live files in data_dir; exit 1 on differences")
    parser.add_argument("--strict-order", action="store_true",
                        help="with --verify: rows in another order count as a difference")
    parser.add_argument("--late-days", type=_non_negative, default=DEFAULT_LATE_DAYS,
                        metavar="N",
                        help="read archive (upload) days up to N days after --to, for "
                             f"batches uploaded late (default {DEFAULT_LATE_DAYS})")
    parser.add_argument("--no-incoming", action="store_true",
                        help="read archive/ only, not the objects still in incoming/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--jobs", type=_positive, default=1, metavar="N",
                        help="decode and build rows in N worker processes (default 1)")
    parser.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                        help="rebuild only the I-th (from 0) of N blocks of consecutive days")


def print_comparisons(comparisons: Iterable[FileComparison], stream: Any = None) -> bool:
    """Print the verify report; True when nothing differs."""
    stream = stream or sys.stdout
    identical = True
    for comparison in comparisons:
        if comparison.differences:
            identical = False
            print(f"{comparison.day}: {len(comparison.differences)} differences", file=stream)
            for line in comparison.differences:
                print(f"  - {line}", file=stream)
        else:
            print(f"{comparison.day}: identical", file=stream)
        for line in comparison.notes:
            print(f"  note: {line}", file=stream)
    print("verify: identical" if identical else "verify: DIFFERENT", file=stream)
    return identical


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    require_s3_credentials(settings)
    setup_logging(settings)
    if args.verify:
        _import_tables()  # fail before the work, not after it
    bucket = Bucket.from_settings(settings)
    if args.shard is not None:
        mine = shard_days(args.first, args.last, *args.shard)
        if mine is None:
            print(f"replay: shard {args.shard[0]}/{args.shard[1]} has no days of "
                  f"{args.first}..{args.last}; nothing to do")
            return 0
        args.first, args.last = mine
        print(f"replay: shard {args.shard[0]}/{args.shard[1]}: {args.first}..{args.last}")
    try:
        report = replay(bucket, settings, args.first, args.last, args.out,
                        late_days=args.late_days, include_incoming=not args.no_incoming,
                        progress=not args.no_progress, jobs=args.jobs)
    except ValueError as exc:
        print(f"datastore replay: {exc}", file=sys.stderr)
        return 2
    except BucketError as exc:
        print(f"datastore replay: bucket error: {short_reason(exc)}", file=sys.stderr)
        return 1
    print(report.summary())
    for key, problem in sorted(report.problems.items()):
        print(f"  not replayed: {key}: {problem}")
    if not args.verify:
        return 1 if report.problems else 0
    identical = print_comparisons(
        verify(settings.data_dir, args.out, args.first, args.last, args.strict_order)
    )
    return 0 if identical and not report.problems else 1
