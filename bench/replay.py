"""Replay benchmark: ``datastore replay`` with 1 and with 2 ``--jobs`` over one archive.

An archive of ``--days`` event days is built in a SeaweedFS started for the run: per day
and station, ``--batches`` batches of ``--events`` events of realistic station traffic
(``samples.realistic_batch``: one singles message a second, coincidences with four traces
every couple of seconds, now and then another type), as Python 2 protocol-0 pickles, each
stored under ``archive/<upload day>/`` with the metadata the upload function writes
(``event-days`` included), uploaded a few minutes after its start.  Replay runs with its
default late window (7 days).  Then each replay runs in a fresh process
(so its peak memory is its own) into a fresh directory, alternating 1 and 2 jobs,
``--repeat`` times each; the figures are the medians:

- events/s, and the ratio of 2 jobs to 1 (target: at least 1.7);
- CPU seconds per 1000 events of the replay (all its processes) and of the S3 server,
  which shares this machine's two cores here but not a cluster's nodes;
- peak memory: the main process's, and the largest worker's; a pod needs the first plus
  one of the second per job.

The cluster sizing in docs/PERFORMANCE.md ("Replay on a cluster") is worked out from
these figures.  Run: ``.venv/bin/python bench/replay.py`` (``--quick`` for a smaller
archive); ``--json FILE`` writes the figures for bench/run.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2
from hisparc_datastore_dev.s3server import SeaweedS3

from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import archive_key, incoming_key
from hisparc_datastore.format.origin import event_day_span
from hisparc_datastore.ops.replay import replay
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for

FIRST_DAY = dt.date(2024, 6, 21)
CLUSTER = "Amsterdam"
FIRST_STATION = 501
TARGET_SPEEDUP = 1.7


@dataclass
class Run:
    """One replay in its own process."""

    jobs: int
    seconds: float
    events: int
    rows: int
    cpu_seconds: float  # the replay's processes: user + system
    server_cpu_seconds: float
    main_peak_mb: float
    worker_peak_mb: float

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds


def build_archive(bucket: Bucket, days: int, stations: int, batches: int, events: int,
                  seed: int = 11) -> int:
    """Put the archive; the number of events in it.

    Generating realistic traces is slow, so each station's batches are made once, for
    the first day, and the other days get copies moved by whole days (new bodies, so new
    keys); the decoding work per event is the same.
    """
    rng = random.Random(seed)
    work: list[tuple[str, bytes, dict[str, str]]] = []
    total = 0
    for number in range(FIRST_STATION, FIRST_STATION + stations):
        station = Station(number, CLUSTER, "x")
        for part in range(batches):
            # Batches spread over the day; each uploaded five minutes after its start.
            start = dt.datetime.combine(FIRST_DAY, dt.time()) + dt.timedelta(
                seconds=part * 86400 // batches + number
            )
            batch = samples.realistic_batch(events, start, rng)
            for day in range(days):
                shift = dt.timedelta(days=day)
                moved = [{**event, "header": {**event["header"],
                                              "datetime": event["header"]["datetime"] + shift}}
                         for event in batch]
                body = dumps_py2(moved)
                received = (start + shift + dt.timedelta(minutes=5)).replace(tzinfo=dt.UTC)
                key = archive_key(incoming_key(number, hashlib.md5(body).hexdigest()),  # noqa: S324
                                  received)
                work.append((key, body, metadata_for(station, len(moved), received,
                                                     event_day_span(moved))))
                total += len(moved)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: bucket.put(*item), work))
    return total


def write_station_list(path: Path, stations: int) -> Path:
    path.write_text("".join(f"{n},{CLUSTER},x\n"
                            for n in range(FIRST_STATION, FIRST_STATION + stations)))
    return path


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(options: argparse.Namespace) -> dict[str, Any]:
    """The child's side: one replay, its figures as JSON on stdout."""
    settings = Settings(
        log="", loglevel="warning", station_list=Path(options.station_list),
        data_dir=Path(options.out).parent / "live-not-used", minimum_year=2020,
        writer_sleep=1, bucket_endpoint=options.endpoint, bucket_name=options.bucket,
        bucket_region="us-east-1", max_body_bytes=1 << 25,
        aws_access_key_id=os.environ["BENCH_ACCESS_KEY"],
        aws_secret_access_key=os.environ["BENCH_SECRET_KEY"],
    )
    bucket = Bucket.from_settings(settings)
    last = FIRST_DAY + dt.timedelta(days=options.days - 1)
    watcher = Descendants()
    watcher.start()
    started = time.perf_counter()
    report = replay(bucket, settings, FIRST_DAY, last, Path(options.out),
                    include_incoming=False, jobs=options.jobs)
    seconds = time.perf_counter() - started
    watcher.stop()
    assert not report.problems, report.problems
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = [seen for pid, seen in watcher.seen.items() if seen.worker]
    return {
        "seconds": seconds, "events": report.events_in_range, "rows": report.rows,
        "cpu_seconds": own.ru_utime + own.ru_stime + sum(s.cpu for s in watcher.seen.values()),
        # Not ru_maxrss: Linux carries a parent's peak over fork and exec, and the parent
        # here held the whole archive.  VmHWM is this process image's own.
        "main_peak_mb": process_status(os.getpid())[1],
        "worker_peak_mb": max((seen.peak_mb for seen in workers), default=0.0),
    }


