"""Metrics, scraped from the functions as their images serve them.

Both functions run under the launcher (gunicorn, multiprocess metrics, the endpoint on its
own port) against the session's real S3 server; the counters must move as uploads and
writes happen, and every name the alert rules and the dashboard use must be served.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hisparc_datastore_dev.processes import Served
from hisparc_datastore_dev.py2pickle import dumps_py2

from hisparc_datastore.storage.store import Bucket

try:  # tests/ as a package, or tests/ on sys.path
    from .conftest import TEST_STATIONS, wait_for
    from .notification_bodies import cloudevent_binary, minio_body
    from .reliability_support import make_batch, serve, store_batch
except ImportError:
    from conftest import TEST_STATIONS, wait_for  # type: ignore[no-redef]
    from notification_bodies import cloudevent_binary, minio_body  # type: ignore[no-redef]
    from reliability_support import make_batch, serve, store_batch  # type: ignore[no-redef]

pytestmark = pytest.mark.long

MONITORING = Path(__file__).resolve().parents[1] / "infra" / "monitoring"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(served: Served) -> dict[str, float]:
    """``name{labels}`` -> value, from the function's metrics endpoint."""
    assert served.metrics_url is not None
    answer = requests.get(served.metrics_url, timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for line in answer.text.splitlines():
        found = SAMPLE.match(line)
        if found:
            samples[found.group(1) + (found.group(2) or "")] = float(found.group(3))
    return samples


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    want = ",".join(f'{key}="{text}"' for key, text in sorted(labels.items()))
    return samples.get(f"{name}{{{want}}}" if labels else name, 0.0)


@pytest.fixture
def upload(datastore_env: dict[str, str], bucket: Bucket, tmp_path: Path) -> Iterator[Served]:
    served = serve("upload", {**datastore_env, "WORKERS": "2"}, tmp_path / "upload.log")
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def writer(datastore_env: dict[str, str], bucket: Bucket, tmp_path: Path) -> Iterator[Served]:
    served = serve("writer", datastore_env, tmp_path / "writer.log")
    try:
        yield served
    finally:
        served.stop()


def post(upload: Served, station: int, body: bytes, password: str | None = None) -> str:
    answer = requests.post(upload.url, data={
        "station_id": str(station), "password": password or TEST_STATIONS[station][1],
        "data": body.decode("latin-1"), "checksum": hashlib.md5(body).hexdigest(),  # noqa: S324
    }, timeout=60)
    return answer.text


def test_upload_counters_move_across_workers(upload: Served) -> None:
    before = scrape(upload)
    bodies = [dumps_py2(make_batch(n, 501)) for n in range(1, 7)]
    answers = [post(upload, 501, body) for body in bodies]
    answers.append(post(upload, 501, bodies[0], password="wrong"))
    assert answers == ["100"] * 6 + ["203"]
    after = scrape(upload)  # two workers: the endpoint sums both
    assert value(after, "datastore_uploads_total", code="100") - value(
        before, "datastore_uploads_total", code="100") == 6
    assert value(after, "datastore_uploads_total", code="203") == 1
    assert value(after, "datastore_upload_duration_seconds_count") == 7
    assert value(after, "datastore_upload_events_count") == 6
    assert value(after, "datastore_upload_events_sum") == sum(
        len(make_batch(n, 501)) for n in range(1, 7))
    assert value(after, "datastore_upload_request_bytes_count") == 7
    last = value(after, "datastore_station_last_upload_timestamp_seconds", station="501")
    assert time.time() - 60 < last <= time.time()


def test_writer_counters_move_as_objects_are_written(writer: Served, bucket: Bucket) -> None:
    keys = [store_batch(bucket, make_batch(n, 7001), 7001) for n in range(1, 5)]
    for key in keys:
        answer = requests.post(writer.url, data=minio_body(bucket.name, [key]),
                               headers={"Content-Type": "application/json"}, timeout=60)
        assert answer.status_code == 200
    samples = scrape(writer)
    assert value(samples, "datastore_writer_objects_total", outcome="archived") == 4
    rows = sum(len(make_batch(n, 7001)) for n in range(1, 5))
    assert value(samples, "datastore_writer_rows_total") == rows
    assert value(samples, "datastore_writer_lag_seconds_count") == 4
    assert value(samples, "datastore_writer_notifications_total", kind="minio",
                 status="200") == 4

    headers, body = cloudevent_binary(json.dumps({"limit": 10}).encode(),
                                      "org.hisparc.datastore.sweep")
    assert requests.post(writer.url, data=body, headers=headers, timeout=60).status_code == 202
    wait_for(lambda: value(scrape(writer),
                           "datastore_writer_last_sweep_timestamp_seconds") > 0, 30)
    samples = scrape(writer)
    assert value(samples, "datastore_writer_backlog_objects") == 0
    assert value(samples, "datastore_writer_failed_objects") == 0
    assert value(samples, "datastore_data_volume_size_bytes") > 0
    assert 0 < value(samples, "datastore_data_volume_free_bytes") <= value(
        samples, "datastore_data_volume_size_bytes")
    assert value(samples, "datastore_writer_notifications_total", kind="sweep",
                 status="202") == 1


def test_the_functions_do_not_serve_metrics_to_stations(upload: Served) -> None:
    """Stations reach the function's port only; /metrics there is the function's."""
    answer = requests.get(upload.url + "metrics", timeout=10)
    assert "datastore_uploads_total" not in answer.text


@pytest.mark.skipif(not MONITORING.exists(), reason="infra/monitoring/ not written yet")
def test_every_metric_the_rules_and_dashboard_use_is_served(
    upload: Served, writer: Served, bucket: Bucket
) -> None:
    """After one of each thing an operator watches (an upload, a refused one, a
    notification, a sweep): a labelled series exists only once it was first counted."""
    body = dumps_py2(make_batch(3, 501))
    assert [post(upload, 501, body), post(upload, 501, body, password="wrong")] == [
        "100", "203"]
    key = store_batch(bucket, make_batch(2, 7001), 7001)
    assert requests.post(writer.url, data=minio_body(bucket.name, [key]),
                         headers={"Content-Type": "application/json"},
                         timeout=60).status_code == 200
    headers, sweep = cloudevent_binary(json.dumps({"limit": 10}).encode(),
                                       "org.hisparc.datastore.sweep")
    assert requests.post(writer.url, data=sweep, headers=headers, timeout=60).status_code == 202
    wait_for(lambda: value(scrape(writer),
                           "datastore_writer_last_sweep_timestamp_seconds") > 0, 30)
    served: set[str] = set()
    for function in (upload, writer):
        served |= {name.split("{")[0] for name in scrape(function)}
    used: set[str] = set()
    for path in MONITORING.rglob("*"):
        if path.suffix in (".yaml", ".yml", ".json"):
            used |= set(re.findall(r"\bdatastore_[a-z_]+", path.read_text()))
    missing = sorted(name for name in used if name not in served)
    assert not missing, f"used by infra/monitoring/ but not served: {missing}"


def test_a_labelled_child_is_the_metrics_own_and_made_once() -> None:
    """The upload's hot path takes its answer code's and station's children from
    ``metrics.child``: the very children ``labels()`` gives, looked up once."""
    from hisparc_datastore import metrics

    child = metrics.child(metrics.UPLOADS, "999")
    assert child is metrics.UPLOADS.labels("999")
    assert metrics.child(metrics.UPLOADS, "999") is child
    assert metrics.child(metrics.STATION_LAST_UPLOAD, "999") is not child
    assert metrics.child(metrics.STATION_LAST_UPLOAD, "999") is (
        metrics.STATION_LAST_UPLOAD.labels("999"))
