"""What can go wrong with a day file, and whose fault it is.

The writer answers differently for each (see writer/pipeline.py): a busy file waits, a
broken file waits with a retry record, a broken volume is an outage of the whole writer.
"""

from __future__ import annotations

import errno
import re


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


def volume_failure(exc: BaseException | None) -> bool:
    """Whether an h5py error is (or follows) a failed system call."""
    return failure_errno(exc) is not None


def is_volume_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the volume is in trouble (full, read-only, gone), not one file."""
    return failure_errno(exc) in VOLUME_ERRNOS


def lock_conflict(exc: BaseException) -> bool:
    """HDF5 could not take its file lock: another process has the file open."""
    return failure_errno(exc) in (errno.EAGAIN, errno.EWOULDBLOCK) or (
        "unable to lock file" in str(exc)
    )
