"""``datastore status``: what the datastore holds and whether it is keeping up, at a glance.

Three questions an operator asks: is anything stuck (objects left under ``incoming/``
and *why they wait*: the writer's retry records and day files held open by readers; held
in ``suspicious/``, quarantined in ``failed/``), when was the last write (newest archived
object, newest day file), and what do the day files contain (rows per table, summed over
stations).  Collecting is separate from formatting so the layout is tested on fixed
figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from hisparc_datastore.config import (
    CONFIG_ENV,
    DEFAULT_STATE_DIR,
    ConfigError,
    load_settings,
    require_s3_credentials,
    stack_environment,
)
from hisparc_datastore.format.keys import DEFERRED, LEGACY_IMPORT, PREFIXES, RETRYING
from hisparc_datastore.format.schema import ROOT_GROUP, TABLE_NAMES
from hisparc_datastore.storage.dayfile import day_file_path, held_open
from hisparc_datastore.storage.store import Bucket, BucketError
from hisparc_datastore.writer.retries import Backoff, RetryBook, RetryRecord

DAY_FILE_NAME = re.compile(r"^(\d{4})_(\d{1,2})_(\d{1,2})\.h5$")
DEFAULT_DAYS = 7


@dataclass(frozen=True)
class PrefixStats:
    prefix: str
    objects: int
    bytes: int
    newest: dt.datetime | None = None
    newest_key: str | None = None


@dataclass(frozen=True)
class DayFileStats:
    day: dt.date
    path: Path
    size: int
    modified: dt.datetime
    stations: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class StatusReport:
    bucket: str
    endpoint: str
    prefixes: list[PrefixStats] | None  # None: the bucket could not be read
    bucket_error: str | None
    data_dir: Path
    days: list[DayFileStats]
    #: Why objects wait in incoming/: the writer's retry records (None: not readable) ...
    records: list[RetryRecord] | None = None
    #: ... and day files a reader holds open (their batches wait for it to close).
    held: list[DayFileStats] = field(default_factory=list)
    backoff: Backoff = field(default_factory=Backoff)


# ----------------------------------------------------------------------------- collect

#: The writer's prefixes, then its retry records, then the operators' (empty unless a
#: tool left something there).
STATUS_PREFIXES = (*PREFIXES, DEFERRED, RETRYING, LEGACY_IMPORT)


def prefix_stats(bucket: Bucket, prefix: str) -> PrefixStats:
    count = size = 0
    newest: dt.datetime | None = None
    newest_key: str | None = None
    for item in bucket.list(prefix):
        count += 1
        size += item.size
        if newest is None or item.last_modified >= newest:
            newest, newest_key = item.last_modified, item.key
    return PrefixStats(prefix, count, size, newest, newest_key)


def day_of(path: Path) -> dt.date | None:
    """The UTC day a file named ``<YYYY>_<M>_<D>.h5`` holds, or None for other files."""
    match = DAY_FILE_NAME.match(path.name)
    if not match:
        return None
    try:
        return dt.date(*(int(part) for part in match.groups()))
    except ValueError:
        return None


def find_day_files(data_dir: Path) -> list[tuple[dt.date, Path]]:
    """Every day file under ``data_dir`` that sits where the writer puts that day."""
    found = []
    for path in data_dir.glob("*/*/*.h5"):
        day = day_of(path)
        if day is not None and day_file_path(data_dir, day) == path:
            found.append((day, path))
    return sorted(found)


def count_rows(path: Path) -> tuple[int, dict[str, int]]:
    """Stations and rows per table, summed over stations, from the ``/hisparc`` tree.

    Tables are recognised by the PyTables ``CLASS`` attribute, so the blob arrays and
    the writer's ledger (outside ``/hisparc``) are not counted.
    """
    rows: dict[str, int] = {}
    stations = 0
    with h5py.File(path, "r") as handle:
        tree = handle.get(ROOT_GROUP)
        if tree is None:
            return 0, rows
        for cluster in tree.values():
            if not isinstance(cluster, h5py.Group):
                continue
            for station in cluster.values():
                if not isinstance(station, h5py.Group):
                    continue
                stations += 1
                for name, node in station.items():
                    if isinstance(node, h5py.Dataset) and _attribute(node, "CLASS") == "TABLE":
                        rows[name] = rows.get(name, 0) + int(node.shape[0])
    return stations, rows


def _attribute(node: h5py.Dataset, name: str) -> str:
    value = node.attrs.get(name)
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def day_file_stats(day: dt.date, path: Path, attempts: int = 5) -> DayFileStats:
    """One day file's figures; a file the writer holds open is retried, then reported."""
    stat = path.stat()
    modified = dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC)
    error = "unreadable"
    for attempt in range(attempts):
        try:
            stations, rows = count_rows(path)
            return DayFileStats(day, path, stat.st_size, modified, stations, rows)
        except OSError as exc:  # locked by the writer, or damaged
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if attempt + 1 < attempts:
                time.sleep(0.1 * (attempt + 1))
    return DayFileStats(day, path, stat.st_size, modified, error=error)