@dataclass
class Seen:
    cpu: float = 0.0
    peak_mb: float = 0.0
    worker: bool = False  # a replay worker (not the fork server)


class Descendants(threading.Thread):
    """CPU and peak memory of this process's descendants, from /proc every 50 ms: the
    workers are the fork server's children, so this process's rusage never counts them.
    The last 50 ms of a worker's CPU may be missed."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[int, Seen] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()

    def sample(self) -> None:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int(
                        (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        mine = {os.getpid()}
        grew = True
        while grew:
            found = {pid for pid, parent in parents.items() if parent in mine} - mine
            grew = bool(found)
            mine |= found
        for pid in mine - {os.getpid()}:
            cpu, peak = process_status(pid)
            if cpu == cpu:
                seen = self.seen.setdefault(pid, Seen())
                seen.cpu, seen.peak_mb = max(seen.cpu, cpu), max(seen.peak_mb, peak)
                seen.worker = parents.get(pid) != os.getpid()


def process_status(pid: int) -> tuple[float, float]:
    """(CPU seconds, VmHWM in MB) of one process; NaNs when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan"), float("nan")
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = next((int(line.split()[1]) / 1024 for line in status.splitlines()
                 if line.startswith("VmHWM:")), float("nan"))
    return cpu, peak


def measure(server: SeaweedS3, bucket_name: str, work: Path, days: int, stations_csv: Path,
            jobs: int, attempt: int) -> Run:
    out = work / f"out-{jobs}-{attempt}"
    assert server.process is not None
    before = process_cpu(server.process.pid)
    env = {**os.environ, "BENCH_ACCESS_KEY": server.access_key,
           "BENCH_SECRET_KEY": server.secret_key}
    done = subprocess.run(
        [sys.executable, __file__, "--run-one", "--endpoint", server.endpoint, "--bucket",
         bucket_name, "--station-list", str(stations_csv), "--out", str(out), "--days",
         str(days), "--jobs", str(jobs)],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"replay with {jobs} jobs failed:\n{done.stderr}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return Run(jobs=jobs, server_cpu_seconds=process_cpu(server.process.pid) - before,
               **figures)


