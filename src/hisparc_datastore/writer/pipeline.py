"""The writer: objects under ``incoming/`` into the daily HDF5 files, then to ``archive/``.

Every path into HDF5 goes through :func:`process_keys` (a notification's keys) or
:func:`sweep` (everything still under ``incoming/``).  Both work in chunks of objects:
fetch the chunk concurrently, decode each object, group the events of *all* objects in
the chunk by UTC day, open each day file once and append every object's part in one
transaction, and only then move the objects whose every day is written to ``archive/``.
Thousands of one-event objects therefore cost one file open per day, not one per object.

Why this order is crash-safe: an object leaves ``incoming/`` only after its rows are in
every day file it touches *and* its archive copy exists.  A crash anywhere before that
leaves it in ``incoming/``; the next notification or sweep appends it again, and the day
file's ingest ledger (keyed by object key) turns that second append into a no-op.

Outcomes per object (one of), and what the HTTP layer answers for them:
- archived: rows written (or already in the ledger, or every event skipped by the event
  rules) and the object moved to ``archive/<YYYY>/<MM>/<DD>/...`` by its receive date;
- already done: the object is no longer in ``incoming/`` (a duplicate notification, or
  another writer was faster);
- refused: the S3 server refuses the key itself (a NUL byte, say) and no listing shows
  it: nothing is stored under it, so there is nothing to write;
- quarantined: the bytes cannot be decoded (:class:`~.payload.PayloadError`), the rows of
  just this object cannot be built, or its retries ran out; the object moves to
  ``failed/...`` with a short ASCII ``failure-reason`` in its metadata;
- deferred: a problem of this object or of one of its day files, not of the writer: a day
  file held open by a reader (written when the reader closes it), a day file that cannot
  be written (a retry record per day), an object without a cluster or that cannot be
  archived (a retry record per object).  The object stays in ``incoming/``; the backlog
  of the serving process and every sweep retry it with back-off (:mod:`.retries`), and
  after ``Backoff.attempts`` failures it is quarantined with the record's reason;
- failed: an outage of the whole writer (the bucket unreachable, the volume full,
  read-only or gone, out of memory), which retrying in a moment may cure.  Nothing is
  lost: the object stays in ``incoming/`` and the HTTP layer answers 5xx, so the sender
  retries; the sweep picks it up anyway.

Only *failed* makes a notification's answer 5xx: one bad object or one bad day file never
stalls the notification queue behind it (MinIO delivers in order and retries the head for
ever).  To tell a broken day file from a broken volume, a failed append is followed by
:func:`~hisparc_datastore.storage.dayfile.probe_volume`; to tell a refused key from a
refusing bucket, by a HEAD that must answer.

Station and cluster come from the object's metadata (the upload function sets both; the
cluster percent-encoded).  When they are missing, the station number comes from the key
(``incoming/<station>/<md5>.pickle``) and the cluster from the station list.  When no
cluster can be found the object is *failed*, not quarantined: it is a configuration gap
(a station list not yet updated), so the object waits in ``incoming/`` for the fix.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from hisparc_datastore.format.keys import INCOMING, archive_key, failed_key
from hisparc_datastore.format.origin import (
    BadOrigin,
    ClusterLookup,
    NoCluster,
    ObjectPlan,
    plan_object,
    received_time,
)
from hisparc_datastore.format.payload import PayloadError
from hisparc_datastore.format.rows import RowsError, SkipReport
from hisparc_datastore.stations import cluster_lookup
from hisparc_datastore.storage.dayfile import (
    AppendReport,
    DayFile,
    DayFileBusy,
    day_file_path,
    is_volume_failure,
    probe_volume,
)
from hisparc_datastore.storage.store import (
    S3_THREADS,
    BucketError,
    ObjectInfo,
    ObjectMissing,
    ObjectRefused,
    Store,
    StoredObject,
)
from hisparc_datastore.writer.retries import (
    DEFAULT_BACKOFF,
    Backoff,
    RetryBook,
    RetryRecord,
    RetrySettings,
    day_name,
)


class WriterSettings(RetrySettings, Protocol):
    """What the writer's core reads of the settings, and all it may: where the day files
    are, the year rule, the station list and the retry policy.  The whole
    :class:`~hisparc_datastore.config.Settings` (secrets included) stays at the edges,
    which pass it as this."""

    @property
    def data_dir(self) -> Path: ...
    @property
    def minimum_year(self) -> int: ...
    @property
    def station_list(self) -> Path: ...


log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors worth retrying at once: the bucket, the volume.
TRANSIENT: tuple[type[BaseException], ...] = (BucketError, OSError, TimeoutError)
#: ... except these, which a moment's wait cannot change.
FINAL: tuple[type[BaseException], ...] = (ObjectMissing, ObjectRefused, DayFileBusy)

#: A chunk holds at most this many objects, or this many body bytes (a single larger
#: object forms a chunk of its own).  Bounds memory; large enough to amortise file opens.
CHUNK_OBJECTS = 1000
CHUNK_BYTES = 8 * 1024 * 1024
#: Seconds to wait for another writer (a sweep thread, another revision) to release a day
#: file before the objects are deferred.  Short: a notification must be answered well
#: within the sender's patience (MinIO's webhook client gives up after 60 s), and one
#: chunk of another writer's appends takes well under a second.
LOCK_TIMEOUT = 5.0
#: The sweep lists ``incoming/`` in windows of at least this many keys, cut at a station
#: boundary, and processes each window oldest first (see :func:`sweep`).
LIST_WINDOW = 10_000
#: Objects up to this size are archived by putting the bytes already in hand (cheapest for
#: the server); larger ones by a server-side copy, so their bytes are dropped right after
#: decoding and memory stays near one batch (decoded) per chunk.
ARCHIVE_PUT_BYTES = 256 * 1024
#: Longest ``failure-reason`` kept in the failed object's metadata.
REASON_LENGTH = 200


@dataclass(frozen=True)
class RetryPolicy:
    """Pauses between attempts; ``len(delays) + 1`` attempts in all."""

    delays: tuple[float, ...] = (0.2, 1.0, 2.0)


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class Deferral:
    """Why an object waits in ``incoming/`` and when it is worth trying again.

    ``busy`` holds the days whose files another process holds open (no retry record:
    try again when the file is free); ``next_try`` is the earliest time a retry record
    allows (unix time; None when only busy files stand in the way).
    """

    reason: str
    busy: frozenset[dt.date] = frozenset()
    next_try: float | None = None

    def merged(self, other: Deferral) -> Deferral:
        tries = [t for t in (self.next_try, other.next_try) if t is not None]
        reasons = self.reason if other.reason in self.reason else f"{self.reason}; {other.reason}"
        return Deferral(short_reason(reasons), self.busy | other.busy,
                        min(tries) if tries else None)


@dataclass
class WriteResult:
    """What happened to each object; ``ok`` decides between 2xx and 5xx."""

    archived: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    quarantined: dict[str, str] = field(default_factory=dict)
    deferred: dict[str, Deferral] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # failures not tied to one object
    rows: int = 0
    skipped_events: int = 0
    seconds: float = 0.0
    #: per archived object: seconds from its arrival in the bucket to its rows committed
    lags: list[float] = field(default_factory=list)
    #: a sweep that listed all of incoming/: (objects there, age of the oldest in seconds)
    backlog: tuple[int, float] | None = None

    @property
    def ok(self) -> bool:
        """No outage: every object ended somewhere, or waits for a reason of its own."""
        return not self.failed and not self.errors

    @property
    def objects(self) -> int:
        return (
            len(self.archived) + len(self.already_done) + len(self.quarantined)
            + len(self.deferred) + len(self.refused) + len(self.failed)
        )

    def merge(self, other: WriteResult) -> None:
        self.archived += other.archived
        self.already_done += other.already_done
        self.quarantined.update(other.quarantined)
        self.deferred.update(other.deferred)
        self.refused.update(other.refused)
        self.failed.update(other.failed)
        self.errors += other.errors
        self.rows += other.rows
        self.skipped_events += other.skipped_events
        self.seconds += other.seconds
        self.lags += other.lags
        self.backlog = other.backlog or self.backlog

    def summary(self) -> str:
        errors = "".join(f"; {error}" for error in self.errors)
        extra = "".join(
            f", {len(found)} {name}" for name, found in
            (("deferred", self.deferred), ("refused", self.refused)) if found
        )
        return (
            f"{self.objects} objects: {len(self.archived)} archived, "
            f"{len(self.already_done)} already done, {len(self.quarantined)} quarantined"
            f"{extra}, {len(self.failed)} failed; {self.rows} rows written, "
            f"{self.skipped_events} events skipped, {self.seconds:.2f} s{errors}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "archived": len(self.archived),
            "already_done": len(self.already_done),
            "quarantined": self.quarantined,
            "deferred": {key: deferral.reason for key, deferral in self.deferred.items()},
            "refused": self.refused,
            "failed": self.failed,
            "errors": self.errors,
            "rows": self.rows,
            "skipped_events": self.skipped_events,
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------


def _never() -> bool:
    return False



def short_reason(exc: BaseException | str) -> str:
    """An ASCII, single-line, bounded reason: S3 metadata travels in HTTP headers."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = text.encode("ascii", "replace").decode("ascii")
    text = "".join(c if 0x20 <= ord(c) < 0x7F else " " for c in text)
    text = " ".join(text.split())
    return text[:REASON_LENGTH] or "unknown"


