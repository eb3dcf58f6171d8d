"""One day's HDF5 file, appended to exactly once per bucket object, crash-safe.

An append is a transaction of four steps, each flushed before the next (see ledger.py for
what the ledger holds and how an unfinished append is rolled back):

1. :meth:`DayFile._record_intent`: every dataset the append touches, with its length
   before and after, and every node it creates;
2. :meth:`DayFile._create_nodes`: missing cluster and station groups, tables, blobs;
3. :meth:`DayFile._write_data`: the rows (one resize and one write per dataset), the
   objects' ``keys`` rows (pending) and their ``ranges``;
4. :meth:`DayFile._commit`: empties the intent (that is the commit) and marks the keys.

Rows are built once, per station, before the transaction starts
(:func:`hisparc_datastore.format.rows.gather`); :meth:`DayFile.write` decides which
objects are new and appends them.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import h5py
import numpy as np

from hisparc_datastore.format.rows import BatchPart, SkipReport, StationBatch, gather
from hisparc_datastore.format.schema import (
    BLOBS_NODE,
    ROOT_GROUP,
    ROOT_TITLE,
    TABLES,
    cluster_node,
    cluster_title,
    station_node,
    station_title,
)
from hisparc_datastore.storage.dayfile.errors import (
    DayFileBusy,
    DayFileError,
    DayFileIOError,
    failure_errno,
    lock_conflict,
    volume_failure,
)
from hisparc_datastore.storage.dayfile.ledger import (
    COMMITTED,
    INTENT_DTYPE,
    KEYS_DTYPE,
    PENDING,
    RANGES_DTYPE,
    Ledger,
    create_ledger,
    ledger_entry,
    truncate,
    write_root_attrs,
)
from hisparc_datastore.storage.dayfile.lock import PathLock
from hisparc_datastore.storage.dayfile.nodes import (
    VLEN_UINT8,
    append_blobs,
    append_rows,
    check_layout,
    create_blobs,
    create_event_table,
    group_attrs,
    set_nrows,
    write_rows_at,
)
from hisparc_datastore.storage.dayfile.volume import make_dirs

log = logging.getLogger(__name__)


@dataclass
class AppendReport:
    """What one :meth:`DayFile.append` did."""

    written: list[str] = field(default_factory=list)
    skipped_duplicates: list[str] = field(default_factory=list)
    #: table path below /hisparc (``cluster_x/station_n/events``) -> rows added
    rows: dict[str, int] = field(default_factory=dict)
    #: blobs path below /hisparc (``cluster_x/station_n/blobs``) -> blobs added
    blobs: dict[str, int] = field(default_factory=dict)
    #: key -> table rows it added (its skipped events excluded)
    events: dict[str, int] = field(default_factory=dict)
    skipped_events: SkipReport = field(default_factory=SkipReport)


def station_path(batch: StationBatch) -> str:
    return f"/{ROOT_GROUP}/{cluster_node(batch.cluster)}/{station_node(batch.station)}"


@dataclass
class _Transaction:
    """One append in progress: what it writes, and where each object's rows went."""

    txn: int
    batches: Sequence[StationBatch]
    parts: list[BatchPart]  # every batch's parts, in the order of the keys rows
    index: list[list[int]]  # per batch, per part: its index in ``parts``
    key_start: int = 0
    keys: np.ndarray | None = None


