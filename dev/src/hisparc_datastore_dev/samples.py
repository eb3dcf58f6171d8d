"""Realistic, reproducible station events for tests, benchmarks and the station simulator.

Events have the shape of docs/FORMAT.md, section 2, and use every upload code of its
section 4.6 (with the intended codes of the lightning types, see its section 5), with
values that fit the column dtypes listed there.  Everything is driven by one
``random.Random``, so the same seed gives the same batch, byte for byte once pickled.

Coincidences (CIC) come from a model of the station's electronics (``electronics``): 2,400
samples of 2.5 ns per channel around a baseline of 26-31 ADC counts, positive pulses from
the particles of a shower, the trigger at sample 400, and every number the DAQ reports
(baselines, their spread, peaks, pulse heights, integrals, trigger pattern) derived from
those samples the way HiSPARC's analysis derives them, so that SAPPHiRE recomputes the
stored values.  Traces are sent the way stations do: comma-separated ADC counts,
zlib-compressed, base64 text.  A :class:`StationModel` adds a station's place, its own
hardware and the air showers of ``showers`` to its stream of events.
"""

from __future__ import annotations

import base64
import itertools
import random
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from hisparc_datastore_dev import showers
from hisparc_datastore_dev.electronics import (
    ADC_MAX,
    PRE_TRIGGER,
    TRACE_SAMPLES,
    Electronics,
    Readout,
    read_out,
)

#: Sample where the trigger sits (1 us of pre-coincidence time).
TRIGGER_SAMPLE = PRE_TRIGGER

Event = dict[str, Any]
_Gen = Callable[[random.Random], Any]


# --- value generators, one per column dtype family -------------------------------------


def _uniform(lo: float, hi: float, digits: int = 3) -> _Gen:
    return lambda rng: round(rng.uniform(lo, hi), digits)


def _integer(lo: int, hi: int) -> _Gen:
    return lambda rng: rng.randint(lo, hi)


def _flag(p_true: float = 0.5) -> _Gen:
    return lambda rng: rng.random() < p_true


def _choice(options: Sequence[Any]) -> _Gen:
    return lambda rng: rng.choice(options)


_U1 = _integer(0, 255)
_F8 = _uniform(-1000.0, 1000.0, 6)
_ERROR_MESSAGES = (
    "Error 11: DSP communication timeout on channel 2",
    "GPS: no satellite fix, using internal clock",
    "Buffer overflow: 17 events lost",
    "HV supply channel 1 outside limits (mean 912 V)",
    "Temperature sensor read failure: 0xff",
    "Serial port COM3 could not be opened",
    "Température extérieure hors limites",  # stations send latin-1 byte strings
    "Connection to the local database failed (code 1045)",
)
_ERRMSG = _choice(_ERROR_MESSAGES)


def _version(rng: random.Random) -> str:
    return f"Hardware: {rng.randint(28, 40)} FPGA: {rng.randint(10, 25)}"


def _password(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(10))


def _buffer(rng: random.Random) -> str:
    return " ".join(f"{rng.randint(0, 255):02X}" for _ in range(16))


