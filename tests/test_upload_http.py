"""The upload function through real HTTP: functions/upload/main.py served as its image does.

One server process serves the whole module (against the session's real SeaweedFS); two
more short-lived processes cover what needs another configuration: a bucket that is down,
and a configuration error at start-up.  Clients talk the way stations do: ``requests``
with a form whose ``data`` is the pickle as latin-1 text (station software, reference
clients) or as raw bytes (a naive Python 3 client).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import http.client
import os
import pickle
import random
import socket
import subprocess
import textwrap
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import TEST_STATIONS, S3Endpoint, write_station_list
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.ports import free_port
from hisparc_datastore_dev.processes import serve_command, serve_function, stop_process
from hisparc_datastore_dev.py2pickle import Py2Unicode, dumps_py2
from hostile_pickles import HOSTILE, MARKER

from hisparc_datastore.format.keys import incoming_key, suspicious_key
from hisparc_datastore.storage.store import Bucket

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "functions" / "upload" / "main.py"
MAX_BODY = 16 * 1024 * 1024  # room for the hostile corpus's largest case, raw-encoded
STATION, PASSWORD = 501, TEST_STATIONS[501][1]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324


def batch(n: int = 3, year: int = 2024, seed: int = 1) -> list[dict]:
    return samples.batch(n, dt.datetime(year, 5, 17, 8, 0, 0), random.Random(seed))


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    stderr_path: Path
    station_list: Path
    bucket: Bucket

    def log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def post(self, data: bytes | str, station: object = STATION, password: str = PASSWORD,
             checksum: str | None = None, path: str = "/") -> requests.Response:
        """POST like the station software: ``data`` is a str (latin-1 text) or raw bytes."""
        raw = data if isinstance(data, bytes) else data.encode("latin-1")
        return requests.post(
            self.url + path,
            data={
                "station_id": str(station),
                "password": password,
                "data": data,
                "checksum": md5(raw) if checksum is None else checksum,
            },
            timeout=60,
        )

    def stored_keys(self) -> set[str]:
        return {item.key for item in self.bucket.list("")}


def server_environment(config: Path, endpoint: S3Endpoint, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATASTORE_", "AWS_"))
    }
    env.update(
        DATASTORE_CONFIG=str(config),
        AWS_ACCESS_KEY_ID=endpoint.access_key,
        AWS_SECRET_ACCESS_KEY=endpoint.secret_key,
        **extra,
    )
    return env


def write_config(directory: Path, endpoint: S3Endpoint, bucket_name: str) -> Path:
    station_list = write_station_list(directory / "stations.csv")
    config = directory / "config.ini"
    config.write_text(
        textwrap.dedent(
            f"""\
            [General]
            log =
            loglevel = debug
            station_list = {station_list}
            data_dir = {directory / "data"}
            minimum_year = 2020

            [Bucket]
            endpoint = {endpoint.url}
            name = {bucket_name}

            [Upload]
            max_body_bytes = {MAX_BODY}
            """
        )
    )
    return config


def upload_site(directory: Path, endpoint: S3Endpoint, prefix: str) -> tuple[Path, Bucket]:
    """A config for a served upload function, and its own fresh bucket, created."""
    bucket_name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    config = write_config(directory, endpoint, bucket_name)
    bucket = Bucket(bucket_name, endpoint=endpoint.url, access_key=endpoint.access_key,
                    secret_key=endpoint.secret_key)
    bucket.ensure_exists()
    return config, bucket


def start(env: dict[str, str], stderr_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Serve the upload function as its image does; the process and its port."""
    served = serve_function(SOURCE, "upload", env, stderr_path, cwd=ROOT)
    return served.process, served.port


def stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process)


