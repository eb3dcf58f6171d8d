"""The serving writer process: notifications answered at once, everything slow behind them.

The writer function is one long-lived process (min-scale = max-scale = 1) that notification
senders call one request at a time.  MinIO's queue waits for each answer (and its webhook
client gives up after 60 s); whatever the writer does that is not *this* notification's
objects must not sit in front of the next one.  So this module keeps, per process:

- a :class:`Backlog` of the objects it deferred (a day file held open by a reader, a day
  file or an object with a retry record), with what each one waits for;
- one background thread that retries the backlog as soon as a wait is over (a held file is
  probed every ``tick`` seconds, so its batches are written within about a second of the
  reader closing it) and runs the sweeps that are requested (a sweep request is answered
  ``202`` at once; the sweep runs here, passing over what the backlog knows still waits);
- a :class:`Watchdog` for the liveness probe: every step of a run that reached the bucket
  or the volume ticks it, so a long healthy sweep stays alive while a run stuck in I/O for
  ``stall_seconds`` makes ``/healthz`` answer 503 and the kubelet restart the container.

The backlog is memory only: after a restart, the next sweep finds the objects again (they
never left ``incoming/``), and the retry records in the bucket keep their attempts.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hisparc_datastore import metrics
from hisparc_datastore.format.keys import FAILED
from hisparc_datastore.storage.dayfile import day_file_path, held_open
from hisparc_datastore.storage.store import Bucket, BucketError
from hisparc_datastore.writer.pipeline import (
    Deferral,
    WriteResult,
    WriterSettings,
    process_keys,
    short_reason,
    sweep,
)
from hisparc_datastore.writer.retries import Backoff, RetryBook

log = logging.getLogger(__name__)

#: A sweep stops taking new chunks after this long; what is left waits for the next one.
SWEEP_SECONDS = 240.0
#: How often the background thread looks at the backlog (and probes held day files).
TICK_SECONDS = 1.0
#: A run with no progress for this long is stuck (liveness fails).  A chunk's append or an
#: S3 request takes seconds at most, so minutes without one is not a slow disk.
STALL_SECONDS = 300.0
#: After an outage, keys of the backlog wait this long before their next try.
OUTAGE_PAUSE = 5.0


@dataclass
class _Wait:
    deferral: Deferral
    since: float  # monotonic time of the deferral


class Backlog:
    """The objects this process deferred and what each waits for (thread-safe)."""

    def __init__(self, data_dir: Path, tick: float = TICK_SECONDS) -> None:
        self.data_dir = Path(data_dir)
        self.tick = tick
        self._waits: dict[str, _Wait] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._waits)

    def update(self, result: WriteResult) -> None:
        """Take what a run did: finished objects leave, deferred ones (re)enter."""
        now = time.monotonic()
        with self._lock:
            for key in (*result.archived, *result.already_done, *result.quarantined,
                        *result.refused):
                self._waits.pop(key, None)
            for key, deferral in result.deferred.items():
                self._waits[key] = _Wait(deferral, now)
            for key, reason in result.failed.items():  # an outage: soon again
                if key in self._waits:
                    self._waits[key] = _Wait(
                        Deferral(reason, next_try=time.time() + OUTAGE_PAUSE), now)

    def _held(self, days: Iterable[dt.date], cache: dict[dt.date, bool]) -> bool:
        for day in days:
            if day not in cache:
                cache[day] = held_open(day_file_path(self.data_dir, day))
            if cache[day]:
                return True
        return False

    def _ready(self, wait: _Wait, now: float, wall: float, cache: dict[dt.date, bool]
               ) -> bool:
        deferral = wait.deferral
        if deferral.next_try is not None and wall >= deferral.next_try:
            return True
        if deferral.busy and now - wait.since >= self.tick:
            return not self._held(deferral.busy, cache)
        return False

    def due(self) -> list[str]:
        """Keys worth another try now: a held file was closed, or a record's time came."""
        now, wall, cache = time.monotonic(), time.time(), {}
        with self._lock:
            waits = list(self._waits.items())
        return [key for key, wait in waits if self._ready(wait, now, wall, cache)]

    def waiting(self, key: str) -> Deferral | None:
        """For the sweep: the reason ``key`` still waits, or None if it is worth a try."""
        with self._lock:
            wait = self._waits.get(key)
        if wait is None or self._ready(wait, time.monotonic(), time.time(), {}):
            return None
        return wait.deferral

    def reasons(self) -> dict[str, int]:
        """How many objects wait for each reason (for logs and the health document)."""
        counts: dict[str, int] = {}
        with self._lock:
            for wait in self._waits.values():
                counts[wait.deferral.reason] = counts.get(wait.deferral.reason, 0) + 1
        return counts


@dataclass
class Watchdog:
    """Is a run stuck?  Runs begin, tick on progress, and end."""

    stall_seconds: float = STALL_SECONDS
    _active: dict[int, float] = field(default_factory=dict)  # run id -> last progress
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next: int = 0

    def begin(self) -> int:
        with self._lock:
            self._next += 1
            self._active[self._next] = time.monotonic()
            return self._next

    def tick(self, run: int) -> None:
        with self._lock:
            if run in self._active:
                self._active[run] = time.monotonic()

    def end(self, run: int) -> None:
        with self._lock:
            self._active.pop(run, None)

    def stalled_for(self) -> float:
        """Seconds the most stuck active run has gone without progress (0: none)."""
        now = time.monotonic()
        with self._lock:
            return max((now - last for last in self._active.values()), default=0.0)


