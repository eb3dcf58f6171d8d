"""The station simulator against a tiny real HTTP server that answers what a test scripts.

The server is the standard library's, on loopback; the simulator's HTTP client, form
encoding and retry loop are the real ones.  Only the backoff waits are recorded instead of
slept, so the tests are quick and never depend on timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import http.server
import itertools
import json
import os
import pickle
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hisparc_datastore_dev import samples, showers, simulate


@dataclass
class ScriptedServer:
    """Answers each POST with the next (status, body) of ``script``; the last one repeats."""

    script: list[tuple[int, str]]
    forms: list[dict[str, list[str]]] = field(default_factory=list)
    raw_bodies: list[bytes] = field(default_factory=list)
    url: str = ""
    delay: float = 0.0  # seconds before each answer: a slow server
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, body: bytes) -> tuple[int, str]:
        with self._lock:
            self.raw_bodies.append(body)
            self.forms.append(urllib.parse.parse_qs(body.decode("ascii")))
            index = min(len(self.forms) - 1, len(self.script) - 1)
        time.sleep(self.delay)
        return self.script[index]


@pytest.fixture
def scripted() -> Iterator[callable]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(script: list[tuple[int, str]], delay: float = 0.0) -> ScriptedServer:
        state = ScriptedServer(script, delay=delay)

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
    assert fields["answers"] == "100 (stored) x2, 203 (wrong password) x1, timeout x1"
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
    stations = (simulate.SimulatedStation(7001, "pw"), simulate.SimulatedStation(7002, "pw2"))
    plan = simulate.Plan(url=server.url, stations=stations, flavour="py2",
                         batch_size=20, batches=2, seed=4, start=start)
    summary, pace = simulate.simulate(plan)
    assert pace is None  # no --rate, nothing to keep
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
    again = list(itertools.islice(simulate.station_batches(7001, 20, start, seed=4), 2))
    assert decode_batch(simulate.pickle_batch(again[0], "py2")) == \
        decode_batch(simulate.pickle_batch(again[0], "py3"))
    py3 = simulate.pickle_batch(again[1], "py3")
    assert pickle.loads(py3) == again[1]
    # The second batch goes on where the first ended: one stream, in time order.
    stream = list(itertools.islice(simulate.station_events(7001, start, seed=4), 40))
    assert again[0] + again[1] == stream
    times = [samples.event_time_ns(event) for event in stream]
    assert times == sorted(times)


# ------------------------------------------------------------- distinct stations


def test_each_station_uploads_as_itself_with_its_own_events(scripted) -> None:
    from hisparc_datastore.format.payload import decode_batch

    server = scripted([(200, "100")])
    stations = tuple(simulate.SimulatedStation(n, f"pw-{n}", "Amsterdam")
                     for n in (501, 502, 503))
    plan = simulate.Plan(url=server.url, stations=stations, batch_size=30, batches=2,
                         start=dt.datetime(2024, 3, 5, 12))
    summary, _ = simulate.simulate(plan)
    assert summary.accepted == 6

    by_station: dict[str, list[list[dict]]] = {}
    for form in server.forms:
        number = form["station_id"][0]
        assert form["password"] == [f"pw-{number}"]
        by_station.setdefault(number, []).append(decode_batch(form["data"][0].encode("latin-1")))
    assert sorted(by_station) == ["501", "502", "503"]

    def singles(batches: list[list[dict]]) -> list[tuple]:
        return [tuple(sorted(map(str, event["datalist"]))) for batch in batches
                for event in batch if event["header"]["eventtype_uploadcode"] == "SIN"]

    streams = [singles(batches) for batches in by_station.values()]
    assert all(streams)
    # No station repeats another's singles: HiSPARC would drop them as duplicates.
    assert not set(streams[0]) & set(streams[1]) and not set(streams[1]) & set(streams[2])


LISTED = [simulate.SimulatedStation(n, f"pw-{n}", "Amsterdam") for n in (501, 502, 503)]


def test_stations_are_chosen_from_the_list_never_twice() -> None:
    assert simulate.choose_stations(2, LISTED, "the list") == tuple(LISTED[:2])
    assert simulate.choose_stations(1, LISTED, "the list", station=502) == (
        simulate.SimulatedStation(502, "pw-502"),
    )
    assert simulate.choose_stations(1, [], "the list", 7001, "given") == (
        simulate.SimulatedStation(7001, "given"),
    )
    for arguments, words in (
        ((8, LISTED, "the local stack", None, None, ": restart it with --stations 8"),
         "8 stations asked for, but the local stack lists 3: restart it with --stations 8"),
        ((2, LISTED, "the list", 501), "--station names one station, not 2"),
        ((1, LISTED, "the list", 7001), "no password for station 7001: give --password"),
        ((1, LISTED, "the list", None, "pw"), "--password goes with --station"),
    ):
        with pytest.raises(SystemExit, match=re.escape(words)):
            simulate.choose_stations(*arguments)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_local_stacks_stations_are_used_without_flags(tmp_path: Path) -> None:
    from hisparc_datastore_dev import local

    info = local.StackInfo(
        pid=os.getpid(), upload_url="http://127.0.0.1:1/", writer_url="", s3_endpoint="",
        bucket="b", data_dir="", config="",
        stations=[{"number": s.number, "cluster": s.cluster, "password": s.password}
                  for s in LISTED],
        children={},
    )
    local.StackFiles.at(tmp_path).info.write_text(json.dumps(dataclasses.asdict(info)))

    plan = simulate.plan_from_args(_args("--state-dir", str(tmp_path), "--stations", "3"))
    assert plan.url == "http://127.0.0.1:1/"
    assert plan.stations == tuple(LISTED)
    assert simulate.plan_from_args(_args("--state-dir", str(tmp_path))).stations == (
        LISTED[0],
    )
    with pytest.raises(SystemExit,
                       match=r"lists 3: restart it with `datastore local --stations 4`"):
        simulate.plan_from_args(_args("--state-dir", str(tmp_path), "--stations", "4"))

    listed = tmp_path / "stations.csv"
    listed.write_text("7001,Leiden,a\n7002,Leiden,b\n")
    plan = simulate.plan_from_args(_args("--url", "http://elsewhere/", "--station-list",
                                         str(listed), "--stations", "2"))
    assert [(s.number, s.password) for s in plan.stations] == [(7001, "a"), (7002, "b")]
    assert plan.url == "http://elsewhere/"

    with pytest.raises(SystemExit, match="no local stack running"):
        simulate.plan_from_args(_args("--state-dir", str(tmp_path / "none")))


def test_the_header_names_the_stations() -> None:
    def stations(*numbers: int) -> tuple[simulate.SimulatedStation, ...]:
        return tuple(simulate.SimulatedStation(n, "pw") for n in numbers)

    assert simulate.describe_stations(stations(501)) == "station 501"
    assert simulate.describe_stations(stations(501, 502, 503)) == "stations 501-503"
    assert simulate.describe_stations(stations(501, 7001)) == "stations 501, 7001"


# ------------------------------------------------------------------ answer codes


def test_every_answer_code_of_the_upload_function_is_explained() -> None:
    from hisparc_datastore.upload import protocol

    codes = {value for name, value in vars(protocol).items()
             if name.isupper() and isinstance(value, str) and re.fullmatch(r"\d{3}", value)}
    assert codes == set(simulate.ANSWER_MEANINGS)
    assert simulate.explain_answer("203") == "203 (wrong password)"
    assert simulate.explain_answer("HTTP 503: 404") == (
        "HTTP 503: 404 (database unreachable: the bucket failed)"
    )
    assert simulate.explain_answer("timeout") == "timeout"
    assert simulate.explain_answer("HTTP 500: <html>") == "HTTP 500: <html>"


def test_run_prints_the_answers_meaning_and_exit_status(
    scripted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = scripted([(200, "206")])
    listed = tmp_path / "stations.csv"
    listed.write_text("7001,Leiden,a\n")
    code = simulate.run(_args("--url", server.url, "--station-list", str(listed),
                              "--batch-size", "5", "--max-retries", "0"))
    out = capsys.readouterr().out
    assert code == 1
    assert "as station 7001 ->" in out
    assert re.search(r"answers\s+206 \(station not in the station list\) x1$", out, re.M)


# -------------------------------------------------------------------------- pace


def test_batches_due_in_a_window() -> None:
    assert simulate.batches_due(2, 30.0, None) == 60  # at 0, 0.5, ... 29.5 s
    assert simulate.batches_due(2, 30.2, None) == 61
    assert simulate.batches_due(2, 30.0, 10) == 10
    assert simulate.batches_due(2, 0.0, None) == 0


def _pace(**changes: float) -> simulate.Pace:
    values = dict(rate=2.0, stations=8, due=480, sent=81, late=75, worst_lag=12.3,
                  preparing=1.1, answering=0.4, waiting=0.0, slowest_answer=2.0)
    return simulate.Pace(**{**values, **changes})


def test_a_rate_not_kept_is_explained_with_its_numbers() -> None:
    pace = _pace()
    assert not pace.kept and pace.unsent == 399
    assert simulate.format_pace(pace) == (
        "2/s per station: 480 batches due, 81 sent, 75 late, 399 never sent (NOT KEPT)"
    )
    text = simulate.explain_pace(pace)
    assert text is not None
    assert "of 480 batches due, 399 were never sent and 75 were sent late (up to 12.3 s " \
        "behind schedule)" in text
    assert "spent 1.50 s on average, where the rate allows 0.50 s" in text
    assert text.startswith("warning: --rate 2 (batches per second per station) was not kept")
    assert "preparing" in text and "8 station(s) share this process" in text
    assert "This process is the bottleneck" in text

    slow_server = simulate.explain_pace(_pace(preparing=0.01, answering=0.9))
    assert slow_server and "The previous batch was not answered in time" in slow_server
    refused = simulate.explain_pace(_pace(preparing=0.01, answering=0.01, waiting=3.0))
    assert refused and "resent after a wait" in refused
    hiccup = simulate.explain_pace(_pace(preparing=0.1, answering=0.1, sent=480,
                                         late=2))
    assert hiccup and "On average a station keeps up" in hiccup

    kept = _pace(sent=480, late=0)
    assert kept.kept and simulate.explain_pace(kept) is None
    assert simulate.format_pace(kept).endswith("480 sent, on schedule")


def test_a_slow_server_is_reported_as_the_reason(scripted) -> None:
    server = scripted([(200, "100")], delay=0.4)
    plan = simulate.Plan(url=server.url, stations=(simulate.SimulatedStation(501, "pw"),),
                         batch_size=5, batches=None, duration=1.0, rate=20.0)
    summary, pace = simulate.simulate(plan)
    assert pace is not None and not pace.kept
    assert pace.due == 20
    assert pace.sent == summary.batches < 5
    assert pace.late + pace.unsent == 20 - 1  # only the first batch was on time
    assert pace.answering >= 0.4
    text = simulate.explain_pace(pace)
    assert text and "The previous batch was not answered in time" in text
    assert "rate" in simulate.format_summary(summary, "header", pace)


def test_a_kept_rate_says_so(scripted) -> None:
    server = scripted([(200, "100")])
    plan = simulate.Plan(url=server.url, stations=(simulate.SimulatedStation(501, "pw"),),
                         batch_size=5, batches=3, rate=4.0)
    summary, pace = simulate.simulate(plan)
    assert summary.accepted == 3
    assert pace is not None and pace.due == 3 and pace.sent == 3
    assert pace.kept, simulate.explain_pace(pace)  # a quarter second of slack per batch


# ----------------------------------------------------- places and air showers


def test_stations_stand_on_a_compact_grid_around_501() -> None:
    middle = showers.CLUSTER_MIDDLE
    assert showers.default_position(501) == middle  # where the real 501 stands (Nikhef)
    places = {n: showers.to_enu(showers.default_position(n), middle) for n in range(501, 538)}
    assert len({tuple(np.round(p, 1)) for p in places.values()}) == 37  # all distinct
    for n in range(502, 508):  # the first ring: 150 m out, 150 m from the next one
        assert abs(np.hypot(*places[n][:2]) - 150.0) < 0.01
        assert abs(np.hypot(*(places[n] - places[502 + (n - 501) % 6])[:2]) - 150.0) < 0.01
        assert abs(places[n][2]) < 0.01  # on the tangent plane, give or take the curvature
    assert max(np.hypot(*p[:2]) for p in places.values()) < showers.SHOWER_RADIUS - 100
    assert showers.default_position(538) == showers.default_position(501)  # 37 places
    assert showers.default_position(7001) in {showers.default_position(n)
                                              for n in range(501, 538)}
    # Moving by metres and measuring back agree to the millimetre (7 decimals: ~1 cm).
    back = showers.to_enu(showers.moved(middle, 300.0, -200.0), middle)
    assert np.allclose(back[:2], (300.0, -200.0), atol=0.02)


def test_showers_are_a_function_of_the_seed_and_the_time() -> None:
    start = samples.epoch_ns(dt.datetime(2024, 3, 5, 12))
    minute = 60 * 10**9
    one = showers.ShowerStream(5, 1.0)
    everything = one.between(start, start + 3 * minute)
    pieces = showers.ShowerStream(5, 1.0).between(start + minute, start + 3 * minute)
    assert everything[-len(pieces):] == pieces  # however it is asked, the same showers
    assert showers.ShowerStream(6, 1.0).between(start, start + minute) != \
        one.between(start, start + minute)
    assert 120 <= len(everything) <= 240  # Poisson, 180 expected
    assert [s.time_ns for s in everything] == sorted(s.time_ns for s in everything)
    assert showers.ShowerStream(5, 0.0).between(start, start + minute) == []
    with pytest.raises(ValueError):
        showers.ShowerStream(5, -1.0)
    for shower in everything:
        assert np.hypot(shower.core_east, shower.core_north) <= showers.SHOWER_RADIUS
        assert 0 <= shower.zenith <= np.radians(60)
        assert -np.pi <= shower.azimuth <= np.pi
        assert showers.MIN_ENERGY <= shower.energy <= showers.MAX_ENERGY
    zeniths = np.degrees([s.zenith for s in everything])
    assert 15 < np.median(zeniths) < 30  # cos^8: most showers come from high up


def test_neighbours_see_one_shower_at_the_times_its_geometry_gives() -> None:
    """Events of two stations less than a few microseconds apart are one shower, and
    their time difference is the plane front's, give or take its thickness."""
    start = dt.datetime(2024, 3, 5, 12)
    stream = showers.ShowerStream(3, 2.0)
    models = {n: samples.StationModel.create(n, None, stream) for n in (501, 502, 503)}
    begin, end = samples.epoch_ns(start), samples.epoch_ns(start) + 300 * 10**9
    residuals = []
    for shower in stream.between(begin, end):
        seen = {n: m.shower_events(shower.time_ns, shower.time_ns + 1, traces=False)
                for n, m in models.items()}
        hit = {n: samples.event_time_ns(events[0]) for n, events in seen.items() if events}
        for a, b in itertools.combinations(sorted(hit), 2):
            geometry = (models[b].detectors[1] - models[a].detectors[1]) @ shower.axis
            residuals.append(abs((hit[b] - hit[a]) + geometry / showers.LIGHT_SPEED))
    # An event's time is its trigger's: the second or third detector hit, after the
    # front's thickness, 2.5 ns samples and the GPS's jitter.  Tens of nanoseconds, where
    # the geometry gives up to 500.
    assert len(residuals) >= 20
    assert np.median(residuals) < 20 and np.percentile(residuals, 90) < 60, sorted(residuals)


