"""The station list: who may upload, with which password, into which cluster.

publicdb regenerates the CSV and it arrives as a mounted secret, so the file can change
under a running function.  It is re-read when its modification time, size or inode
changes; a malformed line is logged with its line number and skipped, and a file that
cannot be read at all keeps the last good list, so one bad edit never takes uploads down.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Station numbers are stored as uint32 (the ingest ledger's ``station`` column).
MAX_STATION = 2**32 - 1


@dataclass(frozen=True)
class Station:
    number: int
    cluster: str
    password: str

    def __repr__(self) -> str:  # never show the password in logs or tracebacks
        return f"Station(number={self.number}, cluster={self.cluster!r})"


def parse_station_list(text: str, source: str = "station list") -> dict[int, Station]:
    """Parse ``number,cluster,password`` lines; bad lines are logged and skipped."""
    stations: dict[int, Station] = {}
    for line_number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 3:
            log.error(
                "%s line %d: expected 3 fields (number,cluster,password), got %d; skipped",
                source, line_number, len(row),
            )
            continue
        number_text, cluster, password = (cell.strip() for cell in row)
        if not number_text.isdigit():
            log.error("%s line %d: station number %r is not a number; skipped",
                      source, line_number, number_text)
            continue
        if not cluster:
            log.error("%s line %d: empty cluster name; skipped", source, line_number)
            continue
        number = int(number_text)
        if number > MAX_STATION:
            log.error("%s line %d: station number %d is larger than %d; skipped",
                      source, line_number, number, MAX_STATION)
            continue
        if number in stations:
            log.warning("%s line %d: station %d listed again; the later line wins",
                        source, line_number, number)
        stations[number] = Station(number, cluster, password)
    return stations


class StationList:
    """The station list file, re-read whenever it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | bool | None = False  # False: never read
        self._stations: dict[int, Station] = {}
        self.refresh()

    def _stat_signature(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def refresh(self) -> None:
        """Re-read the file if it changed since the last read."""
        signature = self._stat_signature()
        if signature == self._signature:
            return
        with self._lock:
            if signature == self._signature:
                return
            self._signature = signature
            if signature is None:
                log.error("station list %s is missing; keeping %d stations",
                          self.path, len(self._stations))
                return
            try:
                text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                log.error("station list %s cannot be read (%s); keeping %d stations",
                          self.path, exc, len(self._stations))
                return
            self._stations = parse_station_list(text, str(self.path))
            log.info("station list %s: %d stations", self.path, len(self._stations))

    def get(self, number: int) -> Station | None:
        self.refresh()
        return self._stations.get(number)

    def __len__(self) -> int:
        return len(self._stations)


_lists: dict[Path, StationList] = {}
_lists_lock = threading.Lock()


def cluster_lookup(path: Path) -> Callable[[int], str | None]:
    """A station's cluster from the list at ``path``, for objects without metadata.

    The list is read on first use, not before (most objects carry their cluster), and
    shared by every lookup of the same path in this process.
    """

    def cluster_of(number: int) -> str | None:
        with _lists_lock:
            stations = _lists.get(Path(path))
            if stations is None:
                stations = _lists[Path(path)] = StationList(path)
        station = stations.get(number)
        return station.cluster if station else None

    return cluster_of
