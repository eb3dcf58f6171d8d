"""``datastore simulate``: a station, or many, uploading realistic batches.

It speaks exactly what the station software (hsmonitor) speaks: a form-encoded POST of
``station_id``, ``password``, ``data`` (the pickle's bytes as latin-1 text, which
``requests`` sends UTF-8 percent-encoded) and ``checksum`` (md5 hex of the pickle), and it
treats only a body of exactly ``100`` as success: anything else (another code, an error
page, a timeout) means wait ``min(2**n, 60)`` seconds and resend the same batch.

Pickles are Python 2 protocol 0 (``--pickle py2``, what hsmonitor's ``cPickle.dumps``
produces) or Python 3 with numpy scalars (``--pickle py3``, like PySPARC).  Batches are
deterministic for a ``--seed`` and ``--start``; the first batch of each station carries one
event of every type, so a short run exercises every table.

Simulated stations are distinct stations: each uploads under its own number and password
(from the local stack's list, or ``--station-list``), and its number seeds its events.
Stations sharing one identity would send one stream twice, which HiSPARC's analysis drops
as duplicate singles.  With ``--rate``, the summary says whether the rate was kept and, if
not, where a station's time went: preparing batches here, or waiting for answers.

Each station stands somewhere (the local stack publishes the positions it keeps; otherwise
``showers.default_position``) and air showers (``--shower-rate``) fall on the cluster, so
stations near each other record the same showers at the times the shower's geometry gives:
HiSPARC's analysis finds them as coincidences and reconstructs their directions.  A
station's events depend only on the seed, the start, its number and its position, not on
which other stations run, so separate processes with one seed simulate one cluster.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import math
import pickle
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from hisparc_datastore.config import DEFAULT_STATE_DIR
from hisparc_datastore.stations import parse_station_list
from hisparc_datastore.upload import protocol
from hisparc_datastore_dev.local import read_stack_info
from hisparc_datastore_dev.showers import (
    DEFAULT_SHOWER_RATE,
    MAX_ENERGY,
    MIN_ENERGY,
    SHOWER_RADIUS,
    Position,
    ShowerStream,
    default_position,
)

PICKLE_FLAVOURS = ("py2", "py3")
PY3_PROTOCOL = 3  # what PySPARC's uploads were seen to use
CONNECT_TIMEOUT = 3.0  # the station software's timeouts
READ_TIMEOUT = 600.0
MAX_BACKOFF = 60.0
ACCEPTED = protocol.STORED

#: What each answer code tells the station (the codes are the upload function's own).
ANSWER_MEANINGS = {
    protocol.STORED: "stored",
    protocol.CHECKSUM_MISMATCH: "checksum mismatch",
    protocol.WRONG_PASSWORD: "wrong password",
    protocol.TRANSACTION_FAILED: "transaction failed: the server ran out of memory",
    protocol.UNKNOWN_STATION: "station not in the station list",
    protocol.NOT_DECODABLE: "data not decodable",
    protocol.BAD_REQUEST: "form unusable or too large",
    protocol.DATABASE_UNREACHABLE: "database unreachable: the bucket failed",
}
#: A batch sent later than this share of the interval after its time is behind schedule.
LATE_SHARE = 0.5


# --------------------------------------------------------------------------- stations


@dataclass(frozen=True)
class SimulatedStation:
    """One station the simulator uploads as.

    Its number is its identity at the upload function and the seed of its event stream,
    so no two simulated stations send the same events.  ``position`` is where it stands
    (its default place when None); its detectors are the standard layout around it.
    """

    number: int
    password: str = field(repr=False)
    cluster: str = ""
    position: Position | None = None

    @property
    def place(self) -> Position:
        return self.position or default_position(self.number)


# --------------------------------------------------------------------------- batches


def station_events(
    station: int | SimulatedStation,
    start: dt.datetime,
    seed: int,
    shower_rate: float = DEFAULT_SHOWER_RATE,
    stream: ShowerStream | None = None,
) -> Iterator[dict[str, Any]]:
    """The endless, deterministic event stream of a station, from ``start`` on.

    First one event of every type, a second apart (so that even a short run fills every
    table), then what the station records: singles, its own triggers, now and then
    another message, and the air showers of ``stream`` (or of ``shower_rate`` and
    ``seed``) it triggers on.  Times are naive UTC, as the station software sends them.
    """
    from hisparc_datastore_dev import samples

    if isinstance(station, int):
        station = SimulatedStation(station, "")
    if stream is None and shower_rate > 0:
        stream = ShowerStream(seed, shower_rate)
    model = samples.StationModel.create(station.number, station.place, stream)
    rng = random.Random(seed * 1_000_003 + station.number)  # noqa: S311 (sample data)
    for index, code in enumerate(samples.UPLOAD_CODE_ORDER):
        when = start + dt.timedelta(seconds=index)
        if code == "CIC":  # at a moment of its own: stations must not coincide by design
            later = rng.randrange(1_000_000 - when.microsecond)
            yield model.local_event(when + dt.timedelta(microseconds=later), rng)
        elif code == "CFG":
            yield model.config_event(when, rng)
        else:
            yield samples.event_of_type(code, when, rng)
    later = start + dt.timedelta(seconds=len(samples.UPLOAD_CODE_ORDER))
    yield from samples.event_stream(later, rng, station=model)


def station_batches(
    station: int | SimulatedStation,
    size: int,
    start: dt.datetime,
    seed: int,
    shower_rate: float = DEFAULT_SHOWER_RATE,
    stream: ShowerStream | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """The endless, deterministic batches of a station: its events, ``size`` at a time.

    Consecutive batches continue one another: nothing is skipped between them.
    """
    events = station_events(station, start, seed, shower_rate, stream)
    while True:
        yield list(itertools.islice(events, size))


def pickle_batch(events: list[dict[str, Any]], flavour: str) -> bytes:
    """The bytes a station would upload for ``events``."""
    if flavour == "py2":
        from hisparc_datastore_dev.py2pickle import dumps_py2

        return dumps_py2(events)
    if flavour == "py3":
        from hisparc_datastore_dev.samples import numpy_flavour

        return pickle.dumps(numpy_flavour(events), protocol=PY3_PROTOCOL)
    raise ValueError(f"unknown pickle flavour {flavour!r}")


def form_fields(station: int, password: str, pickled: bytes) -> dict[str, str]:
    """The form hsmonitor posts: the pickle as latin-1 text, its md5 as lower-case hex."""
    return {
        "station_id": str(station),
        "password": password,
        "data": pickled.decode("latin-1"),
        "checksum": hashlib.md5(pickled).hexdigest(),  # noqa: S324 (the protocol's checksum)
    }


# ------------------------------------------------------------------------------ upload


def backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failed attempt in a row.

    hsmonitor's ``min(2**n, 60)`` with ``n`` the retries made so far: 1, 2, 4, ... 60 s.
    """
    return min(2.0 ** (failures - 1), MAX_BACKOFF)