def median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda run: run.seconds)
    return ordered[len(ordered) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Even, so that 2 jobs get blocks of equal size (3 days split 2 + 1: at most 1.5x).
    parser.add_argument("--days", type=int, default=6)
    parser.add_argument("--stations", type=int, default=4)
    parser.add_argument("--batches", type=int, default=24, help="per station and day")
    parser.add_argument("--events", type=int, default=500, help="per batch")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 days, 2 stations, 1 repeat")
    parser.add_argument("--json", type=Path, help="write the figures here")
    # The child's side (one replay in a fresh process).
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", help=argparse.SUPPRESS)
    parser.add_argument("--station-list", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.run_one:
        print(json.dumps(run_one(options)))
        return 0
    if options.quick:
        options.days, options.stations, options.batches, options.repeat = 2, 2, 12, 1

    with tempfile.TemporaryDirectory(prefix="bench-replay-") as scratch:
        work = Path(scratch)
        server = SeaweedS3(data_dir=work / "s3", access_key="bench",
                           secret_key="bench-" + uuid.uuid4().hex)
        server.start()
        try:
            bucket = Bucket("bench", endpoint=server.endpoint, access_key=server.access_key,
                            secret_key=server.secret_key)
            bucket.ensure_exists()
            built = time.perf_counter()
            events = build_archive(bucket, options.days, options.stations, options.batches,
                                   options.events)
            objects = options.days * options.stations * options.batches
            print(f"archive: {options.days} days x {options.stations} stations x "
                  f"{options.batches} batches of {options.events} events = {objects} objects, "
                  f"{events} events (built in {time.perf_counter() - built:.0f} s)")
            stations_csv = write_station_list(work / "stations.csv", options.stations)
            runs: dict[int, list[Run]] = {1: [], 2: []}
            for attempt in range(options.repeat):
                for jobs in (1, 2):
                    run = measure(server, "bench", work, options.days, stations_csv, jobs,
                                  attempt)
                    assert run.events == events, (run.events, events)
                    runs[jobs].append(run)
                    print(f"  jobs={jobs}: {run.events_per_second:,.0f} events/s "
                          f"({run.seconds:.1f} s, load {os.getloadavg()[0]:.2f})")
        finally:
            server.stop()

    one, two = median_run(runs[1]), median_run(runs[2])
    speedup = two.events_per_second / one.events_per_second
    figures = {
        "events": events,
        "events_per_second_1_job": one.events_per_second,
        "events_per_second_2_jobs": two.events_per_second,
        "speedup_2_jobs": speedup,
        "target_speedup": TARGET_SPEEDUP,
        "replay_cpu_ms_per_1000_events": {
            str(run.jobs): run.cpu_seconds / run.events * 1e6 for run in (one, two)},
        "server_cpu_ms_per_1000_events": {
            str(run.jobs): run.server_cpu_seconds / run.events * 1e6 for run in (one, two)},
        "main_peak_mb": one.main_peak_mb,
        "main_peak_mb_2_jobs": two.main_peak_mb,
        "worker_peak_mb": two.worker_peak_mb,
        "pod_peak_mb_2_jobs": two.main_peak_mb + 2 * two.worker_peak_mb,
        "runs": [asdict(run) for jobs in (1, 2) for run in runs[jobs]],
        "load_average": os.getloadavg()[0],
    }
    print()
    print(f"replay, 1 job : {one.events_per_second:10,.0f} events/s   "
          f"CPU {figures['replay_cpu_ms_per_1000_events']['1']:.0f} ms/1000 events, "
          f"S3 server {figures['server_cpu_ms_per_1000_events']['1']:.0f} ms/1000 events")
    print(f"replay, 2 jobs: {two.events_per_second:10,.0f} events/s   "
          f"CPU {figures['replay_cpu_ms_per_1000_events']['2']:.0f} ms/1000 events, "
          f"S3 server {figures['server_cpu_ms_per_1000_events']['2']:.0f} ms/1000 events")
    print(f"2 jobs / 1 job: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x)"
          f"{'' if speedup >= TARGET_SPEEDUP else '  NOT MET'}")
    print(f"peak memory: 1 job {figures['main_peak_mb']:.0f} MB; with 2 jobs the main "
          f"process {two.main_peak_mb:.0f} MB and a worker {figures['worker_peak_mb']:.0f} MB, "
          f"{figures['pod_peak_mb_2_jobs']:.0f} MB in all")
    if options.json:
        options.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