def _mas_slv(prefix: str) -> list[tuple[str, _Gen]]:
    """Upload codes of one HiSPARC board (master or slave) in a CFG message."""
    p = f"CFG_{prefix}_"
    return [
        (p + "CH1THRLOW", _uniform(25.0, 40.0)),
        (p + "CH1THRHIGH", _uniform(60.0, 80.0)),
        (p + "CH2THRLOW", _uniform(25.0, 40.0)),
        (p + "CH2THRHIGH", _uniform(60.0, 80.0)),
        (p + "CH1INTTIME", _uniform(0.0, 10.0)),
        (p + "CH2INTTIME", _uniform(0.0, 10.0)),
        (p + "CH1VOLT", _uniform(600.0, 950.0, 1)),
        (p + "CH2VOLT", _uniform(600.0, 950.0, 1)),
        (p + "CH1CURR", _uniform(0.5, 9.5)),
        (p + "CH2CURR", _uniform(0.5, 9.5)),
        (p + "COMPTHRLOW", _uniform(-50.0, 50.0)),
        (p + "COMPTHRHIGH", _uniform(-50.0, 50.0)),
        (p + "MAXVOLT", _uniform(1000.0, 1500.0, 1)),
        (p + "RESET", _flag(0.05)),
        (p + "CH1GAINPOS", _U1),
        (p + "CH1GAINNEG", _U1),
        (p + "CH2GAINPOS", _U1),
        (p + "CH2GAINNEG", _U1),
        (p + "CH1OFFPOS", _U1),
        (p + "CH1OFFNEG", _U1),
        (p + "CH2OFFPOS", _U1),
        (p + "CH2OFFNEG", _U1),
        (p + "COMMOFF", _U1),
        (p + "INTVOLTAGE", _U1),
        (p + "CH1ADCGAIN", _uniform(0.5, 1.5, 6)),
        (p + "CH1ADCOFF", _uniform(-5.0, 5.0, 6)),
        (p + "CH2ADCGAIN", _uniform(0.5, 1.5, 6)),
        (p + "CH2ADCOFF", _uniform(-5.0, 5.0, 6)),
        (p + "CH1COMPGAIN", _uniform(0.5, 1.5, 6)),
        (p + "CH1COMPOFF", _uniform(-5.0, 5.0, 6)),
        (p + "CH2COMPGAIN", _uniform(0.5, 1.5, 6)),
        (p + "CH2COMPOFF", _uniform(-5.0, 5.0, 6)),
    ]


def _station_setup() -> list[tuple[str, _Gen]]:
    """Codes shared by the weather and lightning configuration messages (prefix added later)."""
    return [
        ("COM_PORT", _integer(1, 8)),
        ("BAUD_RATE", _choice((4800, 9600, 19200))),
        ("STATION_ID", _integer(1, 65000)),
        ("DATABASE_NAME", _choice(("buffer.mdb", "storage.db", "hisparc_local.sqlite"))),
        ("HELP_URL", _choice(("http://www.hisparc.nl/", "https://docs.hisparc.nl/weather"))),
        ("DAQ_MODE", _flag()),
        ("LATITUDE", _uniform(50.7, 53.6, 6)),
        ("LONGITUDE", _uniform(3.3, 7.2, 6)),
        ("ALTITUDE", _uniform(-5.0, 120.0, 2)),
    ]


def _prefixed(prefix: str, items: Iterable[tuple[str, _Gen]]) -> list[tuple[str, _Gen]]:
    return [(prefix + code, gen) for code, gen in items]


