"""``datastore replay``: rebuild daily HDF5 files from the bucket's archive, and compare.

The archive holds every batch ever written, byte for byte as the station sent it, so the
day files can always be rebuilt from it: after a damaged volume, a writer bug, or to check
that the live files hold exactly what was uploaded.  Replay never touches the live files
and never moves an object: it reads ``archive/`` (and ``incoming/``, what the live writer
has not reached yet) and writes into a separate directory with the data_dir layout.

Which objects.  An archive day is the *upload* date, not the events' dates, and uploads
come after the events: a batch of events just before midnight arrives just after it, and
a station that was offline uploads days of backlog at once.  So an event day's rows come
from the objects uploaded from the day before it (a station clock a little ahead of the
server's) to ``--late-days`` (default 7) after it: replay reads those archive days and
keeps, of each object, the events of the days whose window holds its upload day.  The
window is the same for every day whatever the range, so a day's file is the same from a
replay of that day alone, of a year, or of any shard.  A batch uploaded later than that
is missed, and ``--verify`` names it (its key is in the live file's ledger, not in the
replayed one's).

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

Scale.  Different days are different files.  ``--jobs N`` splits the range into N blocks
of consecutive days, each replayed by a worker process of its own (its own S3 client,
its own files): each file gets the objects one process would give it, in the same
order, so the same rows (tested), and the workers share nothing but the progress bar.
``--shard I/N`` rebuilds only the I-th of those N blocks, so machines, or the pods of a
Kubernetes Indexed Job (infra/knative/replay/), each take one into one output volume.
A block of D days looks at the objects of D + ``--late-days`` + 1 upload days: those
whose ``event-days`` metadata is outside the block are passed over, and those stored
before the upload wrote it are decoded, so such an object uploaded near a block's edge
is read by two blocks: fewer, longer blocks waste less.  Each shard records what it
wrote in a report (``replay-reports/<from>_<to>/shard-I-of-N.json`` below ``--out``),
written when it finishes; ``--verify-only`` then checks that every shard finished, with
no unusable object, and compares each day file with the live one, or, where ``data_dir``
holds none (the lost volume), reads each rebuilt file through and counts its rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing
import queue
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.lib.recfunctions import repack_fields

from hisparc_datastore.config import Settings, load_settings, require_s3_credentials
from hisparc_datastore.format.keys import ARCHIVE, INCOMING
from hisparc_datastore.format.origin import (
    NoCluster,
    event_days_of,
    plan_object,
    received_time,
)
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
from hisparc_datastore.storage.dayfile import (
    LEDGER_GROUP,
    AppendReport,
    DayFile,
    day_file_path,
)
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
#: Larger groups cost less per row (one resize and write per table; 64 MiB: 5 % less CPU
#: than 8, for 40 MB more memory, docs/PERFORMANCE.md).
GROUP_OBJECTS = 500
GROUP_BYTES = 64 * 1024 * 1024
#: The ledger's table of bucket keys, in every day file.
LEDGER_NODE = f"/{LEDGER_GROUP}/keys"


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


class _ForwardedProgress(Progress):
    """A worker's progress, sent to the process that shows the bar a few times a second."""

    def __init__(self, updates: Any) -> None:
        super().__init__(None, None, False, "")
        self._updates = updates
        self._pending = [0, 0, 0]
        self._sent = time.monotonic()

    def advance(self, objects: int = 1, events: int = 0, nbytes: int = 0) -> None:
        for index, value in enumerate((objects, events, nbytes)):
            self._pending[index] += value
        if time.monotonic() - self._sent > 0.25:
            self._send()

    def _send(self) -> None:
        if self._updates is not None and any(self._pending):
            self._updates.put(tuple(self._pending))
        self._pending = [0, 0, 0]
        self._sent = time.monotonic()

    def close(self) -> None:
        self._send()


# ----------------------------------------------------------------------------- rebuild


