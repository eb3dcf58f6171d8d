"""The daily HDF5 files: PyTables-native nodes written with h5py, exactly once, crash-safe.

Layout and attributes are those of the reference datastore (docs/FORMAT.md): readers
(publicdb, SAPPHiRE) open these files with PyTables.  The parts:

- ``dayfile``: :class:`DayFile`, one file opened for appending: the append transaction;
- ``ledger``: the ingest ledger in ``/_datastore`` (exactly once, and the crash repair);
- ``nodes``: groups, tables, blob arrays and attributes exactly as PyTables writes them;
- ``lock``: one writer per file (threads and processes);
- ``volume``: where each day's file lives, whether a reader holds it, whether the volume
  takes writes;
- ``errors``: what can go wrong, and whose fault it is.
"""

from hisparc_datastore.storage.dayfile.dayfile import AppendReport, DayFile
from hisparc_datastore.storage.dayfile.errors import (
    DayFileBusy,
    DayFileError,
    DayFileIOError,
    DayFileLocked,
    is_volume_failure,
)
from hisparc_datastore.storage.dayfile.ledger import LEDGER_GROUP, ledger_entry
from hisparc_datastore.storage.dayfile.volume import day_file_path, held_open, probe_volume

__all__ = [
    "LEDGER_GROUP",
    "AppendReport",
    "DayFile",
    "DayFileBusy",
    "DayFileError",
    "DayFileIOError",
    "DayFileLocked",
    "day_file_path",
    "held_open",
    "is_volume_failure",
    "ledger_entry",
    "probe_volume",
]
