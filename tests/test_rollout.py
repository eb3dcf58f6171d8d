"""A Knative rollout of the writer: the old and the new revision at once on one volume.

During a rollout Knative starts the new revision's pod before it retires the old one, and
for that while both take notifications (MinIO's webhook, the sweep) for the same day
files.  Here two writer functions are served as the image serves them (one worker, two
threads), sharing one ``data_dir`` and one bucket.  Both are notified of every key, from
several threads at once, each in its own shuffled order and each key more than once, as
MinIO's retries and the sweep would.  Any answer but 500 is acceptable meanwhile: 200, or
503 when a writer could not finish (a day file the other held too long, say); what counts
is the end state.  After a final sweep every batch's rows are in the day files exactly
once, with event ids 1..n, and nothing is left in ``incoming/`` or ``failed/``.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from hisparc_datastore_dev.processes import Served, start_function, wait_until_serving
from notification_bodies import minio_body
from reliability_support import RECEIVED, ROOT, Expected, make_batch, store_batch, verify

from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import archive_key
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.writer.pipeline import sweep

pytestmark = pytest.mark.long

SOURCE = ROOT / "functions" / "writer" / "main.py"
STATIONS = (501, 502, 7001)
#: make_batch puts batch i on day i % 3, and every fifth across a midnight: four day files.
BATCHES = 36
#: How often each writer is told of each key, and how many requests are in flight at once.
COPIES = 2
SENDERS = 6
#: A hang guard for one request, not a timing assertion.
GUARD = 120.0


def serve_writers(env: dict[str, str], directory: Path, names: tuple[str, ...]
                  ) -> list[Served]:
    """Start one served writer per name (at once: each takes seconds to import), ready."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("DATASTORE_", "AWS_"))}
    child_env.update(env, WORKERS="1", THREADS="2")  # as the image and the manifest run it
    writers: list[Served] = []
    try:
        for name in names:
            writers.append(start_function(SOURCE, "writer", child_env,
                                          directory / f"writer-{name}.log", name=name, cwd=ROOT))
        for writer in writers:
            wait_until_serving(writer)
    except BaseException:
        for writer in writers:
            writer.stop()
        raise
    return writers


def notifications(keys: list[str], writers: list[Served], rng: random.Random
                  ) -> list[tuple[Served, list[str]]]:
    """Every key to every writer COPIES times, in chunks of 1 to 3 keys, all interleaved."""
    jobs: list[tuple[Served, list[str]]] = []
    for writer in writers:
        stream = [key for key in keys for _ in range(COPIES)]
        rng.shuffle(stream)
        while stream:
            size = rng.randint(1, 3)
            jobs.append((writer, stream[:size]))
            stream = stream[size:]
    rng.shuffle(jobs)
    return jobs


def test_old_and_new_writer_revision_on_one_volume(
    bucket: Bucket, settings: Settings, datastore_env: dict[str, str], tmp_path: Path
) -> None:
    rng = random.Random(14719)
    expected = Expected()
    for index in range(1, BATCHES + 1):
        station = STATIONS[index % len(STATIONS)]
        events = make_batch(index, station)
        expected.add(store_batch(bucket, events, station), station, events)
    keys = list(expected.batches)
    days = {name for name, _ in expected.rows()}
    assert len(days) >= 3, days

    def notify(job: tuple[Served, list[str]]) -> tuple[str, int, int]:
        """(writer, status, rows it says it wrote)."""
        writer, chunk = job
        answer = requests.post(writer.url, data=minio_body(bucket.name, chunk), timeout=GUARD,
                               headers={"Content-Type": "application/json"})
        try:
            written = int(answer.json().get("rows", 0))
        except (ValueError, AttributeError):
            written = 0
        return writer.name, answer.status_code, written

    statuses: Counter[tuple[str, int]] = Counter()
    rows: Counter[str] = Counter()
    writers = serve_writers(datastore_env, tmp_path, ("old", "new"))
    try:
        with ThreadPoolExecutor(SENDERS) as pool:
            for name, status, written in pool.map(notify, notifications(keys, writers, rng)):
                statuses[(name, status)] += 1
                rows[name] += written
    finally:
        for writer in writers:
            writer.stop()
    assert not [item for item in statuses if item[1] == 500], statuses
    for writer in writers:
        assert "writer failed unexpectedly" not in writer.log(), writer.log_path
    # Both revisions really wrote into the shared files (else there was no overlap).
    assert rows["old"] > 0 and rows["new"] > 0, rows

    # The safety net, as the CronJob's sweep would run it after the overlap.
    result = sweep(bucket, settings)
    assert result.ok, result.summary()
    assert [info.key for info in bucket.list("incoming/")] == []
    assert [info.key for info in bucket.list("failed/")] == []
    archived = {info.key for info in bucket.list("archive/")}
    assert archived == {archive_key(key, RECEIVED) for key in keys}
    verdict = verify(settings.data_dir, expected)
    assert verdict.ok, verdict
    print(f"\nrollout overlap: {BATCHES} batches in {verdict.files} day files, "
          f"{verdict.rows} rows checked; rows written {dict(rows)}; answers "
          f"{dict(sorted(statuses.items()))}; final sweep: {result.summary()}")