@dataclass
class ReplayReport:
    """What a replay read and wrote."""

    objects: int = 0
    bytes: int = 0
    events_in_range: int = 0
    rows: int = 0
    duplicates: int = 0  # objects whose key was already written (archived twice)
    passed_over: int = 0  # objects not fetched: their event-days metadata is out of range
    skipped_events: int = 0
    problems: dict[str, str] = field(default_factory=dict)  # key -> why it was not used
    files: list[Path] = field(default_factory=list)
    #: table rows written per day file (its ledger not counted)
    file_rows: dict[Path, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.objects / self.seconds if self.seconds else 0.0
        return (
            f"replay: {self.objects} objects ({self.bytes / 1e6:.1f} MB) read, "
            + (f"{self.passed_over} passed over (their event-days are out of range), "
               if self.passed_over else "")
            + f"{self.events_in_range} events in range, {self.rows} rows written to "
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


def upload_day(key: str, metadata: dict[str, str]) -> dt.date | None:
    """The day an object was uploaded: its archive day, or the ``received`` of one still
    in ``incoming/`` (None when it does not say)."""
    if key.startswith(ARCHIVE):
        try:
            return dt.datetime.strptime(key[len(ARCHIVE):len(ARCHIVE) + 10], "%Y/%m/%d").date()
        except ValueError:
            return None
    text = metadata.get("received", "").strip()
    try:
        return dt.datetime.fromisoformat(text).astimezone(dt.UTC).date() if text else None
    except ValueError:
        return None


def in_late_window(event_day: dt.date, uploaded: dt.date | None, late_days: int) -> bool:
    """Whether replay takes events of ``event_day`` from an object uploaded on
    ``uploaded``: from the day before (a station clock ahead) to ``late_days`` after.

    The same rule for every day, whatever the range, so a day's file is the same from a
    replay of that day alone, of a year, or of any shard.
    """
    if uploaded is None:
        return True
    return event_day - dt.timedelta(days=1) <= uploaded <= event_day + dt.timedelta(
        days=late_days
    )


def prepare(key: str, body: bytes, metadata: dict[str, str], etag: str,
            days: frozenset[dt.date], late_days: int, minimum_year: int,
            station_list: Path) -> Prepared:
    """The live writer's plan of an object (:func:`plan_object`), its days in range and
    in the late window built into rows.  The ledger key is the object's ``incoming/`` key,
    as the live writer recorded it.
    """
    uploaded = upload_day(key, metadata)
    try:
        plan = plan_object(ledger_key(key), body, metadata, etag, minimum_year=minimum_year,
                           cluster_of=cluster_lookup(station_list), context=key)
        batches = {}
        events = 0
        for day, part in plan.parts.items():
            if day not in days or not in_late_window(day, uploaded, late_days):
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
            added = sum(appended.rows.values())
            self.report.rows += added
            self.report.file_rows[path] = self.report.file_rows.get(path, 0) + added
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
                    pool: ThreadPoolExecutor) -> Iterator[list[tuple[str, dict[str, str]]]]:
    """(key, metadata) per (prefix, station), each group in arrival order (``received``,
    key)."""

    def arrival(info: ObjectInfo) -> tuple[dt.datetime, str, dict[str, str]]:
        metadata = bucket.metadata(info.key) or {}
        return received_time(metadata, info.last_modified), info.key, metadata

    for prefix in prefixes:
        for _, group in groupby(bucket.list(prefix), key=_station_prefix):
            infos = list(group)
            yield [(key, metadata) for _, key, metadata in sorted(pool.map(arrival, infos))]


def wanted(key: str, metadata: dict[str, str], days: frozenset[dt.date],
           late_days: int) -> bool:
    """Whether an object may hold events replay takes: False only when its ``event-days``
    metadata says that none of its days is in ``days`` with its upload day in that
    day's late window.  Objects without it (stored before it existed) are decoded."""
    span = event_days_of(metadata)
    if span is None:
        return True
    uploaded = upload_day(key, metadata)
    first, last = max(span[0], min(days)), min(span[1], max(days))
    return any(
        first + dt.timedelta(days=n) in days
        and in_late_window(first + dt.timedelta(days=n), uploaded, late_days)
        for n in range((last - first).days + 1)
    )


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
    replace: bool = False,
) -> ReplayReport:
    """Rebuild the day files of ``first``..``last`` into ``out`` (see the module doc).

    ``jobs`` > 1 splits the days into that many blocks of consecutive days, each replayed
    by a worker process of its own into its own day files: each file gets the same
    objects in the same order as from one process, so the same rows.  ``replace``
    deletes day files of the range already in ``out`` first (a shard run again after a
    crash) instead of refusing.
    """
    started = time.perf_counter()
    if last < first:
        raise ValueError("--to is before --from")
    if Path(out).resolve() == Path(settings.data_dir).resolve():
        raise ValueError("the output directory is the live data_dir; replay never writes there")
    days = event_days(first, last)
    existing = [p for p in map(lambda d: day_file_path(out, d), days) if p.exists()]
    if existing and not replace:
        raise ValueError(
            f"{existing[0]} already exists; replay into an empty directory (or --replace)"
        )
    for path in existing:
        log.warning("replay: %s: deleting the earlier replay's file (--replace)", path)
        path.unlink()
    blocks = [block for index in range(min(jobs, len(days)))
              if (block := shard_days(first, last, index, min(jobs, len(days))))]
    prefixes = [_prefixes(a, b, late_days, include_incoming) for a, b in blocks]
    total, total_bytes = (
        [sum(figures) for figures in zip(*(_count(bucket, p) for p in prefixes), strict=True)]
        if progress else (None, None)
    )
    bar = Progress(total, total_bytes, progress, "replay")
    try:
        if len(blocks) == 1:
            report = _replay_days(bucket, settings, first, last, Path(out), late_days,
                                  prefixes[0], bar)
        else:
            report = _replay_blocks(settings, blocks, Path(out), late_days, include_incoming,
                                    bar)
    finally:
        bar.close()
    report.files.sort()
    report.seconds = time.perf_counter() - started
    return report