@dataclass(frozen=True)
class Attempt:
    answer: str  # the body's code, or what went wrong ("HTTP 503: 404", "timeout", ...)
    seconds: float
    accepted: bool


@dataclass
class Delivery:
    """One batch, sent until it was accepted (or the retries ran out, or we were stopped)."""

    events: int
    attempts: list[Attempt] = field(default_factory=list)
    seconds: float = 0.0  # from the first request to the last answer, waits included

    @property
    def accepted(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].accepted

    @property
    def waited(self) -> float:
        """Seconds spent backing off between attempts, not waiting for answers."""
        return max(0.0, self.seconds - sum(attempt.seconds for attempt in self.attempts))


def describe_answer(status: int, body: str) -> str:
    text = body.strip()
    short = text if len(text) <= 24 else text[:21] + "..."
    if status == 200:
        return short or "(empty body)"
    return f"HTTP {status}: {short}" if short else f"HTTP {status}"


def post_once(session: Any, url: str, form: dict[str, str],
              ca_file: Path | None = None) -> Attempt:
    """One POST.  ``ca_file``: trust this certificate (per request, since requests lets
    ``REQUESTS_CA_BUNDLE`` override a session's own)."""
    import requests

    began = time.perf_counter()
    extra = {} if ca_file is None else {"verify": str(ca_file)}
    try:
        response = session.post(url, data=form, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
                                **extra)
        body = response.text
        answer = describe_answer(response.status_code, body)
        accepted = body == ACCEPTED
    except requests.Timeout:
        answer, accepted = "timeout", False
    except requests.exceptions.SSLError:
        answer, accepted = "TLS error (server's certificate not trusted? --ca-cert)", False
    except requests.ConnectionError:
        answer, accepted = "connection error", False
    except requests.RequestException as exc:
        answer, accepted = type(exc).__name__, False
    return Attempt(answer, time.perf_counter() - began, accepted)


