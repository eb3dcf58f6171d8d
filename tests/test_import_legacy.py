"""Importing the reference datastore's queue folders, against the real S3 server.

Queue files are made as the reference's upload app made them: a pickled dict with
station_id, cluster and event_list, by Python 2 (protocol 0, via ``dumps_py2``) or by
Python 3 (numpy scalars, protocol 3).  What the import stores must be written by the
live writer into exactly the rows a direct upload of the same batch gives.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import pickle
import random
from pathlib import Path
from typing import Any

import pytest
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.cli import main
from hisparc_datastore.config import Settings
from hisparc_datastore.format.keys import incoming_key
from hisparc_datastore.format.payload import PayloadError, decode_batch
from hisparc_datastore.ops.import_legacy import (
    MARKER_PREFIX,
    decode_queue_file,
    import_legacy,
)
from hisparc_datastore.ops.replay import compare_files
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload.protocol import metadata_for
from hisparc_datastore.writer.pipeline import process_keys, sweep

DAY = dt.date(2024, 3, 1)
ALL_TYPES = ("CIC", "ERR", "CFG", "CMP", "SIN", "SAT", "WTR", "WER", "WCG", "LIT", "LER",
             "LCG", "LST", "LNS")
MTIME = dt.datetime(2024, 3, 1, 12, 0, tzinfo=dt.UTC)


def the_batch(seed: int = 3, start: dt.datetime = dt.datetime(2024, 3, 1, 10, 0)) -> list[Any]:
    return samples.batch(2 * len(ALL_TYPES), start, random.Random(seed), kinds=ALL_TYPES)


def queue_file_py2(events: list[Any], station: int = 501, cluster: str = "Amsterdam") -> bytes:
    return dumps_py2({"station_id": station, "cluster": cluster, "event_list": events})


def queue_file_py3(events: list[Any], station: int = 501, cluster: str = "Amsterdam") -> bytes:
    return pickle.dumps(
        {"station_id": station, "cluster": cluster, "event_list": samples.numpy_flavour(events)},
        protocol=3,
    )


def write_queue(root: Path, folder: str, name: str, data: bytes) -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (MTIME.timestamp(), MTIME.timestamp()))
    return path


def keys(bucket: Bucket, prefix: str) -> list[str]:
    return [info.key for info in bucket.list(prefix)]


def test_decode_gives_the_batch_events() -> None:
    events = the_batch()
    direct = decode_batch(dumps_py2(events))
    for data in (queue_file_py2(events), queue_file_py3(events)):
        batch = decode_queue_file(data)
        assert (batch.station, batch.cluster, batch.events) == (501, "Amsterdam", len(events))
        assert decode_batch(batch.body) == direct
        assert batch.md5 == hashlib.md5(batch.body).hexdigest()  # noqa: S324
    # the same file always gives the same body (the key is its md5)
    assert decode_queue_file(queue_file_py2(events)).body == decode_queue_file(
        queue_file_py2(events)).body


@pytest.mark.parametrize("data, reason", [
    (pickle.dumps({"station_id": 501, "cluster": "x", "event_list": [{}],
                   "evil": os.system}, protocol=2), "refused"),
    (pickle.dumps([{"header": {}}], protocol=4), "not a dict"),
    (pickle.dumps({"station_id": "501", "cluster": "x", "event_list": []}), "station_id"),
    (pickle.dumps({"station_id": 501, "cluster": "", "event_list": []}), "cluster"),
    (pickle.dumps({"station_id": 501, "cluster": "x", "event_list": [1]}), "event_list"),
    (b"not a pickle", "pickle"),
])
def test_decode_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        decode_queue_file(data)


def test_import_lands_the_same_rows_as_a_direct_upload(
    bucket: Bucket, settings: Settings, tmp_path: Path
) -> None:
    events = the_batch()
    # Direct: the station's own pickle, stored as the upload function does.
    direct = dataclasses.replace(settings, data_dir=tmp_path / "direct")
    direct.data_dir.mkdir()  # a mounted volume: the writer never makes data_dir itself
    body = dumps_py2(events)
    key = incoming_key(501, hashlib.md5(body).hexdigest())  # noqa: S324
    bucket.put(key, body, metadata_for(Station(501, "Amsterdam", ""), len(events), MTIME))
    assert process_keys([key], bucket, direct).archived == [key]

    for flavour, make in (("py2", queue_file_py2), ("py3", queue_file_py3)):
        root = tmp_path / f"queue-{flavour}"
        write_queue(root, "incoming", "501_0001", make(events))
        report = import_legacy(bucket, root)
        assert len(report.imported) == 1 and not report.undecodable
        (imported,) = report.imported
        stored = bucket.get(imported)
        assert stored.metadata["station"] == "501"
        assert stored.metadata["cluster"] == "Amsterdam"
        assert stored.metadata["events"] == str(len(events))
        assert dt.datetime.fromisoformat(stored.metadata["received"]) == MTIME
        assert stored.metadata["legacy-source"] == "incoming/501_0001"
        written = dataclasses.replace(settings, data_dir=tmp_path / flavour)
        written.data_dir.mkdir()
        result = sweep(bucket, written)
        assert result.archived == [imported], result.summary()
        comparison = compare_files(day_file_path(direct.data_dir, DAY),
                                   day_file_path(written.data_dir, DAY), DAY,
                                   strict_order=True, ledger=False)
        assert comparison.differences == [], flavour
    assert keys(bucket, "incoming/") == []


def test_folders_and_idempotence(bucket: Bucket, settings: Settings, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "queue"
    write_queue(root, "incoming", "a", queue_file_py2(the_batch(1)))
    write_queue(root, "incoming", "b", queue_file_py3(the_batch(2), station=502))
    write_queue(root, "partial", "c", queue_file_py2(the_batch(4), station=7001,
                                                     cluster="Leiden"))
    cold_start = the_batch(5, start=dt.datetime(2019, 12, 31, 23, 0))
    write_queue(root, "suspicious", "d", queue_file_py2(cold_start))
    broken = write_queue(root, "incoming", "e", b"(dp0\nS'station_id'\np1\nI501\n")

    assert main(["import-legacy", str(root), "--skip-partial", "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert "3 imported" in printed and "1 skipped" in printed and "1 undecodable" in printed
    assert "undecodable, left in place: incoming/e" in printed
    assert broken.exists() and (root / "partial" / "c").exists()
    stored = keys(bucket, "incoming/") + keys(bucket, "suspicious/")
    assert len(stored) == 3
    assert sum(key.startswith("suspicious/501/") for key in stored) == 1
    assert len(keys(bucket, MARKER_PREFIX)) == 3

    # twice: nothing new; now with partial/ too
    report = import_legacy(bucket, root)
    assert len(report.already) == 3 and len(report.imported) == 1
    assert report.imported[0].startswith("incoming/7001/")
    # after the writer archived them: still nothing new
    assert sweep(bucket, settings).ok
    assert keys(bucket, "incoming/") == []
    again = import_legacy(bucket, root)
    assert again.imported == [] and len(again.already) == 4
    assert keys(bucket, "incoming/") == []
    assert len(keys(bucket, "archive/")) == 3


def test_dry_run_stores_nothing(bucket: Bucket, settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "queue"
    write_queue(root, "incoming", "a", queue_file_py2(the_batch(1)))
    report = import_legacy(bucket, root, dry_run=True)
    assert len(report.imported) == 1
    assert keys(bucket, "") == []


def test_cli_refuses_a_directory_without_queue_folders(settings: Settings,
                                                      tmp_path: Path) -> None:
    assert main(["import-legacy", str(tmp_path), "--no-progress"]) == 2