def _prefixes(first: dt.date, last: dt.date, late_days: int,
              include_incoming: bool) -> list[str]:
    prefixes = [archive_day_prefix(day) for day in archive_days(first, last, late_days)]
    return [*prefixes, INCOMING] if include_incoming else prefixes


def _replay_days(bucket: Bucket, settings: Settings, first: dt.date, last: dt.date, out: Path,
                 late_days: int, prefixes: Sequence[str], bar: Progress) -> ReplayReport:
    """One process: list, fetch, decode and append, object after object in arrival order."""
    report = ReplayReport()
    appender = _Appender(out, report)
    days = frozenset(event_days(first, last))
    with ThreadPoolExecutor(S3_THREADS, thread_name_prefix="replay-s3") as pool:
        for group in _ordered_groups(bucket, prefixes, pool):
            keys = [key for key, metadata in group if wanted(key, metadata, days, late_days)]
            report.passed_over += len(group) - len(keys)
            bar.advance(len(group) - len(keys))
            # Bodies a few at a time, in order: map() keeps the order and its look-ahead is
            # bounded by the slice.
            for start in range(0, len(keys), S3_THREADS * 2):
                chunk = keys[start:start + S3_THREADS * 2]
                for key, stored in zip(chunk, pool.map(_get(bucket), chunk), strict=True):
                    work = stored if isinstance(stored, Exception) else prepare(
                        key, stored.body, stored.metadata, stored.etag, days, late_days,
                        settings.minimum_year, settings.station_list)
                    _take(key, work, appender, report, bar)
        appender.flush()
    return report