def test_a_stations_events_do_not_depend_on_the_others(scripted) -> None:
    from hisparc_datastore.format.payload import decode_batch

    server = scripted([(200, "100")])
    start = dt.datetime(2024, 3, 5, 12)
    plan = simulate.Plan(
        url=server.url, batch_size=60, batches=3, seed=8, start=start, shower_rate=2.0,
        stations=tuple(simulate.SimulatedStation(n, "pw") for n in (501, 502, 503)),
    )
    simulate.simulate(plan)
    sent = [decode_batch(form["data"][0].encode("latin-1")) for form in server.forms
            if form["station_id"] == ["502"]]
    alone = list(itertools.islice(simulate.station_batches(502, 60, start, 8, 2.0), 3))
    assert sent == [decode_batch(simulate.pickle_batch(b, "py2")) for b in alone]
    quiet = list(itertools.islice(simulate.station_batches(502, 60, start, 8, 0.0), 3))
    assert sum(len(b) for b in quiet) == 180
    assert quiet != alone  # the showers add events


def test_a_station_reports_where_it_stands(tmp_path: Path) -> None:
    place = showers.Position(52.0, 5.0, 12.5)
    station = simulate.SimulatedStation(7001, "pw", position=place)
    config = next(e for e in simulate.station_events(station, dt.datetime(2024, 3, 5), 1)
                  if e["header"]["eventtype_uploadcode"] == "CFG")
    values = {item["data_uploadcode"]: item["data"] for item in config["datalist"]}
    assert (values["CFG_GPS_LAT"], values["CFG_GPS_LONG"], values["CFG_GPS_ALT"]) == (
        52.0, 5.0, 12.5)
    assert (values["CFG_TRIGLOWSIG"], values["CFG_TRIGHIGHSIG"], values["CFG_TRIGANDOR"],
            values["CFG_TRIGEXT"]) == (3, 2, True, 0)  # 3 low or 2 high
    assert values["CFG_MAS_CH1THRLOW"] == 30.0 and values["CFG_SLV_CH2THRHIGH"] == 70.0
    assert values["CFG_REDUCE"] is False and values["CFG_USEFILTER"] is False
    assert simulate.SimulatedStation(501, "pw").place == showers.CLUSTER_MIDDLE


