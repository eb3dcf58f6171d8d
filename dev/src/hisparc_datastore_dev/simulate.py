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
from typing import Any

from hisparc_datastore.config import DEFAULT_STATE_DIR
from hisparc_datastore_dev.local import read_stack_info

PICKLE_FLAVOURS = ("py2", "py3")
PY3_PROTOCOL = 3  # what PySPARC's uploads were seen to use
CONNECT_TIMEOUT = 3.0  # the station software's timeouts
READ_TIMEOUT = 600.0
MAX_BACKOFF = 60.0
ACCEPTED = "100"


# --------------------------------------------------------------------------- batches


def build_batch(
    size: int, start: dt.datetime, rng: random.Random, every_type: bool = False
) -> list[dict[str, Any]]:
    """``size`` realistic events from ``start`` on; with ``every_type``, one of each type first.

    Times are naive UTC, as the station software sends them.
    """
    from hisparc_datastore_dev import samples

    events: list[dict[str, Any]] = []
    if every_type:
        for index, code in enumerate(samples.UPLOAD_CODE_ORDER[:size]):
            events.append(samples.event_of_type(code, start + dt.timedelta(seconds=index), rng))
    rest = size - len(events)
    if rest:
        events += samples.realistic_batch(rest, start + dt.timedelta(seconds=len(events)), rng)
    return events


def next_start(events: list[dict[str, Any]]) -> dt.datetime:
    """The whole second after a batch's last event: where the station's next batch begins."""
    last = max(event["header"]["datetime"] for event in events)
    return last.replace(microsecond=0) + dt.timedelta(seconds=1)


def station_batches(
    station_index: int, size: int, start: dt.datetime, seed: int
) -> Iterator[list[dict[str, Any]]]:
    """The endless, deterministic stream of batches of one simulated station."""
    rng = random.Random(seed * 1_000_003 + station_index)  # noqa: S311 (sample data)
    events = build_batch(size, start, rng, every_type=True)
    while True:
        yield events
        events = build_batch(size, next_start(events), rng)


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

    @property
    def accepted(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].accepted


def describe_answer(status: int, body: str) -> str:
    text = body.strip()
    short = text if len(text) <= 24 else text[:21] + "..."
    if status == 200:
        return short or "(empty body)"
    return f"HTTP {status}: {short}" if short else f"HTTP {status}"


def post_once(session: Any, url: str, form: dict[str, str]) -> Attempt:
    import requests

    began = time.perf_counter()
    try:
        response = session.post(url, data=form, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        body = response.text
        answer = describe_answer(response.status_code, body)
        accepted = body == ACCEPTED
    except requests.Timeout:
        answer, accepted = "timeout", False
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
    while True:
        attempt = post()
        delivery.attempts.append(attempt)
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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, delivery: Delivery) -> None:
        with self._lock:
            self.batches += 1
            self.requests += len(delivery.attempts)
            for attempt in delivery.attempts:
                self.answers[attempt.answer] += 1
                self.latencies.append(attempt.seconds)
            if delivery.accepted:
                self.accepted += 1
                self.events += delivery.events

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


def format_summary(summary: Summary, header: str) -> str:
    def milliseconds(value: float) -> str:
        return "-" if math.isnan(value) else f"{value * 1000:.0f} ms"

    answers = ", ".join(
        f"{answer} x{count}" for answer, count in sorted(summary.answers.items())
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
    width = max(len(label) for label, _ in rows)
    lines = [f"  {label.ljust(width)}  {value}" for label, value in rows]
    return "\n".join([header, *lines]) + "\n"


# -------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class Plan:
    url: str
    station: int
    password: str
    flavour: str = "py2"
    stations: int = 1
    batch_size: int = 100
    batches: int | None = 3  # per station; None: until ``duration`` has passed
    duration: float | None = None
    rate: float = 0.0  # batches per second per station; 0: as fast as answers come
    seed: int = 0
    start: dt.datetime | None = None
    max_retries: int | None = None


def run_station(index: int, plan: Plan, summary: Summary, stop: threading.Event,
                start: dt.datetime, deadline: float | None) -> None:
    import requests

    began = time.monotonic()
    batches = station_batches(index, plan.batch_size, start, plan.seed)
    with requests.Session() as session:
        for number in itertools.count():
            if plan.batches is not None and number >= plan.batches:
                return
            if plan.rate > 0 and stop.wait(max(0.0, began + number / plan.rate - time.monotonic())):
                return
            if stop.is_set() or (deadline is not None and time.monotonic() >= deadline):
                return
            events = next(batches)
            form = form_fields(plan.station, plan.password, pickle_batch(events, plan.flavour))
            delivery = deliver(
                lambda form=form: post_once(session, plan.url, form),
                len(events),
                stop.wait,
                plan.max_retries,
            )
            summary.add(delivery)
            if not delivery.accepted:  # a station never skips a batch: it stops here
                return


def simulate(plan: Plan, stop: threading.Event | None = None) -> Summary:
    stop = stop or threading.Event()
    start = plan.start or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    summary = Summary()
    began = time.monotonic()
    deadline = began + plan.duration if plan.duration else None
    threads = [
        threading.Thread(
            target=run_station, args=(index, plan, summary, stop, start, deadline),
            name=f"station-{index}", daemon=True,
        )
        for index in range(plan.stations)
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
    return summary


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive")
        return value

    return parse


def _timestamp(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("where to upload (default: the running `datastore local`)")
    target.add_argument("--url", help="the upload URL")
    target.add_argument("--station", type=int, help="station number")
    target.add_argument("--password", help="the station's password")
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
    load = parser.add_argument_group("load")
    load.add_argument("--stations", type=_positive(int), default=1,
                      help="stations uploading at once, all with the same identity "
                           "(default: %(default)s)")
    amount = load.add_mutually_exclusive_group()
    amount.add_argument("--batches", type=_positive(int), default=None,
                        help="batches per station (default: 3)")
    amount.add_argument("--duration", type=_positive(float),
                        help="seconds to keep uploading, instead of --batches")
    load.add_argument("--rate", type=float, default=0.0,
                      help="batches per second per station, 0 for as fast as answered "
                           "(default: %(default)s)")
    load.add_argument("--max-retries", type=int, default=None,
                      help="give a batch up after this many retries (default: never, "
                           "like a station)")


def plan_from_args(args: argparse.Namespace) -> Plan:
    url, station, password = args.url, args.station, args.password
    if url is None or station is None or password is None:
        info = read_stack_info(args.state_dir)
        if info is None or not info.is_running():
            raise SystemExit(
                "datastore simulate: no --url/--station/--password given and no local stack "
                f"running in {args.state_dir} (start one with `datastore local`)"
            )
        url = url or info.upload_url
        station = info.station if station is None else station
        password = info.password if password is None else password
    return Plan(
        url=url,
        station=station,
        password=password,
        flavour=args.pickle,
        stations=args.stations,
        batch_size=args.batch_size,
        batches=None if args.duration else (args.batches or 3),
        duration=args.duration,
        rate=args.rate,
        seed=args.seed,
        start=args.start,
        max_retries=args.max_retries,
    )


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    summary = simulate(plan)
    header = (
        f"simulated {plan.stations} station(s) as station {plan.station} -> {plan.url} "
        f"({plan.flavour} pickles, {plan.batch_size} events per batch)"
    )
    sys.stdout.write(format_summary(summary, header))
    return 0 if summary.batches and summary.accepted == summary.batches else 1
