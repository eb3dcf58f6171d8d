"""The data volume: where each day's file lives, and whether the volume takes writes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from datetime import date
from pathlib import Path


def day_file_path(data_dir: Path, day: date) -> Path:
    """``<data_dir>/<YYYY>/<M>/<YYYY>_<M>_<D>.h5``, month and day without zero padding."""
    return Path(data_dir) / str(day.year) / str(day.month) / (
        f"{day.year}_{day.month}_{day.day}.h5"
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


def make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, each 0755 (racing writers welcome)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o755)
