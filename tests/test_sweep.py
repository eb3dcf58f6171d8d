"""``datastore sweep`` as an operator runs it: a real process against the real S3 server."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tables
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import incoming_key
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for

DATASTORE = str(Path(sys.executable).with_name("datastore"))
RECEIVED = dt.datetime(2024, 10, 1, 12, tzinfo=dt.UTC)


def put_batches(bucket: Bucket, batches: list[list[dict]], station: int = 501) -> list[str]:
    def put(events: list[dict]) -> str:
        body = dumps_py2(events)
        key = incoming_key(station, hashlib.md5(body).hexdigest())  # noqa: S324
        bucket.put(key, body, metadata_for(Station(station, "Amsterdam", "x"), len(events),
                                           RECEIVED))
        return key

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(put, batches))


def one_event_batches(n: int, seed: int, start: dt.datetime) -> list[list[dict]]:
    rng = random.Random(seed)
    return [samples.batch(1, start + dt.timedelta(seconds=i), rng, kinds=("CIC", "SIN"),
                          traces=False) for i in range(n)]


def incoming(bucket: Bucket) -> list[str]:
    return [info.key for info in bucket.list("incoming/")]


def table_rows(data_dir: Path) -> dict[str, list[int]]:
    """Table path -> its event ids, over every day file."""
    found: dict[str, list[int]] = {}
    for path in sorted(data_dir.rglob("*.h5")):
        with tables.open_file(path, "r") as h5:
            for node in h5.walk_nodes("/hisparc", classname="Table"):
                found[f"{path.name}:{node._v_pathname}"] = node.col("event_id").tolist()
    return found


def run_sweep(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([DATASTORE, "sweep", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_sweep_once_writes_everything_and_logs_counts(
    bucket: Bucket, settings: Settings, datastore_env: dict[str, str]
) -> None:
    keys = put_batches(bucket, one_event_batches(12, 1, dt.datetime(2024, 10, 1, 3)))

    done = run_sweep(datastore_env)

    assert done.returncode == 0, done.stderr
    assert incoming(bucket) == []
    assert len(list(bucket.list("archive/"))) == len(keys)
    assert sum(len(ids) for ids in table_rows(settings.data_dir).values()) == 12
    assert "sweep: 12 objects: 12 archived" in done.stderr


def test_sweep_limit(bucket: Bucket, datastore_env: dict[str, str]) -> None:
    put_batches(bucket, one_event_batches(5, 2, dt.datetime(2024, 10, 2, 3)))
    done = run_sweep(datastore_env, "--limit", "2")
    assert done.returncode == 0, done.stderr
    assert len(incoming(bucket)) == 3
    refused = run_sweep(datastore_env, "--limit", "0")
    assert refused.returncode == 2 and "positive" in refused.stderr


def test_sweep_reports_failure_and_configuration_errors(
    bucket: Bucket, settings: Settings, datastore_env: dict[str, str]
) -> None:
    put_batches(bucket, one_event_batches(2, 3, dt.datetime(2024, 10, 3, 3)))
    blocker = settings.data_dir / "2024"
    blocker.write_text("not a directory")  # one day's folder cannot be made: they wait
    waiting = run_sweep(datastore_env)
    assert waiting.returncode == 1 and len(incoming(bucket)) == 2
    assert "2 deferred" in waiting.stderr and "NotADirectoryError" in waiting.stderr
    blocker.unlink()

    settings.data_dir.rmdir()  # the volume is gone: an outage
    failed = run_sweep(datastore_env)
    assert failed.returncode == 1 and len(incoming(bucket)) == 2
    assert "2 failed" in failed.stderr
    settings.data_dir.mkdir()

    missing = run_sweep({**datastore_env, "DATASTORE_CONFIG": "/nonexistent/config.ini"})
    assert missing.returncode == 2 and "configuration error" in missing.stderr


def test_missing_credentials_are_named_before_any_request(
    settings: Settings, datastore_env: dict[str, str]
) -> None:
    config_only = {"DATASTORE_CONFIG": datastore_env["DATASTORE_CONFIG"]}
    for env, named in (
        (config_only, ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                       "AWS_WEB_IDENTITY_TOKEN_FILE", settings.bucket_endpoint)),
        (config_only | {"AWS_ACCESS_KEY_ID": datastore_env["AWS_ACCESS_KEY_ID"]},
         ("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not",)),
    ):
        for arguments in ((), ("--watch",)):
            refused = run_sweep(env, *arguments, timeout=30)
            assert refused.returncode == 2, refused.stderr
            assert "configuration error" in refused.stderr
            for words in named:
                assert words in refused.stderr
            assert "sweep:" not in refused.stderr  # it never began


def test_watch_keeps_sweeping_until_sigterm(
    bucket: Bucket, settings: Settings, datastore_env: dict[str, str], tmp_path: Path
) -> None:
    log_path = tmp_path / "watch.log"
    with log_path.open("w") as log:
        watcher = subprocess.Popen([DATASTORE, "sweep", "--watch"], env=datastore_env,
                                   stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        first = put_batches(bucket, one_event_batches(3, 4, dt.datetime(2024, 10, 4, 3)))
        deadline = time.monotonic() + 90
        while incoming(bucket) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert incoming(bucket) == [], log_path.read_text()
        second = put_batches(bucket, one_event_batches(2, 5, dt.datetime(2024, 10, 4, 4)))
        while incoming(bucket) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert incoming(bucket) == [], log_path.read_text()
    finally:
        watcher.send_signal(signal.SIGTERM)
        code = watcher.wait(timeout=60)
    text = log_path.read_text()
    assert code == 0, text
    assert "sweep round 1:" in text and "SIGTERM received" in text and "stopped after" in text
    assert len(list(bucket.list("archive/"))) == len(first) + len(second)
    assert sum(len(ids) for ids in table_rows(settings.data_dir).values()) == 5


def test_two_sweeps_at_once_write_every_row_once(
    bucket: Bucket, settings: Settings, datastore_env: dict[str, str]
) -> None:
    start = dt.datetime(2024, 10, 5, 6)
    batches = one_event_batches(150, 6, start)
    rng = random.Random(7)
    batches += [samples.batch(40, start + dt.timedelta(minutes=m), rng, kinds=("CIC", "SIN"))
                for m in range(1, 4)]
    keys = put_batches(bucket, batches)
    total = sum(len(events) for events in batches)

    sweeps = [subprocess.Popen([DATASTORE, "sweep"], env=datastore_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=240) for process in sweeps]

    for process, (_, stderr) in zip(sweeps, outputs, strict=True):
        assert process.returncode == 0, stderr
    assert incoming(bucket) == []
    assert len(list(bucket.list("archive/"))) == len(keys)
    written = [int(line.split("; ")[1].split()[0]) for _, err in outputs
               for line in err.splitlines() if "sweep: " in line and "rows written" in line]
    assert sum(written) == total  # between them, every row was written once
    rows = table_rows(settings.data_dir)
    assert sum(len(ids) for ids in rows.values()) == total
    for table, ids in rows.items():
        assert ids == list(range(1, len(ids) + 1)), table
