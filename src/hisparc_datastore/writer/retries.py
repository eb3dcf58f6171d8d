"""Retry records: why an object still waits in ``incoming/``, how often it was tried, and when
it is tried next.

The writer never answers a notification with 5xx for a problem of one object or one day
file: MinIO delivers its queue in order and retries the head for ever, so one such object
would stall every station behind it.  Instead the object stays where it is (nothing is
lost) and a *retry record* says what went wrong.  Records live in the bucket beside the
objects, so every writer process, every sweep and ``datastore status`` see the same ones:

- ``deferred/days/<YYYY-MM-DD>.json``: a day file that cannot be written (a directory
  where the file should be, a corrupt or unreadable file, a table with other columns).
  Every object with events on that day waits for it; one record, however many objects.
- ``deferred/objects/<sha256 of the key>.json``: one object that cannot be finished for a
  reason of its own (no cluster for its station, a key the server refuses to archive).
  A digest names it because the key itself may be one the server refuses.

Each failed attempt counts and pushes the next try back (:class:`Backoff`); after
``Backoff.attempts`` failed attempts the objects are quarantined in ``failed/`` with the
record's reason, from where ``datastore failed retry`` brings them back.  A day file held
open by a reader is not a failure and has no record: that wait ends when the reader
closes the file (see the writer's backlog).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Literal, Protocol

from hisparc_datastore.format.keys import DEFERRED
from hisparc_datastore.storage.store import BucketError, ObjectInfo, ObjectMissing, StoredObject

log = logging.getLogger(__name__)

Subject = Literal["day", "object"]
DAYS = f"{DEFERRED}days/"
OBJECTS = f"{DEFERRED}objects/"


class RecordStore(Protocol):
    """What the records need of the bucket."""

    def get(self, key: str) -> StoredObject: ...
    def put(self, key: str, body: bytes, metadata: dict[str, str],
            content_type: str = ...) -> str: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...


class RetrySettings(Protocol):
    """The ``[Writer] retry_*`` settings (:class:`~hisparc_datastore.config.Settings` has
    them): how long an object or day file waits between tries, and how many it gets."""

    @property
    def retry_delay(self) -> float: ...
    @property
    def retry_max_delay(self) -> float: ...
    @property
    def retry_attempts(self) -> int: ...


@dataclass(frozen=True)
class Backoff:
    """Pauses between attempts after failures: ``first`` doubling up to ``longest``.

    With the defaults, 12 failed attempts take about 1 h 15 min (10 s, 20 s, ... then
    every 10 minutes): long enough for an operator to act on the alert, short enough
    that a fix is picked up within minutes.
    """

    first: float = 10.0
    factor: float = 2.0
    longest: float = 600.0
    attempts: int = 12

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> Backoff:
        return cls(first=settings.retry_delay, longest=settings.retry_max_delay,
                   attempts=settings.retry_attempts)

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt."""
        return min(self.first * self.factor ** max(attempts - 1, 0), self.longest)


DEFAULT_BACKOFF = Backoff()