def collect(bucket: Bucket, data_dir: Path, backoff: Backoff | None = None) -> StatusReport:
    prefixes: list[PrefixStats] | None = None
    records: list[RetryRecord] | None = None
    bucket_error = None
    try:
        prefixes = [prefix_stats(bucket, prefix) for prefix in STATUS_PREFIXES]
        book = RetryBook(bucket)
        book.load()
        records = book.records()
    except BucketError as exc:
        bucket_error = str(exc)
    days = [day_file_stats(day, path) for day, path in find_day_files(data_dir)]
    held = [day for day in days if held_open(day.path)]
    return StatusReport(bucket.name, bucket.endpoint, prefixes, bucket_error, data_dir, days,
                        records, held, backoff or Backoff())


# ------------------------------------------------------------------------------ format


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def when(moment: dt.datetime | None, now: dt.datetime) -> str:
    """``2026-11-25 08:40:12 UTC (12 s ago)``."""
    if moment is None:
        return "-"
    moment = moment.astimezone(dt.UTC)
    seconds = max(0, int((now - moment).total_seconds()))
    if seconds < 120:
        ago = f"{seconds} s"
    elif seconds < 2 * 3600:
        ago = f"{seconds // 60} min"
    elif seconds < 2 * 86400:
        ago = f"{seconds // 3600} h"
    else:
        ago = f"{seconds // 86400} days"
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({ago} ago)"


