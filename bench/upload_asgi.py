"""CPU per 1-event upload with the upload function served as ASGI: the alternatives compared.

This is how the async worker (``WORKER_TYPE=async``, now what the image serves and what
bench/upload_cpu.py measures as "ours") was chosen, kept to compare it with plain
uvicorn-worker, with h11 and with uvicorn alone when any of them changes.

docs/PERFORMANCE.md, "The single-event upload": the upload function costs more CPU per
one-event upload than the reference, and most of the difference is gunicorn's threaded
worker around it and a thread sleeping through the put.  This runs, side by side and
measured as bench/upload_cpu.py measures (its functions: CPU of each server's process
tree from /proc per upload, 4 clients, medians of interleaved rounds):

- **reference** and **ours**, as in bench/upload_cpu.py;
- **asgi-gunicorn**: the function's ASGI application (``asgi_application`` in
  functions/upload/main.py, every check, the put awaited) under gunicorn with uvicorn's worker
  (``uvicorn_worker.UvicornWorker``, the way functions-framework serves ASGI functions),
  2 workers, keep-alive 100 s: gunicorn's arbiter stays, so would the launcher's metrics
  server and signal handling;
- **asgi-gunicorn-h11**: the same with ``uvicorn_worker.UvicornH11Worker`` (asyncio's
  loop and the pure-Python h11 parser): what the images could run without a new
  dependency, since functions-framework already brings uvicorn and uvicorn-worker;
- **asgi-uvicorn**: the same under ``uvicorn --workers 2`` (uvloop, httptools).

"ours" here is what the image serves (the async worker); these rows measure uvicorn's own
workers, without the launcher's guards, around the same application.  uvloop and httptools
are in the upload extra now; should they be missing, their rows are left out, with a line
saying so.

Run: ``.venv/bin/python bench/upload_asgi.py`` (``--quick`` for a short look).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hisparc_datastore_dev.processes import serve_command, stop_process
from hisparc_datastore_dev.s3server import SeaweedS3

from hisparc_datastore.storage.store import Bucket

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import upload as bench_upload  # noqa: E402 - beside this script
import upload_cpu  # noqa: E402

NEEDED = ("uvicorn", "uvicorn_worker")  # functions-framework's own dependencies
FAST = ("uvloop", "httptools")  # uvicorn[standard]: the rows that use them need them
ASGI_APP = "main:asgi_application"  # functions/upload/main.py
FUNCTION_DIR = upload_cpu.SOURCE.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--uploads", type=int, default=2000, help="per server and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 600 uploads")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.uploads = 3, 600
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"missing {', '.join(missing)}: "
              f"{sys.executable} -m pip install 'uvicorn[standard]' uvicorn-worker")
        return 2
    fast = all(importlib.util.find_spec(name) is not None for name in FAST)
    if not fast:
        print(f"leaving out asgi-gunicorn and asgi-uvicorn: no {' or '.join(FAST)} "
              f"({sys.executable} -m pip install 'uvicorn[standard]')")

    with tempfile.TemporaryDirectory(prefix="bench-upload-asgi-") as temporary:
        work = Path(temporary)
        bodies = [bench_upload.form_body(bench_upload.pickled_batch(1, "py3", seed))
                  for seed in range(64)]
        stations = work / "stations.csv"
        stations.write_text(f"{bench_upload.STATION},{bench_upload.CLUSTER},"
                            f"{bench_upload.PASSWORD}\n")
        s3 = SeaweedS3(work / "seaweedfs", "bench-access", "bench-secret-" + os.urandom(8).hex())
        s3.start()
        servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
        try:
            Bucket(upload_cpu.BUCKET, endpoint=s3.endpoint, access_key=s3.access_key,
                   secret_key=s3.secret_key).ensure_exists()
            base = {k: v for k, v in os.environ.items()
                    if not k.startswith(("DATASTORE_", "AWS_", "PROMETHEUS_"))}
            image = upload_cpu.image_environment(base, work, s3, stations)
            shared = work / "prometheus"
            shared.mkdir()
            asgi = {**image, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
            python = sys.executable
            commands = {
                "reference": (
                    [python, "-m", "gunicorn", "--chdir", str(HERE), "--workers", "2",
                     "--worker-class", "sync", "--log-level", "error", "--bind",
                     "127.0.0.1:{port}", "reference_upload:application"],
                    {**base, "REFERENCE_STATION_LIST": str(stations),
                     "REFERENCE_QUEUE_DIR": str(work / "queue")}),
                "ours": (serve_command(upload_cpu.SOURCE, "upload", "127.0.0.1", 0), image),
                "asgi-gunicorn": (
                    [python, "-m", "gunicorn", "--chdir", str(FUNCTION_DIR), "--workers", "2",
                     "--worker-class", "uvicorn_worker.UvicornWorker", "--keep-alive", "100",
                     "--log-level", "error", "--bind", "127.0.0.1:{port}", ASGI_APP], asgi),
                "asgi-gunicorn-h11": (
                    [python, "-m", "gunicorn", "--chdir", str(FUNCTION_DIR), "--workers", "2",
                     "--worker-class", "uvicorn_worker.UvicornH11Worker", "--keep-alive",
                     "100", "--log-level", "error", "--bind", "127.0.0.1:{port}", ASGI_APP],
                    asgi),
                "asgi-uvicorn": (
                    [python, "-m", "uvicorn", "--app-dir", str(FUNCTION_DIR), "--workers", "2",
                     "--loop", "uvloop", "--http", "httptools", "--timeout-keep-alive", "100",
                     "--no-access-log", "--log-level", "error", "--host", "127.0.0.1",
                     "--port", "{port}", ASGI_APP], asgi),
            }
            if not fast:
                del commands["asgi-gunicorn"], commands["asgi-uvicorn"]
            upload_cpu.start_servers(servers, commands, bodies[0], work)
            figures: dict[str, list[float]] = {name: [] for name in commands}
            for measures in upload_cpu.interleaved_rounds(servers, bodies, args.rounds,
                                                          args.uploads, args.clients, {}):
                for measured in measures:
                    if measured.failures:
                        print(f"FAILURES of {measured.server}: {measured.failures}")
                        return 1
                    figures[measured.server].append(measured.cpu_ms)
        finally:
            for _, process in servers.values():
                stop_process(process)
            s3.stop()
    reference = statistics.median(figures["reference"])
    print(f"\nCPU per 1-event upload (medians of {args.rounds} rounds of {args.uploads}, "
          f"{args.clients} clients, {os.cpu_count()} CPUs):")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"  {name:<18} {median:5.2f} ms  {median / reference:4.2f}x the reference   "
              f"rounds: {' '.join(f'{v:.2f}' for v in values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
