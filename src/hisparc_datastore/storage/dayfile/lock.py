"""One writer per day file: a lock per path for threads, ``flock`` on ``<file>.lock`` for
processes (another writer revision during a rollout, a CLI sweep beside the function).

The lock file is separate from the day file because HDF5 takes its own ``flock`` on the
day file while it is open (readers shared, writers exclusive; see :func:`held_open`).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from hisparc_datastore.storage.dayfile.errors import DayFileLocked

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(os.path.abspath(path), threading.Lock())


class PathLock:
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