class DayFile:
    """One day's HDF5 file, opened for appending under an exclusive lock.

    ::

        with DayFile(day_file_path(data_dir, day), lock_timeout=5) as day_file:
            report = day_file.write(parts)

    Opening repairs an append that a crash left unfinished.  Not re-entrant: a thread
    that opens the same file twice waits for itself.
    """

    def __init__(self, path: Path, lock_timeout: float | None = None) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._lock = PathLock(self.path, lock_timeout)
        self._file: h5py.File | None = None
        self._ledger: Ledger | None = None

    # -- opening and closing

    def __enter__(self) -> DayFile:
        make_dirs(self.path.parent)
        self._lock.acquire()
        try:
            if not self.path.exists():
                self._create_file()
            try:
                self._file = h5py.File(self.path, "r+")
            except OSError as exc:
                if lock_conflict(exc):
                    raise DayFileBusy(
                        f"{self.path} is held open by another process (a reader): "
                        "HDF5 cannot lock it"
                    ) from exc
                raise
            self._ledger = Ledger.of(self._file, self.path)
            self._ledger.repair()
        except BaseException as exc:
            try:
                self._close()
            except Exception as close_error:  # the lock must be released all the same
                log.warning("%s: closing after a failed open: %s", self.path, close_error)
            finally:
                self._lock.release()
            if not isinstance(exc, DayFileError) and volume_failure(exc):
                raise DayFileIOError(failure_errno(exc), f"{self.path}: {exc}") from exc
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self._close()
        except RuntimeError as close_error:
            if exc is not None:  # the append's own error says more; do not mask it
                log.warning("%s: closing after a failed append: %s", self.path, close_error)
            elif volume_failure(close_error):
                raise DayFileIOError(
                    failure_errno(close_error), f"{self.path}: {close_error}"
                ) from close_error
            else:
                raise
        finally:
            self._lock.release()

    def _close(self) -> None:
        if self._file is not None:
            try:
                if self._file.id.valid:
                    try:
                        self._file.flush()
                    finally:  # a failed flush must not leave HDF5 holding the file open
                        self._file.close()
            finally:
                self._file = None
                self._ledger = None

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            raise DayFileError(f"{self.path} is not open (use DayFile as a context manager)")
        return self._file

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise DayFileError(f"{self.path} is not open (use DayFile as a context manager)")
        return self._ledger

    def _create_file(self) -> None:
        """Build the skeleton under a temporary name and rename it: never half a file."""
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a crash during creation; we hold the lock
        temporary = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex}")
        try:
            with h5py.File(temporary, "w") as new:
                write_root_attrs(new)
                group_attrs(new.create_group(ROOT_GROUP), ROOT_TITLE)
                create_ledger(new)
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)

    # -- which objects are new

    def ingested(self, key: str) -> bool:
        """Whether ``key`` is committed in this file's ledger (its rows are all here)."""
        return self.ledger.ingested(key)

    def new_parts(self, parts: Sequence[BatchPart]) -> tuple[list[BatchPart], list[str]]:
        """The parts whose objects this file does not hold yet, and the keys of the rest
        (committed before, or repeated in ``parts``)."""
        committed = self.ledger.committed()
        new: list[BatchPart] = []
        duplicates: list[str] = []
        seen: set[bytes] = set()
        for part in parts:
            entry = ledger_entry(part.key)
            if entry in committed or entry in seen:
                duplicates.append(part.key)
                continue
            seen.add(entry)
            new.append(part)
        return new, duplicates

    # -- appending

    def write(self, parts: Sequence[BatchPart]) -> AppendReport:
        """Append the objects of ``parts`` this file does not hold yet, in one transaction.

        The rows are built here, once per station (:func:`~hisparc_datastore.format.rows.
        gather`); an object whose rows cannot be built raises
        :class:`~hisparc_datastore.format.rows.RowsError` before the file is touched.
        """
        new, duplicates = self.new_parts(parts)
        report = self.append(gather(new), order=new) if new else AppendReport()
        report.skipped_duplicates = duplicates
        return report

    def append(self, batches: Sequence[StationBatch],
               order: Sequence[BatchPart] | None = None) -> AppendReport:
        """Write new objects' rows, built per station, in one transaction.

        ``batches`` must hold only new objects (:meth:`new_parts`); an object already in
        the ledger is refused rather than written twice.  Each table and each station's
        ``blobs`` gets one resize and one write for the whole call.  The ledger lists the
        objects in ``order`` (their arrival; default: station by station).
        """
        report = AppendReport()
        for batch in batches:
            report.skipped_events.merge(batch.rows.skipped)
        parts = list(order) if order is not None else [
            part for batch in batches for part in batch.parts]
        if not parts:
            return report
        if len(self.new_parts(parts)[0]) != len(parts):
            raise DayFileError(f"{self.path}: an object in this append is already in it")
        self._check_existing(batches)
        ledger = self.ledger
        if ledger.unfinished:
            ledger.repair()  # an earlier append in this session failed half-way
        position = {id(part): index for index, part in enumerate(parts)}
        if sum(len(batch.parts) for batch in batches) != len(parts) or not all(
                id(part) in position for batch in batches for part in batch.parts):
            raise ValueError("order must list exactly the batches' parts")
        # A station whose every event was skipped gets no nodes; its objects still go
        # into the ledger (they are done), with no rows.
        writing = [batch for batch in batches if _tables(batch)]
        index = [[position[id(part)] for part in batch.parts] for batch in writing]
        work = _Transaction(int(ledger.table("keys").shape[0]), writing, parts, index)
        try:
            self._record_intent(work)
            self._create_nodes(work)
            self._write_data(work, report)
            self._commit(work, report)
        except BaseException as exc:
            log.exception("%s: append failed, rolling back", self.path)
            try:
                ledger.repair()
            except Exception:
                log.exception("%s: rollback failed; the next open retries it", self.path)
            if volume_failure(exc):
                raise DayFileIOError(failure_errno(exc), f"{self.path}: {exc}") from exc
            raise
        return report

    def _check_existing(self, batches: Sequence[StationBatch]) -> None:
        """Refuse before writing anything if an existing node is not what we would write."""
        h5file = self.file
        for batch in batches:
            path = station_path(batch)
            for table in _tables(batch):
                node = h5file.get(f"{path}/{table}")
                if node is not None:
                    check_layout(node, TABLES[table].dtype)
            blobs = h5file.get(f"{path}/{BLOBS_NODE}")
            if blobs is not None and (
                not isinstance(blobs, h5py.Dataset) or blobs.dtype != VLEN_UINT8
            ):
                raise DayFileError(f"{blobs.name} in {self.path} is not a vlen uint8 array")

    def _record_intent(self, work: _Transaction) -> None:
        """Step 1: what will be created, and every dataset's length before and after."""
        h5file = self.file
        keys_ds, ranges_ds, intent_ds = (self.ledger.table(n) for n in ("keys", "ranges",
                                                                          "intent"))
        intent: list[tuple[str, int, int, bool]] = []  # node, length, length after, created
        created_clusters: set[str] = set()
        for batch in work.batches:
            path = station_path(batch)
            cluster_path = path.rsplit("/", 1)[0]
            if cluster_path not in h5file and cluster_path not in created_clusters:
                created_clusters.add(cluster_path)
                intent.append((cluster_path, 0, 0, True))
            station_group = h5file.get(path)
            if station_group is None:
                intent.append((path, 0, 0, True))
                continue  # removing the group on rollback removes what it holds
            adding = {name: len(rows) for name, rows in _tables(batch).items()}
            adding[BLOBS_NODE] = len(batch.rows.blobs)
            for table, count in adding.items():
                node = station_group.get(table)
                if node is None:
                    intent.append((f"{path}/{table}", 0, count, True))
                else:
                    length = int(node.shape[0])
                    intent.append((node.name, length, length + count, False))
        range_count = len(work.parts) * (len(TABLES) + 1)  # at most
        for dataset, adding in ((keys_ds, len(work.parts)), (ranges_ds, range_count)):
            length = int(dataset.shape[0])
            intent.append((dataset.name, length, length + adding, False))
        rows = np.zeros(len(intent), dtype=INTENT_DTYPE)
        for index, (node, length, after, created) in enumerate(intent):
            rows[index] = (work.txn, node.encode(), length, after, created)
        truncate(intent_ds, 0)
        append_rows(intent_ds, rows)
        set_nrows(intent_ds, intent_ds.shape[0])
        h5file.flush()

    def _create_nodes(self, work: _Transaction) -> None:
        """Step 2: the groups, tables and blob arrays this append needs."""
        for batch in work.batches:
            station_group = self._station_group(batch)
            for table in _tables(batch):
                if table not in station_group:
                    create_event_table(station_group, TABLES[table])
            if BLOBS_NODE not in station_group:
                create_blobs(station_group)
        self.file.flush()

    def _write_data(self, work: _Transaction, report: AppendReport) -> None:
        """Step 3: the rows, one resize and one write per dataset; keys pending; ranges."""
        h5file = self.file
        keys_ds, ranges_ds = self.ledger.table("keys"), self.ledger.table("ranges")
        ranges: list[tuple[int, str, int, int]] = []  # part index, node, start, count
        events_per_part = [0] * len(work.parts)
        for batch, index_of in zip(work.batches, work.index, strict=True):
            path = station_path(batch)
            station_group = h5file[path]
            below_root = path.removeprefix(f"/{ROOT_GROUP}/")
            blob_start = append_blobs(station_group[BLOBS_NODE], batch.rows.blobs)
            for table, table_rows in _tables(batch).items():
                dataset = station_group[table]
                rows = table_rows.rows_with_blob_offset(blob_start)
                start = int(dataset.shape[0])
                rows["event_id"] = np.arange(start + 1, start + 1 + len(rows), dtype=np.uint32)
                append_rows(dataset, rows)
                set_nrows(dataset, dataset.shape[0])
                node = f"{below_root}/{table}"
                report.rows[node] = report.rows.get(node, 0) + len(rows)
                for local, count in batch.owners(table_rows.positions):
                    ranges.append((index_of[local], node, start, count))
                    events_per_part[index_of[local]] += count
                    start += count
            node = f"{below_root}/{BLOBS_NODE}"
            if batch.rows.blobs:
                report.blobs[node] = report.blobs.get(node, 0) + len(batch.rows.blobs)
            start = blob_start
            for local, count in batch.owners(batch.rows.blob_positions):
                ranges.append((index_of[local], node, start, count))
                start += count

        work.key_start = int(keys_ds.shape[0])
        keys = np.zeros(len(work.parts), dtype=KEYS_DTYPE)
        for index, part in enumerate(work.parts):
            keys[index] = (
                ledger_entry(part.key), part.etag.encode("utf-8")[:64], part.station,
                events_per_part[index], work.txn, PENDING, 0.0,
            )
        append_rows(keys_ds, keys)
        set_nrows(keys_ds, keys_ds.shape[0])
        range_rows = np.zeros(len(ranges), dtype=RANGES_DTYPE)
        for index, (part_index, node, start, count) in enumerate(ranges):
            range_rows[index] = (work.txn, work.key_start + part_index, node.encode(), start,
                                 count)
        append_rows(ranges_ds, range_rows)
        set_nrows(ranges_ds, ranges_ds.shape[0])
        h5file.flush()
        work.keys = keys
        report.events = {part.key: events_per_part[i] for i, part in enumerate(work.parts)}

    def _commit(self, work: _Transaction, report: AppendReport) -> None:
        """Step 4: emptying the intent is the commit; the state column follows it."""
        assert work.keys is not None
        keys = work.keys
        keys["state"] = COMMITTED
        keys["written_at"] = time.time()
        write_rows_at(self.ledger.table("keys"), work.key_start, keys)
        truncate(self.ledger.table("intent"), 0)
        self.file.flush()
        self.ledger.committed().update(keys["key"].tolist())
        report.written = [part.key for part in work.parts]

    def _station_group(self, batch: StationBatch) -> h5py.Group:
        root = self.file[ROOT_GROUP]
        name = cluster_node(batch.cluster)
        cluster = root.get(name)
        if cluster is None:
            cluster = root.create_group(name)
            group_attrs(cluster, cluster_title(batch.cluster))
        station = cluster.get(station_node(batch.station))
        if station is None:
            station = cluster.create_group(station_node(batch.station))
            group_attrs(station, station_title(batch.station))
        return station


def _tables(batch: StationBatch) -> dict:
    """The batch's tables that have rows."""
    return {name: rows for name, rows in batch.rows.items() if len(rows)}