@pytest.fixture(scope="module")
def server(s3_endpoint: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("upload-http")
    config, bucket = upload_site(directory, s3_endpoint, "upload-http")
    stderr_path = directory / "stderr.log"
    process, port = start(server_environment(config, s3_endpoint), stderr_path)
    try:
        yield Server(f"http://127.0.0.1:{port}", port, process, stderr_path,
                     directory / "stations.csv", bucket)
    finally:
        stop(process)


def replace_station_list(path: Path, text: str) -> None:
    """Swap the file in whole, as a mounted secret changes (a new inode)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# --- what stations see ---------------------------------------------------------------------


def test_get_and_head_describe_the_endpoint(server: Server) -> None:
    for path in ("/", "/anything/else"):
        answer = requests.get(server.url + path, timeout=30)
        assert answer.status_code == 200
        assert "HiSPARC" in answer.text and "upload" in answer.text
    assert requests.head(server.url, timeout=30).status_code == 200


def test_station_software_python2_batch_is_stored_byte_for_byte(server: Server) -> None:
    data = dumps_py2(batch(100, seed=11))
    answer = server.post(data.decode("latin-1"), path="/upload")
    assert (answer.status_code, answer.text) == (200, "100")
    assert answer.headers["Content-Type"].startswith("text/plain")
    stored = server.bucket.get(incoming_key(STATION, md5(data)))
    assert stored.body == data
    assert stored.metadata["station"] == "501"
    assert stored.metadata["cluster"] == "Amsterdam"
    assert stored.metadata["events"] == "100"
    received = dt.datetime.fromisoformat(stored.metadata["received"])
    assert received.tzinfo is not None
    assert abs(received - dt.datetime.now(dt.UTC)) < dt.timedelta(hours=1)


@pytest.mark.parametrize("protocol", [3, 5])
@pytest.mark.parametrize("as_text", [True, False], ids=["latin1-text", "raw-bytes"])
def test_python3_numpy_pickles_in_both_encodings(
    server: Server, protocol: int, as_text: bool
) -> None:
    data = pickle.dumps(samples.numpy_flavour(batch(2, seed=protocol)), protocol=protocol)
    assert not data.isascii()
    answer = server.post(data.decode("latin-1") if as_text else data)
    assert answer.text == "100"
    assert server.bucket.get(incoming_key(STATION, md5(data))).body == data


def test_python2_pickle_with_non_ascii_bytes_in_both_encodings(server: Server) -> None:
    events = batch(1)
    events[0]["datalist"].append({"data_uploadcode": "ERRMSG", "data": Py2Unicode("\u00e9\u00ff")})
    data = dumps_py2(events)
    assert not data.isascii()
    for payload in (data.decode("latin-1"), data):
        assert server.post(payload).text == "100"
    assert server.bucket.get(incoming_key(STATION, md5(data))).body == data


def test_resent_batch_overwrites_the_same_key(server: Server) -> None:
    data = dumps_py2(batch(3, seed=99))
    key = incoming_key(STATION, md5(data))
    assert server.post(data.decode("latin-1")).text == "100"
    first = server.bucket.head(key)
    assert server.post(data).text == "100"
    assert [k for k in server.stored_keys() if md5(data) in k] == [key]
    assert server.bucket.head(key).etag == first.etag


def test_suspicious_batch_is_100_and_held_apart(server: Server) -> None:
    data = dumps_py2(batch(2, seed=5) + batch(1, year=2019, seed=6))
    assert server.post(data.decode("latin-1")).text == "100"
    assert server.bucket.get(suspicious_key(STATION, md5(data))).body == data
    assert server.bucket.head(incoming_key(STATION, md5(data))) is None


# --- every refusal -------------------------------------------------------------------------


def assert_answer(response: requests.Response, code: str, status: int = 200) -> None:
    assert (response.status_code, response.text) == (status, code)
    assert response.headers["Content-Type"].startswith("text/plain")


def test_refusal_codes_in_order(server: Server) -> None:
    before = server.stored_keys()
    data = dumps_py2(batch(1, seed=3))
    text = data.decode("latin-1")
    url = server.url
    fields = {"station_id": "501", "password": PASSWORD, "data": text, "checksum": md5(data)}
    for missing in fields:
        partial = {k: v for k, v in fields.items() if k != missing}
        assert_answer(requests.post(url, data=partial, timeout=30), "400")
    assert_answer(requests.post(url, data=b"", timeout=30), "400")
    assert_answer(server.post(text, station="abc"), "400")
    assert_answer(server.post(text, station="501.0"), "400")
    assert_answer(server.post(text, station=999, password="nope", checksum="x"), "206")
    assert_answer(server.post(text, password="wrong", checksum="x"), "203")
    assert_answer(server.post(text, checksum=md5(b"other")), "201")
    garbage = b"this is not a pickle"
    assert_answer(server.post(garbage.decode("latin-1")), "208")
    assert_answer(server.post(pickle.dumps({"a": 1}, protocol=2)), "208")
    assert server.stored_keys() == before


def test_every_hostile_pickle_is_208_nothing_stored_nothing_run(server: Server) -> None:
    assert not MARKER.exists()
    before = server.stored_keys()
    for name, data in HOSTILE:
        for payload in (data.decode("latin-1"), data):
            answer = server.post(payload)
            assert (answer.status_code, answer.text) == (200, "208"), name
    assert server.stored_keys() == before
    assert not MARKER.exists()
    assert requests.get(server.url, timeout=30).status_code == 200


def test_nothing_the_client_sends_gives_a_5xx(server: Server) -> None:
    cases: list[tuple[bytes, str]] = [
        (b"\x00\x01\x02\xff" * 1000, "application/x-www-form-urlencoded"),
        (b"station_id=%zz&password=%&data=%%%&checksum=%g0", "application/x-www-form-urlencoded"),
        (b"--x\r\n\r\n\r\n--x--", "multipart/form-data; boundary=x"),
        (b"anything", 'multipart/form-data; boundary="' + "b" * 300 + '"'),
        (b"a=b", "text/plain; charset=\xff"),
        (b"=" * 10000, ""),
    ]
    for body, content_type in cases:
        headers = {"Content-Type": content_type} if content_type else {}
        answer = requests.post(server.url, data=body, headers=headers, timeout=30)
        assert (answer.status_code, answer.text) == (200, "400"), body[:60]
    mixed = b"station_id=501&station_id=x&password=&data=&checksum="
    answer = requests.post(server.url, data=mixed, timeout=30)
    assert (answer.status_code, answer.text) == (200, "203")  # the first station_id counts
    answer = requests.put(server.url, data=b"x", timeout=30)
    assert (answer.status_code, answer.text) == (405, "400")
    assert "Traceback" not in server.log()


# --- body size -----------------------------------------------------------------------------


def read_response(sock: socket.socket) -> tuple[int, str]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read().decode()


def test_body_over_the_limit_is_refused_without_reading_it(server: Server) -> None:
    head = (
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {10**9}\r\n\r\n"
    ).encode()
    # The client sends a few bytes of a 1 GB body and then waits: an answer can only come
    # from a server that decided on the header alone.
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head + b"station_id=501&password=")
        status, body = read_response(sock)
    assert (status, body) == (413, "400")
    assert requests.get(server.url, timeout=30).status_code == 200


def test_chunked_body_over_the_limit_is_cut_off(server: Server) -> None:
    head = (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n" % (256 * 1024) + b"a" * (256 * 1024) + b"\r\n"

    def send(sock: socket.socket) -> None:
        try:
            sock.sendall(head)
            while True:  # never ends by itself: the body is endless
                sock.sendall(chunk)
        except OSError:
            pass

    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sender = threading.Thread(target=send, args=(sock,), daemon=True)
        sender.start()
        status, body = read_response(sock)
        with contextlib.suppress(OSError):  # the server may have closed it already
            sock.shutdown(socket.SHUT_RDWR)
    sender.join(30)
    assert (status, body) == (413, "400")
    assert requests.get(server.url, timeout=30).status_code == 200


def test_body_of_exactly_the_limit_is_read_one_more_byte_is_not(server: Server) -> None:
    data = dumps_py2(batch(1, seed=42))
    form = (
        b"station_id=501&password=" + PASSWORD.encode() + b"&checksum=" + md5(data).encode()
        + b"&data=" + requests.utils.quote(data.decode("latin-1"), safe="").encode()
        + b"&pad="
    )
    body = form + b"x" * (MAX_BODY - len(form))
    assert len(body) == MAX_BODY
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = requests.post(server.url, data=body, headers=headers, timeout=60)
    assert (answer.status_code, answer.text) == (200, "100")
    answer = requests.post(server.url, data=body + b"x", headers=headers, timeout=60)
    assert (answer.status_code, answer.text) == (413, "400")


# --- station list, logs --------------------------------------------------------------------


def test_station_list_changes_are_picked_up_and_bad_lines_reported(server: Server) -> None:
    original = server.station_list.read_text(encoding="utf-8")
    data = dumps_py2(batch(1, seed=77))
    assert server.post(data, station=9001, password="new-9001").text == "206"
    try:
        replace_station_list(
            server.station_list,
            original + "not-a-number,Amsterdam,x\n9001,Utrecht,new-9001\n",
        )
        bad_line = len(original.splitlines()) + 1
        assert server.post(data, station=9001, password="new-9001").text == "100"
        assert server.post(data, station=STATION).text == "100"
        stored = server.bucket.get(incoming_key(9001, md5(data)))
        assert stored.metadata["cluster"] == "Utrecht"
        assert f"line {bad_line}" in server.log()
    finally:
        replace_station_list(server.station_list, original)
    assert server.post(data, station=9001, password="new-9001").text == "206"


def test_one_log_line_per_request_and_never_a_password(server: Server) -> None:
    data = dumps_py2(batch(2, seed=123))
    assert server.post(data).text == "100"
    assert server.post(data, password="Wr0ng-Secret-Guess").text == "203"
    log = server.log()
    lines = [line for line in log.splitlines() if f"{md5(data)}.pickle" in line]
    assert len(lines) == 1
    assert "station=501 code=100 events=2 bytes=" in lines[0]
    assert " ms=" in lines[0]
    assert "code=203" in log
    for secret in ["Wr0ng-Secret-Guess", *(password for _, password in TEST_STATIONS.values()),
                   "new-9001"]:
        assert secret not in log
    assert "Traceback" not in log  # nothing any earlier test sent produced one either


# --- other configurations ------------------------------------------------------------------


def test_bucket_down_answers_404_with_503(
    s3_endpoint: S3Endpoint, tmp_path: Path
) -> None:
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    with refusing:
        down = f"http://127.0.0.1:{refusing.getsockname()[1]}"
        config = write_config(tmp_path, s3_endpoint, "bucket-down")
        env = server_environment(config, s3_endpoint, DATASTORE_BUCKET_ENDPOINT=down)
        process, port = start(env, tmp_path / "stderr.log")
        try:
            data = dumps_py2(batch(2))
            answer = requests.post(
                f"http://127.0.0.1:{port}/",
                data={"station_id": "501", "password": PASSWORD,
                      "data": data.decode("latin-1"), "checksum": md5(data)},
                timeout=120,
            )
        finally:
            stop(process)
    assert (answer.status_code, answer.text) == (503, "404")
    log = (tmp_path / "stderr.log").read_text()
    assert "code=404" in log
    assert "Traceback" not in log


def test_configuration_error_stops_the_start_naming_the_key(
    s3_endpoint: S3Endpoint, tmp_path: Path
) -> None:
    config = write_config(tmp_path, s3_endpoint, "config-error")
    env = server_environment(config, s3_endpoint, DATASTORE_UPLOAD_MAX_BODY_BYTES="lots")
    result = subprocess.run(
        serve_command(SOURCE, "upload", "127.0.0.1", free_port()),
        env=env, cwd=ROOT, capture_output=True, timeout=120, check=False,
    )
    assert result.returncode != 0
    assert b"DATASTORE_UPLOAD_MAX_BODY_BYTES" in result.stderr
    assert b"configuration error" in result.stderr
