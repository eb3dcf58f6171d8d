"""Shared parts of the reliability tests: batches with known rows, the exactly-once check,
and a writer driver that runs in its own process so it can be killed with SIGKILL.

Batches are built so every row can be traced back to its batch: each coincidence (CIC)
gets a unique ``(timestamp, nanoseconds)`` per station, each singles (SIN) row a unique
``timestamp``.  The check reads every day file with PyTables and demands that each
station table holds exactly the expected identities, once each, with ``event_id`` 1..n,
that every trace index points at the right blob, and that the ingest ledger holds every
key once with no append left in progress.

Run as a script (``python reliability_support.py sweep|keys FILE``) it is the writer
under test.  ``DATASTORE_TEST_CRASH_AT=<point>:<n>`` makes it kill itself with SIGKILL at
the n-th pass of a point; the hooks are monkeypatched here, in the test's process only,
so nothing of them exists in ``src/``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tables
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.processes import Served, serve_function
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.format.keys import incoming_key
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for

HERE = Path(__file__).resolve().parent
CLUSTERS = {501: "Amsterdam", 502: "Amsterdam", 7001: "Leiden"}
DAY0 = dt.datetime(2024, 6, 1)
TRACE_SAMPLES = 48
RECEIVED = dt.datetime(2024, 6, 4, 9, tzinfo=dt.UTC)

#: Where the driver can be told to kill itself (see ``install_crash``).
CRASH_POINTS = (
    "get",  # before an object's GET
    "intent",  # the append's intent is on disk, nothing else
    "created",  # intent and new nodes, no rows
    "rows",  # mid-append: after the n-th table (or ledger) write
    "blobs",  # mid-append: after the n-th blob array write
    "data",  # rows and pending ledger rows flushed, not committed
    "committed",  # ledger committed, archive copy not yet put
    "archived",  # archive copy put, not yet deleted from incoming/
)


# -- batches ------------------------------------------------------------------------------


def make_batch(index: int, station: int, events: int = 4, first_day: dt.datetime = DAY0
               ) -> list[dict[str, Any]]:
    """Batch ``index`` of ``station``: rows unique to it, one day file in three.

    Every fifth batch starts two seconds before midnight, so its events fall on two day
    files (a crash between those two appends is one of the cases).  Such a batch holds
    coincidences only; their nanoseconds (from the microsecond ``index``) keep them unique.
    """
    rng = random.Random(index * 100_003 + station)
    day = first_day + dt.timedelta(days=index % 3)
    batch: list[dict[str, Any]] = []
    if index % 5 == 0:
        start = day + dt.timedelta(days=1, seconds=-2, microseconds=index)
        for k in range(events):
            when = start + dt.timedelta(seconds=k)
            batch.append(samples.cic_event(when, rng, samples=TRACE_SAMPLES))
        return batch
    start = day + dt.timedelta(hours=1, seconds=10 * index, microseconds=index)
    for k in range(events - 1):
        when = start + dt.timedelta(seconds=k)
        batch.append(samples.cic_event(when, rng, samples=TRACE_SAMPLES))
    batch.append(samples.event_of_type("SIN", start.replace(microsecond=0), rng))
    return batch


def store_batch(bucket: Bucket, events: list[dict[str, Any]], station: int) -> str:
    """Put a batch the way the upload function does; returns its incoming/ key."""
    body = dumps_py2(events)
    key = incoming_key(station, hashlib.md5(body).hexdigest())  # noqa: S324
    meta = metadata_for(Station(station, CLUSTERS[station], "x"), len(events), RECEIVED)
    bucket.put(key, body, meta)
    return key


# -- the exactly-once check -----------------------------------------------------------------


def _identity(event: dict[str, Any]) -> tuple[str, int, int]:
    header = event["header"]
    when: dt.datetime = header["datetime"]
    timestamp = int(when.replace(tzinfo=dt.UTC).timestamp())
    code = header["eventtype_uploadcode"]
    return ("events" if code == "CIC" else "singles", timestamp,
            int(header["nanoseconds"]) if code == "CIC" else 0)


@dataclass
class Expected:
    """What the day files must hold: every accepted batch, each once."""

    batches: dict[str, tuple[int, list[dict[str, Any]]]] = field(default_factory=dict)

    def add(self, key: str, station: int, events: list[dict[str, Any]]) -> None:
        self.batches[key] = (station, events)

    def rows(self) -> dict[tuple[str, str], Counter]:
        """(file name, node path) -> Counter of row identities."""
        wanted: dict[tuple[str, str], Counter] = {}
        for station, events in self.batches.values():
            node = f"/hisparc/cluster_{CLUSTERS[station].lower()}/station_{station}"
            for event in events:
                table, timestamp, nanoseconds = _identity(event)
                day = dt.datetime.fromtimestamp(timestamp, dt.UTC).date()
                name = day_file_path(Path("."), day).name
                wanted.setdefault((name, f"{node}/{table}"), Counter())[
                    (timestamp, nanoseconds)
                ] += 1
        return wanted

    def traces(self) -> dict[tuple[int, int, int], list[bytes]]:
        """(station, timestamp, nanoseconds) -> the four trace blobs, as stored."""
        found = {}
        for station, events in self.batches.values():
            for event in events:
                table, timestamp, nanoseconds = _identity(event)
                if table != "events":
                    continue
                blobs = {item["data_uploadcode"]: item["data"] for item in event["datalist"]
                         if item["data_uploadcode"].startswith("TR")}
                found[(station, timestamp, nanoseconds)] = [
                    base64.b64decode(blobs[f"TR{n}"]) for n in range(1, 5)
                ]
        return found


@dataclass
class Verdict:
    rows: int = 0
    files: int = 0
    missing: int = 0
    doubled: int = 0
    unexpected: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.doubled or self.unexpected or self.problems)


def verify(data_dir: Path, expected: Expected, allow_intent: bool = False) -> Verdict:
    """Read every day file with PyTables and compare with ``expected`` (see module doc).

    ``allow_intent``: an append may be left in progress (its rollback could not be
    written, e.g. on a full disk; the next open finishes it); readers must still see
    exactly the committed rows.
    """
    verdict = Verdict()
    wanted = expected.rows()
    traces = expected.traces()
    found: dict[tuple[str, str], Counter] = {}
    ledger_keys: Counter = Counter()
    for path in sorted(data_dir.rglob("*.h5")):
        verdict.files += 1
        try:
            h5 = tables.open_file(str(path), "r")
        except Exception as exc:
            verdict.problems.append(f"{path.name} does not open in PyTables: {exc}")
            continue
        with h5:
            intent = h5.get_node("/_datastore/intent")
            if intent.nrows and not allow_intent:
                verdict.problems.append(f"{path.name}: append still in progress")
            for key in h5.get_node("/_datastore/keys").col("key").tolist():
                ledger_keys[(path.name, key)] += 1
            for table in h5.walk_nodes("/hisparc", classname="Table"):
                rows = table.read()
                verdict.rows += len(rows)
                ids = rows["event_id"].tolist()
                if ids != list(range(1, len(ids) + 1)):
                    verdict.problems.append(f"{path.name}:{table._v_pathname}: event ids "
                                            "not 1..n")
                nanoseconds = (rows["nanoseconds"].tolist() if table.name == "events"
                               else [0] * len(rows))
                found[(path.name, table._v_pathname)] = Counter(
                    zip(rows["timestamp"].tolist(), nanoseconds, strict=True)
                )
                if table.name == "events":
                    _check_traces(h5, table, rows, traces, verdict, path.name)
    for name_key, count in ledger_keys.items():
        if count > 1:
            verdict.problems.append(f"ledger holds {name_key} {count} times")
    for place in set(wanted) | set(found):
        want, have = wanted.get(place, Counter()), found.get(place, Counter())
        verdict.missing += sum((want - have).values())
        extra = have - want
        verdict.doubled += sum(n for ident, n in extra.items() if ident in want)
        verdict.unexpected += sum(n for ident, n in extra.items() if ident not in want)
    return verdict


def _check_traces(h5: tables.File, table: tables.Table, rows: Any,
                  traces: dict[tuple[int, int, int], list[bytes]], verdict: Verdict,
                  name: str) -> None:
    station = int(table._v_parent._v_name.removeprefix("station_"))
    blobs = h5.get_node(table._v_parent, "blobs").read()
    for row in rows:
        want = traces.get((station, int(row["timestamp"]), int(row["nanoseconds"])))
        if want is None:
            continue
        got = [blobs[int(index)] if 0 <= int(index) < len(blobs) else None
               for index in row["traces"]]
        if got != want:
            verdict.problems.append(f"{name}: station {station} row {row['event_id']}: "
                                    "traces point at the wrong blobs")
            return


# -- served functions -------------------------------------------------------------------


ROOT = HERE.parent


def serve(function: str, env: dict[str, str], log_path: Path) -> Served:
    """Serve ``functions/<function>/main.py`` (target ``function``) as its image does, on a
    free loopback port, in its own process group."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("DATASTORE_", "AWS_"))}
    child_env.update(env)
    # 120 s: a hang guard, not a timing assertion.
    return serve_function(ROOT / "functions" / function / "main.py", function, child_env,
                          log_path, cwd=ROOT, timeout=120)