def _replay_blocks(settings: Settings, blocks: Sequence[tuple[dt.date, dt.date]], out: Path,
                   late_days: int, include_incoming: bool, bar: Progress) -> ReplayReport:
    """A worker process per block of days, each with its own S3 client and day files.

    Not forked from this process, which has S3 clients and threads a child must not
    inherit: forked from a fork server, a fresh process that imports this module once
    (numpy, h5py, the S3 client), so that each worker does not pay for the imports again.
    Their progress comes back through a queue.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    updates = context.Queue()
    report = ReplayReport()
    with ProcessPoolExecutor(len(blocks), mp_context=context, initializer=_block_worker_init,
                             initargs=(updates,)) as pool:
        futures = [pool.submit(_replay_block, settings, a, b, out, late_days, include_incoming)
                   for a, b in blocks]
        try:
            while True:
                done = all(future.done() for future in futures)
                _drain(updates, bar, wait=not done)
                if done:
                    break
            for future in futures:
                _add_report(report, future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return report


def _drain(updates: Any, bar: Progress, wait: bool) -> None:
    try:
        item = updates.get(timeout=0.2) if wait else updates.get_nowait()
        while True:
            bar.advance(*item)
            item = updates.get_nowait()
    except queue.Empty:
        return


def _add_report(total: ReplayReport, part: ReplayReport) -> None:
    for name in ("objects", "bytes", "events_in_range", "rows", "duplicates", "passed_over",
                 "skipped_events"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.problems.update(part.problems)
    total.files += part.files
    total.file_rows.update(part.file_rows)


_updates: Any = None


def _block_worker_init(updates: Any) -> None:
    global _updates
    _updates = updates


def _replay_block(settings: Settings, first: dt.date, last: dt.date, out: Path,
                  late_days: int, include_incoming: bool) -> ReplayReport:
    setup_logging(settings)
    bucket = Bucket.from_settings(settings)
    bar = _ForwardedProgress(_updates)
    try:
        return _replay_days(bucket, settings, first, last, out, late_days,
                            _prefixes(first, last, late_days, include_incoming), bar)
    finally:
        bar.close()


def _get(bucket: Bucket) -> Callable[[str], StoredObject | Exception]:
    def get(key: str) -> StoredObject | Exception:
        try:
            return bucket.get(key)
        except BucketError as exc:
            return exc

    return get


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


def _nodes(h5: h5py.File) -> dict[str, h5py.Group | h5py.Dataset]:
    """Every group and dataset below the root group, by PyTables path."""
    found: dict[str, h5py.Group | h5py.Dataset] = {}
    if ROOT_GROUP in h5:
        h5[ROOT_GROUP].visititems(
            lambda name, node: found.__setitem__(f"/{ROOT_GROUP}/{name}", node)
        )
    return found


def _attribute(node: h5py.HLObject, name: str) -> str | None:
    """A PyTables attribute (CLASS, TITLE) as text, however it was stored."""
    value = node.attrs.get(name)
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.tobytes()
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _kind(node: h5py.HLObject) -> str:
    """PyTables' node class (``TABLE``, ``VLARRAY``, ``GROUP``, ...)."""
    return _attribute(node, "CLASS") or ("GROUP" if isinstance(node, h5py.Group) else "?")


def _read_table(dataset: h5py.Dataset) -> np.ndarray:
    """The rows without padding, so two files' rows compare byte for byte."""
    return repack_fields(dataset[()]) if dataset.shape else np.zeros(0, dataset.dtype)


def _read_blobs(dataset: h5py.Dataset) -> list[bytes]:
    return [np.asarray(cell, dtype=np.uint8).tobytes() for cell in dataset[()]]


