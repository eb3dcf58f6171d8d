"""HiSPARC's own analysis (SAPPHiRE) accepts what ``datastore simulate`` uploads.

Four simulated stations (501 where the real station 501 stands at Science Park, 502-504 on
the ring 150 m around it) under a busy sky of air showers upload their batches the way
``datastore simulate`` does: the same events, pickles and form, through the upload
function's core into the test's S3 server; the writer's sweep puts them into a day file.
SAPPHiRE then works on that day file, offline (``hisparc_datastore_dev.analysis``: the
cluster and the trigger settings come from the simulation, and the network is made
unreachable for SAPPHiRE here):

- its ``TraceObservables`` recompute, from the stored traces, exactly the baselines,
  spreads, peak counts, pulse heights and integrals the stations sent;
- its ``ProcessEventsWithTriggerOffset`` finds an arrival time for the detectors with a
  signal and the trigger time of every event;
- its coincidence search finds the showers, and only them, and its direction
  reconstruction recovers the simulated directions to within a few degrees.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import math
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from conftest import write_station_list
from hisparc_datastore_dev import analysis, samples, simulate
from hisparc_datastore_dev.showers import Shower, ShowerStream, default_position

from hisparc_datastore.config import Settings
from hisparc_datastore.stations import StationList
from hisparc_datastore.storage.dayfile import day_file_path
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload import protocol
from hisparc_datastore.writer.pipeline import RetryPolicy, sweep

pytest.importorskip(
    "sapphire", reason="hisparc-sapphire is not installed (the dev extra installs it)"
)

pytestmark = pytest.mark.long

STATIONS = (501, 502, 503, 504)
START = dt.datetime(2024, 3, 5, 12, 0, 0)
SEED = 11
#: A sky forty times busier than nature's, so that a few minutes give many coincidences.
SHOWER_RATE = 2.0
BATCHES, BATCH_SIZE = 5, 100


def upload_everything(bucket: Bucket, settings: Settings, tmp_path: Path) -> int:
    """Every station's batches, sent as ``datastore simulate`` sends them, into the bucket.

    Returns the time (ns) up to which every station has uploaded its events.
    """
    listed = {n: ("Amsterdam", f"password-{n}") for n in STATIONS}
    lookup = StationList(write_station_list(tmp_path / "simulated-stations.csv", listed))
    stream = ShowerStream(SEED, SHOWER_RATE)
    uploaded_until = []
    for index, number in enumerate(STATIONS):
        station = simulate.SimulatedStation(number, f"password-{number}", "Amsterdam")
        flavour = simulate.PICKLE_FLAVOURS[index % 2]  # hsmonitor's and PySPARC's pickles
        batches = simulate.station_batches(station, BATCH_SIZE, START, SEED, SHOWER_RATE,
                                           stream)
        for events in itertools.islice(batches, BATCHES):
            form = simulate.form_fields(number, station.password,
                                        simulate.pickle_batch(events, flavour))
            answer = protocol.handle_upload(
                urllib.parse.urlencode(form).encode("ascii"),
                "application/x-www-form-urlencoded", lookup, bucket,
                settings.minimum_year, dt.datetime.now(dt.UTC),
            )
            assert answer.code == protocol.STORED, answer.reason
        uploaded_until.append(samples.event_time_ns(events[-1]))
    written = sweep(bucket, settings, retry=RetryPolicy(delays=(0.01, 0.01)))
    assert written.ok and written.objects == len(STATIONS) * BATCHES, written.summary()
    return min(uploaded_until)


def multi_station_showers(stream: ShowerStream, start_ns: int, end_ns: int
                          ) -> dict[Shower, tuple[int, ...]]:
    """The simulated showers in ``[start_ns, end_ns)`` two or more stations triggered on."""
    models = [samples.StationModel.create(n, None, stream) for n in STATIONS]
    seen = {}
    for shower in stream.between(start_ns, end_ns):
        stations = tuple(m.number for m in models
                         if m.shower_events(shower.time_ns, shower.time_ns + 1, traces=False))
        if len(stations) >= 2:
            seen[shower] = stations
    return seen


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAPPHiRE reaches the public database only through ``urlopen``: make it fail."""
    import sapphire.api

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"SAPPHiRE went to the network: {args[:1]}")

    monkeypatch.setattr(sapphire.api, "urlopen", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)