#: Per event type (except CIC, built by :func:`cic_event`): upload code -> value generator.
_TYPE_CODES: dict[str, list[tuple[str, _Gen]]] = {
    "ERR": [("ERRMSG", _ERRMSG)],
    "CFG": [
        ("CFG_GPS_LAT", _uniform(50.7, 53.6, 7)),
        ("CFG_GPS_LONG", _uniform(3.3, 7.2, 7)),
        ("CFG_GPS_ALT", _uniform(-5.0, 120.0, 3)),
        ("CFG_MAS_VERSION", _version),
        ("CFG_SLV_VERSION", _version),
        ("CFG_TRIGLOWSIG", _integer(0, 4)),
        ("CFG_TRIGHIGHSIG", _integer(0, 4)),
        ("CFG_TRIGEXT", _integer(0, 1)),
        ("CFG_TRIGANDOR", _flag()),
        ("CFG_PRECTIME", _choice((1.0e-6, 1.5e-6))),
        ("CFG_CTIME", _choice((1.5e-6, 2.0e-6))),
        ("CFG_POSTCTIME", _choice((3.5e-6, 3.0e-6))),
        ("CFG_DETNUM", _integer(1, 65535)),
        ("CFG_PASSWORD", _password),
        ("CFG_SPAREBYTES", _U1),
        ("CFG_USEFILTER", _flag()),
        ("CFG_USEFILTTHRES", _flag()),
        ("CFG_REDUCE", _flag(0.1)),
        ("CFG_BUFFER", _buffer),
        ("CFG_STARTMODE", _flag()),
        ("CFG_DELAYSCREEN", _uniform(0.0, 5.0)),
        ("CFG_DELAYCHECK", _uniform(0.0, 5.0)),
        ("CFG_DELAYERROR", _uniform(0.0, 5.0)),
        *_mas_slv("MAS"),
        *_mas_slv("SLV"),
    ],
    "CMP": [
        ("CMP_DEVICE", _integer(0, 1)),
        ("CMP_COMPARATOR", _integer(0, 3)),
        ("CMP_COUNT", _integer(0, 65535)),
    ],
    "SIN": [
        ("MAS_CH1_LOW", _integer(80, 400)),
        ("MAS_CH1_HIGH", _integer(5, 60)),
        ("MAS_CH2_LOW", _integer(80, 400)),
        ("MAS_CH2_HIGH", _integer(5, 60)),
        ("SLV_CH1_LOW", _integer(80, 400)),
        ("SLV_CH1_HIGH", _integer(5, 60)),
        ("SLV_CH2_LOW", _integer(80, 400)),
        ("SLV_CH2_HIGH", _integer(5, 60)),
    ],
    "SAT": [
        ("MIN_N", _integer(3, 6)),
        ("MEAN_N", _uniform(6.0, 9.0, 2)),
        ("MAX_N", _integer(9, 12)),
        ("MIN_SIGNAL", _integer(20, 35)),
        ("MEAN_SIGNAL", _uniform(35.0, 45.0, 2)),
        ("MAX_SIGNAL", _integer(45, 52)),
    ],
    "WTR": [
        ("WTR_TEMP_INSIDE", _uniform(15.0, 25.0, 1)),
        ("WTR_TEMP_OUTSIDE", _uniform(-10.0, 30.0, 1)),
        ("WTR_HUMIDITY_INSIDE", _integer(20, 60)),
        ("WTR_HUMIDITY_OUTSIDE", _integer(30, 100)),
        ("WTR_BAROMETER", _uniform(970.0, 1040.0, 1)),
        ("WTR_WIND_DIR", _integer(0, 359)),
        ("WTR_WIND_SPEED", _integer(0, 30)),
        ("WTR_SOLAR_RAD", _integer(0, 1000)),
        ("WTR_UV", _integer(0, 10)),
        ("WTR_ET", _uniform(0.0, 5.0, 2)),
        ("WTR_RAIN_RATE", _uniform(0.0, 10.0, 1)),
        ("WTR_HEAT_INDEX", _integer(-10, 35)),
        ("WTR_DEW_POINT", _uniform(-15.0, 20.0, 1)),
        ("WTR_WIND_CHILL", _uniform(-20.0, 30.0, 1)),
    ],
    "WER": [("WER_ERRMSG", _ERRMSG)],
    "WCG": [
        *_prefixed("WCG_", _station_setup()),
        *(
            (f"WCG_{sensor}", _flag(0.8))
            for sensor in (
                "TEMPERATURE_INSIDE",
                "TEMPERATURE_OUTSIDE",
                "HUMIDITY_INSIDE",
                "HUMIDITY_OUTSIDE",
                "BAROMETER",
                "WIND_DIRECTION",
                "WIND_SPEED",
                "SOLAR_RADIATION",
                "UV_INDEX",
                "EVAPOTRANSPIRATION",
                "RAIN_RATE",
                "HEAT_INDEX",
                "DEW_POINT",
                "WIND_CHILL",
            )
        ),
        ("WCG_OFFSET_INSIDE_TEMPERATURE", _uniform(-2.0, 2.0, 1)),
        ("WCG_OFFSET_OUTSIDE_TEMPERATURE", _uniform(-2.0, 2.0, 1)),
        ("WCG_OFFSET_INSIDE_HUMIDITY", _integer(-5, 5)),
        ("WCG_OFFSET_OUTSIDE_HUMIDITY", _integer(-5, 5)),
        ("WCG_OFFSET_WIND_DIRECTION", _integer(-20, 20)),
        ("WCG_OFFSET_STATION_ALTITUDE", _uniform(-5.0, 5.0, 1)),
        ("WCG_OFFSET_BAR_SEA_LEVEL", _uniform(-3.0, 3.0, 1)),
    ],
    "LIT": [
        ("LIT_CORR_DIST", _integer(0, 300)),
        ("LIT_UNCORR_DIST", _integer(0, 300)),
        ("LIT_UNCORR_ANGLE", _uniform(0.0, 360.0, 1)),
        ("LIT_CORR_ANGLE", _uniform(0.0, 360.0, 1)),
    ],
    "LER": [("LER_ERRMSG", _ERRMSG)],
    "LCG": [
        *_prefixed("LCG_", _station_setup()),
        ("LCG_SQUELCH_SETTING", _integer(0, 15)),
        ("LCG_CLOSE_ALARM_DISTANCE", _integer(5, 30)),
        ("LCG_SEVERE_ALARM_DISTANCE", _integer(1, 10)),
        ("LCG_NOISE_BEEP", _flag()),
        ("LCG_MINIMUM_GPS_SPEED", _integer(0, 20)),
        ("LCG_ANGLE_CORRECTION", _uniform(-180.0, 180.0, 1)),
    ],
    "LST": [
        ("LST_CLOSE_RATE", _integer(0, 50)),
        ("LST_TOTAL_RATE", _integer(0, 500)),
        ("LST_CLOSE_ALARM", _flag(0.1)),
        ("LST_SEVERE_ALARM", _flag(0.05)),
        ("LST_CURR_HEADING", _uniform(0.0, 360.0, 1)),
    ],
    "LNS": [],
}