def compare_files(live_path: Path, rebuilt_path: Path, day: dt.date,
                  strict_order: bool = False, ledger: bool = True) -> FileComparison:
    """Every difference between two day files (see the module doc).

    Read with h5py, the library the writer image has, so the check runs in the cluster
    (infra/knative/replay/); that PyTables reads the files is what the tests check.
    ``ledger=False`` compares the station data only, not which bucket keys wrote it.
    """
    result = FileComparison(day)
    if not live_path.exists() and not rebuilt_path.exists():
        return result
    if not live_path.exists():
        result.differences.append(f"{live_path}: live file missing (replay has {rebuilt_path})")
        return result
    if not rebuilt_path.exists():
        result.differences.append(f"{rebuilt_path}: not rebuilt (the live file exists)")
        return result
    opened: list[h5py.File] = []
    for which, path in (("live", live_path), ("rebuilt", rebuilt_path)):
        try:
            opened.append(h5py.File(path, "r"))
        except OSError as exc:
            for h5 in opened:
                h5.close()
            result.differences.append(
                f"{path}: the {which} file cannot be opened ({_last_line(exc)})"
            )
            return result
    with opened[0] as h5_live, opened[1] as h5_re:
        try:
            _compare_contents(h5_live, h5_re, result)
            if ledger:
                _compare_ledgers(h5_live, h5_re, result)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            result.differences.append(f"{day}: a node cannot be read ({_last_line(exc)})")
    if strict_order:
        result.differences += result.notes
        result.notes = []
    return result


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _compare_contents(h5_live: h5py.File, h5_re: h5py.File, result: FileComparison) -> None:
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
            cached = blob_cache[(which, station)] = [] if node is None else _read_blobs(node)
        return cached

    for path in sorted(live_nodes.keys() & rebuilt_nodes.keys()):
        a, b = live_nodes[path], rebuilt_nodes[path]
        if _kind(a) != _kind(b):
            result.differences.append(f"{path}: {_kind(a)} live, {_kind(b)} replayed")
            continue
        if _attribute(a, "TITLE") != _attribute(b, "TITLE"):
            result.differences.append(
                f"{path}: titles differ ({_attribute(a, 'TITLE')!r} vs "
                f"{_attribute(b, 'TITLE')!r})"
            )
        station = path.rsplit("/", 1)[0]
        if _kind(a) == "TABLE":
            _compare_table(path, _read_table(a), _read_table(b), blobs_of(0, live_nodes, station),
                           blobs_of(1, rebuilt_nodes, station), result)
        elif _kind(a) == "VLARRAY":
            _compare_blobs(path, blobs_of(0, live_nodes, station),
                           blobs_of(1, rebuilt_nodes, station), result)


def _compare_ledgers(h5_live: h5py.File, h5_rebuilt: h5py.File,
                     result: FileComparison) -> None:
    """Objects written into one file but not the other: names the batch behind a gap."""
    live, rebuilt = _ledger_keys(h5_live), _ledger_keys(h5_rebuilt)
    for key in sorted(live - rebuilt)[:20]:
        result.differences.append(f"ledger: {key.decode()} written live, not replayed")
    for key in sorted(rebuilt - live)[:20]:
        result.differences.append(f"ledger: {key.decode()} replayed, not in the live ledger")


def _ledger_keys(h5: h5py.File) -> set[bytes]:
    node = h5.get(LEDGER_NODE)
    return set(node["key"].tolist()) if node is not None and node.shape else set()


def verify(data_dir: Path, out: Path, first: dt.date, last: dt.date,
           strict_order: bool = False) -> list[FileComparison]:
    return [
        compare_files(day_file_path(data_dir, day), day_file_path(out, day), day, strict_order)
        for day in event_days(first, last)
    ]


# ----------------------------------------------------------------------------- shards


#: Below ``--out``: one folder per replayed range, one JSON report per finished shard.
REPORTS = "replay-reports"


@dataclass(frozen=True)
class Shard:
    """One of ``count`` parts of the replay of ``first``..``last`` (0 of 1: all of it)."""

    first: dt.date
    last: dt.date
    index: int = 0
    count: int = 1

    @property
    def days(self) -> tuple[dt.date, dt.date] | None:
        return shard_days(self.first, self.last, self.index, self.count)

    def report_path(self, out: Path) -> Path:
        return reports_folder(out, self.first, self.last) / (
            f"shard-{self.index:04d}-of-{self.count:04d}.json"
        )


def reports_folder(out: Path, first: dt.date, last: dt.date) -> Path:
    return Path(out) / REPORTS / f"{first}_{last}"


def write_shard_report(out: Path, shard: Shard, report: ReplayReport | None) -> Path:
    """Record that ``shard`` finished, and what it wrote: the final verify's evidence.

    Written last and atomically (a temporary file renamed), so a report exists only for
    a shard that ran to its end; ``report`` is None for a shard that has no days.
    """
    days = shard.days
    record: dict[str, Any] = {
        "shard": shard.index,
        "shards": shard.count,
        "from": str(shard.first),
        "to": str(shard.last),
        "days": None if days is None else [str(days[0]), str(days[1])],
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if report is not None:
        record.update(
            objects=report.objects,
            events_in_range=report.events_in_range,
            rows=report.rows,
            seconds=round(report.seconds, 1),
            files={str(path.relative_to(out)): rows
                   for path, rows in sorted(report.file_rows.items())},
            problems=report.problems,
        )
    path = shard.report_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".json.partial")
    scratch.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    scratch.replace(path)
    return path


