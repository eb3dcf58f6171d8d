"""``datastore import-legacy DIR``: the reference datastore's queue into the bucket.

The reference's upload app pickled each accepted batch into a file of its queue folders
(``incoming/``, ``partial/`` while its writer worked on it, ``suspicious/`` for batches held
back by the minimum-year rule), as a dict ``{'station_id': int, 'cluster': str,
'event_list': [...]}``, Python 2 protocol 0 or a Python 3 pickle.  This command puts each
batch into the bucket where the upload function would have put it, so the new writer
writes it.

Decisions:

- Decoding: the queue file is network data too (the event list is what a station sent),
  so it goes through the payload module's three gates (opcode scan, restricted
  unpickler, structure check), with only the outer shape different: a dict holding the
  batch.  Nothing is ever unpickled any other way.
- The object body: the decoded event list, pickled again with protocol 4, as a Python 3
  station would send it.  Extracting the list's bytes from the outer pickle would keep
  them as sent but is not possible in general (memo references cross the boundary).  The
  new body must decode through :func:`payload.decode_batch` to the same events, and
  pickling those again must give the same bytes (checked for every file): so the rows
  are the rows of a direct upload of the batch, and the same queue file always gives the
  same body, hence the same md5 and key.
- Keys and metadata as the upload function writes them: ``incoming/<station>/<md5>.pickle``
  (``suspicious/...`` for the suspicious folder), metadata station, cluster, events and
  received = the file's modification time (when the reference accepted it).
- ``partial/``: the reference's writer was part-way through the batch.  It is imported
  into ``incoming/`` like the rest; the new writer's ledger does not know the rows the
  reference already wrote, so those events may appear twice in their day file (readers
  drop duplicate events by ``ext_timestamp``; ``config`` rows are not dropped).
  ``--skip-partial`` leaves that folder alone for an operator to judge.
- Idempotence: after an object is stored, a marker ``legacy-import/<md5>`` (a small JSON
  naming the source file) is put.  A file whose marker exists is skipped, whether its
  object still waits in ``incoming/`` or was written and archived long ago.  A crash
  between object and marker stores the object again on the next run, under the same key,
  which the writer's ledger makes harmless.
- A file that cannot be decoded is reported and left in place (the queue folders are
  never changed): exit status 1, nothing stored for it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hisparc_datastore.config import load_settings, require_s3_credentials
from hisparc_datastore.format.keys import LEGACY_IMPORT, incoming_key, suspicious_key
from hisparc_datastore.format.origin import event_day_span
from hisparc_datastore.format.payload import PayloadError, decode_batch, decode_pickle
from hisparc_datastore.logs import setup_logging
from hisparc_datastore.ops.replay import Progress
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.store import Bucket, BucketError
from hisparc_datastore.upload.protocol import metadata_for
from hisparc_datastore.writer.pipeline import short_reason

log = logging.getLogger(__name__)

MARKER_PREFIX = LEGACY_IMPORT
FOLDERS = ("incoming", "partial", "suspicious")
#: Queue files larger than this are refused (the upload's own limit is far below).
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class QueueBatch:
    """One decoded queue file, ready to store."""

    station: int
    cluster: str
    body: bytes
    md5: str
    events: int
    #: the events' first and last UTC date (the object's ``event-days`` metadata)
    event_days: tuple[dt.date, dt.date] | None = None


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)  # bucket keys stored
    already: list[str] = field(default_factory=list)  # files whose marker existed
    skipped: list[str] = field(default_factory=list)  # files left alone (--skip-partial)
    undecodable: dict[str, str] = field(default_factory=dict)  # file -> reason
    events: int = 0

    def summary(self) -> str:
        return (
            f"import-legacy: {len(self.imported)} imported ({self.events} events), "
            f"{len(self.already)} already imported, {len(self.skipped)} skipped, "
            f"{len(self.undecodable)} undecodable"
        )


def decode_queue_file(data: bytes) -> QueueBatch:
    """A reference queue file -> the object to store; PayloadError when it is not one."""
    if not data:
        raise PayloadError("empty file")
    outer = decode_pickle(data)
    if type(outer) is not dict:
        raise PayloadError(f"queue file holds a {type(outer).__name__}, not a dict")
    station = outer.get("station_id")
    cluster = outer.get("cluster")
    events = outer.get("event_list")
    if type(station) is not int or not 0 < station < 2**32:
        raise PayloadError("station_id missing or not a station number")
    if type(cluster) is bytes:
        cluster = cluster.decode("latin-1")
    if type(cluster) is not str or not cluster.strip():
        raise PayloadError("cluster missing or not text")
    if type(events) is not list or any(type(event) is not dict for event in events):
        raise PayloadError("event_list missing or not a list of events")
    body = pickle.dumps(events, protocol=4)
    # The stored body must be exactly what the writer will decode, and stable.
    if pickle.dumps(decode_batch(body), protocol=4) != body:
        raise PayloadError("event list does not survive re-encoding unchanged")
    md5 = hashlib.md5(body).hexdigest()  # noqa: S324 - the protocol's checksum
    return QueueBatch(station, cluster.strip(), body, md5, len(events),
                      event_day_span(events))


def queue_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(folder, file) for every queue file, folder by folder, in name order."""
    for folder in FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(p for p in base.rglob("*") if p.is_file()):
            if not path.name.startswith("."):
                yield folder, path