_CIC_CODES: tuple[str, ...] = (
    "RED",
    "EVENTRATE",
    "TRIGPATTERN",
    *(f"{code}{ch}" for code in ("BL", "STDDEV", "NP", "PH", "IN", "TR") for ch in range(1, 5)),
)

#: Every event type's upload code, in the order of the format (docs/FORMAT.md).
UPLOAD_CODE_ORDER: tuple[str, ...] = (
    "CIC", "ERR", "CFG", "CMP", "SIN", "SAT", "WTR", "WER", "WCG", "LIT", "LER", "LCG",
    "LST", "LNS",
)  # fmt: skip

#: The upload codes each event type is generated with (CIC with traces).
UPLOAD_CODES: dict[str, tuple[str, ...]] = {
    "CIC": _CIC_CODES,
    **{kind: tuple(code for code, _ in codes) for kind, codes in _TYPE_CODES.items()},
}

#: Event types whose header carries sub-second time in ``nanoseconds`` (docs/FORMAT.md, 4.6).
EXTENDED_TIME: frozenset[str] = frozenset({"CIC", "CMP"})


# --- traces ----------------------------------------------------------------------------


def _numpy_rng(rng: random.Random) -> np.random.Generator:
    """A numpy generator seeded from ``rng``: array-speed noise that stays reproducible."""
    return np.random.default_rng(rng.getrandbits(64))


#: Decimal text of every ADC value: joining these is ten times faster than str() per sample.
_ADC_TEXT = np.array([str(value) for value in range(ADC_MAX + 1)], dtype=object)


def encode_trace(adc: Iterable[int]) -> str:
    """Station encoding of a trace: comma-separated ints, zlib (default level), base64."""
    values = np.asarray(list(adc) if not isinstance(adc, np.ndarray) else adc, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > ADC_MAX):
        text = ",".join(map(str, values.tolist()))
    else:
        text = ",".join(_ADC_TEXT[values].tolist())
    return base64.b64encode(zlib.compress(text.encode("ascii"))).decode("ascii")


def decode_trace(blob: str | bytes) -> list[int]:
    """Inverse of :func:`encode_trace`, the way readers of the HDF5 files decode it."""
    return [int(v) for v in zlib.decompress(base64.b64decode(blob)).decode("ascii").split(",")]


def local_readout(station: Electronics, rng: random.Random,
                  samples: int = TRACE_SAMPLES) -> Readout:
    """One of a station's ordinary triggers: a small shower only it sees.

    Drawn again, denser each time, until the station triggers (most small showers do not).
    """
    gen = _numpy_rng(rng)
    offsets = showers.detector_offsets()
    for attempt in range(40):
        hits = showers.local_hits(rng, gen, offsets, attempt)
        readout = read_out(station, hits, gen, samples)
        if readout is not None:
            return readout
    raise RuntimeError("no trigger from ever denser showers: the trigger settings are off")


