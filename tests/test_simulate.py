"""The station simulator against a tiny real HTTP server that answers what a test scripts.

The server is the standard library's, on loopback; the simulator's HTTP client, form
encoding and retry loop are the real ones.  Only the backoff waits are recorded instead of
slept, so the tests are quick and never depend on timing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import itertools
import pickle
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hisparc_datastore_dev import simulate


@dataclass
class ScriptedServer:
    """Answers each POST with the next (status, body) of ``script``; the last one repeats."""

    script: list[tuple[int, str]]
    forms: list[dict[str, list[str]]] = field(default_factory=list)
    raw_bodies: list[bytes] = field(default_factory=list)
    url: str = ""

    def handle(self, body: bytes) -> tuple[int, str]:
        self.raw_bodies.append(body)
        self.forms.append(urllib.parse.parse_qs(body.decode("ascii")))
        index = min(len(self.forms) - 1, len(self.script) - 1)
        return self.script[index]


@pytest.fixture
def scripted() -> Iterator[callable]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(script: list[tuple[int, str]]) -> ScriptedServer:
        state = ScriptedServer(script)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status, text = state.handle(body)
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        state.url = f"http://127.0.0.1:{server.server_address[1]}/upload"
        return state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class RecordedWaits:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return False


def test_backoff_is_hsmonitors_capped_doubling() -> None:
    assert [simulate.backoff(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_retries_with_backoff_until_the_body_is_exactly_100(scripted) -> None:
    server = scripted([
        (200, "203"),  # a protocol error code
        (503, "404"),  # bucket unreachable
        (200, "100 "),  # not exactly 100: a station retries
        (500, "<html>Internal Server Error</html>"),
        (200, "100"),
    ])
    pickled = bytes(range(256)) + b"\x80\x03}q\x00."  # every byte value survives the form
    form = simulate.form_fields(501, "pa ss&w=rd", pickled)
    waits = RecordedWaits()
    import requests

    with requests.Session() as session:
        delivery = simulate.deliver(
            lambda: simulate.post_once(session, server.url, form), 7, waits
        )

    assert delivery.accepted
    assert [attempt.answer for attempt in delivery.attempts] == [
        "203", "HTTP 503: 404", "100", "HTTP 500: <html>Internal Server...", "100",
    ]
    assert [attempt.accepted for attempt in delivery.attempts] == [False] * 4 + [True]
    assert waits.waits == [1, 2, 4, 8]
    # The same batch every time, form-encoded as the station software does it.
    assert len(server.forms) == 5
    for received in server.forms:
        assert received["station_id"] == ["501"]
        assert received["password"] == ["pa ss&w=rd"]
        data = received["data"][0].encode("latin-1")
        assert data == pickled
        assert received["checksum"] == [hashlib.md5(pickled).hexdigest()]  # noqa: S324
    assert len(set(server.raw_bodies)) == 1


def test_connection_errors_are_retried_and_max_retries_gives_up() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    waits = RecordedWaits()
    import requests

    with requests.Session() as session:
        delivery = simulate.deliver(
            lambda: simulate.post_once(session, url, {"station_id": "1"}), 1, waits,
            max_retries=3,
        )
    assert not delivery.accepted
    assert [attempt.answer for attempt in delivery.attempts] == ["connection error"] * 4
    assert waits.waits == [1, 2, 4]


def test_a_stop_during_the_backoff_ends_the_delivery(scripted) -> None:
    server = scripted([(200, "201")])
    import requests

    with requests.Session() as session:
        delivery = simulate.deliver(
            lambda: simulate.post_once(session, server.url, {"station_id": "1"}), 1,
            lambda seconds: True,
        )
    assert not delivery.accepted
    assert len(delivery.attempts) == 1


def test_percentiles_and_summary_layout() -> None:
    assert simulate.percentile([], 50) != simulate.percentile([], 50)  # NaN
    values = [i / 1000 for i in range(1, 101)]
    assert simulate.percentile(values, 50) == 0.050
    assert simulate.percentile(values, 99) == 0.099
    assert simulate.percentile([0.3], 99) == 0.3

    summary = simulate.Summary()
    ok = simulate.Attempt("100", 0.040, True)
    summary.add(simulate.Delivery(100, [simulate.Attempt("203", 0.010, False), ok]))
    summary.add(simulate.Delivery(100, [ok]))
    summary.add(simulate.Delivery(50, [simulate.Attempt("timeout", 3.0, False)]))
    summary.elapsed = 2.0
    text = simulate.format_summary(summary, "header line")
    lines = text.splitlines()
    assert lines[0] == "header line"
    fields = dict(line.strip().split("  ", 1) for line in lines[1:])
    fields = {label.strip(): value.strip() for label, value in fields.items()}
    assert fields["batches accepted"] == "2 of 3"
    assert fields["events accepted"] == "200"
    assert fields["requests"] == "4 (1 retries)"
    assert fields["answers"] == "100 x2, 203 x1, timeout x1"
    assert fields["latency p50"] == "40 ms"
    assert fields["latency p99"] == "3000 ms"
    assert fields["elapsed"] == "2.0 s (1.0 batches/s, 100 events/s)"
    # Values start in one column.
    assert len({line.index(value) for line, value in zip(lines[1:], fields.values(),
                                                          strict=True)}) == 1


def test_simulated_stations_send_deterministic_batches_of_every_type(scripted) -> None:
    from hisparc_datastore_dev.samples import UPLOAD_CODE_ORDER

    from hisparc_datastore.format.payload import decode_batch

    server = scripted([(200, "100")])
    start = dt.datetime(2024, 3, 5, 12, 0, 0)
    plan = simulate.Plan(url=server.url, station=7001, password="pw", flavour="py2",
                         stations=2, batch_size=20, batches=2, seed=4, start=start)
    summary = simulate.simulate(plan)
    assert summary.accepted == summary.batches == 4
    assert summary.events == 80
    assert summary.retries == 0

    decoded = [decode_batch(form["data"][0].encode("latin-1")) for form in server.forms]
    assert all(form["data"][0].isascii() for form in server.forms)  # protocol 0 is ASCII
    first_batches = [batch for batch in decoded
                     if batch[0]["header"]["datetime"] == start]
    assert len(first_batches) == 2
    for batch in first_batches:
        codes = [event["header"]["eventtype_uploadcode"] for event in batch]
        assert codes[:len(UPLOAD_CODE_ORDER)] == list(UPLOAD_CODE_ORDER)

    # Same seed and start: the same batches, in either pickle flavour.
    again = list(itertools.islice(simulate.station_batches(0, 20, start, seed=4), 2))
    assert decode_batch(simulate.pickle_batch(again[0], "py2")) == \
        decode_batch(simulate.pickle_batch(again[0], "py3"))
    py3 = simulate.pickle_batch(again[1], "py3")
    second = pickle.loads(py3)
    assert second[0]["header"]["datetime"] >= simulate.next_start(again[0])
    times = [event["header"]["datetime"] for batch in again for event in batch]
    assert times == sorted(times)
