"""Upload benchmark: the new upload function against the reference app, side by side.

Both servers run the way production runs them, on the same machine, in the same run:
- ours: ``python -m hisparc_datastore.serve --source functions/upload/main.py --target
  upload``, as the image runs it: gunicorn (gthread worker with our idle timeout and
  request-line limit; ``WORKERS`` workers, default 1, so it is set to 2 here; ``THREADS``
  threads, default 4 per CPU), storing into a local SeaweedFS started for the run;
- the baseline: bench/reference_upload.py (form parsing, md5 and plain ``pickle.loads``
  as the reference does, writing into a queue directory) under gunicorn with the same
  worker class, workers and threads.
The client is 4 threads, each with its own ``requests.Session``, sending pre-encoded
form bodies exactly as the station software encodes them (``data`` as latin-1 text), so
the client's own cost is small and equal for both.  Cold start is process start to the
first answer ``100``.  Besides uploads/s and latencies the table gives the CPU time per
upload of each server (and of SeaweedFS for ours), read from /proc: on a shared machine
that figure stays put while throughput follows the load.

Run: ``.venv/bin/python bench/upload.py`` (``--scale 0.2`` for a quick look).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import os
import pickle
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import requests
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.ports import free_port
from hisparc_datastore_dev.processes import serve_command, spawn, stop_process
from hisparc_datastore_dev.py2pickle import dumps_py2
from hisparc_datastore_dev.s3server import SeaweedS3

from hisparc_datastore.storage.store import Bucket

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SOURCE = ROOT / "functions" / "upload" / "main.py"
STATION, CLUSTER, PASSWORD = 501, "Amsterdam", "bench-password-501"
FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
START = dt.datetime(2024, 6, 1, 10, 0, 0)


@dataclass(frozen=True)
class Scenario:
    name: str
    events: int
    flavour: str  # "py2": station software protocol 0; "py3": Python 3 client with numpy
    requests: int


SCENARIOS = (
    Scenario("1 event (py3, numpy)", 1, "py3", 3000),
    Scenario("100 events (py2 station)", 100, "py2", 800),
    Scenario("1000 events (py2 station)", 1000, "py2", 80),
)


@dataclass
class Result:
    uploads_per_s: float
    p50_ms: float
    p99_ms: float
    failures: dict[str, int]
    server_cpu_ms: float = 0.0  # CPU per upload of the server's processes
    storage_cpu_ms: float = 0.0  # CPU per upload of the S3 server (none for the reference)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (gunicorn workers), from /proc.

    CPU per upload does not depend on what else runs on the machine, unlike uploads/s,
    so it is the figure to compare when the machine is shared.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for process in [pid, *map(int, children)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def pickled_batch(events: int, flavour: str, seed: int) -> bytes:
    rng = random.Random(seed)
    start = START + dt.timedelta(minutes=seed)
    if events == 1:
        batch = [samples.cic_event(start, rng)]
    else:
        batch = samples.realistic_batch(events, start, rng)
    if flavour == "py2":
        return dumps_py2(batch)
    return pickle.dumps(samples.numpy_flavour(batch), protocol=3)


def form_body(data: bytes) -> bytes:
    """The body the station software sends: ``data`` as latin-1 text, UTF-8 on the wire."""
    return urllib.parse.urlencode(
        {
            "station_id": str(STATION),
            "password": PASSWORD,
            "data": data.decode("latin-1"),
            "checksum": hashlib.md5(data).hexdigest(),  # noqa: S324
        }
    ).encode("ascii")


def start_server(
    command: list[str], env: dict[str, str], url: str, probe: bytes, log: Path
) -> tuple[subprocess.Popen[bytes], float]:
    """Start a server and return it with its cold start: process start to the first 100."""
    started = time.perf_counter()
    process = spawn(command, {"METRICS_PORT": "0", **env}, log, cwd=ROOT)
    session = requests.Session()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited; see {log}")
        try:
            answer = session.post(url, data=probe, headers=FORM_HEADERS, timeout=30)
        except requests.ConnectionError:
            time.sleep(0.005)
            continue
        if answer.text == "100":
            return process, time.perf_counter() - started
        if time.perf_counter() - started > 120:
            stop(process)
            raise RuntimeError(f"{command[0]} answers {answer.text!r}; see {log}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process)


def ours_command(port: int) -> list[str]:
    """The upload function as its image serves it, on loopback."""
    return serve_command(SOURCE, "upload", "127.0.0.1", port)


def load(
    url: str, bodies: list[bytes], total: int, clients: int, server: int = 0, storage: int = 0
) -> Result:
    """``total`` uploads from ``clients`` concurrent clients; throughput, latencies, CPU."""
    numbers = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    failures: Counter[str] = Counter()

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                number = next(numbers)
            if number >= total:
                return
            began = time.perf_counter()
            try:
                text = session.post(
                    url, data=bodies[number % len(bodies)], headers=FORM_HEADERS, timeout=120
                ).text
            except requests.RequestException as exc:
                text = type(exc).__name__
            elapsed = time.perf_counter() - began
            with lock:
                latencies.append(elapsed)
                if text != "100":
                    failures[text] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu_before = [cpu_seconds(pid) if pid else 0.0 for pid in (server, storage)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    cpu = [
        (cpu_seconds(pid) - before) * 1000 / total if pid else 0.0
        for pid, before in zip((server, storage), cpu_before, strict=True)
    ]
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Result(total / wall, cuts[49] * 1000, cuts[98] * 1000, dict(failures), *cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    parser.add_argument("--distinct", type=int, default=16, help="distinct batches per scenario")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    threads = int(os.environ.get("THREADS", (os.cpu_count() or 1) * 4))

    with tempfile.TemporaryDirectory(prefix="bench-upload-") as temporary:
        work = Path(temporary)
        print("preparing batches ...", file=sys.stderr)
        bodies = {
            scenario.name: [
                form_body(pickled_batch(scenario.events, scenario.flavour, seed))
                for seed in range(args.distinct)
            ]
            for scenario in SCENARIOS
        }
        sizes = {name: statistics.mean(len(b) for b in group) for name, group in bodies.items()}
        probe = form_body(pickled_batch(1, "py3", 10_000))

        station_list = work / "stations.csv"
        station_list.write_text(f"{STATION},{CLUSTER},{PASSWORD}\n")
        s3 = SeaweedS3(work / "seaweedfs", "bench-access", "bench-secret-" + os.urandom(8).hex())
        s3.start()
        servers: list[subprocess.Popen[bytes]] = []
        try:
            bucket = Bucket("bench-upload", endpoint=s3.endpoint, access_key=s3.access_key,
                            secret_key=s3.secret_key)
            bucket.ensure_exists()
            config = work / "config.ini"
            config.write_text(
                f"[General]\nlog = {work / 'upload.log'}\nloglevel = info\n"
                f"station_list = {station_list}\ndata_dir = {work / 'data'}\n"
                f"[Bucket]\nendpoint = {s3.endpoint}\nname = bench-upload\n"
            )
            base_env = {k: v for k, v in os.environ.items()
                        if not k.startswith(("DATASTORE_", "AWS_"))}
            ours_port, reference_port = free_port(), free_port()
            ours_url = f"http://127.0.0.1:{ours_port}/"
            reference_url = f"http://127.0.0.1:{reference_port}/"
            ours, ours_cold = start_server(
                ours_command(ours_port),
                {**base_env, "DATASTORE_CONFIG": str(config), "AWS_ACCESS_KEY_ID": s3.access_key,
                 "AWS_SECRET_ACCESS_KEY": s3.secret_key, "WORKERS": str(args.workers),
                 "THREADS": str(threads)},
                ours_url, probe, work / "ours.out",
            )
            servers.append(ours)
            reference, reference_cold = start_server(
                [str(BIN / "gunicorn"), "--chdir", str(ROOT / "bench"), "--workers",
                 str(args.workers), "--worker-class", "gthread", "--threads", str(threads),
                 "--bind", f"127.0.0.1:{reference_port}", "--log-level", "error",
                 "reference_upload:application"],
                {**base_env, "REFERENCE_STATION_LIST": str(station_list),
                 "REFERENCE_QUEUE_DIR": str(work / "queue")},
                reference_url, probe, work / "reference.out",
            )
            servers.append(reference)

            results: dict[str, dict[str, Result]] = {}
            for scenario in SCENARIOS:
                total = max(args.clients * 5, int(scenario.requests * args.scale))
                group = bodies[scenario.name]
                results[scenario.name] = {}
                for label, url, pids in (
                    ("ours", ours_url, (ours.pid, s3.process.pid if s3.process else 0)),
                    ("reference", reference_url, (reference.pid, 0)),
                ):
                    print(f"{scenario.name}: {label} ...", file=sys.stderr)
                    load(url, group, args.clients * 2, args.clients)  # warm-up
                    results[scenario.name][label] = load(url, group, total, args.clients, *pids)
        finally:
            for process in servers:
                stop(process)
            s3.stop()

    print()
    print(f"upload benchmark: {args.clients} concurrent clients, {args.workers} gunicorn workers "
          f"x {threads} threads each, {os.cpu_count()} CPUs, storage: ours SeaweedFS, "
          "reference local disk")
    header = (f"{'scenario':<28} {'body KB':>8} {'server':<10} {'uploads/s':>10} "
              f"{'p50 ms':>8} {'p99 ms':>8} {'CPU ms/upload':>16}  failures")
    print(header)
    print("-" * len(header))
    for scenario in SCENARIOS:
        ours_result = results[scenario.name]["ours"]
        reference_result = results[scenario.name]["reference"]
        for label, result in (("ours", ours_result), ("reference", reference_result)):
            first = label == "ours"
            name = scenario.name if first else ""
            size = f"{sizes[scenario.name] / 1024:.1f}" if first else ""
            cpu = f"{result.server_cpu_ms:.1f}"
            if result.storage_cpu_ms:
                cpu += f" + S3 {result.storage_cpu_ms:.1f}"
            print(f"{name:<28} {size:>8} {label:<10} {result.uploads_per_s:>10.1f} "
                  f"{result.p50_ms:>8.1f} {result.p99_ms:>8.1f} {cpu:>16}  "
                  f"{result.failures or '-'}")
        print(f"{'':<28} {'':>8} {'ratio':<10} "
              f"{ours_result.uploads_per_s / reference_result.uploads_per_s:>9.2f}x "
              f"{ours_result.p50_ms / reference_result.p50_ms:>7.2f}x "
              f"{ours_result.p99_ms / reference_result.p99_ms:>7.2f}x")
    print(f"cold start (process start to first 100): ours {ours_cold:.2f} s, "
          f"reference {reference_cold:.2f} s")
    print(f"machine load average at the end: {os.getloadavg()[0]:.2f} "
          "(uploads/s and latencies are only comparable within one run)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "results": {name: {label: asdict(r) for label, r in group.items()}
                        for name, group in results.items()},
            "cold_start_s": {"ours": ours_cold, "reference": reference_cold},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