def make_trace(rng: random.Random, samples: int = TRACE_SAMPLES) -> str:
    """One realistic trace as a station uploads it (base64 of zlib of comma-separated ADC)."""
    return encode_trace(local_readout(Electronics.draw(rng), rng, samples).adc[0])


# --- events ----------------------------------------------------------------------------


def _header(kind: str, when: datetime, rng: random.Random) -> dict[str, Any]:
    if kind in EXTENDED_TIME:
        # GPS second in the datetime, the sub-second part in nanoseconds.
        nanoseconds = when.microsecond * 1000 + rng.randrange(1000)
        when = when.replace(microsecond=0)
    else:
        nanoseconds = 0
    return {"eventtype_uploadcode": kind, "datetime": when, "nanoseconds": nanoseconds}


_EPOCH = datetime(1970, 1, 1)


def epoch_ns(when: datetime) -> int:
    """Nanoseconds since 1970 of a naive UTC datetime (exact, unlike a float timestamp)."""
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def event_time_ns(event: Event) -> int:
    """When an event happened, from its header, in nanoseconds since 1970."""
    header = event["header"]
    return epoch_ns(header["datetime"]) + int(header["nanoseconds"])


def _item(code: str, value: Any) -> dict[str, Any]:
    return {"data_uploadcode": code, "data": value}


def _cic_datalist(readout: Readout, event_rate: float, traces: bool) -> list[dict[str, Any]]:
    """The upload codes of a coincidence, every value as the DAQ derived it from its traces.

    ``RED`` (data reduction) is False: the traces are whole, as the config says.
    """
    datalist = [
        _item("RED", False),
        _item("EVENTRATE", round(event_rate, 4)),
        _item("TRIGPATTERN", readout.trigger_pattern),
    ]
    for code, values in (
        ("BL", readout.baseline),
        ("STDDEV", readout.std_dev),
        ("NP", readout.n_peaks),
        ("PH", readout.pulseheights),
        ("IN", readout.integrals),
    ):
        datalist.extend(_item(f"{code}{n}", value) for n, value in enumerate(values, 1))
    if traces:
        datalist.extend(_item(f"TR{n}", encode_trace(row)) for n, row in enumerate(readout.adc, 1))
    return datalist


def cic_event(
    when: datetime,
    rng: random.Random,
    traces: bool = True,
    samples: int = TRACE_SAMPLES,
    station: Electronics | None = None,
) -> Event:
    """A coincidence (CIC) event of a four-detector station, with or without its traces.

    One of the station's ordinary triggers (a small local shower) read out by ``station``'s
    electronics (a random station's when None), triggering at ``when``.
    """
    readout = local_readout(station or Electronics.draw(rng), rng, samples)
    datalist = _cic_datalist(readout, rng.uniform(0.3, 1.4), traces)
    return {"header": _header("CIC", when, rng), "datalist": datalist}


def event_of_type(code: str, when: datetime, rng: random.Random) -> Event:
    """An event of any of the 14 types, carrying every upload code of that type."""
    if code == "CIC":
        return cic_event(when, rng)
    try:
        codes = _TYPE_CODES[code]
    except KeyError:
        raise ValueError(f"unknown event type {code!r}") from None
    return {
        "header": _header(code, when, rng),
        "datalist": [_item(upload_code, gen(rng)) for upload_code, gen in codes],
    }


def batch(
    n: int,
    start: datetime,
    rng: random.Random,
    kinds: Sequence[str] = ("CIC",),
    interval: timedelta = timedelta(seconds=1),
    traces: bool = True,
) -> list[Event]:
    """``n`` events, ``interval`` apart from ``start``, cycling through ``kinds``."""
    events = []
    for number in range(n):
        kind = kinds[number % len(kinds)]
        when = start + number * interval
        if kind == "CIC":
            events.append(cic_event(when, rng, traces=traces))
        else:
            events.append(event_of_type(kind, when, rng))
    return events


