"""The host's side of scripts/image-check.sh, run with the development venv's Python.

    image_check.py s3 DIR        SeaweedFS on loopback with a fresh bucket; writes
                                 DIR/s3.env (endpoint, bucket, credentials) once it is
                                 ready, and runs until SIGTERM or SIGINT
    image_check.py ports N       N free loopback ports, one per line
    image_check.py upload URL STATION PASSWORD
                                 one realistic batch, as a station posts it; prints the
                                 bucket key it must land at, exits 1 unless answered 100
    image_check.py notify URL TOKEN BUCKET KEY
                                 a MinIO webhook body naming KEY, with the writer's token
    image_check.py written S3_ENV KEY DATA_DIR
                                 waits until KEY is archived and its events are rows in a
                                 day file under DATA_DIR (prints the rows found)

Each prints what it saw on one line; the shell script prints the summary.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import signal
import sys
import time
from pathlib import Path
from urllib.parse import quote

WAIT_SECONDS = 60.0


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


def run_s3(directory: Path) -> int:
    from hisparc_datastore_dev.s3server import SeaweedS3

    from hisparc_datastore.storage.store import Bucket

    server = SeaweedS3(data_dir=directory / "seaweedfs", access_key="image-check",
                       secret_key=secrets.token_hex(16))
    stop = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server.start()
    try:
        bucket = Bucket("hisparc-datastore", endpoint=server.endpoint,
                        access_key=server.access_key, secret_key=server.secret_key)
        bucket.ensure_exists()
        values = {"S3_ENDPOINT": server.endpoint, "S3_BUCKET": bucket.name,
                  "AWS_ACCESS_KEY_ID": server.access_key,
                  "AWS_SECRET_ACCESS_KEY": server.secret_key}
        target = directory / "s3.env"
        partial = target.with_suffix(".tmp")
        partial.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
        partial.chmod(0o600)
        partial.rename(target)
        print(f"SeaweedFS at {server.endpoint}, bucket {bucket.name}", flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        server.stop()
    return 0


def free_ports(count: int) -> int:
    from hisparc_datastore_dev.ports import free_port

    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    print("\n".join(str(port) for port in sorted(ports)))
    return 0


def upload(url: str, station: int, password: str) -> int:
    import requests
    from hisparc_datastore_dev.simulate import form_fields, pickle_batch, station_batches

    from hisparc_datastore.format.keys import incoming_key

    start = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=5)
    events = next(station_batches(station, 20, start, seed=1))  # one event of each type first
    pickled = pickle_batch(events, "py2")  # as the station software (Python 2) sends them
    answer = requests.post(url, data=form_fields(station, password, pickled), timeout=60)
    key = incoming_key(station, hashlib.md5(pickled).hexdigest())  # noqa: S324
    print(key)
    print(f"answer {answer.text.strip()!r} (HTTP {answer.status_code}) for {len(events)}"
          f" events", file=sys.stderr)
    return 0 if answer.text.strip() == "100" else 1


def notify(url: str, token: str, bucket: str, key: str) -> int:
    import requests

    record = {
        "eventVersion": "2.0", "eventSource": "minio:s3", "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": quote(key, safe="")}},
    }
    body = {"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}", "Records": [record]}
    answer = requests.post(url, data=json.dumps(body), timeout=60, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        result = answer.json()
        said = f"{result['archived']} archived, {result['rows']} rows"
    except (ValueError, KeyError, TypeError):
        said = answer.text.strip()[:200]
    print(f"HTTP {answer.status_code}: {said}")
    return 0 if answer.ok else 1


def written(s3_env: Path, key: str, data_dir: Path) -> int:
    from hisparc_datastore.storage.store import Bucket

    values = _env_file(s3_env)
    bucket = Bucket(values["S3_BUCKET"], endpoint=values["S3_ENDPOINT"],
                    access_key=values["AWS_ACCESS_KEY_ID"],
                    secret_key=values["AWS_SECRET_ACCESS_KEY"])
    name = key.rsplit("/", 1)[-1]
    deadline = time.monotonic() + WAIT_SECONDS
    archived: list[str] = []
    rows = 0
    files: list[Path] = []
    incoming = None
    while time.monotonic() < deadline:
        archived = [info.key for info in bucket.list("archive/") if info.key.endswith(name)]
        incoming = bucket.head(key)
        files = sorted(data_dir.rglob("*.h5"))
        rows = sum(_event_rows(path) for path in files)
        if archived and incoming is None and rows:
            break
        time.sleep(0.5)
    where = ", ".join(str(path.relative_to(data_dir)) for path in files) or "no day file"
    left = "; still in incoming/" if incoming is not None else ""
    print(f"archived as {archived[0] if archived else '(not archived)'}{left}; {where}: "
          f"{rows} rows in the station's tables")
    return 0 if archived and incoming is None and rows else 1


def _event_rows(path: Path) -> int:
    """Rows in the file's station tables (docs/FORMAT.md, 4.6: one per event written)."""
    import h5py

    sizes: list[int] = []

    def visit(name: str, node: object) -> None:
        if (isinstance(node, h5py.Dataset) and node.dtype.names
                and re.fullmatch(r"hisparc/cluster_[^/]+/station_\d+/[^/]+", name)):
            sizes.append(len(node))

    with h5py.File(path, "r") as handle:
        handle.visititems(visit)
    return sum(sizes)


def main(argv: list[str]) -> int:
    command, arguments = argv[0], argv[1:]
    if command == "s3":
        return run_s3(Path(arguments[0]))
    if command == "ports":
        return free_ports(int(arguments[0]))
    if command == "upload":
        return upload(arguments[0], int(arguments[1]), arguments[2])
    if command == "notify":
        return notify(*arguments)
    if command == "written":
        return written(Path(arguments[0]), arguments[1], Path(arguments[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv[1:]))