def _finished_cleanly(path: Path) -> bool:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and not record.get("problems")


@dataclass
class ShardCheck:
    """What the shard reports of one replayed range say."""

    differences: list[str] = field(default_factory=list)
    #: rebuilt day file (relative to ``out``) -> table rows its shard wrote
    file_rows: dict[str, int] = field(default_factory=dict)
    shards: int = 0


def check_shard_reports(out: Path, first: dt.date, last: dt.date) -> ShardCheck:
    """Every shard of the range finished, with the same shard count and no unusable
    object; each difference names the shard, so its pod's log can be looked up."""
    check = ShardCheck()
    folder = reports_folder(out, first, last)
    records = []
    for path in sorted(folder.glob("shard-*-of-*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            check.differences.append(f"{path}: unreadable report ({_last_line(exc)})")
    if not records:
        check.differences.append(
            f"no shard report in {folder}: no replay of {first}..{last} finished into {out}"
        )
        return check
    counts = sorted({record["shards"] for record in records})
    if len(counts) > 1:
        check.differences.append(
            f"{folder}: reports of replays with different shard counts {counts} (run with "
            f"one --shard I/N for every I, into an empty directory)"
        )
        return check
    check.shards = counts[0]
    missing = sorted(set(range(check.shards)) - {record["shard"] for record in records})
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        check.differences.append(
            f"{len(missing)} of {check.shards} shards did not finish (no report): {shown}"
        )
    for record in records:
        problems = record.get("problems") or {}
        if problems:
            key, reason = sorted(problems.items())[0]
            check.differences.append(
                f"shard {record['shard']}/{record['shards']}: {len(problems)} objects not "
                f"replayed (first: {key}: {reason})"
            )
        check.file_rows.update(record.get("files") or {})
    return check


def check_rebuilt_file(path: Path, day: dt.date, expected_rows: int | None) -> FileComparison:
    """A rebuilt day file on its own (no live file to compare with): it opens, every
    node reads through, and its tables hold the rows its shard wrote."""
    result = FileComparison(day)
    if not path.exists():
        if expected_rows:
            result.differences.append(f"{path}: missing (its shard wrote {expected_rows} rows)")
        return result
    try:
        with h5py.File(path, "r") as h5:
            rows = 0
            for node in _nodes(h5).values():
                if _kind(node) == "TABLE":
                    rows += len(_read_table(node))
                elif _kind(node) == "VLARRAY":
                    _read_blobs(node)
            _ledger_keys(h5)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        result.differences.append(f"{path}: cannot be read through ({_last_line(exc)})")
        return result
    if expected_rows is None:
        result.differences.append(f"{path}: no shard report names this file")
    elif rows != expected_rows:
        result.differences.append(
            f"{path}: {rows} table rows, its shard wrote {expected_rows}"
        )
    return result


@dataclass
class ReplayCheck:
    """The final verify of a (sharded) replay: its shards, then its files."""

    shards: ShardCheck
    comparisons: list[FileComparison]
    against_live: bool

    @property
    def identical(self) -> bool:
        return not self.shards.differences and not any(c.differences for c in self.comparisons)


def verify_replay(data_dir: Path, out: Path, first: dt.date, last: dt.date,
                  strict_order: bool = False) -> ReplayCheck:
    """Check a finished replay in ``out``: every shard's report, then each day file
    against the live one in ``data_dir``, or, when ``data_dir`` holds none of the range's
    files (the volume that was lost), each rebuilt file on its own."""
    shards = check_shard_reports(out, first, last)
    days = event_days(first, last)
    against_live = any(day_file_path(data_dir, day).exists() for day in days)
    if against_live:
        comparisons = verify(data_dir, out, first, last, strict_order)
    else:
        comparisons = []
        for day in days:
            path = day_file_path(out, day)
            relative = str(path.relative_to(out))
            comparisons.append(check_rebuilt_file(path, day, shards.file_rows.get(relative)))
    return ReplayCheck(shards, comparisons, against_live)


def print_replay_check(check: ReplayCheck, data_dir: Path, stream: Any = None) -> bool:
    stream = stream or sys.stdout
    if check.shards.shards:
        print(f"shards: {check.shards.shards} expected", file=stream)
    for line in check.shards.differences:
        print(f"  - {line}", file=stream)
    if not check.against_live:
        print(f"no live day file of this range in {data_dir}: each rebuilt file checked on "
              "its own (opens, reads through, holds the rows its shard wrote)", file=stream)
    return print_comparisons(check.comparisons, stream,
                             other_differences=bool(check.shards.differences))


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
                        help="N worker processes, each replaying a block of consecutive "
                             "days (default 1)")
    parser.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                        help="rebuild only the I-th (from 0) of N blocks of consecutive days")
    parser.add_argument("--replace", action="store_true",
                        help="delete day files of the range already in --out first (a "
                             "shard run again after a crash) instead of refusing")
    parser.add_argument("--skip-finished", action="store_true",
                        help="exit at once when this shard's report says it finished with "
                             "every object used (a Job run again redoes only the rest)")
    parser.add_argument("--verify-only", action="store_true",
                        help="rebuild nothing: check a finished replay in --out (every "
                             "shard's report, then each file against data_dir's, or on "
                             "its own where data_dir has none); exit 1 on differences")