# --- a simulated station ---------------------------------------------------------------

#: Spread (ns) of a station's GPS timestamps around the true time of its trigger.
GPS_JITTER_NS = 2.0
#: The station's thresholds as its config states them, in millivolts (HiSPARC defaults).
LOW_THRESHOLD_MV = 30.0
HIGH_THRESHOLD_MV = 70.0


@dataclass(frozen=True)
class StationModel:
    """A simulated station: where it stands, its electronics, the showers over it.

    Its events are consistent with each other: the config reports its GPS position and
    trigger settings, and every coincidence comes from particles read out by the same four
    channels, either a small shower of its own or one of the air showers of ``stream``
    (None: only its own triggers).  The electronics are a function of the station number:
    the same station has the same hardware in every run.
    """

    number: int
    position: showers.Position
    electronics: Electronics
    stream: showers.ShowerStream | None = None
    detectors: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        middle = self.stream.middle if self.stream is not None else showers.CLUSTER_MIDDLE
        object.__setattr__(self, "detectors", showers.detectors_enu(self.position, middle))

    @classmethod
    def create(cls, number: int, position: showers.Position | None = None,
               stream: showers.ShowerStream | None = None) -> StationModel:
        """Station ``number`` at ``position`` (its default place when None)."""
        hardware = Electronics.draw(random.Random(f"electronics of {number}"))  # noqa: S311
        return cls(number, position or showers.default_position(number), hardware, stream)

    def config_event(self, when: datetime, rng: random.Random) -> Event:
        """A CFG message: the generic values, with this station's position and trigger."""
        trigger = self.electronics.trigger
        settings: dict[str, Any] = {
            "CFG_GPS_LAT": self.position.latitude,
            "CFG_GPS_LONG": self.position.longitude,
            "CFG_GPS_ALT": self.position.altitude,
            "CFG_TRIGLOWSIG": trigger.n_low,
            "CFG_TRIGHIGHSIG": trigger.n_high,
            "CFG_TRIGEXT": int(trigger.external),
            "CFG_TRIGANDOR": trigger.and_or,
            "CFG_PRECTIME": 1.0e-6,
            "CFG_CTIME": 1.5e-6,
            "CFG_POSTCTIME": 3.5e-6,
            "CFG_USEFILTER": False,
            "CFG_USEFILTTHRES": False,
            "CFG_REDUCE": False,
        }
        for board in ("MAS", "SLV"):
            for channel in ("CH1", "CH2"):
                settings[f"CFG_{board}_{channel}THRLOW"] = LOW_THRESHOLD_MV
                settings[f"CFG_{board}_{channel}THRHIGH"] = HIGH_THRESHOLD_MV
        event = event_of_type("CFG", when, rng)
        for item in event["datalist"]:
            if item["data_uploadcode"] in settings:
                item["data"] = settings[item["data_uploadcode"]]
        return event

    def local_event(self, when: datetime, rng: random.Random, traces: bool = True) -> Event:
        """One of the station's ordinary triggers, at ``when``."""
        return cic_event(when, rng, traces=traces, station=self.electronics)

    def shower_events(self, start_ns: int, end_ns: int, traces: bool = True) -> list[Event]:
        """The events of the air showers in ``[start_ns, end_ns)`` this station triggers on.

        The event's time is the trigger's: the front's arrival at the detectors, the
        moment the trigger condition is met, and the GPS's few nanoseconds of jitter.
        """
        if self.stream is None:
            return []
        events = []
        for shower in self.stream.between(start_ns, end_ns):
            gen = showers.station_generator(self.stream.seed, shower, self.number)
            hits = showers.station_hits(shower, self.detectors, gen)
            if hits is None:
                continue
            readout = read_out(self.electronics, hits, gen)
            if readout is None:
                continue
            jitter = gen.normal(0.0, GPS_JITTER_NS)
            moment = shower.time_ns + round(readout.trigger_time + jitter)
            seconds, nanoseconds = divmod(moment, 10**9)
            header = {"eventtype_uploadcode": "CIC",
                      "datetime": _EPOCH + timedelta(seconds=seconds),
                      "nanoseconds": nanoseconds}
            datalist = _cic_datalist(readout, float(gen.uniform(0.3, 1.4)), traces)
            events.append({"header": header, "datalist": datalist})
        return events