def chunked(
    infos: Iterable[ObjectInfo], max_objects: int = CHUNK_OBJECTS, max_bytes: int = CHUNK_BYTES
) -> Iterator[list[ObjectInfo]]:
    """Consecutive chunks bounded by count and by body bytes."""
    chunk: list[ObjectInfo] = []
    size = 0
    for info in infos:
        if chunk and (len(chunk) >= max_objects or size + info.size > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(info)
        size += info.size
    if chunk:
        yield chunk


def station_windows(infos: Iterable[ObjectInfo], window: int = LIST_WINDOW) -> Iterator[
    list[ObjectInfo]
]:
    """Cut a key-ordered listing into windows of >= ``window`` keys at station boundaries.

    Keys are ``incoming/<station>/...``, so a listing in key order holds each station's
    objects together; cutting only between stations keeps every station's objects in one
    window, where sorting by LastModified puts them oldest first.  That is the order that
    matters: event ids are per station table.
    """
    batch: list[ObjectInfo] = []
    for info in infos:
        if len(batch) >= window and _prefix(info.key) != _prefix(batch[-1].key):
            yield batch
            batch = []
        batch.append(info)
    if batch:
        yield batch


def _prefix(key: str) -> str:
    return key.rsplit("/", 1)[0]


def oldest_first(infos: list[ObjectInfo]) -> list[ObjectInfo]:
    return sorted(infos, key=lambda info: (info.last_modified, info.key))


# --------------------------------------------------------------------------------------
# The shell: S3, files, retries
# --------------------------------------------------------------------------------------


def with_retry(action: Callable[[], T], what: str, retry: RetryPolicy,
               worth_it: Callable[[BaseException], bool] | None = None) -> T:
    """Run ``action``; on a transient error wait and try again, then re-raise.

    Missing and refused objects and busy day files are final at once (see ``FINAL``);
    ``worth_it`` narrows further which transient errors earn another attempt.
    """
    for attempt, delay in enumerate((*retry.delays, None), start=1):
        try:
            return action()
        except FINAL:
            raise
        except TRANSIENT as exc:
            if delay is None or (worth_it is not None and not worth_it(exc)):
                raise
            log.warning("%s failed (attempt %d): %s; retrying in %.1f s",
                        what, attempt, short_reason(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _glibc() -> Any:
    """glibc, or None where the C library is another (nothing to tune there)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc's, not in other C libraries
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_GLIBC = _glibc()
_TRIM: Callable[[], object] | None = (
    None if _GLIBC is None else functools.partial(_GLIBC.malloc_trim, 0)
)
#: ``mallopt``'s parameter number for the mmap threshold (``M_MMAP_THRESHOLD`` in malloc.h).
_M_MMAP_THRESHOLD = -3
#: Blocks from this size get pages of their own, unmapped when freed: glibc's starting
#: value, kept fixed (see :func:`keep_large_blocks_mapped`).
MMAP_THRESHOLD_BYTES = 128 * 1024
_mmap_threshold_fixed = False


def keep_large_blocks_mapped() -> bool:
    """Fix glibc's mmap threshold at 128 KiB for this process; whether it is fixed.

    glibc starts at 128 KiB but raises the threshold to the size of every mapped block
    that is freed (up to 32 MiB), so after the first large batch the next batches' bodies,
    S3 buffers and arrays all come from the heap, where what they free stays resident
    between live blocks and the next batch lands on top of it.  In a catch-up of ten
    1000-event batches the writer's peak grew to 4.97x one batch, against 3.58x for a single
    batch (bench/memory.py; target below 4x).  With the threshold fixed, large blocks are
    mapped and unmapped whole: 3.73x, and bench/writer.py's events/s unchanged within
    the run-to-run spread.  Setting the threshold also stops glibc from moving it.
    Idempotent; a no-op outside glibc.
    """
    global _mmap_threshold_fixed
    if not _mmap_threshold_fixed and _GLIBC is not None:
        _mmap_threshold_fixed = bool(_GLIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return _mmap_threshold_fixed


def release_free_memory() -> None:
    """Hand memory freed by a large batch back to the system (glibc's ``malloc_trim``).

    glibc keeps what a decoded batch freed in its heap, scattered between live blocks,
    and the next batch's body then arrives on top: in a catch-up of 1000-event batches
    the peak RSS grew to 4.8x one batch against 3.4x for a single one (bench/memory.py).
    Trimming after each large batch brings it back to 3.8x.  It is cheap, but chunks of
    small objects free too little to need it and skip it.
    """
    if _TRIM is not None:
        _TRIM()


def _apply(function: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    return [function(item) for item in items]


class _Pending(Generic[T]):
    """Results being computed on the S3 threads (or already computed)."""

    def __init__(self, futures: list[Future[list[T]]] | None = None,
                 values: list[T] | None = None) -> None:
        self.futures = futures or []
        self.values = values

    def results(self) -> list[T]:
        if self.values is None:
            self.values = [value for future in self.futures for value in future.result()]
        return self.values

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()


@dataclass
class _Archiving:
    """A chunk whose rows are written and whose archive copies are on their way."""

    result: WriteResult
    objects: list[_InFlight]
    outcomes: _Pending[Exception | None]  # per object: None (archived) or why not


@dataclass
class _InFlight:
    """One fetched, decoded object on its way to its day files."""

    stored: StoredObject
    plan: ObjectPlan
    pending_days: set[dt.date] = field(default_factory=set)
    copy_archive: bool = False  # archive by server-side copy (the body was dropped)
    error: str | None = None  # an outage on one of its days: answer 5xx
    poison: str | None = None  # its own rows cannot be built: quarantine
    waiting: Deferral | None = None  # a day of its waits (busy, or a retry record)
    give_up: str | None = None  # a day's retries ran out: quarantine with this reason

    def wait(self, deferral: Deferral) -> None:
        self.waiting = deferral if self.waiting is None else self.waiting.merged(deferral)


@dataclass(frozen=True)
class RunOptions:
    """How one call of :func:`process_keys` or :func:`sweep` treats failures."""

    retry: RetryPolicy = DEFAULT_RETRY  # in-call retries of transient errors
    lock_timeout: float = LOCK_TIMEOUT  # wait for another writer's day-file lock
    backoff: Backoff = DEFAULT_BACKOFF  # between deferred attempts, and when to give up
    #: False: try day files now even if their retry record says later (an operator's
    #: ``datastore failed retry`` after a fix).
    respect_schedule: bool = True
    #: Called after every step that reached the bucket or the volume: a serving process
    #: tells a long, healthy run from one stuck in I/O by it (its liveness check).
    progress: Callable[[], object] = _never


class _Run:
    """One call of process_keys or sweep: its settings, pool, retry policy and result."""

    def __init__(
        self,
        store: Store,
        settings: WriterSettings,
        options: RunOptions,
        pool: Executor | None,
        book: RetryBook,
    ) -> None:
        keep_large_blocks_mapped()
        self.store = store
        self.settings = settings
        self.options = options
        self.retry = options.retry
        self.pool = pool
        self.book = book
        self.cluster_of: ClusterLookup = cluster_lookup(settings.station_list)
        self.deletes: list[Future[None]] = []  # background DeleteObjects of archived chunks
        self.bucket_trouble = False  # a bucket error survived its retries in this run
        self.volume_trouble = False  # the data volume cannot take writes
        self._bucket_answers: bool | None = None

    def spawn(self, function: Callable[[Any], T], items: Sequence[Any]) -> _Pending[T]:
        """``function`` over ``items`` on the S3 threads, a few slices per thread.

        Slices, not one task per item: a Future costs tens of microseconds, which is a
        noticeable share of a one-event object's budget.
        """
        if self.pool is None or len(items) <= 1:
            return _Pending(values=[function(item) for item in items])
        size = -(-len(items) // (2 * S3_THREADS))
        return _Pending(futures=[
            self.pool.submit(_apply, function, items[start:start + size])
            for start in range(0, len(items), size)
        ])

    @property
    def trouble(self) -> bool:
        """An outage: the run stops taking new chunks (everything would fail alike)."""
        return self.bucket_trouble or self.volume_trouble

    def bucket_answers(self) -> bool:
        """Whether the bucket works for a key it surely does not refuse (asked once a run).

        A 4xx about one key may still be the bucket's (wrong region or credentials answer
        4xx for every key): only when this HEAD answers is a refusal the key's own.
        """
        if self._bucket_answers is None:
            try:
                self.store.head(f"{INCOMING}.probe")
                self._bucket_answers = True
            except BucketError as exc:
                log.error("the bucket does not answer: %s", short_reason(exc))
                self._bucket_answers = False
                self.bucket_trouble = True
        return self._bucket_answers

    # -- fetching ----------------------------------------------------------------------

    def fetch(self, key: str) -> StoredObject | ObjectMissing | Exception:
        try:
            stored = with_retry(lambda: self.store.get(key), f"get {key}", self.retry)
            self.options.progress()
            return stored
        except (ObjectMissing, ObjectRefused) as exc:
            return exc
        except TRANSIENT as exc:
            self.bucket_trouble = True
            return exc

    def size(self, key: str) -> ObjectInfo | ObjectMissing | Exception:
        """HEAD: the object's size (and whether it is still there)."""
        try:
            info = with_retry(lambda: self.store.head(key), f"head {key}", self.retry)
        except ObjectRefused as exc:
            return exc
        except TRANSIENT as exc:
            self.bucket_trouble = True
            return exc
        return ObjectMissing(key) if info is None else info

    def listed(self, key: str) -> bool:
        """Whether a listing shows ``key`` (for a key whose GET the server refuses)."""
        try:
            return any(info.key == key for info in self.store.list(key))
        except ObjectRefused:
            return False
        except BucketError:
            return True  # cannot tell: treat it as there, so it is never dropped

    # -- one chunk ---------------------------------------------------------------------

    def process(self, keys: Sequence[str], fetched: list[Any]) -> WriteResult:
        """All stages of one chunk, in order."""
        started = time.perf_counter()
        large = any(
            isinstance(item, StoredObject) and len(item.body) > ARCHIVE_PUT_BYTES
            for item in fetched
        )
        result = self.finish(self.write(keys, fetched))
        if large:
            release_free_memory()
        result.seconds = time.perf_counter() - started
        return result

    def write(self, keys: Sequence[str], fetched: list[Any]) -> _Archiving:
        """Decode and append a fetched chunk, then start archiving what was written.

        The archive copies are put in the background; :meth:`finish` waits for them, so
        the sweep can write the next chunk meanwhile.
        """
        result = WriteResult()
        objects = self._decode(keys, fetched, result)
        self._write(objects, result)
        done: list[_InFlight] = []
        for item in objects:
            key = item.stored.key
            if item.poison is not None:
                self._quarantine(item.stored, item.poison, result)
            elif item.error is not None:
                result.failed[key] = item.error
            elif item.give_up is not None:
                self._quarantine(item.stored, item.give_up, result)
            elif item.waiting is not None:
                result.deferred[key] = item.waiting
            elif item.pending_days:
                result.failed[key] = "not every day file was written"
            else:
                done.append(item)
        return _Archiving(result, done, self.spawn(self._copy_to_archive, done))

    def finish(self, archiving: _Archiving) -> WriteResult:
        """Wait for the archive copies, then drop the archived objects from incoming/."""
        result = archiving.result
        outcomes = archiving.outcomes.results()
        self.options.progress()
        archived: list[str] = []
        for item, error in zip(archiving.objects, outcomes, strict=True):
            key = item.stored.key
            if error is None:
                archived.append(key)
                self.book.cleared("object", key)
                stored = item.stored
                arrived = received_time(stored.metadata, stored.last_modified)
                result.lags.append(max(time.time() - arrived.timestamp(), 0.0))
            elif isinstance(error, ObjectRefused) and self.bucket_answers():
                self._object_trouble(item.stored, f"cannot archive: {short_reason(error)}",
                                     result)
            else:
                self.bucket_trouble = True
                result.failed[key] = short_reason(error)
        if len(archived) > 1 and self.pool is not None:
            self.deletes.append(self.pool.submit(self._delete_incoming, archived))
        elif archived:
            self._delete_incoming(archived)
        result.archived += archived
        return result

    def drain(self) -> None:
        """Wait for the background deletions from incoming/."""
        for future in self.deletes:
            future.result()
        self.deletes.clear()

    def _decode(
        self, keys: Sequence[str], fetched: list[Any], result: WriteResult
    ) -> list[_InFlight]:
        """Plan each fetched object (:func:`~hisparc_datastore.format.origin.plan_object`);
        quarantine what cannot be read.

        Besides :class:`PayloadError`, any other exception from decoding or splitting is
        a quarantine too (logged with its traceback): one object that trips a bug must
        not stop every later sweep at the same place.  Except ``MemoryError``: that is
        the writer's outage (the upload treats it so too), and a good batch must not need
        a ``datastore failed retry`` because the writer was short of memory once.
        """
        objects: list[_InFlight] = []
        for index, key in enumerate(keys):
            # Take each object out of the list, so a large body can be freed once it is
            # decoded (see ARCHIVE_PUT_BYTES) instead of living until the chunk is done.
            item, fetched[index] = fetched[index], None
            if isinstance(item, ObjectMissing):
                log.debug("%s is no longer in incoming/: already processed", key)
                result.already_done.append(key)
                continue
            if isinstance(item, ObjectRefused):
                self._refused(key, item, result)
                continue
            if isinstance(item, Exception):
                result.failed[key] = short_reason(item)
                continue
            stored: StoredObject = item
            try:
                plan = plan_object(key, stored.body, stored.metadata, stored.etag,
                                   minimum_year=self.settings.minimum_year,
                                   cluster_of=self.cluster_of)
            except PayloadError as exc:
                self._quarantine(stored, f"undecodable: {exc}", result)
                continue
            except MemoryError:
                # The decoder's memory is bounded by the object's size (payload.py), so
                # this is the writer's own shortage: the object stays for a later try.
                log.error("%s: out of memory while decoding; left in incoming/", key)
                result.failed[key] = "out of memory while decoding"
                continue
            except BadOrigin as exc:
                self._quarantine(stored, f"bad metadata: {short_reason(str(exc))}", result)
                continue
            except NoCluster as exc:
                # A configuration gap (the station list not yet updated): wait for the fix.
                self._object_trouble(stored, short_reason(str(exc)), result)
                continue
            except Exception as exc:
                log.exception("%s: decoding failed unexpectedly", key)
                self._quarantine(stored, f"decoder error: {short_reason(exc)}", result)
                continue
            if plan.skipped.total:
                result.skipped_events += plan.skipped.total
                log.info("%s: %d of %d events skipped (%s)", key, plan.skipped.total,
                         plan.events, _counts(plan.skipped))
            copy_archive = len(stored.body) > ARCHIVE_PUT_BYTES
            if copy_archive:
                stored = item = dataclasses.replace(stored, body=b"")
            objects.append(_InFlight(stored, plan, set(plan.parts), copy_archive))
        return objects

    def _refused(self, key: str, exc: ObjectRefused, result: WriteResult) -> None:
        """The server refuses to GET ``key``: nothing is there, or it cannot be read."""
        if not self.bucket_answers():
            result.failed[key] = short_reason(exc)
        elif not self.listed(key):
            log.warning("%s: the S3 server refuses this key and lists no such object; "
                        "nothing to write (%s)", key, short_reason(exc))
            result.refused[key] = short_reason(exc)
        else:
            info = ObjectInfo(key, "", 0, dt.datetime.now(dt.UTC))
            stored = StoredObject(key, b"", "", {}, info.last_modified)
            self._object_trouble(stored, f"cannot be read: {short_reason(exc)}", result)

    def _write(self, objects: list[_InFlight], result: WriteResult) -> None:
        by_day: dict[dt.date, list[_InFlight]] = {}
        for item in objects:
            for day in item.plan.parts:
                by_day.setdefault(day, []).append(item)
        for day in sorted(by_day):
            self._write_day(day, by_day[day], result)
        for item in objects:
            item.plan.parts = {}  # the events are in the files (or will be retried)

    def _append(self, day: dt.date, objects: list[_InFlight]) -> AppendReport:
        path = day_file_path(self.settings.data_dir, day)
        parts = [item.plan.parts[day] for item in objects]

        def append() -> AppendReport:
            with DayFile(path, lock_timeout=self.options.lock_timeout) as day_file:
                return day_file.write(parts)

        # Only a failing volume is worth an immediate second try; a broken file is not.
        return with_retry(append, f"append {len(parts)} objects to {path}", self.retry,
                          worth_it=is_volume_failure)

    def _write_day(self, day: dt.date, objects: list[_InFlight], result: WriteResult) -> None:
        live = [item for item in objects
                if item.error is None and item.poison is None and item.give_up is None]
        if not live:
            return
        if not self.volume_trouble and not self.settings.data_dir.is_dir():
            # Never created here: an unmounted volume would be written into the container.
            log.error("data_dir %s is not a directory: is the volume mounted?",
                      self.settings.data_dir)
            self.volume_trouble = True
        if self.volume_trouble:
            for item in live:
                item.error = "the data volume cannot take writes"
            return
        path = day_file_path(self.settings.data_dir, day)
        record = self.book.day(day)
        if record is not None and self.options.respect_schedule and not record.due():
            for item in live:  # its file failed recently: do not touch it before next_try
                item.wait(Deferral(f"day file {path.name}: {record.reason}",
                                   next_try=record.next_try))
            return
        try:
            report = self._append(day, live)
        except DayFileBusy as exc:
            log.info("day %s: %s; %d objects wait for it", day, exc, len(live))
            for item in live:
                item.wait(Deferral(short_reason(exc), busy=frozenset({day})))
            return
        except RowsError as exc:
            if len(live) == 1:
                log.error("%s: its rows for %s cannot be built: %s", live[0].stored.key, day,
                          exc.__cause__ or exc)
                live[0].poison = f"write failed: {short_reason(exc.__cause__ or exc)}"
                return
            # Something in one object's rows cannot be built: find it, keep the rest.
            log.warning("day %s: rows of %d objects cannot be built (%s); one by one",
                        day, len(live), short_reason(exc))
            for item in live:
                self._write_day(day, [item], result)
            return
        except Exception as exc:
            self._day_trouble(day, path, live, exc)
            return
        self.options.progress()
        if record is not None:
            self.book.cleared("day", day_name(day))
        result.rows += sum(report.rows.values())
        if report.skipped_events.total:
            result.skipped_events += report.skipped_events.total
            log.info("day %s: %d events skipped while building rows (%s)", day,
                     report.skipped_events.total, _counts(report.skipped_events))
        for item in live:
            item.pending_days.discard(day)

    def _day_trouble(self, day: dt.date, path: Path, live: list[_InFlight],
                     exc: BaseException) -> None:
        """An append failed: the volume's outage, or this day file's own problem."""
        reason = short_reason(exc)
        problem = reason if is_volume_failure(exc) else probe_volume(self.settings.data_dir)
        if problem is not None:
            self.volume_trouble = True
            log.error("day %s: %s; %d objects stay in incoming/ (outage)", day, problem,
                      len(live))
            for item in live:
                item.error = short_reason(problem)
            return
        log.error("day %s: the day file cannot be written: %s", day, reason)
        try:
            record = self.book.failed("day", day_name(day), f"{path.name}: {reason}")
        except BucketError as bucket_error:
            self.bucket_trouble = True
            for item in live:
                item.error = f"cannot record the retry: {short_reason(bucket_error)}"
            return
        if record.exhausted(self.options.backoff):
            for item in live:
                item.give_up = short_reason(
                    f"day file unusable after {record.attempts} attempts: {record.reason}"
                )
            return
        log.warning("day %s: %d objects wait, %s", day, len(live),
                    record.describe(self.options.backoff))
        for item in live:
            item.wait(Deferral(f"day file {record.reason}", next_try=record.next_try))

    def _object_trouble(self, stored: StoredObject, reason: str, result: WriteResult,
                        can_quarantine: bool = True) -> None:
        """A problem of this object alone: count the attempt; wait, or give up.

        ``can_quarantine`` is False when moving it to failed/ is what failed: it then
        waits at the longest back-off, visible in its record, for an operator.
        """
        key = stored.key
        try:
            record: RetryRecord = self.book.failed("object", key, reason)
        except BucketError as exc:
            self.bucket_trouble = True
            result.failed[key] = f"{reason}; cannot record the retry: {short_reason(exc)}"
            return
        if record.exhausted(self.options.backoff) and can_quarantine:
            self._quarantine(stored, f"after {record.attempts} attempts: {reason}", result)
            if stored.key in result.quarantined:
                self.book.cleared("object", key)
            return
        log.warning("%s: waits in incoming/, %s", key, record.describe(self.options.backoff))
        result.deferred[key] = Deferral(reason, next_try=record.next_try)

    def _copy_to_archive(self, item: _InFlight) -> Exception | None:
        """Put the archive copy (the bytes we hold, verified by Content-MD5)."""
        stored = item.stored
        target = archive_key(stored.key, received_time(stored.metadata, stored.last_modified))
        try:
            if item.copy_archive:
                with_retry(lambda: self.store.copy(stored.key, target),
                           f"archive {stored.key}", self.retry)
            else:
                with_retry(lambda: self.store.put(target, stored.body, stored.metadata),
                           f"archive {stored.key}", self.retry)
        except ObjectMissing:
            log.debug("%s: gone from incoming/, archived by another writer", stored.key)
        except TRANSIENT as exc:
            return exc
        return None

    def _delete_incoming(self, keys: list[str]) -> None:
        """Remove archived objects from incoming/; a leftover is harmless (ledger)."""
        if len(keys) == 1:
            try:
                with_retry(lambda: self.store.delete(keys[0]), f"delete {keys[0]}", self.retry)
            except TRANSIENT as exc:
                log.warning("%s archived but not deleted from incoming/ (%s); the next "
                            "sweep finishes it", keys[0], short_reason(exc))
            return
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            try:
                leftovers = with_retry(
                    lambda batch=batch: self.store.delete_many(batch),
                    f"delete {len(batch)} objects",
                    self.retry,
                )
            except TRANSIENT as exc:
                leftovers = batch
                log.warning("%d objects archived but not deleted from incoming/ (%s)",
                            len(batch), short_reason(exc))
            for key in leftovers:
                log.warning("%s archived but still in incoming/; the next sweep finishes it",
                            key)

    def _quarantine(self, stored: StoredObject, reason: str, result: WriteResult) -> None:
        reason = short_reason(reason)
        metadata = {**stored.metadata, "failure-reason": reason,
                    "failed-at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        target = failed_key(stored.key)
        try:
            with_retry(lambda: self.store.move(stored.key, target, metadata),
                       f"quarantine {stored.key}", self.retry)
        except ObjectMissing:
            result.already_done.append(stored.key)  # another writer quarantined it
            return
        except ObjectRefused as exc:
            if self.bucket_answers():  # the key cannot even be moved: it waits, visibly
                self._object_trouble(
                    stored, f"{reason}; cannot be moved to failed/: {short_reason(exc)}",
                    result, can_quarantine=False)
                return
            result.failed[stored.key] = f"cannot move to failed/: {short_reason(exc)}"
            return
        except TRANSIENT as exc:
            self.bucket_trouble = True
            result.failed[stored.key] = f"cannot move to failed/: {short_reason(exc)}"
            return
        log.warning("%s quarantined as %s: %s", stored.key, target, reason)
        result.quarantined[stored.key] = reason
        self.book.cleared("object", stored.key)


def _counts(report: SkipReport) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(report.counts.items()))


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def _unique_incoming(keys: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for key in keys:
        if key.startswith(INCOMING):
            seen.setdefault(key, None)
    return list(seen)


def _pipeline(
    run: _Run, chunks: Iterable[list[ObjectInfo]], should_stop: Callable[[], bool]
) -> WriteResult:
    """Process ``chunks`` in order; returns early on ``should_stop()`` or an outage.

    Chunks of small objects run as a three-stage pipeline: while chunk n is decoded and
    written, chunk n+1 is fetched and chunk n-1's archive copies are put, all by the S3
    threads.  A chunk holding a large object (a full batch) runs on its own, with nothing
    else in flight, so memory stays near one decoded batch.
    """
    result = WriteResult()
    fetched: tuple[list[str], _Pending[Any]] | None = None
    archiving: _Archiving | None = None

    def advance(next_fetch: tuple[list[str], _Pending[Any]] | None) -> None:
        """Write what was fetched, finish the chunk before it, queue ``next_fetch``."""
        nonlocal fetched, archiving
        written = run.write(fetched[0], fetched[1].results()) if fetched else None
        if archiving is not None:
            result.merge(run.finish(archiving))
        archiving, fetched = written, next_fetch

    def stopping() -> bool:
        return should_stop() or run.trouble

    try:
        for chunk in chunks:
            keys = [info.key for info in chunk]
            if max(info.size for info in chunk) > ARCHIVE_PUT_BYTES:
                advance(None)
                advance(None)  # the pipeline is empty now
                result.merge(run.process(keys, run.spawn(run.fetch, keys).results()))
            else:
                arriving = run.spawn(run.fetch, keys)
                if fetched is None:
                    fetched = (keys, arriving)
                    continue
                advance((keys, arriving))
            if stopping():
                if fetched is not None:
                    fetched[1].cancel()
                    fetched = None
                break
    except TRANSIENT as exc:  # listing failed; what was fetched is still written below
        result.errors.append(f"listing incoming/: {short_reason(exc)}")
        run.bucket_trouble = True
    advance(None)
    advance(None)
    run.drain()
    return result


def _book(store: Store, book: RetryBook | None, options: RunOptions) -> RetryBook:
    """The caller's book (a serving process keeps one), or a fresh one read now."""
    if book is None:
        book = RetryBook(store, options.backoff)
    if not book.loaded:
        with_retry(book.load, "read the retry records", options.retry)
    return book


def process_keys(
    keys: Iterable[str],
    bucket: Store,
    settings: WriterSettings,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    lock_timeout: float = LOCK_TIMEOUT,
    backoff: Backoff | None = None,
    respect_schedule: bool = True,
    book: RetryBook | None = None,
    progress: Callable[[], object] = _never,
) -> WriteResult:
    """Write the notified objects (duplicates and keys outside incoming/ dropped).

    One key (every MinIO webhook call) is fetched and written directly.  Several keys
    are first sized with HEAD requests, so they can be chunked by bytes like the sweep
    does.
    ``book`` is the serving process's retry records (read from the bucket when None);
    ``backoff`` defaults to the settings' ``[Writer] retry_*``.
    """
    started = time.perf_counter()
    wanted = _unique_incoming(keys)
    if not wanted:
        return WriteResult()
    backoff = backoff or Backoff.from_settings(settings)
    options = RunOptions(retry, lock_timeout, backoff, respect_schedule, progress)
    with ThreadPoolExecutor(S3_THREADS, thread_name_prefix="writer-s3") as pool:
        store = bucket
        try:
            records = _book(store, book, options)
        except BucketError as exc:
            result = WriteResult(failed={key: short_reason(exc) for key in wanted})
            result.seconds = time.perf_counter() - started
            return result
        if len(wanted) == 1:
            run = _Run(store, settings, options, None, records)
            result = run.process(wanted, [run.fetch(wanted[0])])
            result.seconds = time.perf_counter() - started
            return result
        run = _Run(store, settings, options, pool, records)
        sized = run.spawn(run.size, wanted).results()
        result = WriteResult()
        infos: list[ObjectInfo] = []
        for key, info in zip(wanted, sized, strict=True):
            if isinstance(info, ObjectInfo):
                infos.append(info)
            elif isinstance(info, ObjectMissing):
                result.already_done.append(key)
            elif isinstance(info, ObjectRefused):
                run._refused(key, info, result)
            else:
                result.failed[key] = short_reason(info)
        result.merge(_pipeline(run, chunked(infos), _never))
    result.seconds = time.perf_counter() - started
    return result


def sweep(
    bucket: Store,
    settings: WriterSettings,
    limit: int | None = None,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    lock_timeout: float = LOCK_TIMEOUT,
    backoff: Backoff | None = None,
    respect_schedule: bool = True,
    should_stop: Callable[[], bool] = _never,
    waiting: Callable[[str], Deferral | None] | None = None,
    book: RetryBook | None = None,
    progress: Callable[[], object] = _never,
) -> WriteResult:
    """Process everything under ``incoming/``, oldest first, in bounded chunks.

    The listing is read page by page and cut into windows at station boundaries (see
    :func:`station_windows`); each window is sorted by (LastModified, key) and processed
    in chunks (see :func:`_pipeline`).  Stops early, leaving the rest for the next round,
    after ``limit`` objects, when ``should_stop()`` says so (checked between chunks), or
    when the bucket or the volume keeps failing.

    Objects that wait are passed over without a request: those whose retry record says
    later, and those ``waiting(key)`` names (the serving process's backlog, which knows
    which day files are still held open); they are reported as deferred.  The retry
    records are read afresh first (``book``, when given, is refreshed), and after a
    complete listing the records of objects no longer in ``incoming/`` are removed.
    """
    started = time.perf_counter()
    remaining = limit
    backoff = backoff or Backoff.from_settings(settings)
    options = RunOptions(retry, lock_timeout, backoff, respect_schedule, progress)
    with ThreadPoolExecutor(S3_THREADS, thread_name_prefix="writer-s3") as pool:
        store = bucket
        records = book if book is not None else RetryBook(store, backoff)
        try:
            with_retry(records.load, "read the retry records", options.retry)
        except BucketError as exc:
            result = WriteResult(errors=[f"reading retry records: {short_reason(exc)}"])
            result.seconds = time.perf_counter() - started
            return result
        run = _Run(store, settings, options, pool, records)
        passed_over: dict[str, Deferral] = {}
        unseen = {r.name for r in records.records() if r.subject == "object"}
        complete = False
        listed = 0
        oldest: dt.datetime | None = None

        def wait_reason(key: str) -> Deferral | None:
            unseen.discard(key)
            if waiting is not None and (known := waiting(key)) is not None:
                return known
            record = records.object(key)
            if record is not None and respect_schedule and not record.due():
                return Deferral(record.reason, next_try=record.next_try)
            return None

        def chunks() -> Iterator[list[ObjectInfo]]:
            nonlocal remaining, complete, listed, oldest
            for window in station_windows(store.list(INCOMING)):
                todo = []
                for info in window:
                    listed += 1
                    if oldest is None or info.last_modified < oldest:
                        oldest = info.last_modified
                    deferral = wait_reason(info.key)
                    if deferral is None:
                        todo.append(info)
                    else:
                        passed_over[info.key] = deferral
                for chunk in chunked(oldest_first(todo)):
                    if remaining is not None:
                        chunk = chunk[:remaining]
                        remaining -= len(chunk)
                    if chunk:
                        yield chunk
                    if remaining is not None and remaining <= 0:
                        return
            complete = True

        result = _pipeline(run, chunks(), should_stop)
        result.deferred = {**passed_over, **result.deferred}
        if complete:
            age = (dt.datetime.now(dt.UTC) - oldest).total_seconds() if oldest else 0.0
            result.backlog = (listed, max(age, 0.0))
        if complete and not run.trouble and unseen:
            dropped = records.drop_orphans(unseen)
            if dropped:
                log.info("sweep: removed %d retry records of objects no longer waiting",
                         dropped)
    if run.bucket_trouble:
        log.error("sweep stopped early: the bucket keeps failing")
    if run.volume_trouble:
        log.error("sweep stopped early: the data volume cannot take writes")
    result.seconds = time.perf_counter() - started
    return result
