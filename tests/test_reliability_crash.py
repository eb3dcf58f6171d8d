"""Reliability target 1: kill -9 the writer anywhere; every accepted batch lands exactly once.

Each trial adds new batches to ``incoming/`` (and now and then re-puts an archived one, as
a station does that resends after a lost answer), starts the writer in a child process
(a sweep, or a notification's keys in random order with duplicates) and SIGKILLs it:

- at a named point, through the driver's test-only hooks (``reliability_support``): before
  a GET, with only the append's intent on disk, after node creation, mid-append after a
  table or blob write, with rows written but the ledger not committed, after the commit
  but before the archive copy, after the archive copy but before the delete;
- or after a seeded random delay from the moment the writer is ready to work.

After the last trial a clean sweep runs, and every day file is read with PyTables: each
batch's rows are there exactly once, event ids are 1..n, trace indexes point at the right
blobs, the ledger holds each key once, ``incoming/`` and ``failed/`` are empty.

``DATASTORE_TEST_CRASH_TRIALS`` and ``DATASTORE_TEST_CRASH_SEED`` change the default
60 trials and seed 1; the soak variant (``-m slow``) runs 400 trials.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import tables
from reliability_support import (
    CRASH_POINTS,
    Expected,
    finish,
    make_batch,
    start_driver,
    store_batch,
    verify,
    wait_ready,
)

from hisparc_datastore.config import Settings
from hisparc_datastore.storage.store import Bucket

pytestmark = pytest.mark.long

STATIONS = (501, 502, 7001)


def run_trials(bucket: Bucket, settings: Settings, env: dict[str, str], tmp_path: Path,
               trials: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    expected = Expected()
    accepted: list[tuple[int, int]] = []  # (station, index) of every stored batch
    figures: Counter = Counter()
    window = 0.6  # seconds; replaced by the first undisturbed run's duration
    index = 0
    for trial in range(trials):
        for _ in range(3):
            station = rng.choice(STATIONS)
            index += 1
            events = make_batch(index, station)
            expected.add(store_batch(bucket, events, station), station, events)
            accepted.append((station, index))
        if accepted and rng.random() < 0.3:  # a station resends an earlier batch
            station, old = rng.choice(accepted)
            store_batch(bucket, make_batch(old, station), station)
            figures["resent batches"] += 1
        mode = "sweep" if trial % 2 else "keys"
        keys_file = None
        if mode == "keys":
            keys = [info.key for info in bucket.list("incoming/")]
            keys += rng.sample(keys, k=min(2, len(keys)))  # duplicate notifications
            rng.shuffle(keys)
            keys_file = tmp_path / f"keys-{trial}.txt"
            keys_file.write_text("\n".join(keys))
        timed = trial % 3 == 2 or trial == 0
        crash_at = None if timed else f"{CRASH_POINTS[trial % len(CRASH_POINTS)]}:" \
            f"{rng.randint(1, 3)}"
        process = start_driver(env, mode, keys_file, crash_at)
        assert wait_ready(process) or process.wait() != 0
        started = time.monotonic()
        if trial == 0:  # measure an undisturbed run: random kills fall inside it
            result = finish(process)
            window = max(0.2, time.monotonic() - started)
            figures["undisturbed runs"] += 1
            continue
        if timed:
            time.sleep(rng.uniform(0, window))
            process.kill()
            figures["random-time kills"] += 1
        result = finish(process)
        if result is None:
            figures["killed" if timed else f"killed at {crash_at.split(':')[0]}"] += 1
        else:
            figures["finished before the kill"] += 1
    figures["batches accepted"] = len(expected.batches)
    # restart: sweep until nothing is left (a sweep leaves nothing when nothing fails)
    for _ in range(3):
        process = start_driver(env, "sweep")
        wait_ready(process)
        result = finish(process)
        assert result is not None
        if not any(True for _ in bucket.list("incoming/")):
            break
    assert [info.key for info in bucket.list("incoming/")] == []
    assert [info.key for info in bucket.list("failed/")] == []
    verdict = verify(settings.data_dir, expected)
    assert verdict.problems == []
    assert (verdict.missing, verdict.doubled, verdict.unexpected) == (0, 0, 0)
    figures["rows checked"] = verdict.rows
    figures["day files"] = verdict.files
    archived = {info.key.rsplit("/", 2)[-2] + "/" + info.key.rsplit("/", 1)[-1]
                for info in bucket.list("archive/")}
    assert archived == {key.removeprefix("incoming/") for key in expected.batches}
    for path in settings.data_dir.rglob("*.h5"):
        with tables.open_file(str(path), "r") as h5:
            h5.root._f_walknodes()  # every node loads
    return dict(figures)


def _trials(default: int) -> int:
    return int(os.environ.get("DATASTORE_TEST_CRASH_TRIALS", default))


def test_kill_9_at_random_points_loses_and_doubles_nothing(
    bucket: Bucket, settings: Settings, datastore_env: dict[str, str], tmp_path: Path
) -> None:
    seed = int(os.environ.get("DATASTORE_TEST_CRASH_SEED", 1))
    figures = run_trials(bucket, settings, datastore_env, tmp_path, _trials(60), seed)
    print(f"\ncrash trials (seed {seed}): {figures}")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill_9_soak(
    bucket: Bucket, settings: Settings, datastore_env: dict[str, str], tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("the soak runs only when asked for: pytest -m slow")
    seed = int(os.environ.get("DATASTORE_TEST_CRASH_SEED", 2))
    figures = run_trials(bucket, settings, datastore_env, tmp_path, _trials(400), seed)
    print(f"\ncrash soak (seed {seed}): {figures}")