def stored_events(day_file: Path, number: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A station's events table and each event's traces (samples x channels)."""
    import tables
    from sapphire.analysis.process_events import ProcessEvents

    with tables.open_file(str(day_file), "r") as data:
        group = f"/hisparc/cluster_amsterdam/station_{number}"
        reader = ProcessEvents(data, group, progress=False)  # only reads: no processing
        events = data.get_node(group, "events").read()
        return events, [reader.get_traces_for_event(event) for event in events]


def test_sapphire_accepts_simulated_stations(
    bucket: Bucket, settings: Settings, tmp_path: Path, offline: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sapphire.analysis.process_traces import TraceObservables

    began = time.monotonic()
    uploaded_until = upload_everything(bucket, settings, tmp_path)
    day_file = day_file_path(settings.data_dir, START.date())
    uploaded = time.monotonic()

    # The numbers the stations sent are the numbers SAPPHiRE gets from their traces.
    for number in STATIONS:
        events, traces = stored_events(day_file, number)
        assert len(events) > 100
        for event, trace in zip(events, traces, strict=True):
            assert trace.shape == (2400, 4)
            observed = TraceObservables(trace)
            assert list(event["baseline"]) == observed.baselines
            assert list(event["std_dev"]) == observed.std_dev
            assert list(event["pulseheights"]) == observed.pulseheights
            assert list(event["integrals"]) == observed.integrals
            assert list(event["n_peaks"]) == observed.n_peaks
        # HiSPARC III baselines of 25-30 counts; noise of 1-2 counts over 26 samples.
        assert events["baseline"].min() >= 24 and events["baseline"].max() <= 33
        assert events["std_dev"].min() >= 300 and events["std_dev"].max() <= 3000

    before = hashlib.sha256(day_file.read_bytes()).digest()
    result = analysis.analyse(day_file, tmp_path / "analysis.h5",
                              {n: default_position(n) for n in STATIONS})
    analysed = time.monotonic()
    # SAPPHiRE rewrites the tables it processes: the analysis works on its own file.
    assert hashlib.sha256(day_file.read_bytes()).digest() == before
    analysis.match_showers(result, ShowerStream(SEED, SHOWER_RATE))
    print(analysis.summary(result))  # the figures, for -s
    print(f"upload and write {uploaded - began:.1f} s, SAPPHiRE {analysed - uploaded:.1f} s")

    # Arrival times for the detectors with a signal, a trigger time for every event.
    assert result.stations == list(STATIONS)
    assert result.timed >= 0.99 * result.signals
    assert result.triggers == result.total_events

    # Coincidences are the simulated showers, nothing else, each with the stations it hit.
    strays = [(c.ext_timestamp, c.stations) for c in result.coincidences if c.shower is None]
    assert not strays
    # The stations' streams have showers after their first 14 events (one of each type).
    begin = samples.epoch_ns(START) + len(samples.UPLOAD_CODE_ORDER) * 10**9
    end = uploaded_until - 10**6  # a shower's events come microseconds after its core time
    expected = multi_station_showers(ShowerStream(SEED, SHOWER_RATE), begin, end)
    found = {c.shower: c.stations for c in result.coincidences
             if c.shower is not None and begin <= c.shower.time_ns < end}
    assert len(found) == len([c for c in result.coincidences if c.shower in found])
    assert found == expected

    # Directions: three or four stations each, within a few degrees of the simulated ones
    # (SAPPHiRE times a station by its first detector hit, placed at the station's centre,
    # and the simulated front has a thickness: about 1-4 degrees, more for three stations).
    threefold = [c for c in result.coincidences if len(c.stations) >= 3]
    assert len(threefold) >= 15
    done = [c for c in threefold if not math.isnan(c.zenith)]
    assert len(done) >= 0.9 * len(threefold)
    degrees = np.degrees([c.angle for c in done])
    assert np.median(degrees) < 5.0, sorted(degrees)
    assert np.percentile(degrees, 90) < 12.0, sorted(degrees)
    fourfold = np.degrees([c.angle for c in done if len(c.stations) == 4])
    assert len(fourfold) >= 3 and np.median(fourfold) < 3.5, sorted(fourfold)

    # The command line does the same, and says so.
    capsys.readouterr()
    assert analysis.main([str(day_file), "--state-dir", str(tmp_path / "no-stack"),
                          "--out", str(tmp_path / "again.h5"), "--seed", str(SEED),
                          "--shower-rate", str(SHOWER_RATE)]) == 0
    printed = capsys.readouterr().out
    assert f"trigger times     {result.total_events} of {result.total_events} events" in printed
    assert f"vs. simulated     median {np.median(degrees):.1f} deg" in printed