def print_comparisons(comparisons: Iterable[FileComparison], stream: Any = None,
                      *, other_differences: bool = False) -> bool:
    """Print the verify report, day by day and a last line; True when nothing differs
    (``other_differences``: something the caller printed already does)."""
    stream = stream or sys.stdout
    identical = not other_differences
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
    setup_logging(settings)
    if args.last < args.first:
        print("datastore replay: --to is before --from", file=sys.stderr)
        return 2
    if args.verify_only:
        if args.verify or args.shard is not None:
            print("datastore replay: --verify-only checks every shard's output; it takes "
                  "neither --verify nor --shard", file=sys.stderr)
            return 2
        check = verify_replay(settings.data_dir, args.out, args.first, args.last,
                              args.strict_order)
        return 0 if print_replay_check(check, settings.data_dir) else 1
    require_s3_credentials(settings)
    bucket = Bucket.from_settings(settings)
    shard = Shard(args.first, args.last, *(args.shard or (0, 1)))
    days = shard.days
    if days is None:
        print(f"replay: shard {shard.index}/{shard.count} has no days of "
              f"{args.first}..{args.last}; nothing to do")
        write_shard_report(args.out, shard, None)
        return 0
    if shard.count > 1:
        print(f"replay: shard {shard.index}/{shard.count}: {days[0]}..{days[1]}")
    finished = shard.report_path(args.out)
    if finished.exists():
        if args.skip_finished and _finished_cleanly(finished):
            print(f"replay: {finished} says this shard finished with every object used; "
                  "nothing to do (--skip-finished)")
            return 0
        if not args.replace:
            print(f"datastore replay: {finished} says this replay finished already; "
                  "--replace runs it again", file=sys.stderr)
            return 2
        finished.unlink()  # the files are about to go: no report may vouch for them
    try:
        report = replay(bucket, settings, days[0], days[1], args.out,
                        late_days=args.late_days, include_incoming=not args.no_incoming,
                        progress=not args.no_progress, jobs=args.jobs, replace=args.replace)
    except ValueError as exc:
        print(f"datastore replay: {exc}", file=sys.stderr)
        return 2
    except BucketError as exc:
        print(f"datastore replay: bucket error: {short_reason(exc)}", file=sys.stderr)
        return 1
    print(report.summary())
    for key, problem in sorted(report.problems.items()):
        print(f"  not replayed: {key}: {problem}")
    print(f"replay: report {write_shard_report(args.out, shard, report)}")
    if not args.verify:
        return 1 if report.problems else 0
    identical = print_comparisons(
        verify(settings.data_dir, args.out, days[0], days[1], args.strict_order)
    )
    return 0 if identical and not report.problems else 1
