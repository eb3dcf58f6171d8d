"""The daily HDF5 files: PyTables-native nodes written with h5py, exactly once, crash-safe.

Layout and attributes are spec section 3: readers (publicdb, SAPPHiRE) open these files
with PyTables, which recognises nodes by their ``CLASS``/``VERSION``/``TITLE`` attributes,
so every node gets the attributes PyTables itself would write, with the same HDF5 types
(fixed-length UTF-8 strings, bitfield bools, int64 ``NROWS``).

Exactly once and crash safety rest on an ingest ledger kept outside ``/hisparc`` (readers
that walk ``/hisparc`` never see it), in ``/_datastore``:

- ``keys``: one row per bucket object written into this file (key, etag, state, ...);
- ``ranges``: the rows each object added to each node (start, count);
- ``intent``: the write-ahead record of the append in progress: every node it touches
  with its length before, and the nodes it creates.

An append records its intent and flushes, creates missing nodes, appends all rows (one
resize and one write per dataset) with its ``keys`` rows pending, flushes, then commits:
empties the intent (and marks its keys committed), and flushes.  The intent alone decides:
opening a file whose intent is not empty means an append died half-way, so every touched
dataset is cut back to its recorded length, the nodes it created are removed, and the
intent is emptied; the object is then written again by the next append, never twice.
With the intent empty every ``keys`` row is committed (a pending ``state`` left by a
kill during the final flush is rolled forward).  Cutting a blob array back also nulls the
heap references a killed append may have left past the cut, which HDF5 would otherwise
chase (and fail on) when the next append overwrites those elements.

One writer per file at a time: an exclusive ``flock`` on ``<file>.lock`` (processes) plus
a lock per path (threads of one process).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import h5py
import numpy as np
from h5py import h5a, h5d, h5p, h5s, h5t

from hisparc_datastore.format.rows import BatchRows, SkipReport, TableRows, build_table_rows
from hisparc_datastore.format.schema import (
    BLOBS_NODE,
    BLOBS_TITLE,
    ROOT_GROUP,
    ROOT_TITLE,
    TABLES,
    EventType,
    cluster_node,
    cluster_title,
    station_node,
    station_title,
)

log = logging.getLogger(__name__)

LEDGER_GROUP = "_datastore"
LEDGER_TITLE = "HiSPARC datastore ingest ledger"

#: Ledger rows are fixed-size (PyTables tables cannot hold variable-length strings).
KEY_BYTES = 256
KEYS_DTYPE = np.dtype([
    ("key", f"S{KEY_BYTES}"),
    ("etag", "S64"),
    ("station", "<u4"),
    ("events", "<u4"),  # rows this object added, all tables together
    ("txn", "<u8"),
    ("state", "|u1"),
    ("written_at", "<f8"),  # unix time of the commit
])
RANGES_DTYPE = np.dtype([
    ("txn", "<u8"),
    ("key_row", "<u8"),  # row of the object in ``keys``
    ("node", "S192"),  # path below /hisparc, e.g. cluster_amsterdam/station_501/events
    ("start", "<u8"),
    ("count", "<u8"),
])
INTENT_DTYPE = np.dtype([
    ("txn", "<u8"),
    ("node", "S256"),  # absolute path
    ("length", "<u8"),  # rows before the append (0 for created nodes)
    ("length_after", "<u8"),  # rows the append means to leave
    ("created", "|u1"),  # 1: the append creates this node; rollback removes it
])
PENDING, COMMITTED = 0, 1

_LEDGER_TABLES = {
    "keys": (KEYS_DTYPE, "Bucket objects ingested into this file"),
    "ranges": (RANGES_DTYPE, "Rows each ingested object added, per node"),
    "intent": (INTENT_DTYPE, "Append in progress (write-ahead intent)"),
}

#: About 64 KiB per chunk, like PyTables for the expected size of a day's table.
TABLE_CHUNK_BYTES = 64 * 1024
#: Blob chunks hold 16-byte heap references: 4096 of them is 64 KiB.
BLOB_CHUNK_ROWS = 4096
_VLEN_UINT8 = h5py.vlen_dtype(np.dtype("uint8"))

Stage = Literal["intent", "created", "data"]


class DayFileError(Exception):
    """The day file cannot be written as asked (e.g. an existing table has other columns)."""


class DayFileBusy(DayFileError):
    """Someone else has the day file: a reader (HDF5's own file lock) or another writer.

    Not an error of the file or of the batch: the batch waits and is written when the
    file is free (see :func:`held_open`).
    """


class DayFileLocked(DayFileBusy, TimeoutError):
    """Another writer held the day file for longer than the lock timeout."""


class DayFileIOError(DayFileError, OSError):
    """A system call failed under the file (full, read-only, I/O error, ...).

    HDF5 reports a failed write or flush as a ``RuntimeError`` whose message names the
    system call's errno; left as it is, the writer would take it for a fault of the
    batch and quarantine good data whenever the disk fills up.  ``errno`` is that number
    when HDF5 gave one.
    """

    def __init__(self, number: int | None, message: str) -> None:
        super().__init__(message)
        self.errno = number  # type: ignore[misc]


class RowsError(Exception):
    """One of the batches' events cannot be made into rows: the batch's fault, not the file's.

    Raised before the file is touched; ``__cause__`` holds the original exception.
    """


#: Errors of the volume, not of one file: every day file would fail the same way.
VOLUME_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ESTALE, errno.ENOTCONN,
    errno.ENODEV, errno.ENXIO, errno.EHOSTDOWN, errno.ETIMEDOUT, errno.ENOMEM,
})
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")


def failure_errno(exc: BaseException | None) -> int | None:
    """The system call's errno behind an error: its own, or the one HDF5 puts in its
    message (``errno = N``), following causes and contexts (a close that fails after a
    failed flush carries the flush's error)."""
    while exc is not None:
        number = getattr(exc, "errno", None)
        if isinstance(number, int):
            return number
        found = _ERRNO_IN_MESSAGE.search(str(exc))
        if found and isinstance(exc, (RuntimeError, OSError)):
            return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def _volume_failure(exc: BaseException | None) -> bool:
    """Whether an h5py error is (or follows) a failed system call."""
    return failure_errno(exc) is not None


def is_volume_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the volume is in trouble (full, read-only, gone), not one file."""
    return failure_errno(exc) in VOLUME_ERRNOS


def _lock_conflict(exc: BaseException) -> bool:
    """HDF5 could not take its file lock: another process has the file open."""
    return failure_errno(exc) in (errno.EAGAIN, errno.EWOULDBLOCK) or (
        "unable to lock file" in str(exc)
    )


def held_open(path: Path) -> bool:
    """Whether another process has ``path`` open with HDF5 file locking (a reader).

    HDF5 (1.10 and later) takes ``flock(LOCK_SH)`` for a reader and ``LOCK_EX`` for a
    writer, for as long as the file is open; a free file takes our exclusive lock for a
    moment.  A reader that opens in that moment gets HDF5's "unable to lock file" error,
    the same as while the writer appends, which it may retry.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the lock
    return False


def probe_volume(data_dir: Path) -> str | None:
    """Why the volume under ``data_dir`` cannot take writes, or None when it can.

    Creates, writes, syncs and removes a small file: what every append needs.  The writer
    asks this when a day file fails, to tell a broken file (the objects of that day wait)
    from a broken volume (nothing can be written: answer 5xx).
    """
    directory = Path(data_dir)
    if not directory.is_dir():
        return f"{directory} is not a directory (volume not mounted?)"
    probe = directory / f".write-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        return f"{directory} cannot be written: {exc.strerror or exc}"
    return None


def day_file_path(data_dir: Path, day: date) -> Path:
    """``<data_dir>/<YYYY>/<M>/<YYYY>_<M>_<D>.h5``, month and day without zero padding."""
    return Path(data_dir) / str(day.year) / str(day.month) / (
        f"{day.year}_{day.month}_{day.day}.h5"
    )


@dataclass(frozen=True)
class BatchPart:
    """The events of one bucket object that fall on one UTC day."""

    key: str
    etag: str
    station: int
    cluster: str
    events: list[dict]


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


# -- attributes, exactly as PyTables writes them ---------------------------------------------

def _write_attr(obj: h5py.HLObject, name: str, value: str | np.generic) -> None:
    """Set one attribute with the HDF5 type PyTables uses for it.

    Strings: scalar fixed-length, NUL-terminated, UTF-8 (an empty string is a null
    dataspace, as PyTables writes the root's empty title).  Bools: an 8-bit bitfield,
    which PyTables maps to bool (h5py's bool enum would make PyTables give up on the
    node).  Numbers: their numpy type.
    """
    oid = obj.id
    bname = name.encode()
    if h5a.exists(oid, bname):
        h5a.delete(oid, bname)
    if isinstance(value, str):
        data = value.encode("utf-8")
        tid = h5t.C_S1.copy()
        tid.set_size(max(len(data), 1))
        tid.set_strpad(h5t.STR_NULLTERM)
        tid.set_cset(h5t.CSET_UTF8)
        if not data:
            h5a.create(oid, bname, tid, h5s.create(h5s.NULL))
            return
        attr = h5a.create(oid, bname, tid, h5s.create(h5s.SCALAR))
        attr.write(np.array(data, dtype=f"S{len(data)}"), mtype=tid)
        return
    array = np.asarray(value)
    if array.dtype == np.bool_:
        tid = h5t.STD_B8LE.copy()
        array = array.astype(np.uint8)
    else:
        tid = h5t.py_create(array.dtype)
    attr = h5a.create(oid, bname, tid, h5s.create(h5s.SCALAR))
    attr.write(np.ascontiguousarray(array), mtype=tid)


def _set_nrows(dataset: h5py.Dataset, rows: int) -> None:
    bname = b"NROWS"
    value = np.array(rows, dtype=np.int64)
    if h5a.exists(dataset.id, bname):
        h5a.open(dataset.id, bname).write(value)
    else:
        _write_attr(dataset, "NROWS", np.int64(rows))


def _group_attrs(group: h5py.Group, title: str) -> None:
    _write_attr(group, "CLASS", "GROUP")
    _write_attr(group, "TITLE", title)
    _write_attr(group, "VERSION", "1.0")


def _file_type(dtype: np.dtype) -> h5t.TypeCompoundID:
    """The on-disk compound type: numpy's packed layout, bools as PyTables' bitfields."""
    tid = h5t.create(h5t.COMPOUND, dtype.itemsize)
    for name in dtype.names or ():
        sub, offset = dtype.fields[name][:2]
        base = sub.base
        member = h5t.STD_B8LE.copy() if base == np.bool_ else h5t.py_create(base)
        if sub.shape:
            member = h5t.array_create(member, sub.shape)
        tid.insert(name.encode(), offset, member)
    return tid


def _with_bools_as_bytes(dtype: np.dtype) -> np.dtype:
    """The dtype h5py can convert to the bitfield members (for the dataset fill value)."""
    return np.dtype([
        (name, np.uint8 if dtype.fields[name][0].base == np.bool_ else dtype.fields[name][0].base,
         dtype.fields[name][0].shape)
        for name in dtype.names or ()
    ])


def _create_table(
    parent: h5py.Group,
    name: str,
    dtype: np.dtype,
    title: str,
    fills: Sequence[Any] | None = None,
) -> h5py.Dataset:
    """An empty, extendible, chunked, uncompressed table that PyTables opens natively."""
    tid = _file_type(dtype)
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_chunk((max(1, TABLE_CHUNK_BYTES // dtype.itemsize),))
    fill_row = np.zeros((), dtype=dtype)
    if fills is not None:
        for column, fill in zip(dtype.names or (), fills, strict=True):
            fill_row[column] = fill
    dcpl.set_fill_value(np.asarray(fill_row.astype(_with_bools_as_bytes(dtype))))
    space = h5s.create_simple((0,), (h5s.UNLIMITED,))
    dataset = h5py.Dataset(h5d.create(parent.id, name.encode(), tid, space, dcpl=dcpl))
    _write_attr(dataset, "CLASS", "TABLE")
    _write_attr(dataset, "VERSION", "2.7")
    _write_attr(dataset, "TITLE", title)
    _write_attr(dataset, "NROWS", np.int64(0))
    for index, column in enumerate(dtype.names or ()):
        _write_attr(dataset, f"FIELD_{index}_NAME", column)
        base = dtype.fields[column][0].base
        _write_attr(dataset, f"FIELD_{index}_FILL", base.type(fill_row[column].flat[0]))
    return dataset


def _create_event_table(parent: h5py.Group, event_type: EventType) -> h5py.Dataset:
    return _create_table(
        parent,
        event_type.table,
        event_type.dtype,
        event_type.title,
        [column.fill for column in event_type.columns],
    )


def _create_blobs(parent: h5py.Group) -> h5py.Dataset:
    """A PyTables VLArray of VLStringAtom: vlen uint8 rows, read back as ``bytes``."""
    dataset = parent.create_dataset(
        BLOBS_NODE, shape=(0,), maxshape=(None,), dtype=_VLEN_UINT8, chunks=(BLOB_CHUNK_ROWS,)
    )
    _write_attr(dataset, "CLASS", "VLARRAY")
    _write_attr(dataset, "VERSION", "1.4")
    _write_attr(dataset, "TITLE", BLOBS_TITLE)
    _write_attr(dataset, "PSEUDOATOM", "vlstring")
    return dataset


def _append_rows(dataset: h5py.Dataset, rows: np.ndarray) -> int:
    """One resize and one write; returns the first new row."""
    start = dataset.shape[0]
    if len(rows):
        dataset.resize((start + len(rows),))
        _write_rows_at(dataset, start, rows)
    return start


def _write_rows_at(dataset: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    """Write rows in place, bytes unconverted.

    The memory type is the file's own compound type: our arrays have its exact layout
    (checked by :func:`_check_layout`), and numpy bools are the bytes of its bitfields.
    """
    count = len(rows)
    file_space = dataset.id.get_space()
    file_space.select_hyperslab((start,), (count,))
    dataset.id.write(
        h5s.create_simple((count,)), file_space, np.ascontiguousarray(rows),
        mtype=dataset.id.get_type(),
    )


#: Blob bytes handed to one vlen write.  h5py copies every element of a vlen write into
#: buffers of its own, so one write of a whole batch's traces held them twice: written in
#: slices of this size, the peak RSS of a 1000-event batch dropped from 4.0x to 3.5x its
#: pickle (bench/memory.py).
BLOB_WRITE_BYTES = 1 << 20


def _append_blobs(dataset: h5py.Dataset, blobs: Sequence[bytes]) -> int:
    start = dataset.shape[0]
    count = len(blobs)
    if not count:
        return start
    dataset.resize((start + count,))
    first = 0
    while first < count:
        end, size = first, 0
        while end < count and (end == first or size + len(blobs[end]) <= BLOB_WRITE_BYTES):
            size += len(blobs[end])
            end += 1
        # h5py's high-level write would turn equal-length blobs into a 2-d array.
        values = np.empty(end - first, dtype=object)
        for index in range(first, end):
            values[index - first] = np.frombuffer(blobs[index], dtype=np.uint8)
        file_space = dataset.id.get_space()
        file_space.select_hyperslab((start + first,), (end - first,))
        dataset.id.write(h5s.create_simple((end - first,)), file_space, values)
        first = end
    return start


def _clear_vlen_references(dataset: h5py.Dataset, start: int, end: int) -> None:
    """Zero the on-disk heap references of elements ``start``.. of a blob array.

    HDF5 frees the heap objects of vlen elements it overwrites.  A writer killed
    mid-append can leave chunks holding references to heap collections that never
    reached the disk, beyond the extent we cut back to; the next append over those
    elements would then fail ("bad heap index").  Raw chunk I/O bypasses the vlen
    conversion, so the references become null ones (length 0) without HDF5 chasing them.
    """
    end = max(end, dataset.shape[0])
    if end <= start or dataset.chunks is None:
        return
    if dataset.shape[0] < end:
        dataset.resize((end,))  # chunks written beyond a stale extent become reachable
    chunk = dataset.chunks[0]
    for offset in range(start - start % chunk, end, chunk):
        info = dataset.id.get_chunk_info_by_coord((offset,))
        if info.byte_offset is None:
            continue
        mask, raw = dataset.id.read_direct_chunk((offset,))
        element = len(raw) // chunk
        first = max(start - offset, 0) * element
        cleared = bytes(raw[:first]) + bytes(len(raw) - first)
        dataset.id.write_direct_chunk((offset,), cleared, mask)


def _check_layout(dataset: h5py.Dataset, dtype: np.dtype) -> None:
    """Refuse to write into a table whose on-disk columns are not ours byte for byte."""
    tid = dataset.id.get_type()
    names = dtype.names or ()
    problem = None
    if not isinstance(tid, h5t.TypeCompoundID) or tid.get_size() != dtype.itemsize:
        problem = "row size differs"
    elif tid.get_nmembers() != len(names):
        problem = "column count differs"
    else:
        for index, name in enumerate(names):
            sub, offset = dtype.fields[name][:2]
            if (
                tid.get_member_name(index).decode() != name
                or tid.get_member_offset(index) != offset
                or tid.get_member_type(index).get_size() != sub.itemsize
            ):
                problem = f"column {index} ({name}) differs"
                break
    if problem:
        raise DayFileError(f"{dataset.name} in {dataset.file.filename}: {problem} from the schema")


# -- locking ---------------------------------------------------------------------------------

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(os.path.abspath(path), threading.Lock())


class _PathLock:
    """Exclusive access to one day file: threads via a lock, processes via flock."""

    def __init__(self, path: Path, timeout: float | None) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.timeout = timeout
        self._fd: int | None = None
        self._thread_lock = _thread_lock(path)

    def acquire(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=-1 if self.timeout is None else self.timeout):
            raise self._locked()
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                self._flock(fd, deadline)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        except BaseException:
            self._thread_lock.release()
            raise

    def _flock(self, fd: int, deadline: float | None) -> None:
        if deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        pause = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._locked() from None
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, 0.1)

    def _locked(self) -> DayFileLocked:
        return DayFileLocked(
            f"{self.path} is locked by another writer (waited {self.timeout} s for "
            f"{self.lock_path})"
        )

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
                self._thread_lock.release()


# -- the day file ----------------------------------------------------------------------------

@dataclass
class _StationWork:
    """Everything one append writes under one station group.

    The events of all the station's parts are built into rows in one go (a batch of
    thousands of one-event objects costs one numpy conversion per column, not thousands);
    ``starts`` maps rows and blobs back to their parts for the ledger.
    """

    cluster: str  # as given (for the title); the node name is lower-case
    station: int
    parts: list[int] = field(default_factory=list)  # indices into the append's parts
    starts: list[int] = field(default_factory=list)  # each part's first event in ``events``
    keys: list[str] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    batch: BatchRows | None = None

    @property
    def path(self) -> str:
        return f"/{ROOT_GROUP}/{cluster_node(self.cluster)}/{station_node(self.station)}"

    @property
    def tables(self) -> dict[str, TableRows]:
        assert self.batch is not None
        return {name: rows for name, rows in self.batch.items() if len(rows)}

    def origin(self, position: int) -> str:
        """Which object (and which of its events) a batch position came from."""
        index = bisect.bisect_right(self.starts, position) - 1
        return f"#{position - self.starts[index]} of {self.keys[index]}"

    def per_part(self, positions: np.ndarray) -> list[tuple[int, int]]:
        """(part index, count) for consecutive runs of rows or blobs, in order."""
        owners = np.searchsorted(np.asarray(self.starts), positions, side="right") - 1
        counts = np.bincount(owners, minlength=len(self.parts))
        return [(self.parts[local], int(n)) for local, n in enumerate(counts.tolist()) if n]


class DayFile:
    """One day's HDF5 file, opened for appending under an exclusive lock.

    ::

        with DayFile(day_file_path(data_dir, day), lock_timeout=30) as day_file:
            report = day_file.append(parts)

    Opening repairs an append that a crash left unfinished.  Not re-entrant: a thread
    that opens the same file twice waits for itself.
    """

    def __init__(self, path: Path, lock_timeout: float | None = None) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._lock = _PathLock(self.path, lock_timeout)
        self._file: h5py.File | None = None
        self._committed: set[bytes] | None = None
        self._ledger_nodes: dict[str, h5py.Dataset] = {}

    # -- context manager

    def __enter__(self) -> DayFile:
        self._make_dirs(self.path.parent)
        self._lock.acquire()
        try:
            if not self.path.exists():
                self._create_file()
            try:
                self._file = h5py.File(self.path, "r+")
            except OSError as exc:
                if _lock_conflict(exc):
                    raise DayFileBusy(
                        f"{self.path} is held open by another process (a reader): "
                        "HDF5 cannot lock it"
                    ) from exc
                raise
            self._ensure_ledger()
            self._repair()
        except BaseException as exc:
            try:
                self._close()
            except Exception as close_error:  # the lock must be released all the same
                log.warning("%s: closing after a failed open: %s", self.path, close_error)
            finally:
                self._lock.release()
            if not isinstance(exc, DayFileError) and _volume_failure(exc):
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
            elif _volume_failure(close_error):
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
                self._committed = None
                self._ledger_nodes = {}

    @staticmethod
    def _make_dirs(directory: Path) -> None:
        missing = []
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):
                folder.mkdir(mode=0o755)

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            raise DayFileError(f"{self.path} is not open (use DayFile as a context manager)")
        return self._file

    # -- creation and repair

    def _create_file(self) -> None:
        """Build the skeleton under a temporary name and rename it: never half a file."""
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a crash during creation; we hold the lock
        temporary = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex}")
        try:
            with h5py.File(temporary, "w") as new:
                _write_attr(new, "CLASS", "GROUP")
                _write_attr(new, "PYTABLES_FORMAT_VERSION", "2.1")
                _write_attr(new, "TITLE", "")
                _write_attr(new, "VERSION", "1.0")
                _group_attrs(new.create_group(ROOT_GROUP), ROOT_TITLE)
                self._create_ledger(new)
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)

    @staticmethod
    def _create_ledger(h5file: h5py.File) -> None:
        group = h5file.create_group(LEDGER_GROUP)
        _group_attrs(group, LEDGER_TITLE)
        for name, (dtype, title) in _LEDGER_TABLES.items():
            _create_table(group, name, dtype, title)

    def _ensure_ledger(self) -> None:
        """Give a file from elsewhere (the reference writer) a ledger.

        A ledger group that exists but is incomplete can only come from a crash while it
        was being created, before any append used it: it is rebuilt.
        """
        h5file = self.file
        group = h5file.get(LEDGER_GROUP)
        if isinstance(group, h5py.Group) and all(
            _table_complete(group.get(name), dtype) for name, (dtype, _) in _LEDGER_TABLES.items()
        ):
            return
        self._ledger_nodes = {}
        if group is not None:
            log.warning("%s: rebuilding an incomplete ingest ledger", self.path)
            del h5file[LEDGER_GROUP]
        if "CLASS" not in h5file.attrs:
            _write_attr(h5file, "CLASS", "GROUP")
            _write_attr(h5file, "PYTABLES_FORMAT_VERSION", "2.1")
            _write_attr(h5file, "TITLE", "")
            _write_attr(h5file, "VERSION", "1.0")
        self._create_ledger(h5file)
        h5file.flush()

    def _ledger(self, name: str) -> h5py.Dataset:
        dataset = self._ledger_nodes.get(name)
        if dataset is None:
            dataset = self._ledger_nodes[name] = self.file[f"/{LEDGER_GROUP}/{name}"]
        return dataset

    def _repair(self) -> None:
        """Roll back an append that did not commit (see the module docstring)."""
        intent = self._ledger("intent")
        if intent.shape[0] == 0:
            return
        records = intent[:]
        h5file = self.file
        txns = sorted({int(txn) for txn in records["txn"]})
        log.warning(
            "%s: rolling back unfinished append (txn %s, %d nodes)",
            self.path, txns, len(records),
        )
        # Created nodes go first, deepest first; a parent's removal takes its children.
        created = [r for r in records if r["created"]]
        for record in sorted(created, key=lambda r: -r["node"].count(b"/")):
            path = record["node"].decode()
            if path.startswith("/") and path in h5file:
                del h5file[path]
        for record in records:
            path = record["node"].decode()
            if record["created"] or not path.startswith("/"):
                continue  # (an empty path: an intent row whose bytes never reached disk)
            dataset = h5file.get(path)
            if not isinstance(dataset, h5py.Dataset):
                continue
            length = int(record["length"])
            if h5py.check_vlen_dtype(dataset.dtype) is not None:
                _clear_vlen_references(dataset, length, int(record["length_after"]))
            if dataset.shape[0] > length:
                dataset.resize((length,))
            if "NROWS" in dataset.attrs:
                _set_nrows(dataset, dataset.shape[0])
        self._truncate(intent, 0)
        h5file.flush()

    @staticmethod
    def _truncate(dataset: h5py.Dataset, length: int) -> None:
        dataset.resize((length,))
        _set_nrows(dataset, length)

    # -- the ledger

    def _committed_keys(self) -> set[bytes]:
        """Every key in the ledger: with the intent empty, all of its rows are committed.

        The intent, not the ``state`` column, decides: a kill during the commit's flush
        can leave the intent emptied on disk but a row's state not yet updated.  Such a
        row is rolled forward here, so ``state`` ends up telling the truth too.
        """
        if self._committed is None:
            keys = self._ledger("keys")
            if self._ledger("intent").shape[0]:
                self._repair()
            records = keys.fields(["key", "state"])[:] if keys.shape[0] else None
            if records is None:
                self._committed = set()
            else:
                self._committed = set(records["key"].tolist())
                pending = np.flatnonzero(records["state"] != COMMITTED)
                if len(pending):
                    self._roll_forward(keys, pending)
        return self._committed

    def _roll_forward(self, keys: h5py.Dataset, pending: np.ndarray) -> None:
        log.warning("%s: marking %d ingested keys committed (commit was cut short)",
                    self.path, len(pending))
        for row in pending.tolist():
            record = keys[row : row + 1]
            record["state"] = COMMITTED
            _write_rows_at(keys, row, record)
        self.file.flush()

    def ingested(self, key: str) -> bool:
        """Whether ``key`` is committed in this file's ledger (its rows are all here)."""
        return ledger_entry(key) in self._committed_keys()

    # -- appending

    def append(self, parts: Sequence[BatchPart]) -> AppendReport:
        """Append the events of many bucket objects in one transaction.

        Objects already committed (or repeated in ``parts``) are skipped.  Each table and
        each station's ``blobs`` gets one resize and one write for the whole call.
        """
        return self._append(parts, stop_after=None)

    def _append_without_commit(
        self, parts: Sequence[BatchPart], stage: Stage = "data"
    ) -> AppendReport:
        """Test hook: do an append up to ``stage`` and stop, as a crash there would."""
        return self._append(parts, stop_after=stage)

    def _append(self, parts: Sequence[BatchPart], stop_after: Stage | None) -> AppendReport:
        report = AppendReport()
        committed = self._committed_keys()
        todo: list[BatchPart] = []
        seen: set[bytes] = set()
        for part in parts:
            key = ledger_entry(part.key)
            if key in committed or key in seen:
                report.skipped_duplicates.append(part.key)
                continue
            seen.add(key)
            todo.append(part)
        if not todo:
            return report

        stations = self._gather(todo)
        for work in stations.values():
            assert work.batch is not None
            report.skipped_events.merge(work.batch.skipped)
        stations = {path: work for path, work in stations.items() if work.tables}
        self._check_existing(stations)
        if self._ledger("intent").shape[0]:
            self._repair()  # an earlier append in this session failed half-way
        try:
            return self._write(todo, stations, report, stop_after)
        except BaseException as exc:
            log.exception("%s: append failed, rolling back", self.path)
            try:
                self._repair()
            except Exception:
                log.exception("%s: rollback failed; the next open retries it", self.path)
            if _volume_failure(exc):
                raise DayFileIOError(failure_errno(exc), f"{self.path}: {exc}") from exc
            raise

    def _check_existing(self, stations: Mapping[str, _StationWork]) -> None:
        """Refuse before writing anything if an existing node is not what we would write."""
        h5file = self.file
        for work in stations.values():
            for table in work.tables:
                node = h5file.get(f"{work.path}/{table}")
                if node is not None:
                    _check_layout(node, TABLES[table].dtype)
            blobs = h5file.get(f"{work.path}/{BLOBS_NODE}")
            if blobs is not None and (
                not isinstance(blobs, h5py.Dataset) or blobs.dtype != _VLEN_UINT8
            ):
                raise DayFileError(f"{blobs.name} in {self.path} is not a vlen uint8 array")

    def _write(
        self,
        todo: Sequence[BatchPart],
        stations: Mapping[str, _StationWork],
        report: AppendReport,
        stop_after: Stage | None,
    ) -> AppendReport:
        """Intent, nodes, data, commit; each step flushed before the next."""
        committed = self._committed_keys()
        h5file = self.file
        keys_ds, ranges_ds, intent_ds = (self._ledger(n) for n in ("keys", "ranges", "intent"))
        txn = int(keys_ds.shape[0])  # unique: a rolled-back txn leaves no key rows behind

        # 1. intent: what will be created, and every dataset's length before
        intent: list[tuple[str, int, int, bool]] = []  # node, length, length after, created
        cluster_paths: dict[str, str] = {}
        for work in stations.values():
            assert work.batch is not None
            cluster_path = work.path.rsplit("/", 1)[0]
            if cluster_path not in h5file and cluster_path not in cluster_paths:
                cluster_paths[cluster_path] = work.cluster
                intent.append((cluster_path, 0, 0, True))
            station_group = h5file.get(work.path)
            if station_group is None:
                intent.append((work.path, 0, 0, True))
                continue  # removing the group on rollback removes what it holds
            adding = {name: len(rows) for name, rows in work.tables.items()}
            adding[BLOBS_NODE] = len(work.batch.blobs)
            for table, count in adding.items():
                node = station_group.get(table)
                if node is None:
                    intent.append((f"{work.path}/{table}", 0, count, True))
                else:
                    length = int(node.shape[0])
                    intent.append((node.name, length, length + count, False))
        key_count = len(todo)
        range_count = sum(len(work.parts) for work in stations.values()) * (len(TABLES) + 1)
        intent.append((keys_ds.name, int(keys_ds.shape[0]), int(keys_ds.shape[0]) + key_count,
                       False))
        intent.append((ranges_ds.name, int(ranges_ds.shape[0]),
                       int(ranges_ds.shape[0]) + range_count, False))  # (at most)
        intent_rows = np.zeros(len(intent), dtype=INTENT_DTYPE)
        for index, (node, length, after, created) in enumerate(intent):
            intent_rows[index] = (txn, node.encode(), length, after, created)
        self._truncate(intent_ds, 0)
        _append_rows(intent_ds, intent_rows)
        _set_nrows(intent_ds, intent_ds.shape[0])
        h5file.flush()
        if stop_after == "intent":
            return report

        # 2. nodes
        for work in stations.values():
            station_group = self._station_group(work)
            for table in work.tables:
                if table not in station_group:
                    _create_event_table(station_group, TABLES[table])
            if BLOBS_NODE not in station_group:
                _create_blobs(station_group)
        if stop_after == "created":
            h5file.flush()
            return report

        # 3. data: one resize and one write per dataset
        ranges: list[tuple[int, str, int, int]] = []
        events_per_key = [0] * len(todo)
        for work in stations.values():
            assert work.batch is not None
            station_group = h5file[work.path]
            below_root = work.path.removeprefix(f"/{ROOT_GROUP}/")
            blob_start = _append_blobs(station_group[BLOBS_NODE], work.batch.blobs)
            for table, table_rows in work.tables.items():
                dataset = station_group[table]
                rows = table_rows.rows_with_blob_offset(blob_start)
                start = int(dataset.shape[0])
                rows["event_id"] = np.arange(start + 1, start + 1 + len(rows), dtype=np.uint32)
                _append_rows(dataset, rows)
                _set_nrows(dataset, dataset.shape[0])
                node = f"{below_root}/{table}"
                report.rows[node] = report.rows.get(node, 0) + len(rows)
                for key_index, count in work.per_part(table_rows.positions):
                    ranges.append((key_index, node, start, count))
                    events_per_key[key_index] += count
                    start += count
            node = f"{below_root}/{BLOBS_NODE}"
            if work.batch.blobs:
                report.blobs[node] = report.blobs.get(node, 0) + len(work.batch.blobs)
            start = blob_start
            for key_index, count in work.per_part(work.batch.blob_positions):
                ranges.append((key_index, node, start, count))
                start += count

        key_start = int(keys_ds.shape[0])
        keys = np.zeros(len(todo), dtype=KEYS_DTYPE)
        for index, part in enumerate(todo):
            keys[index] = (
                ledger_entry(part.key), part.etag.encode("utf-8")[:64], part.station,
                events_per_key[index], txn, PENDING, 0.0,
            )
        _append_rows(keys_ds, keys)
        _set_nrows(keys_ds, keys_ds.shape[0])
        range_rows = np.zeros(len(ranges), dtype=RANGES_DTYPE)
        for index, (key_index, node, start, count) in enumerate(ranges):
            range_rows[index] = (txn, key_start + key_index, node.encode(), start, count)
        _append_rows(ranges_ds, range_rows)
        _set_nrows(ranges_ds, ranges_ds.shape[0])
        h5file.flush()
        if stop_after == "data":
            return report

        # 4. commit: emptying the intent is the commit; the state column follows it
        keys["state"] = COMMITTED
        keys["written_at"] = time.time()
        _write_rows_at(keys_ds, key_start, keys)
        self._truncate(intent_ds, 0)
        h5file.flush()

        committed.update(keys["key"].tolist())
        report.written = [part.key for part in todo]
        report.events = {part.key: events_per_key[i] for i, part in enumerate(todo)}
        return report

    @staticmethod
    def _gather(todo: Sequence[BatchPart]) -> dict[str, _StationWork]:
        """Per station: its parts' events in order, built into rows in one call."""
        stations: dict[str, _StationWork] = {}
        for index, part in enumerate(todo):
            work = _StationWork(part.cluster, part.station)
            work = stations.setdefault(work.path, work)
            work.parts.append(index)
            work.starts.append(len(work.events))
            work.keys.append(part.key)
            work.events.extend(part.events)
        for work in stations.values():
            try:
                work.batch = build_table_rows(work.events, context=work.origin)
            except Exception as exc:
                raise RowsError(f"station {work.station}: {type(exc).__name__}: {exc}") from exc
        return stations

    def _station_group(self, work: _StationWork) -> h5py.Group:
        h5file = self.file
        root = h5file[ROOT_GROUP]
        name = cluster_node(work.cluster)
        cluster = root.get(name)
        if cluster is None:
            cluster = root.create_group(name)
            _group_attrs(cluster, cluster_title(work.cluster))
        station = cluster.get(station_node(work.station))
        if station is None:
            station = cluster.create_group(station_node(work.station))
            _group_attrs(station, station_title(work.station))
        return station


def _table_complete(node: object, dtype: np.dtype) -> bool:
    """Whether a table got all its attributes (the last one written is the last fill)."""
    return isinstance(node, h5py.Dataset) and f"FIELD_{len(dtype.names or ()) - 1}_FILL" in (
        node.attrs
    )


#: How a key too long for the ledger's column is recorded instead.
LONG_KEY_PREFIX = b"sha256:"


def ledger_entry(key: str) -> bytes:
    """The ledger's record of a bucket key: the key itself, or a digest of a long one.

    S3 keys may be up to 1024 bytes, the ledger's column holds 256: a longer key is
    recorded as ``sha256:<hex>`` of its UTF-8 bytes (71 bytes, and no key the upload
    writes starts with ``sha256:``), so it is still written exactly once.
    """
    data = key.encode("utf-8")
    if len(data) > KEY_BYTES:
        return LONG_KEY_PREFIX + hashlib.sha256(data).hexdigest().encode()
    return data




__all__ = [
    "AppendReport",
    "BatchPart",
    "DayFile",
    "DayFileBusy",
    "DayFileError",
    "DayFileIOError",
    "DayFileLocked",
    "RowsError",
    "day_file_path",
    "held_open",
    "is_volume_failure",
    "ledger_entry",
    "probe_volume",
]