def target_key(folder: str, batch: QueueBatch) -> str:
    make = suspicious_key if folder == "suspicious" else incoming_key
    return make(batch.station, batch.md5)


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")[:512]


def import_file(bucket: Bucket, root: Path, folder: str, path: Path, report: ImportReport,
                dry_run: bool = False) -> int:
    """Import one queue file; returns its event count (0 when nothing was stored)."""
    name = str(path.relative_to(root))
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PayloadError(f"file larger than {MAX_FILE_BYTES} bytes")
        batch = decode_queue_file(path.read_bytes())
    except PayloadError as exc:
        log.error("%s: cannot import: %s", name, exc)
        report.undecodable[name] = str(exc)
        return 0
    marker = MARKER_PREFIX + batch.md5
    if bucket.head(marker) is not None:
        report.already.append(name)
        return 0
    key = target_key(folder, batch)
    if dry_run:
        report.imported.append(key)
        report.events += batch.events
        return batch.events
    received = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
    metadata = metadata_for(Station(batch.station, batch.cluster, ""), batch.events, received,
                            batch.event_days)
    metadata["legacy-source"] = _ascii(name)
    bucket.put(key, batch.body, metadata)
    record = {"source": name, "key": key, "events": batch.events,
              "received": metadata["received"],
              "imported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    bucket.put(marker, json.dumps(record).encode(), {"legacy-source": _ascii(name),
                                                      "key": key},
               content_type="application/json")
    report.imported.append(key)
    report.events += batch.events
    return batch.events


def import_legacy(bucket: Bucket, root: Path, *, skip_partial: bool = False,
                  dry_run: bool = False, progress: bool = False) -> ImportReport:
    root = Path(root)
    report = ImportReport()
    files = list(queue_files(root))
    bar = Progress(len(files), sum(p.stat().st_size for _, p in files), progress,
                   "import-legacy", unit="file")
    try:
        for folder, path in files:
            if skip_partial and folder == "partial":
                report.skipped.append(str(path.relative_to(root)))
                bar.advance(nbytes=path.stat().st_size)
                continue
            events = import_file(bucket, root, folder, path, report, dry_run)
            bar.advance(events=events, nbytes=path.stat().st_size)
    finally:
        bar.close()
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR",
                        help="the reference's queue root (holding incoming/, partial/, "
                             "suspicious/)")
    parser.add_argument("--skip-partial", action="store_true",
                        help="leave partial/ alone (its batches may be half written already)")
    parser.add_argument("--dry-run", action="store_true",
                        help="decode and report, store nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    require_s3_credentials(settings)
    setup_logging(settings)
    if not args.dir.is_dir() or not any((args.dir / f).is_dir() for f in FOLDERS):
        print(f"datastore import-legacy: {args.dir} holds none of {', '.join(FOLDERS)}",
              file=sys.stderr)
        return 2
    bucket = Bucket.from_settings(settings)
    try:
        report = import_legacy(bucket, args.dir, skip_partial=args.skip_partial,
                               dry_run=args.dry_run, progress=not args.no_progress)
    except BucketError as exc:
        print(f"datastore import-legacy: bucket error: {short_reason(exc)}; run it again, "
              "imported files are skipped", file=sys.stderr)
        return 1
    print(report.summary() + (" (dry run: nothing stored)" if args.dry_run else ""))
    for name, reason in sorted(report.undecodable.items()):
        print(f"  undecodable, left in place: {name}: {reason}")
    for name in report.skipped:
        print(f"  skipped: {name}")
    return 1 if report.undecodable else 0


__all__ = ["ImportReport", "QueueBatch", "decode_queue_file", "import_legacy"]