class WriterService:
    """Notifications, sweeps and retries of one serving process."""

    def __init__(
        self,
        settings: WriterSettings,
        bucket: Callable[[], Bucket],
        *,
        backoff: Backoff | None = None,
        sweep_seconds: float = SWEEP_SECONDS,
        tick: float = TICK_SECONDS,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.settings = settings
        self._bucket = bucket
        self.backoff = backoff or Backoff.from_settings(settings)
        self.sweep_seconds = sweep_seconds
        self.tick = tick
        self.backlog = Backlog(settings.data_dir, tick)
        self.watchdog = Watchdog(stall_seconds)
        self._book: RetryBook | None = None
        # A sweep asked for: False when none is, else its limit (None: everything).
        self._sweep_wanted: int | bool | None = False
        self._sweeping = False
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- the requests' side

    def book(self) -> RetryBook:
        """The process's retry records; read from the bucket by the first run that needs it."""
        if self._book is None:
            bucket = self._bucket()
            self._book = RetryBook(bucket, self.backoff)
        return self._book

    def notify(self, keys: list[str]) -> WriteResult:
        """Write the notified keys now; what must wait joins the backlog."""
        self._ensure_thread()
        result = self._run(lambda progress: process_keys(
            keys, self._bucket(), self.settings, backoff=self.backoff, book=self.book(),
            progress=progress))
        self._took(result)
        return result

    def _took(self, result: WriteResult) -> None:
        """A run is done: its deferred objects join the backlog, its figures the metrics."""
        self.backlog.update(result)
        for outcome, found in (("archived", result.archived),
                               ("already_done", result.already_done),
                               ("quarantined", result.quarantined),
                               ("deferred", result.deferred), ("refused", result.refused),
                               ("failed", result.failed)):
            if found:
                metrics.OBJECTS.labels(outcome).inc(len(found))
        if result.rows:
            metrics.ROWS.inc(result.rows)
        for lag in result.lags:
            metrics.LAG_SECONDS.observe(lag)
        metrics.WAITING_OBJECTS.set(len(self.backlog))

    def request_sweep(self, limit: int | None = None) -> str:
        """Ask the background thread for a sweep: ``started``, or ``running`` already."""
        self._ensure_thread()
        with self._wake:
            if self._sweeping or self._sweep_wanted is not False:
                return "running"
            self._sweep_wanted = limit
            self._wake.notify_all()
        return "started"

    def health(self) -> tuple[bool, dict[str, object]]:
        """Liveness: the background thread runs and no run is stuck in I/O."""
        stalled = self.watchdog.stalled_for()
        thread_alive = self._thread is None or self._thread.is_alive()
        healthy = thread_alive and stalled < self.watchdog.stall_seconds
        metrics.observe_volume(self.settings.data_dir)
        return healthy, {
            "healthy": healthy,
            "background_thread": "running" if thread_alive else "dead",
            "seconds_without_progress": round(stalled, 1),
            "stall_limit_seconds": self.watchdog.stall_seconds,
            "sweeping": self._sweeping,
            "backlog": len(self.backlog),
            "waiting_for": self.backlog.reasons(),
        }

    def stop(self, timeout: float = 30.0) -> None:
        """Let the current chunk finish, then end the background thread."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the background thread

    def _ensure_thread(self) -> None:
        """Start the thread in the process that serves (gunicorn forks after import)."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                if self._thread is not None:
                    log.error("the writer's background thread had died; starting a new one")
                self._thread = threading.Thread(target=self._loop, name="writer-background",
                                                daemon=True)
                self._thread.start()

    def _run(self, work: Callable[[Callable[[], None]], WriteResult]) -> WriteResult:
        run = self.watchdog.begin()
        try:
            return work(lambda: self.watchdog.tick(run))
        finally:
            self.watchdog.end(run)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                if self._sweep_wanted is False:
                    self._wake.wait(self.tick)
                limit, self._sweep_wanted = self._sweep_wanted, False
                self._sweeping = limit is not False
            try:
                if limit is not False:
                    self._sweep(limit if isinstance(limit, int) else None)
                self._retry_due()
            except Exception:  # never let the thread die: the next round tries again
                log.exception("writer background round failed")
                self._stop.wait(self.tick)
            finally:
                self._sweeping = False

    def _retry_due(self) -> None:
        due = self.backlog.due()
        if not due or self._stop.is_set():
            return
        result = self._run(lambda progress: process_keys(
            due, self._bucket(), self.settings, backoff=self.backoff, book=self.book(),
            progress=progress))
        self._took(result)
        log.log(logging.INFO if result.ok else logging.WARNING,
                "retry of %d waiting objects: %s", len(due), result.summary())

    def _sweep(self, limit: int | None) -> None:
        deadline = time.monotonic() + self.sweep_seconds
        result = self._run(lambda progress: sweep(
            self._bucket(), self.settings, limit=limit, backoff=self.backoff,
            book=self.book(), waiting=self.backlog.waiting, progress=progress,
            should_stop=lambda: self._stop.is_set() or time.monotonic() > deadline))
        self._took(result)
        if result.backlog is not None:
            metrics.BACKLOG_OBJECTS.set(result.backlog[0])
            metrics.BACKLOG_OLDEST.set(result.backlog[1])
            metrics.LAST_SWEEP.set(time.time())
            try:
                metrics.FAILED_OBJECTS.set(sum(1 for _ in self._bucket().list(FAILED)))
            except BucketError as exc:
                log.warning("cannot count failed/: %s", exc)
        metrics.observe_volume(self.settings.data_dir)
        log.log(logging.INFO if result.ok else logging.WARNING, "sweep: %s", result.summary())
        if result.deferred:
            log.info("sweep: %d objects wait: %s", len(result.deferred),
                     short_reason("; ".join(f"{n} x {why}" for why, n in
                                            self.backlog.reasons().items())))