def deliver(
    post: Callable[[], Attempt],
    events: int,
    wait: Callable[[float], bool],
    max_retries: int | None = None,
) -> Delivery:
    """Send one batch the way a station does: again and again until the answer is ``100``.

    ``wait(seconds)`` sleeps and returns True when the simulation is being stopped.
    """
    delivery = Delivery(events)
    began = time.perf_counter()
    while True:
        attempt = post()
        delivery.attempts.append(attempt)
        delivery.seconds = time.perf_counter() - began
        if attempt.accepted:
            return delivery
        failures = len(delivery.attempts)
        if max_retries is not None and failures > max_retries:
            return delivery
        if wait(backoff(failures)):
            return delivery


# ----------------------------------------------------------------------------- summary


@dataclass
class Summary:
    batches: int = 0
    accepted: int = 0
    events: int = 0
    requests: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    #: Where the stations' time went, for the pace report: seconds spent building and
    #: pickling batches, and in retry waits; and how late each batch was sent.
    preparing: float = 0.0
    waiting: float = 0.0
    lags: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, delivery: Delivery, preparing: float = 0.0, lag: float = 0.0) -> None:
        with self._lock:
            self.batches += 1
            self.requests += len(delivery.attempts)
            for attempt in delivery.attempts:
                self.answers[attempt.answer] += 1
                self.latencies.append(attempt.seconds)
            if delivery.accepted:
                self.accepted += 1
                self.events += delivery.events
            self.preparing += preparing
            self.waiting += delivery.waited
            self.lags.append(lag)

    @property
    def retries(self) -> int:
        return self.requests - self.batches


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (``share`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(share / 100 * len(ordered)))
    return ordered[rank - 1]


def explain_answer(answer: str) -> str:
    """``203`` -> ``203 (wrong password)``: what a code means, for people reading a summary.

    An HTTP error's body code (``HTTP 503: 404``) is explained the same way; answers that
    are no code (``timeout``, an error page) are already words.
    """
    code = answer.partition(": ")[2] if answer.startswith("HTTP ") else answer
    meaning = ANSWER_MEANINGS.get(code)
    return f"{answer} ({meaning})" if meaning else answer


@dataclass(frozen=True)
class Pace:
    """Whether the stations kept ``--rate``, and where their time went if not.

    ``due`` counts the batches whose time came while the simulation ran; a batch sent
    more than ``LATE_SHARE`` of an interval after its time is ``late``.  The per-batch
    means say which side could not keep up: this process preparing batches, the server
    answering them, or the waits after answers other than 100.
    """

    rate: float
    stations: int
    due: int
    sent: int
    late: int
    worst_lag: float
    preparing: float  # mean seconds per batch
    answering: float
    waiting: float
    slowest_answer: float

    @property
    def unsent(self) -> int:
        return max(0, self.due - self.sent)

    @property
    def kept(self) -> bool:
        return not self.unsent and not self.late


def batches_due(rate: float, window: float, batches: int | None) -> int:
    """Batches of one station whose time (``k / rate`` s after the start) is in ``window``."""
    due = math.ceil(window * rate - 1e-9) if window > 0 else 0
    return due if batches is None else min(due, batches)


def measure_pace(summary: Summary, plan: Plan, window: float) -> Pace | None:
    """The pace report of a run with a ``--rate``; None for a run as fast as answered."""
    if plan.rate <= 0:
        return None
    late_after = LATE_SHARE / plan.rate
    late = [lag for lag in summary.lags if lag > late_after]
    sent = max(summary.batches, 1)
    return Pace(
        rate=plan.rate,
        stations=len(plan.stations),
        due=len(plan.stations) * batches_due(plan.rate, window, plan.batches),
        sent=summary.batches,
        late=len(late),
        worst_lag=max(late, default=0.0),
        preparing=summary.preparing / sent,
        answering=sum(summary.latencies) / sent,
        waiting=summary.waiting / sent,
        slowest_answer=max(summary.latencies, default=0.0),
    )


def format_pace(pace: Pace) -> str:
    """The summary's one line about the rate."""
    asked = f"{pace.rate:g}/s per station: {pace.due} batches due, {pace.sent} sent"
    if pace.kept:
        return f"{asked}, on schedule"
    return f"{asked}, {pace.late} late, {pace.unsent} never sent (NOT KEPT)"


def explain_pace(pace: Pace) -> str | None:
    """Why the rate was not kept, with the numbers to act on; None when it was kept."""
    if pace.kept:
        return None
    interval = 1 / pace.rate
    behind = []
    if pace.unsent:
        behind.append(f"{pace.unsent} were never sent")
    if pace.late:
        behind.append(f"{pace.late} were sent late (up to {pace.worst_lag:.1f} s behind "
                      "schedule)")
    spent = pace.preparing + pace.answering + pace.waiting
    parts = {
        "preparing": (pace.preparing,
                      f"building and pickling it ({pace.stations} station(s) share this "
                      "process)"),
        "answers": (pace.answering,
                    f"waiting for the upload function's answers (slowest "
                    f"{pace.slowest_answer:.2f} s)"),
        "retry waits": (pace.waiting, "backing off after answers other than 100"),
    }
    lines = [
        f"warning: --rate {pace.rate:g} (batches per second per station) was not kept: of "
        f"{pace.due} batches due, {' and '.join(behind)}.",
        f"  Per batch a station spent {spent:.2f} s on average, where the rate allows "
        f"{interval:.2f} s:",
        *(f"    {label:<11} {seconds:6.2f} s  {what}"
          for label, (seconds, what) in parts.items()),
    ]
    slowest = max(parts, key=lambda label: parts[label][0])
    if spent <= interval:
        lines.append("  On average a station keeps up: the late batches waited behind a "
                     f"slow moment (the slowest answer took {pace.slowest_answer:.2f} s).")
    elif slowest == "preparing":
        lines.append("  This process is the bottleneck, not the server: ask for fewer "
                     "--stations, a smaller --batch-size or a lower --rate.")
    elif slowest == "answers":
        lines.append("  The previous batch was not answered in time: the upload function is "
                     "the bottleneck (see its log).")
    else:
        lines.append("  Batches were refused or failed and were resent after a wait: see "
                     "the answers above.")
    return "\n".join(lines) + "\n"


def format_summary(summary: Summary, header: str, pace: Pace | None = None) -> str:
    def milliseconds(value: float) -> str:
        return "-" if math.isnan(value) else f"{value * 1000:.0f} ms"

    answers = ", ".join(
        f"{explain_answer(answer)} x{count}" for answer, count in sorted(summary.answers.items())
    ) or "-"
    rate = summary.elapsed and summary.accepted / summary.elapsed
    event_rate = summary.elapsed and summary.events / summary.elapsed
    rows = [
        ("batches accepted", f"{summary.accepted} of {summary.batches}"),
        ("events accepted", str(summary.events)),
        ("requests", f"{summary.requests} ({summary.retries} retries)"),
        ("answers", answers),
        ("latency p50", milliseconds(percentile(summary.latencies, 50))),
        ("latency p99", milliseconds(percentile(summary.latencies, 99))),
        ("elapsed", f"{summary.elapsed:.1f} s ({rate:.1f} batches/s, {event_rate:.0f} events/s)"),
    ]
    if pace is not None:
        rows.append(("rate", format_pace(pace)))
    width = max(len(label) for label, _ in rows)
    lines = [f"  {label.ljust(width)}  {value}" for label, value in rows]
    return "\n".join([header, *lines]) + "\n"


# -------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class Plan:
    url: str
    stations: tuple[SimulatedStation, ...]  # each uploads as itself, from its own thread
    flavour: str = "py2"
    batch_size: int = 100
    batches: int | None = 3  # per station; None: until ``duration`` has passed
    duration: float | None = None
    rate: float = 0.0  # batches per second per station; 0: as fast as answers come
    seed: int = 0
    start: dt.datetime | None = None
    max_retries: int | None = None
    shower_rate: float = DEFAULT_SHOWER_RATE  # air showers per second on the cluster
    #: For HTTPS with a certificate no system CA signed (the local stack's): trust this.
    ca_file: Path | None = None


def run_station(station: SimulatedStation, plan: Plan, summary: Summary,
                stop: threading.Event, start: dt.datetime, began: float,
                deadline: float | None, stream: ShowerStream | None = None) -> None:
    """One station: batch ``k`` is due ``k / rate`` s after ``began`` (or at once).

    The next batch is prepared before its time comes, as a station has it ready, so
    only preparation slower than the rate makes it late.
    """
    import requests

    batches = station_batches(station, plan.batch_size, start, plan.seed, plan.shower_rate,
                              stream)
    with requests.Session() as session:
        for number in itertools.count():
            if plan.batches is not None and number >= plan.batches:
                return
            prepared = time.perf_counter()
            events = next(batches)
            form = form_fields(station.number, station.password,
                               pickle_batch(events, plan.flavour))
            preparing = time.perf_counter() - prepared
            due = began + number / plan.rate if plan.rate > 0 else time.monotonic()
            if stop.wait(max(0.0, due - time.monotonic())):
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            lag = max(0.0, time.monotonic() - due)
            delivery = deliver(
                lambda form=form: post_once(session, plan.url, form, plan.ca_file),
                len(events),
                stop.wait,
                plan.max_retries,
            )
            summary.add(delivery, preparing, lag)
            if not delivery.accepted:  # a station never skips a batch: it stops here
                return


def simulate(plan: Plan, stop: threading.Event | None = None) -> tuple[Summary, Pace | None]:
    """Run every station of ``plan`` at once; the summary, and the pace with ``rate``."""
    stop = stop or threading.Event()
    start = plan.start or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    summary = Summary()
    began = time.monotonic()
    deadline = began + plan.duration if plan.duration else None
    # One stream for all stations: they share the showers, and work out each block once.
    stream = ShowerStream(plan.seed, plan.shower_rate) if plan.shower_rate > 0 else None
    threads = [
        threading.Thread(
            target=run_station,
            args=(station, plan, summary, stop, start, began, deadline, stream),
            name=f"station-{station.number}", daemon=True,
        )
        for station in plan.stations
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        for thread in threads:
            thread.join(5)
    summary.elapsed = time.monotonic() - began
    window = summary.elapsed if plan.duration is None else min(summary.elapsed, plan.duration)
    return summary, measure_pace(summary, plan, window)


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def _rate(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be a number >= 0")
    return value


def _timestamp(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group(
        "where to upload, as whom (default: the running `datastore local` and its stations)"
    )
    target.add_argument("--url", help="the upload URL")
    target.add_argument("--ca-cert", type=Path, metavar="PEM",
                        help="trust this certificate for an https --url (the local stack's "
                             "own, of `datastore local --https`, is trusted without it)")
    target.add_argument("--station", type=int,
                        help="upload as this one station (with --password)")
    target.add_argument("--password", help="the --station's password")
    target.add_argument("--station-list", type=Path, metavar="CSV",
                        help="take the stations from this number,cluster,password list "
                             "instead of the local stack's")
    target.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="the local stack to use (default: %(default)s)")
    what = parser.add_argument_group("what to send")
    what.add_argument("--pickle", choices=PICKLE_FLAVOURS, default="py2",
                      help="py2: protocol 0 like hsmonitor; py3: numpy scalars like PySPARC "
                           "(default: %(default)s)")
    what.add_argument("--batch-size", type=_positive(int), default=100,
                      help="events per batch (default: %(default)s)")
    what.add_argument("--start", type=_timestamp,
                      help="UTC time of the first event, ISO 8601 (default: now)")
    what.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    what.add_argument("--shower-rate", type=_rate, default=DEFAULT_SHOWER_RATE, metavar="R",
                      help="air showers per second falling within "
                           f"{SHOWER_RADIUS:.0f} m of the cluster (energies "
                           f"{MIN_ENERGY / 1e15:g}-{MAX_ENERGY / 1e15:g} PeV), seen by every "
                           "simulated station they reach; 0 for none (default: %(default)s, "
                           "about nature's rate)")
    load = parser.add_argument_group("load")
    load.add_argument("--stations", type=_positive(int), default=1,
                      help="distinct stations uploading at once: the first N of the station "
                           "list (default: %(default)s)")
    amount = load.add_mutually_exclusive_group()
    amount.add_argument("--batches", type=_positive(int), default=None,
                        help="batches per station (default: 3)")
    amount.add_argument("--duration", type=_positive(float),
                        help="seconds to keep uploading, instead of --batches")
    load.add_argument("--rate", type=float, default=0.0,
                      help="batches per second per station, 0 for as fast as answered; "
                           "the summary says whether it was kept (default: %(default)s)")
    load.add_argument("--max-retries", type=int, default=None,
                      help="give a batch up after this many retries (default: never, "
                           "like a station)")


def _refuse(message: str) -> NoReturn:
    raise SystemExit(f"datastore simulate: {message}")


def choose_stations(
    count: int,
    listed: list[SimulatedStation],
    source: str,
    station: int | None = None,
    password: str | None = None,
    more: str = "",
) -> tuple[SimulatedStation, ...]:
    """The stations to upload as: ``--station`` alone, or the first ``count`` of ``listed``.

    Never one identity twice: ``count`` stations need ``count`` listed ones.  ``source``
    says where they come from, ``more`` how to get more, for the message.
    """
    if station is not None:
        if count > 1:
            _refuse(f"--station names one station, not {count}: leave --station out to "
                    f"upload as {count} stations from {source}")
        match = [candidate for candidate in listed if candidate.number == station]
        if password is None:
            if not match:
                _refuse(f"no password for station {station}: give --password")
            password = match[0].password
        position = match[0].position if match else None
        return (SimulatedStation(station, password, position=position),)
    if password is not None:
        _refuse("--password goes with --station")
    if len(listed) < count:
        _refuse(f"{count} stations asked for, but {source} lists {len(listed)}{more}")
    return tuple(listed[:count])


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Where to upload and as whom: flags first, then the list, then the local stack."""
    listed: list[SimulatedStation] = []
    source = more = ""
    if args.station_list is not None:
        try:
            text = args.station_list.read_text(encoding="utf-8")
        except OSError as exc:
            _refuse(f"cannot read --station-list: {exc}")
        listed = [SimulatedStation(s.number, s.password, s.cluster)
                  for s in parse_station_list(text, str(args.station_list)).values()]
        source = str(args.station_list)
    url = args.url
    ca_file = args.ca_cert
    needs_stack = url is None or (
        args.station_list is None and (args.station is None or args.password is None)
    )
    if needs_stack:
        info = read_stack_info(args.state_dir)
        if info is None or not info.is_running():
            _refuse("no --url/--station/--password given and no local stack running in "
                    f"{args.state_dir} (start one with `datastore local`)")
        if url is None:
            url = info.upload_url
            ca_file = ca_file or (Path(info.upload_ca) if info.upload_ca else None)
        if args.station_list is None:
            positions = info.positions()
            listed = [SimulatedStation(s.number, s.password, s.cluster,
                                       positions.get(s.number))
                      for s in info.demo_stations()]
            source = f"the local stack in {args.state_dir}"
            more = f": restart it with `datastore local --stations {args.stations}`"
    stations = choose_stations(args.stations, listed, source, args.station, args.password,
                               more)
    return Plan(
        url=url,
        stations=stations,
        flavour=args.pickle,
        batch_size=args.batch_size,
        batches=None if args.duration else (args.batches or 3),
        duration=args.duration,
        rate=args.rate,
        seed=args.seed,
        start=args.start,
        max_retries=args.max_retries,
        shower_rate=args.shower_rate,
        ca_file=ca_file,
    )


def describe_stations(stations: tuple[SimulatedStation, ...]) -> str:
    """``station 501``, ``stations 501-503`` or ``stations 501, 7001``, for the header."""
    numbers = [station.number for station in stations]
    if len(numbers) == 1:
        return f"station {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return f"stations {numbers[0]}-{numbers[-1]}"
    return "stations " + ", ".join(map(str, numbers))


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    summary, pace = simulate(plan)
    showers = f"air showers {plan.shower_rate:g}/s" if plan.shower_rate else "no air showers"
    header = (
        f"simulated {len(plan.stations)} station(s), as {describe_stations(plan.stations)} "
        f"-> {plan.url} ({plan.flavour} pickles, {plan.batch_size} events per batch, "
        f"{showers})"
    )
    sys.stdout.write(format_summary(summary, header, pace))
    sys.stdout.flush()
    warning = explain_pace(pace) if pace is not None else None
    if warning:
        sys.stderr.write(warning)
    return 0 if summary.batches and summary.accepted == summary.batches else 1