def test_the_local_stack_keeps_and_publishes_positions(tmp_path: Path) -> None:
    from hisparc_datastore_dev import local

    from hisparc_datastore.stations import Station

    files = local.StackFiles.at(tmp_path)
    listed = [Station(n, "Amsterdam", f"pw-{n}") for n in (501, 502)]
    placed = local.ensure_positions(files, listed)
    assert placed == {501: showers.default_position(501), 502: showers.default_position(502)}
    # A user moves 502; restarts keep it, and new stations are added beside it.
    moved = showers.Position(52.36, 4.96, 10.0)
    document = json.loads(files.positions.read_text())
    document["502"] = moved.as_dict()
    files.positions.write_text(json.dumps(document))
    again = local.ensure_positions(files, [*listed, Station(503, "Amsterdam", "pw")])
    assert again[502] == moved and again[503] == showers.default_position(503)
    assert json.loads(files.positions.read_text())["502"] == moved.as_dict()

    info = local.StackInfo(
        pid=os.getpid(), upload_url="http://127.0.0.1:1/", writer_url="", s3_endpoint="",
        bucket="b", data_dir="", config="", children={},
        stations=[{"number": n, "cluster": "Amsterdam", "password": f"pw-{n}",
                   **again[n].as_dict()} for n in (501, 502)],
    )
    files.info.write_text(json.dumps(dataclasses.asdict(info)))
    plan = simulate.plan_from_args(_args("--state-dir", str(tmp_path), "--stations", "2",
                                         "--shower-rate", "0"))
    assert [s.place for s in plan.stations] == [again[501], moved]
    assert plan.shower_rate == 0
    one = simulate.plan_from_args(_args("--state-dir", str(tmp_path), "--station", "502"))
    assert one.stations[0].place == moved and one.shower_rate == showers.DEFAULT_SHOWER_RATE

    files.positions.write_text("[1, 2]")
    with pytest.raises(local.LocalStackError, match=r"positions\.json is not a station"):
        local.ensure_positions(files, listed)


def test_the_shower_rate_is_an_option(scripted, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _args("--shower-rate", "-1")
    server = scripted([(200, "100")])
    listed = tmp_path / "stations.csv"
    listed.write_text("7001,Leiden,a\n")
    assert simulate.run(_args("--url", server.url, "--station-list", str(listed),
                              "--batch-size", "5", "--batches", "1",
                              "--shower-rate", "0")) == 0
    assert "no air showers" in capsys.readouterr().out
