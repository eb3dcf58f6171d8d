"""Prometheus metrics of both functions: what an operator watches instead of the logs.

Everything is a ``prometheus_client`` metric, so gunicorn's worker processes can share
them: the launcher (:mod:`hisparc_datastore.serve`) points ``PROMETHEUS_MULTIPROC_DIR`` at
an empty directory before the function is imported, each worker writes its values there,
and the launcher serves the sum on its own port (``METRICS_PORT``, 9464), which the
Knative Services do not route: stations cannot reach it, Prometheus scrapes the pod.
Without that variable (the CLI, tests calling the cores) the metrics live in the process.

Names follow Prometheus' conventions: ``datastore_`` prefix, base units (seconds, bytes),
``_total`` for counters.  The alert rules and the dashboard in ``infra/monitoring/`` use
exactly these names; ``tests/test_metrics.py`` checks that they exist.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# -- upload ------------------------------------------------------------------------------

UPLOADS = Counter(
    "datastore_uploads_total", "Uploads answered, by protocol answer code", ["code"])
UPLOAD_BYTES = Histogram(
    "datastore_upload_request_bytes", "Size of an upload's body",
    buckets=(1e3, 1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3.4e7))
UPLOAD_EVENTS = Histogram(
    "datastore_upload_events", "Events in an accepted upload",
    buckets=(1, 2, 5, 10, 50, 100, 200, 500, 1000, 5000))
UPLOAD_SECONDS = Histogram(
    "datastore_upload_duration_seconds", "Time to answer an upload",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
STATION_LAST_UPLOAD = Gauge(
    "datastore_station_last_upload_timestamp_seconds",
    "When a station's last batch was accepted (unix time)", ["station"],
    multiprocess_mode="max")

# -- writer ------------------------------------------------------------------------------

OBJECTS = Counter(
    "datastore_writer_objects_total",
    "Objects the writer finished a try on, by outcome (archived, already_done, "
    "quarantined, deferred, refused, failed)", ["outcome"])
ROWS = Counter("datastore_writer_rows_total", "Rows appended to the day files")
NOTIFICATIONS = Counter(
    "datastore_writer_notifications_total",
    "Requests to the writer, by kind (minio, s3, cloudevent-..., sweep) and HTTP status",
    ["kind", "status"])
LAG_SECONDS = Histogram(
    "datastore_writer_lag_seconds",
    "From the object stored in the bucket to its rows committed in HDF5",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
BACKLOG_OBJECTS = Gauge(
    "datastore_writer_backlog_objects",
    "Objects under incoming/ when the last full sweep listed it",
    multiprocess_mode="mostrecent")
BACKLOG_OLDEST = Gauge(
    "datastore_writer_backlog_oldest_seconds",
    "Age of the oldest object under incoming/ when the last full sweep listed it",
    multiprocess_mode="mostrecent")
FAILED_OBJECTS = Gauge(
    "datastore_writer_failed_objects", "Objects in failed/ after the last full sweep",
    multiprocess_mode="mostrecent")
WAITING_OBJECTS = Gauge(
    "datastore_writer_waiting_objects",
    "Objects the serving writer holds back (held-open day file, retry record)",
    multiprocess_mode="mostrecent")
LAST_SWEEP = Gauge(
    "datastore_writer_last_sweep_timestamp_seconds", "When the last full sweep ended",
    multiprocess_mode="max")
VOLUME_FREE = Gauge(
    "datastore_data_volume_free_bytes", "Free space on the day files' volume",
    multiprocess_mode="mostrecent")
VOLUME_SIZE = Gauge(
    "datastore_data_volume_size_bytes", "Size of the day files' volume",
    multiprocess_mode="mostrecent")


_children: dict[tuple[int, str], Any] = {}
_children_lock = threading.Lock()


def child(metric: Any, value: str) -> Any:
    """``metric.labels(value)``: the same child, remembered, without its checks each time.

    For one-label metrics on a hot path (the upload's answer code and station).  The
    children are the metric's own, so a fork (gunicorn's workers) is handled as before.
    """
    key = (id(metric), value)
    found = _children.get(key)
    if found is None:
        with _children_lock:
            found = _children.get(key)
            if found is None:
                found = _children[key] = metric.labels(value)
    return found


def observe_volume(data_dir: Path) -> None:
    """Record the data volume's size and free space (each sweep and each health check)."""
    try:
        stat = os.statvfs(data_dir)
    except OSError:
        return
    VOLUME_FREE.set(stat.f_bavail * stat.f_frsize)
    VOLUME_SIZE.set(stat.f_blocks * stat.f_frsize)


def prepare_multiprocess_dir(directory: Path) -> Path:
    """An empty directory for the workers' metric files, named in the environment.

    Emptied on every start: files of a previous run's workers would add their old counts.
    """
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return directory


def exposition() -> bytes:
    """The text the metrics endpoint serves: every worker's values, summed up."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def worker_exited(pid: int) -> None:
    """Forget a dead worker's live gauges (gunicorn's ``child_exit``)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