@dataclass(frozen=True)
class RetryRecord:
    """One reason to wait: a day file, or one object."""

    subject: Subject
    name: str  # the day as YYYY-MM-DD, or the incoming/ key
    attempts: int
    first_failure: float  # unix times
    last_failure: float
    next_try: float
    reason: str

    def due(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.next_try

    def exhausted(self, backoff: Backoff) -> bool:
        return self.attempts >= backoff.attempts

    @property
    def key(self) -> str:
        return record_key(self.subject, self.name)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> RetryRecord:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("subject") not in ("day", "object"):
            raise ValueError("not a retry record")
        return cls(
            subject=document["subject"],
            name=str(document["name"]),
            attempts=int(document["attempts"]),
            first_failure=float(document["first_failure"]),
            last_failure=float(document["last_failure"]),
            next_try=float(document["next_try"]),
            reason=str(document["reason"]),
        )

    def describe(self, backoff: Backoff = DEFAULT_BACKOFF, now: float | None = None) -> str:
        """One line for logs and ``datastore status``."""
        now = time.time() if now is None else now
        wait = max(self.next_try - now, 0.0)
        return (f"attempt {self.attempts} of {backoff.attempts}, next in {wait:.0f} s "
                f"(since {_utc(self.first_failure)}): {self.reason}")


def _utc(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def record_key(subject: Subject, name: str) -> str:
    if subject == "day":
        return f"{DAYS}{name}.json"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{OBJECTS}{digest}.json"


def day_name(day: dt.date) -> str:
    return day.isoformat()


class RetryBook:
    """The retry records of one bucket, as this process knows them.

    :meth:`load` reads every record (the sweep does, at its start); after that the cache
    follows what this process writes.  A failure reads the stored record first, so
    attempts add up across processes; a success deletes only records this process knows
    of, so the hot path (no record) costs no request.  A record another process wrote
    after our last load is found by the next load, and a stale one is removed there.
    """

    def __init__(self, store: RecordStore, backoff: Backoff = DEFAULT_BACKOFF) -> None:
        self.store = store
        self.backoff = backoff
        self._records: dict[str, RetryRecord] = {}
        self._lock = threading.Lock()
        self.loaded = False

    # -- reading

    def load(self) -> None:
        """Read every record in the bucket (a list and a GET per record)."""
        records: dict[str, RetryRecord] = {}
        for info in self.store.list(DEFERRED):
            record = self._read(info.key)
            if record is not None:
                records[record.key] = record
        with self._lock:
            self._records = records
            self.loaded = True

    def _read(self, key: str) -> RetryRecord | None:
        try:
            return RetryRecord.from_json(self.store.get(key).body)
        except ObjectMissing:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is not a retry record (%s): ignored", key, exc)
            return None

    def records(self) -> list[RetryRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: (r.subject, r.name))

    def day(self, day: dt.date) -> RetryRecord | None:
        with self._lock:
            return self._records.get(record_key("day", day_name(day)))

    def object(self, key: str) -> RetryRecord | None:
        with self._lock:
            return self._records.get(record_key("object", key))

    # -- writing

    def failed(self, subject: Subject, name: str, reason: str,
               now: float | None = None) -> RetryRecord:
        """Count one failed attempt; returns the updated record (already stored).

        When the record cannot be stored (the bucket is failing too), the count is kept
        here and the error is raised: the caller treats it as the outage it is.
        """
        now = time.time() if now is None else now
        key = record_key(subject, name)
        stored = self._read(key)
        with self._lock:
            known = self._records.get(key)
        previous = max((r for r in (stored, known) if r is not None),
                       key=lambda r: r.attempts, default=None)
        if previous is None:
            record = RetryRecord(subject, name, 1, now, now, now + self.backoff.delay(1), reason)
        else:
            attempts = previous.attempts + 1
            record = replace(previous, attempts=attempts, last_failure=now, reason=reason,
                             next_try=now + self.backoff.delay(attempts))
        with self._lock:
            self._records[key] = record
        self.store.put(key, record.to_json(), {}, content_type="application/json")
        return record

    def cleared(self, subject: Subject, name: str) -> None:
        """The day file or object is fine now: drop its record, if this process knows one."""
        key = record_key(subject, name)
        with self._lock:
            known = self._records.pop(key, None)
        if known is None:
            return
        try:
            self.store.delete(key)
        except BucketError as exc:
            log.warning("%s: cannot delete the retry record (%s); the next sweep does", key, exc)

    def drop_orphans(self, waiting: set[str]) -> int:
        """Delete object records whose object is no longer in incoming/ (``waiting`` is the
        complete listing).  Returns how many were deleted."""
        dropped = 0
        for record in self.records():
            if record.subject == "object" and record.name not in waiting:
                with self._lock:
                    self._records.pop(record.key, None)
                try:
                    self.store.delete(record.key)
                    dropped += 1
                except BucketError as exc:
                    log.warning("%s: cannot delete a stale retry record (%s)", record.key, exc)
        return dropped