def align(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Columns padded to their widest cell; ``right`` columns are right-aligned (numbers)."""
    right_columns = set(right)
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in right_columns else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def table_order(days: Sequence[DayFileStats]) -> list[str]:
    """Tables in the order of the event types, then any others by name."""
    present = {name for day in days for name in day.rows}
    ordered = [name for name in TABLE_NAMES if name in present]
    return ordered + sorted(present - set(ordered))


def format_report(report: StatusReport, now: dt.datetime, days: int = DEFAULT_DAYS) -> str:
    lines = [f"Bucket {report.bucket} at {report.endpoint or 'AWS'}"]
    if report.prefixes is None:
        lines.append(f"  unreachable: {report.bucket_error}")
    else:
        rows = [["prefix", "objects", "bytes", "newest"]]
        rows += [
            [p.prefix, str(p.objects), human_bytes(p.bytes), when(p.newest, now)]
            for p in report.prefixes
        ]
        lines += align(rows, right=(1, 2))
        waiting = {p.prefix: p.objects for p in report.prefixes if p.objects}
        if waiting.get("failed/"):
            lines.append("  note: failed/ holds objects the writer gave up on; see "
                         "`datastore failed list` for each one's reason")
        if waiting.get(RETRYING):
            lines.append(f"  note: {RETRYING} holds objects of an interrupted "
                         "'datastore failed retry'; run it again to finish them")

    lines += format_waiting(report, now)

    archived = None
    if report.prefixes is not None:
        archived = next((p for p in report.prefixes if p.prefix == "archive/"), None)
    newest_file = max(report.days, key=lambda day: day.modified, default=None)
    lines += ["", "Newest write"]
    lines += align([
        ["archive object", when(archived.newest if archived else None, now),
         (archived.newest_key or "") if archived else ""],
        ["day file", when(newest_file.modified if newest_file else None, now),
         _below(newest_file.path, report.data_dir) if newest_file else ""],
    ])

    lines.append("")
    total = sum(day.size for day in report.days)
    if not report.days:
        lines.append(f"Day files under {report.data_dir}: none yet")
        return "\n".join(lines) + "\n"
    shown = report.days[-days:] if days > 0 else report.days
    hidden = len(report.days) - len(shown)
    lines.append(
        f"Day files under {report.data_dir}: {len(report.days)} files, {human_bytes(total)}"
        + (f" ({hidden} older not shown)" if hidden else "")
    )
    header = ["rows per table", *(day.day.isoformat() for day in shown)]
    body = [
        [name, *(str(day.rows.get(name, 0)) if day.error is None else "?" for day in shown)]
        for name in table_order(shown)
    ]
    footer = [
        ["stations", *(str(day.stations) if day.error is None else "?" for day in shown)],
        ["file size", *(human_bytes(day.size) for day in shown)],
    ]
    columns = range(1, len(header))
    lines += align([header, *body, *footer], right=columns)
    for day in shown:
        if day.error:
            lines.append(f"  {day.day}: could not be read ({day.error})")
    return "\n".join(lines) + "\n"


def format_waiting(report: StatusReport, now: dt.datetime) -> list[str]:
    """Why objects wait in incoming/: retry records and day files held open by readers."""
    incoming = next((p.objects for p in report.prefixes or () if p.prefix == "incoming/"), 0)
    records = report.records or []
    if not (records or report.held):
        return []
    days = [r for r in records if r.subject == "day"]
    objects = [r for r in records if r.subject == "object"]
    lines = ["", f"Waiting in incoming/ ({incoming} objects): {len(report.held)} day files "
                 f"held open by readers, {len(days)} day files and {len(objects)} objects "
                 "with retry records"]
    rows = [["waits for", "why"]]
    rows += [[f"day {held.day}", f"{held.path.name} is held open by a reader: its objects "
              "are written within seconds of it closing"] for held in report.held]
    moment = now.timestamp()
    rows += [[f"day {r.name}", r.describe(report.backoff, moment)] for r in days]
    rows += [[r.name, r.describe(report.backoff, moment)] for r in objects]
    lines += align(rows)
    lines.append("  after the last attempt the objects go to failed/ (`datastore failed "
                 "list`); a fixed day file is retried at its next attempt")
    return lines


# ----------------------------------------------------------------------------- metrics

#: Where a writer pod's own metrics are (the launcher's default port).
DEFAULT_METRICS_URL = "http://127.0.0.1:9464/metrics"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus' text format: (name, labels, value) per sample; comments skipped."""
    samples = []
    for line in text.splitlines():
        found = _SAMPLE.match(line.strip())
        if found:
            name, labels, number = found.groups()
            try:
                samples.append((name, dict(_LABEL.findall(labels or "")), float(number)))
            except ValueError:
                continue
    return samples


def read_metrics(urls: Sequence[str], timeout: float = 2.0
                 ) -> list[tuple[str, dict[str, str], float]]:
    """The samples of every endpoint that answers (an unreachable one adds nothing)."""
    import urllib.request

    samples = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310
                samples += parse_metrics(answer.read().decode("utf-8", "replace"))
        except (OSError, ValueError):
            continue
    return samples


def format_counters(samples: Sequence[tuple[str, dict[str, str], float]]) -> list[str]:
    """The functions' counters since they started (the same ones Prometheus scrapes)."""
    if not samples:
        return []

    def total(name: str, label: str) -> dict[str, float]:
        found: dict[str, float] = {}
        for sample, labels, number in samples:
            if sample == name:
                key = labels.get(label, "")
                found[key] = found.get(key, 0.0) + number
        return found

    def one(name: str) -> float:
        return sum(number for sample, _, number in samples if sample == name)

    lines = ["", "Counters since the functions started (their metrics endpoints)"]
    uploads = total("datastore_uploads_total", "code")
    if uploads:
        lines.append("  uploads by answer  " + ", ".join(
            f"{code} x{int(count)}" for code, count in sorted(uploads.items())))
    objects = total("datastore_writer_objects_total", "outcome")
    if objects:
        lines.append("  writer objects     " + ", ".join(
            f"{outcome} {int(count)}" for outcome, count in sorted(objects.items())))
        lines.append(f"  rows written       {int(one('datastore_writer_rows_total'))}")
    lagged = one("datastore_writer_lag_seconds_count")
    if lagged:
        mean = one("datastore_writer_lag_seconds_sum") / lagged
        lines.append(f"  lag, bucket to HDF5  mean {mean:.2f} s over {int(lagged)} objects")
    return lines if len(lines) > 2 else []


def _below(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR,
        help="a `datastore local` stack to describe when DATASTORE_CONFIG is unset "
             "(default: %(default)s)",
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS,
        help="newest day files to show, 0 for all (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics", action="append", metavar="URL", default=None,
        help="a function's metrics endpoint to show counters from (repeatable; default: "
             "the local stack's, else the writer pod's own, " + DEFAULT_METRICS_URL + ")",
    )


def run(args: argparse.Namespace) -> int:
    environment = stack_environment(args.state_dir)
    try:
        settings = load_settings(environment)
    except ConfigError as exc:
        if environment.get(CONFIG_ENV):
            raise
        raise ConfigError(f"{exc}, or run `datastore local` (state in {args.state_dir})") from None
    require_s3_credentials(settings, environment)
    bucket = Bucket.from_settings(settings, connect_timeout=3.0, read_timeout=20.0, max_attempts=2)
    report = collect(bucket, settings.data_dir, Backoff.from_settings(settings))
    text = format_report(report, dt.datetime.now(dt.UTC), args.days)
    counters = format_counters(read_metrics(args.metrics or _metrics_urls(args.state_dir)))
    sys.stdout.write(text + ("\n".join(counters) + "\n" if counters else ""))
    return 0 if report.prefixes is not None else 1


def _metrics_urls(state_dir: Path) -> list[str]:
    """A running local stack's endpoints (``stack.json``), else the writer pod's own."""
    import json

    try:
        info = json.loads((Path(state_dir) / "stack.json").read_text(encoding="utf-8"))
        urls = [url for url in info.get("metrics", {}).values() if isinstance(url, str)]
    except (OSError, ValueError, AttributeError):
        urls = []
    return urls or [DEFAULT_METRICS_URL]