# -- the driver ---------------------------------------------------------------------------


def driver_command(mode: str, keys_file: Path | None = None) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), mode]
    if keys_file is not None:
        command.append(str(keys_file))
    return command


def start_driver(env: dict[str, str], mode: str, keys_file: Path | None = None,
                 crash_at: str | None = None, go_file: Path | None = None
                 ) -> subprocess.Popen[str]:
    """The writer in a child process; it prints ``ready`` once it is about to work.

    With ``go_file`` it then waits for that file to exist, so several start together.
    """
    child_env = {**os.environ, **env}
    for name in ("DATASTORE_TEST_CRASH_AT", "DATASTORE_TEST_GO_FILE"):
        child_env.pop(name, None)
    if crash_at:
        child_env["DATASTORE_TEST_CRASH_AT"] = crash_at
    if go_file:
        child_env["DATASTORE_TEST_GO_FILE"] = str(go_file)
    return subprocess.Popen(
        driver_command(mode, keys_file), env=child_env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def wait_ready(process: subprocess.Popen[str]) -> bool:
    """Block until the driver says ``ready`` (False if it died first)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    return line.strip() == "ready"


def finish(process: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any] | None:
    """The driver's result document, or None when it was killed."""
    out, _ = process.communicate(timeout=timeout)
    if process.returncode != 0 and process.returncode != 1:
        return None
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_crash(spec: str) -> None:
    """Make this process SIGKILL itself at the n-th pass of a point (test process only)."""
    from hisparc_datastore.storage.dayfile import dayfile
    from hisparc_datastore.writer import pipeline as writer

    point, _, nth = spec.partition(":")
    if point not in CRASH_POINTS:
        raise SystemExit(f"unknown crash point {point!r}")
    remaining = [int(nth or 1)]

    def tick() -> bool:
        remaining[0] -= 1
        return remaining[0] == 0

    if point == "get":
        real_get = writer.ObjectStore.get

        def get(self: Any, key: str) -> Any:
            if tick():
                _die()
            return real_get(self, key)

        writer.ObjectStore.get = get  # type: ignore[method-assign]
    elif point in ("intent", "created", "data"):
        # The append dies at the step after ``point``, with what it did by then flushed.
        step = {"intent": "_create_nodes", "created": "_write_data", "data": "_commit"}[point]
        real_step = getattr(dayfile.DayFile, step)

        def dying_step(self: Any, *args: Any) -> Any:
            if tick():
                self.file.flush()
                _die()
            return real_step(self, *args)

        setattr(dayfile.DayFile, step, dying_step)
    elif point == "committed":
        real_write = dayfile.DayFile.write

        def write(self: Any, parts: Any) -> Any:
            report = real_write(self, parts)
            if tick():
                _die()
            return report

        dayfile.DayFile.write = write  # type: ignore[method-assign]
    elif point in ("rows", "blobs"):
        name = "append_rows" if point == "rows" else "append_blobs"
        real = getattr(dayfile, name)

        def wrapped(*args: Any) -> Any:
            start = real(*args)
            if tick():
                args[0].file.flush()  # what HDF5 may have written by itself by now
                _die()
            return start

        setattr(dayfile, name, wrapped)
    elif point == "archived":
        real_put, real_copy = writer.ObjectStore.put, writer.ObjectStore.copy

        def put(self: Any, key: str, body: bytes, metadata: Any) -> Any:
            etag = real_put(self, key, body, metadata)
            if key.startswith("archive/") and tick():
                _die()
            return etag

        def copy(self: Any, source: str, target: str) -> None:
            real_copy(self, source, target)
            if tick():
                _die()

        writer.ObjectStore.put = put  # type: ignore[method-assign]
        writer.ObjectStore.copy = copy  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    from hisparc_datastore.config import load_settings
    from hisparc_datastore.writer.pipeline import RetryPolicy, process_keys, sweep

    crash = os.environ.get("DATASTORE_TEST_CRASH_AT")
    if crash:
        install_crash(crash)
    settings = load_settings()
    bucket = Bucket.from_settings(settings)
    retry = RetryPolicy(delays=(0.05, 0.2))
    keys: Iterable[str] = []
    if argv[0] == "keys":
        keys = Path(argv[1]).read_text().split()
    print("ready", flush=True)
    go = os.environ.get("DATASTORE_TEST_GO_FILE")
    while go and not Path(go).exists():  # start together with the other writers
        time.sleep(0.005)
    if argv[0] == "sweep":
        result = sweep(bucket, settings, retry=retry, lock_timeout=120)
    else:
        result = process_keys(keys, bucket, settings, retry=retry, lock_timeout=120)
    print(json.dumps(result.as_dict()), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main(sys.argv[1:]))