#: Event types a station sends now and then besides coincidences and singles.
_OCCASIONAL = ("CFG", "ERR", "CMP", "SAT", "WTR")


def event_stream(
    start: datetime,
    rng: random.Random,
    traces: bool = True,
    coincidence_rate: float = 0.5,
    occasional_rate: float = 0.02,
    station: StationModel | None = None,
) -> Iterator[Event]:
    """A station's events from ``start`` on, for ever, in time order.

    Per second: one singles (SIN) message; the station's own coincidences (CIC, with
    traces) as a Poisson process of ``coincidence_rate`` per second; a chance
    ``occasional_rate`` of one other message (CFG, ERR, CMP, SAT or WTR); and with a
    ``station`` that stands under showers, the coincidences of the showers it triggers on.
    An event a second's work puts after the next second starts waits for that second, so
    the stream never goes back in time.
    """
    held: list[tuple[int, int, Event]] = []
    order = itertools.count()
    second = 0
    while True:
        base = start + timedelta(seconds=second)
        end = epoch_ns(base) + 10**9
        made = [event_of_type("SIN", base, rng)]
        t = rng.expovariate(coincidence_rate) if coincidence_rate > 0 else 2.0
        while t < 1.0:
            when = base + timedelta(microseconds=int(t * 1e6))
            made.append(station.local_event(when, rng, traces) if station
                        else cic_event(when, rng, traces=traces))
            t += rng.expovariate(coincidence_rate)
        if rng.random() < occasional_rate:  # these types carry whole seconds
            when = base + timedelta(microseconds=rng.randrange(1_000_000))
            when = max(when.replace(microsecond=0), base)
            kind = rng.choice(_OCCASIONAL)
            made.append(station.config_event(when, rng) if station and kind == "CFG"
                        else event_of_type(kind, when, rng))
        if station is not None:
            made += station.shower_events(end - 10**9, end, traces)
        held += [(event_time_ns(event), next(order), event) for event in made]
        held.sort(key=lambda entry: entry[:2])
        due = sum(1 for moment, _, _ in held if moment < end)
        yield from (event for _, _, event in held[:due])
        del held[:due]
        second += 1


def realistic_batch(
    n: int,
    start: datetime,
    rng: random.Random,
    traces: bool = True,
    coincidence_rate: float = 0.5,
    occasional_rate: float = 0.02,
    station: StationModel | None = None,
) -> list[Event]:
    """``n`` events in time order as a station's upload queue holds them.

    The first ``n`` of :func:`event_stream`.  With the defaults 100 events span about
    70 s and hold about a third CIC, like a real station's batch.
    """
    stream = event_stream(start, rng, traces, coincidence_rate, occasional_rate, station)
    return list(itertools.islice(stream, n))


# --- the Python 3 client flavour -------------------------------------------------------


def _numpy_value(value: Any) -> Any:
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int32(value) if -(2**31) <= value < 2**31 else np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    return value


def numpy_flavour(events: Iterable[Event]) -> list[Event]:
    """A copy with numeric values as numpy scalars, as a Python 3 client (PySPARC) sends.

    Datalist values and the header's ``nanoseconds`` become ``np.bool_``, ``np.int32``
    (``np.int64`` when too large) or ``np.float64``; strings and datetimes stay as they are.
    """
    flavoured = []
    for event in events:
        event = dict(event)
        if isinstance(event.get("header"), dict):
            header = event["header"] = dict(event["header"])
            if isinstance(header.get("nanoseconds"), int):
                header["nanoseconds"] = np.int64(header["nanoseconds"])
        if isinstance(event.get("datalist"), list):
            event["datalist"] = [
                {**item, "data": _numpy_value(item["data"])}
                if isinstance(item, dict) and "data" in item
                else item
                for item in event["datalist"]
            ]
        flavoured.append(event)
    return flavoured
