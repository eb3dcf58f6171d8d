"""CPU per 1-event upload: the upload function, the reference app and the floor, side by side.

Issue 14, part 2: stations running PySPARC post one event per request, so the one-event
path is the common one, and on shared cores its CPU per request is what bounds uploads/s.
Six servers run on loopback for the whole run, each as it is deployed:

- **reference**: bench/reference_upload.py (form parsing, md5, plain ``pickle.loads``, a
  queue file) under gunicorn with 2 *sync* workers, as the reference datastore ran it;
- **ours**: the upload function as its image serves it, ``python -m
  hisparc_datastore.serve --source functions/upload/main.py --target upload`` with the
  image's environment (functions/upload/Dockerfile ``ENV`` and the Knative Service's
  ``env``: the shipped functions/config.ini, ``WORKER_TYPE=async``, ``WORKERS=2``,
  ``THREADS=8``, ``METRICS_PORT`` on, ``TMPDIR``, ``PYTHONUNBUFFERED``,
  ``PYTHONDONTWRITEBYTECODE``, the 32 MiB body limit; the log goes to stderr as in a
  container), storing into a local SeaweedFS;
- **ours-threads**: the same with ``WORKER_TYPE=threads``, gunicorn's threaded worker
  (the way back should the async worker misbehave).  Shown, not a target;
- **floor**: a function that answers ``100`` and does nothing else, under the same
  launcher with the same environment: what gunicorn, functions-framework and Flask cost
  per request before the upload does anything;
- **floor-wsgi**: the same empty function carrying a plain WSGI application as
  ``wsgi_app`` (as the upload function does, so the launcher serves that instead of
  Flask): what gunicorn and the launcher alone cost per request.  Shown, not a target;
- **floor-asgi**: the same empty function carrying an ASGI application as ``asgi_app``,
  served by the async worker as ours is: what gunicorn's arbiter, uvicorn's HTTP and the
  launcher's guards cost per request.  Shown, not a target.

The floors run with ``WORKER_TYPE`` unset (the threaded worker for the first two, the
async one for the third), ours as the image sets it.

Each round gives every server (in an order rotated per round) a warm-up and then
``--uploads`` 1-event uploads (a Python 3 client's numpy-flavoured CIC event, ``data`` as
latin-1 text, urlencoded as PySPARC's HTTP library sends it) from ``--clients``
concurrent clients on kept-alive connections (the sync workers close each one, as they
did for the reference).  CPU is user + system time of the server's whole process tree
(gunicorn's arbiter, its workers and all their threads, and children already reaped) read
from ``/proc/<pid>/stat`` before and after, divided by the uploads; SeaweedFS's tree is
read the same way while ours runs.  The figures are the medians over ``--rounds`` rounds.
CPU per upload does not depend on the machine's load the way uploads/s does, but the
load average is recorded beside every round.

The target (docs/ARCHITECTURE.md, "Targets"): ours at most the reference's CPU per upload,
or within 0.3 ms of the floor (which matters only when the floor alone costs nearly as
much as the reference or more): ours <= max(reference, floor + 0.3 ms).

``--profile DIR`` also samples our workers with py-spy during one extra round that is not
counted (``--nonblocking``, so the workers are never paused; ``--gil``, so only the
thread running Python code is sampled, not those waiting on a socket or the bucket), and
prints the top functions by own time and by total time.  Work outside the GIL (obstore's
Rust threads, the kernel) is not in it: the CPU figures above have it.

Run: ``.venv/bin/python bench/upload_cpu.py`` (``--quick`` for a short look).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hisparc_datastore_dev.ports import free_port
from hisparc_datastore_dev.processes import serve_command, spawn, stop_process
from hisparc_datastore_dev.s3server import SeaweedS3

from hisparc_datastore.storage.store import Bucket

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import upload as bench_upload  # noqa: E402 - bench/upload.py, beside this script

BIN = Path(sys.executable).parent
SOURCE = ROOT / "functions" / "upload" / "main.py"
IMAGE_CONFIG = ROOT / "functions" / "config.ini"
BUCKET = "bench-upload-cpu"
SERVERS = ("reference", "ours", "ours-threads", "floor", "floor-wsgi", "floor-asgi")
#: ours may cost this much more than the floor, when the floor is above the reference.
FLOOR_MARGIN_MS = 0.3
FLOOR_SOURCE = '''"""The floor: a function that answers 100 and does nothing else."""
import functions_framework


@functions_framework.http
def floor(request):
    return "100"
'''
FLOOR_WSGI_SOURCE = FLOOR_SOURCE + '''

def application(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", "3")])
    return (b"100",)


floor.wsgi_app = application
'''
FLOOR_ASGI_SOURCE = FLOOR_SOURCE + '''

async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"100"})


floor.asgi_app = application
'''


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and every descendant (threads included), from /proc.

    Children already reaped count through their parent's ``cutime``/``cstime``, so a
    worker that exits between two readings does not lose its time.
    """
    total = 0
    for process in [pid, *tree_pids(pid)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile: its parent's cutime/cstime has it
            continue
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> list[int]:
    """``pid``'s live descendants (gunicorn's workers), itself excluded."""
    found: list[int] = []
    stack = [pid]
    while stack:
        process = stack.pop()
        try:
            tasks = list(Path(f"/proc/{process}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            stack.extend(children)
    return found


@dataclass
class Measure:
    """One server's share of one round."""

    server: str
    uploads: int
    seconds: float
    cpu_ms: float  # the server's CPU per upload
    s3_cpu_ms: float = 0.0  # SeaweedFS's CPU per upload (ours only)
    load: float = 0.0  # 1-minute load average at the end
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def uploads_per_s(self) -> float:
        return self.uploads / self.seconds


def post_all(port: int, bodies: list[bytes], total: int, clients: int) -> dict[str, int]:
    """``total`` uploads from ``clients`` threads, each on its own kept-alive connection."""
    numbers = itertools.count()
    lock = threading.Lock()
    failures: collections.Counter[str] = collections.Counter()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while True:
                with lock:
                    number = next(numbers)
                if number >= total:
                    return
                try:
                    connection.request("POST", "/", bodies[number % len(bodies)], headers)
                    answer = connection.getresponse()
                    text = answer.read().decode("latin-1")
                    if answer.will_close:
                        connection.close()
                except (OSError, http.client.HTTPException) as exc:
                    connection.close()
                    text = type(exc).__name__
                if text != "100":
                    with lock:
                        failures[text] += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(failures)


def measure(name: str, port: int, pid: int, s3_pid: int, bodies: list[bytes], uploads: int,
            clients: int) -> Measure:
    post_all(port, bodies, clients * 25, clients)  # warm-up: connections, caches
    before, s3_before = tree_cpu_seconds(pid), tree_cpu_seconds(s3_pid) if s3_pid else 0.0
    started = time.perf_counter()
    failures = post_all(port, bodies, uploads, clients)
    seconds = time.perf_counter() - started
    cpu = (tree_cpu_seconds(pid) - before) * 1000 / uploads
    s3_cpu = (tree_cpu_seconds(s3_pid) - s3_before) * 1000 / uploads if s3_pid else 0.0
    return Measure(name, uploads, seconds, cpu, s3_cpu, os.getloadavg()[0], failures)


def wait_for_100(port: int, body: bytes, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log}")
        try:
            if post_all(port, [body], 1, 1) == {}:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server never answered 100; see {log}")


def start_servers(servers: dict[str, tuple[int, subprocess.Popen[bytes]]],
                  commands: dict[str, tuple[list[str], dict[str, str]]], body: bytes,
                  work: Path) -> None:
    """Start each command on a free port (``{port}`` or ``--port``) and wait for its first
    ``100`` to ``body``; into ``servers`` as each starts, so the caller stops what started."""
    for name, (command, env) in commands.items():
        port = free_port()
        command = [part.replace("{port}", str(port)) for part in command]
        if "--port" in command:
            command[command.index("--port") + 1] = str(port)
        log = work / f"{name}.log"
        process = spawn(command, env, log, cwd=ROOT)
        servers[name] = (port, process)
        wait_for_100(port, body, process, log)


def interleaved_rounds(servers: dict[str, tuple[int, subprocess.Popen[bytes]]],
                       bodies: list[bytes], rounds: int, uploads: int, clients: int,
                       s3_pids: dict[str, int]) -> list[list[Measure]]:
    """``rounds`` rounds of every server, the order rotated per round; each round's
    measures in the order of ``servers``.  ``s3_pids`` names the S3 server measured
    beside a server."""
    names = list(servers)
    measured = []
    for number in range(rounds):
        turn = names[number % len(names):] + names[:number % len(names)]
        found = {}
        for name in turn:
            port, process = servers[name]
            print(f"round {number + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
            found[name] = measure(name, port, process.pid, s3_pids.get(name, 0), bodies,
                                  uploads, clients)
        measured.append([found[name] for name in names])
    return measured


def target_ms(reference: float, floor: float) -> float:
    """At most the reference's CPU per upload, or within 0.3 ms of the floor's."""
    return max(reference, floor + FLOOR_MARGIN_MS)


def image_environment(base: dict[str, str], work: Path, s3: SeaweedS3, stations: Path
                      ) -> dict[str, str]:
    """The upload image's environment (Dockerfile ENV, the Knative Service's env), on loopback.

    The shipped config.ini, with the keys that name places on this machine overridden as
    an operator would (``DATASTORE_<SECTION>_<KEY>``).
    """
    tmp = work / "scratch"
    tmp.mkdir(exist_ok=True)
    return {
        **base,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "DATASTORE_CONFIG": str(IMAGE_CONFIG),
        "WORKER_TYPE": "async",
        "WORKERS": "2",
        "THREADS": "8",
        "TMPDIR": str(tmp),
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(free_port()),
        "DATASTORE_UPLOAD_MAX_BODY_BYTES": "33554432",
        "DATASTORE_GENERAL_STATION_LIST": str(stations),
        "DATASTORE_GENERAL_DATA_DIR": str(work / "data"),
        "DATASTORE_BUCKET_ENDPOINT": s3.endpoint,
        "DATASTORE_BUCKET_NAME": BUCKET,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
    }


def profile_round(port: int, pid: int, bodies: list[bytes], uploads: int, clients: int,
                  directory: Path) -> list[str]:
    """py-spy samples of our workers over ``uploads`` uploads: the top entries, as lines."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("worker-*.txt"):
        old.unlink()
    spy = BIN / "py-spy"
    recorders = []
    for worker in tree_pids(pid):
        output = directory / f"worker-{worker}.txt"
        recorders.append((output, subprocess.Popen(
            [str(spy), "record", "--pid", str(worker), "--nonblocking", "--gil", "--function",
             "--rate", "500", "--format", "raw", "--output", str(output), "--threads"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    time.sleep(1.0)  # py-spy attaches
    post_all(port, bodies, uploads, clients)
    for _, recorder in recorders:
        recorder.send_signal(2)  # SIGINT: py-spy writes its output and exits
    for _, recorder in recorders:
        recorder.wait(60)
    return summarize_raw([output for output, _ in recorders if output.exists()])


#: The one-event path's steps: samples with a frame of the first names and none of the
#: second (a frame is ``function (file:line)``; a name is the start of one).  The app is
#: the ASGI one under the async worker, the WSGI one (or Flask) under the threaded worker.
_APP = ("asgi_application (main.py", "application (main.py", "Flask.__call__ (")
_FUNCTION = ("_served_asgi (main.py", "serve_request (main.py")
STEPS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("the app (everything the worker calls)", _APP, ()),
    ("  around the upload (adapter, answer)", _APP, _FUNCTION),
    ("  the upload (_served_asgi or serve_request, functions/upload/main.py)", _FUNCTION,
     ()),
    ("    reading the body", ("_read_body (main.py", "RequestResponseCycle.receive ("), ()),
    ("    form parsing (parse_form)", ("parse_form (",), ()),
    ("    station, password", ("password_matches (", "StationList.get ("), ()),
    ("    checksum (match_checksum)", ("match_checksum (",), ()),
    ("    decoding gates (decode_batch)", ("decode_batch (",), ()),
    ("    object metadata (metadata_for, event days)", ("metadata_for (", "event_day_span ("), ()),
    ("    the put (Bucket.put or put_async, obstore's Python side)",
     ("Bucket.put (", "Bucket.put_async ("), ()),
    ("    metrics (_count)", ("_count (main.py",), ()),
    ("    the log line (_log, Logger.log)", ("_log (main.py", "Logger.log ("), ()),
    ("the worker outside the app (event loop or main loop, parser, response)", ("",),
     _APP),
)


def steps_breakdown(stacks: collections.Counter[tuple[str, ...]], samples: int) -> list[str]:
    """The share of the samples inside each step of :data:`STEPS`."""
    lines = []
    for label, names, excluded in STEPS:
        count = sum(n for stack, n in stacks.items()
                    if any(frame.startswith(names) for frame in stack)
                    and not any(frame.startswith(excluded) for frame in stack if excluded))
        lines.append(f"  {count / samples:6.1%}  {label}")
    return lines


def summarize_raw(paths: list[Path], top: int = 25) -> list[str]:
    """Own and total shares of the functions in py-spy's raw (collapsed stack) output.

    Samples were taken with ``--gil`` (only the thread holding the GIL), so these are
    shares of the Python code's CPU time, not of the wall time.
    """
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
    samples = 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [frame for frame in stack.split(";") if not frame.startswith("thread")]
            if not frames:
                continue
            samples += count
            stacks[tuple(frames)] += count
            own[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
    if not samples:
        return ["(no samples: is py-spy installed in the venv? pip install py-spy)"]
    lines = [f"{samples} samples of worker threads holding the GIL"]
    lines.append("by step of the one-event path (the step and what it calls):")
    lines += steps_breakdown(stacks, samples)
    lines.append("by own time:")
    lines += [f"  {count / samples:6.1%}  {frame}" for frame, count in own.most_common(top)]
    lines.append("by total time (the frame and what it calls):")
    lines += [f"  {count / samples:6.1%}  {frame}" for frame, count in total.most_common(top)]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--uploads", type=int, default=2000, help="uploads per server and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--distinct", type=int, default=64, help="distinct 1-event batches")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 600 uploads")
    parser.add_argument("--only", nargs="*", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--profile", type=Path, help="py-spy our workers; raw output here")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.uploads = 3, 600

    rounds: list[list[Measure]] = []
    profile: list[str] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-upload-cpu-") as temporary:
        work = Path(temporary)
        bodies = [bench_upload.form_body(bench_upload.pickled_batch(1, "py3", seed))
                  for seed in range(args.distinct)]
        stations = work / "stations.csv"
        stations.write_text(f"{bench_upload.STATION},{bench_upload.CLUSTER},"
                            f"{bench_upload.PASSWORD}\n")
        floor_source = work / "floor" / "main.py"
        floor_source.parent.mkdir()
        floor_source.write_text(FLOOR_SOURCE)
        floor_wsgi_source = work / "floor-wsgi" / "main.py"
        floor_wsgi_source.parent.mkdir()
        floor_wsgi_source.write_text(FLOOR_WSGI_SOURCE)
        floor_asgi_source = work / "floor-asgi" / "main.py"
        floor_asgi_source.parent.mkdir()
        floor_asgi_source.write_text(FLOOR_ASGI_SOURCE)
        s3 = SeaweedS3(work / "seaweedfs", "bench-access", "bench-secret-" + os.urandom(8).hex())
        s3.start()
        servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
        try:
            Bucket(BUCKET, endpoint=s3.endpoint, access_key=s3.access_key,
                   secret_key=s3.secret_key).ensure_exists()
            base = {k: v for k, v in os.environ.items()
                    if not k.startswith(("DATASTORE_", "AWS_", "PROMETHEUS_"))}
            def floor_env() -> dict[str, str]:  # each its own metrics port
                env = image_environment(base, work, s3, stations)
                del env["WORKER_TYPE"]  # each floor gets the worker for what it has
                return env

            commands = {
                "reference": (
                    [str(BIN / "gunicorn"), "--chdir", str(HERE), "--workers", "2",
                     "--worker-class", "sync", "--log-level", "error", "--bind",
                     "127.0.0.1:{port}", "reference_upload:application"],
                    {**base, "REFERENCE_STATION_LIST": str(stations),
                     "REFERENCE_QUEUE_DIR": str(work / "queue")}),
                "ours": (serve_command(SOURCE, "upload", "127.0.0.1", 0),
                         image_environment(base, work, s3, stations)),
                "ours-threads": (serve_command(SOURCE, "upload", "127.0.0.1", 0),
                                 {**image_environment(base, work, s3, stations),
                                  "WORKER_TYPE": "threads"}),
                "floor": (serve_command(floor_source, "floor", "127.0.0.1", 0), floor_env()),
                "floor-wsgi": (serve_command(floor_wsgi_source, "floor", "127.0.0.1", 0),
                               floor_env()),
                "floor-asgi": (serve_command(floor_asgi_source, "floor", "127.0.0.1", 0),
                               floor_env()),
            }
            start_servers(servers, {name: commands[name] for name in args.only}, bodies[0],
                          work)
            s3_pid = s3.process.pid if s3.process else 0
            rounds = [sorted(measures, key=lambda m: SERVERS.index(m.server))
                      for measures in interleaved_rounds(servers, bodies, args.rounds,
                                                         args.uploads, args.clients,
                                                         {"ours": s3_pid})]
            if args.profile and "ours" in servers:
                port, process = servers["ours"]
                profile = profile_round(port, process.pid, bodies, args.uploads, args.clients,
                                        args.profile)
            for name, (_, process) in servers.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited during the run; see {work / name}.log")
            traceback_in = [name for name in servers
                            if "Traceback" in (work / f"{name}.log").read_text()]
        finally:
            for _, process in servers.values():
                stop_process(process)
            s3.stop()

    def median(name: str, attribute: str = "cpu_ms") -> float:
        values = [getattr(m, attribute) for r in rounds for m in r if m.server == name]
        return statistics.median(values) if values else float("nan")

    figures = {name: median(name) for name in args.only}
    s3_ms = median("ours", "s3_cpu_ms") if "ours" in args.only else float("nan")
    reference, ours, ours_threads, floor, floor_wsgi, floor_asgi = (
        figures.get(n, float("nan")) for n in SERVERS)
    target = target_ms(reference, floor)

    print()
    print(f"CPU per 1-event upload: {args.clients} concurrent clients, {args.uploads} uploads "
          f"per server and round, {args.rounds} rounds, {os.cpu_count()} CPUs")
    header = (f"{'round':>5} {'server':<12} {'CPU ms/upload':>14} {'S3 ms/upload':>13} "
              f"{'uploads/s':>10} {'load':>5}  failures")
    print(header)
    print("-" * len(header))
    for number, measures in enumerate(rounds, start=1):
        for m in measures:
            s3_text = f"{m.s3_cpu_ms:.2f}" if m.server == "ours" else "-"
            print(f"{number:>5} {m.server:<12} {m.cpu_ms:>14.2f} {s3_text:>13} "
                  f"{m.uploads_per_s:>10.0f} {m.load:>5.2f}  {m.failures or '-'}")
    print()
    print("medians (ms of CPU per upload):")
    print(f"  reference (gunicorn, 2 sync workers, queue file)   {reference:6.2f}")
    print(f"  ours (the image's launcher and settings)           {ours:6.2f}   "
          f"{ours / reference:.2f}x the reference, {ours - floor:+.2f} ms over the floor")
    print(f"  ours-threads (WORKER_TYPE=threads, the way back)   {ours_threads:6.2f}   "
          f"{ours_threads / reference:.2f}x the reference")
    print(f"  floor (an empty function, same launcher)           {floor:6.2f}   "
          f"{floor / reference:.2f}x the reference")
    print(f"  floor-wsgi (the same, as a plain WSGI app)         {floor_wsgi:6.2f}   "
          f"{floor_wsgi / reference:.2f}x the reference, "
          f"ours-threads {ours_threads - floor_wsgi:+.2f} ms over it")
    print(f"  floor-asgi (the same, as ASGI, the async worker)   {floor_asgi:6.2f}   "
          f"{floor_asgi / reference:.2f}x the reference, ours {ours - floor_asgi:+.2f} ms over it")
    print(f"  S3 server (SeaweedFS) during ours                  {s3_ms:6.2f}")
    rule = ("the reference's" if reference >= floor + FLOOR_MARGIN_MS
            else f"the floor + {FLOOR_MARGIN_MS} ms, above the reference's")
    print(f"target: ours <= {target:.2f} ms ({rule}): "
          f"{'met' if ours <= target else 'NOT met'} ({target / ours:.2f}x)")
    print(f"load average: {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    if profile:
        print()
        print(f"py-spy of our workers over {args.uploads} uploads (raw output in {args.profile}):")
        print("\n".join(profile))
    failures = sum(sum(m.failures.values()) for r in rounds for m in r)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "medians_ms": {**figures, "s3": s3_ms},
            "target_ms": target,
            "met": ours <= target,
            "rounds": [[{**asdict(m), "uploads_per_s": m.uploads_per_s} for m in r]
                       for r in rounds],
            "clients": args.clients,
            "uploads": args.uploads,
            "load": {"start": load_before, "end": os.getloadavg()[0]},
            "failures": failures,
            "tracebacks": traceback_in,
        }, indent=2))
    if failures or traceback_in:
        print(f"FAILURES: {failures} answers other than 100; tracebacks in {traceback_in}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
