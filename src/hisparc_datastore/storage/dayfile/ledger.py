"""The ingest ledger: which bucket objects a day file holds, and the append in progress.

Kept outside ``/hisparc`` (readers that walk ``/hisparc`` never see it), in ``/_datastore``:

- ``keys``: one row per bucket object written into this file (key, etag, state, ...);
- ``ranges``: the rows each object added to each node (start, count);
- ``intent``: the write-ahead record of the append in progress: every node it touches
  with its length before, and the nodes it creates.

The intent alone decides whether an append finished: a file opened with a non-empty
intent had an append die half-way, and :meth:`Ledger.repair` cuts every touched dataset
back to its recorded length, removes the nodes the append created and empties the
intent; the objects are then written again by the next append, never twice.  With the
intent empty every ``keys`` row is committed (a pending ``state`` left by a kill during
the final flush is rolled forward).  Cutting a blob array back also nulls the heap
references a killed append may have left past the cut, which HDF5 would otherwise chase
(and fail on) when the next append overwrites those elements.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import h5py
import numpy as np

from hisparc_datastore.storage.dayfile.nodes import (
    clear_vlen_references,
    create_table,
    group_attrs,
    set_nrows,
    table_complete,
    write_attr,
    write_rows_at,
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

TABLES = {
    "keys": (KEYS_DTYPE, "Bucket objects ingested into this file"),
    "ranges": (RANGES_DTYPE, "Rows each ingested object added, per node"),
    "intent": (INTENT_DTYPE, "Append in progress (write-ahead intent)"),
}

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


def write_root_attrs(h5file: h5py.File) -> None:
    """The root group's attributes, as PyTables writes them."""
    write_attr(h5file, "CLASS", "GROUP")
    write_attr(h5file, "PYTABLES_FORMAT_VERSION", "2.1")
    write_attr(h5file, "TITLE", "")
    write_attr(h5file, "VERSION", "1.0")


def create_ledger(h5file: h5py.File) -> None:
    group = h5file.create_group(LEDGER_GROUP)
    group_attrs(group, LEDGER_TITLE)
    for name, (dtype, title) in TABLES.items():
        create_table(group, name, dtype, title)


def truncate(dataset: h5py.Dataset, length: int) -> None:
    dataset.resize((length,))
    set_nrows(dataset, length)


class Ledger:
    """The ledger of one open day file."""

    def __init__(self, h5file: h5py.File, path: Path) -> None:
        self.file = h5file
        self.path = path
        self._nodes: dict[str, h5py.Dataset] = {}
        self._committed: set[bytes] | None = None

    @classmethod
    def of(cls, h5file: h5py.File, path: Path) -> Ledger:
        """The file's ledger, created first for a file from elsewhere (the reference writer).

        A ledger group that exists but is incomplete can only come from a crash while it
        was being created, before any append used it: it is rebuilt.
        """
        group = h5file.get(LEDGER_GROUP)
        complete = isinstance(group, h5py.Group) and all(
            table_complete(group.get(name), dtype) for name, (dtype, _) in TABLES.items()
        )
        if not complete:
            if group is not None:
                log.warning("%s: rebuilding an incomplete ingest ledger", path)
                del h5file[LEDGER_GROUP]
            if "CLASS" not in h5file.attrs:
                write_root_attrs(h5file)
            create_ledger(h5file)
            h5file.flush()
        return cls(h5file, path)

    def table(self, name: str) -> h5py.Dataset:
        dataset = self._nodes.get(name)
        if dataset is None:
            dataset = self._nodes[name] = self.file[f"/{LEDGER_GROUP}/{name}"]
        return dataset

    @property
    def unfinished(self) -> bool:
        """Whether an append left its intent: it must be rolled back before anything else."""
        return bool(self.table("intent").shape[0])

    def repair(self) -> None:
        """Roll back an append that did not commit (see the module docstring)."""
        intent = self.table("intent")
        if intent.shape[0] == 0:
            return
        records = intent[:]
        h5file = self.file
        txns = sorted({int(txn) for txn in records["txn"]})
        log.warning("%s: rolling back unfinished append (txn %s, %d nodes)",
                    self.path, txns, len(records))
        # Created nodes go first, deepest first; a parent's removal takes its children.
        created = [r for r in records if r["created"]]
        for record in sorted(created, key=lambda r: -r["node"].count(b"/")):
            node = record["node"].decode()
            if node.startswith("/") and node in h5file:
                del h5file[node]
        for record in records:
            node = record["node"].decode()
            if record["created"] or not node.startswith("/"):
                continue  # (an empty path: an intent row whose bytes never reached disk)
            dataset = h5file.get(node)
            if not isinstance(dataset, h5py.Dataset):
                continue
            length = int(record["length"])
            if h5py.check_vlen_dtype(dataset.dtype) is not None:
                clear_vlen_references(dataset, length, int(record["length_after"]))
            if dataset.shape[0] > length:
                dataset.resize((length,))
            if "NROWS" in dataset.attrs:
                set_nrows(dataset, dataset.shape[0])
        truncate(intent, 0)
        h5file.flush()

    def committed(self) -> set[bytes]:
        """Every key in the ledger: with the intent empty, all of its rows are committed.

        The intent, not the ``state`` column, decides: a kill during the commit's flush
        can leave the intent emptied on disk but a row's state not yet updated.  Such a
        row is rolled forward here, so ``state`` ends up telling the truth too.
        """
        if self._committed is None:
            keys = self.table("keys")
            if self.unfinished:
                self.repair()
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
            write_rows_at(keys, row, record)
        self.file.flush()

    def ingested(self, key: str) -> bool:
        """Whether ``key`` is committed in this file's ledger (its rows are all here)."""
        return ledger_entry(key) in self.committed()
