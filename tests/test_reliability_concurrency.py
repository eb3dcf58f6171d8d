"""Reliability target 4: several writers on the same day files at once.

Two and four writer processes (each handed every key, in its own random order, as
duplicated notifications would), sweeps racing each other and notification writers, and
the served writer function taking notifications while a sweep process runs: no file is
corrupt, no row is doubled, nothing is lost.  Each configuration runs several rounds, new
batches arriving between rounds, so the processes contend on growing files.  The writers
start together (they wait for a go file once they are ready).
"""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from notification_bodies import minio_body
from reliability_support import (
    Expected,
    finish,
    make_batch,
    serve,
    start_driver,
    store_batch,
    verify,
    wait_ready,
)

from hisparc_datastore.config import Settings
from hisparc_datastore.storage.store import Bucket

pytestmark = pytest.mark.long

STATIONS = (501, 502, 7001)
ROUNDS = 2
BATCHES_PER_ROUND = 30


def add_batches(bucket: Bucket, expected: Expected, first: int, rng: random.Random) -> int:
    for index in range(first, first + BATCHES_PER_ROUND):
        station = rng.choice(STATIONS)
        events = make_batch(index, station)
        expected.add(store_batch(bucket, events, station), station, events)
    return first + BATCHES_PER_ROUND


def run_together(env: dict[str, str], modes: list[str], keys: list[str], directory: Path,
                 rng: random.Random) -> list[dict]:
    go = directory / f"go-{rng.random()}"
    processes = []
    for number, mode in enumerate(modes):
        keys_file = None
        if mode == "keys":
            keys_file = directory / f"keys-{go.name}-{number}.txt"
            keys_file.write_text("\n".join(rng.sample(keys, len(keys))))
        processes.append(start_driver(env, mode, keys_file, go_file=go))
    for process in processes:
        assert wait_ready(process)
    go.touch()
    results = [finish(process) for process in processes]
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]


@pytest.mark.parametrize("modes", [
    ["keys", "keys"],
    ["keys", "keys", "keys", "keys"],
    ["sweep", "sweep"],
    ["sweep", "keys", "sweep", "keys"],
], ids=["2 writers", "4 writers", "2 sweeps", "2 sweeps + 2 writers"])
def test_writer_processes_at_once(
    modes: list[str], bucket: Bucket, settings: Settings, datastore_env: dict[str, str],
    tmp_path: Path,
) -> None:
    rng = random.Random(len(modes) * 10 + modes.count("sweep"))
    expected = Expected()
    index = 1
    outcomes: Counter = Counter()
    for _ in range(ROUNDS):
        index = add_batches(bucket, expected, index, rng)
        keys = [info.key for info in bucket.list("incoming/")]
        for result in run_together(datastore_env, modes, keys, tmp_path, rng):
            outcomes["runs ok" if not result["failed"] and not result["errors"]
                     else "runs not ok"] += 1
            outcomes["archived"] += result["archived"]
            outcomes["already done"] += result["already_done"]
            outcomes["rows"] += result["rows"]
    assert outcomes["runs not ok"] == 0, outcomes
    assert list(bucket.list("incoming/")) == []
    verdict = verify(settings.data_dir, expected)
    assert verdict.ok, verdict
    assert outcomes["rows"] == verdict.rows
    print(f"\n{' + '.join(modes)}: {len(expected.batches)} batches, {dict(outcomes)}, "
          f"{verdict.files} day files")


def test_sweep_process_and_served_writer_at_once(
    bucket: Bucket, settings: Settings, datastore_env: dict[str, str], tmp_path: Path
) -> None:
    rng = random.Random(11)
    expected = Expected()
    writer = serve("writer", datastore_env, tmp_path / "writer.log")
    statuses: Counter = Counter()
    index = 1
    try:
        for _ in range(ROUNDS):
            index = add_batches(bucket, expected, index, rng)
            keys = [info.key for info in bucket.list("incoming/")]
            rng.shuffle(keys)
            sweeper = start_driver(datastore_env, "sweep", go_file=tmp_path / "go")
            assert wait_ready(sweeper)
            (tmp_path / "go").touch()
            with ThreadPoolExecutor(4) as pool:
                statuses.update(pool.map(
                    lambda chunk: requests.post(
                        writer.url, data=minio_body(bucket.name, chunk), timeout=300,
                        headers={"Content-Type": "application/json"}).status_code,
                    [keys[start:start + 3] for start in range(0, len(keys), 3)],
                ))
            result = finish(sweeper)
            assert result is not None and not result["failed"], result
            (tmp_path / "go").unlink()
    finally:
        writer.stop()
    assert set(statuses) == {200}, statuses
    assert list(bucket.list("incoming/")) == []
    verdict = verify(settings.data_dir, expected)
    assert verdict.ok, verdict
    print(f"\nsweep + served writer: {len(expected.batches)} batches, statuses "
          f"{dict(statuses)}, {verdict.rows} rows checked")
