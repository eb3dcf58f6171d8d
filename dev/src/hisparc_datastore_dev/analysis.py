"""HiSPARC's own analysis (SAPPHiRE) on the day files of simulated stations, offline.

Run it on a local stack's data after ``datastore simulate``::

    python -m hisparc_datastore_dev.analysis --seed 0 --shower-rate 0.05

It needs the ``sapphire`` extra of the development tools (``pip install -e './dev[sapphire]'``,
which installs ``hisparc-sapphire``).

SAPPHiRE asks HiSPARC's public database (data.hisparc.nl) for what it knows about a
station: where it stands and how its detectors lie, its trigger thresholds, and its station
and detector timing offsets.  For simulated stations that is wrong twice over: it needs the
network, and numbers like 501 are real stations whose real metadata is not the
simulation's.  So this module gives SAPPHiRE all of it and never lets it ask:

- **the cluster**: a ``CompassStations`` built from the simulated stations' positions (the
  local stack's ``positions.json``, as ``stack.json`` publishes them) and the standard
  detector layout, with every station and detector timing offset set to zero (the
  simulation has none), so ``ReconstructESDCoincidences`` takes the offsets from it;
- **the trigger**: ``ProcessEventsFromSourceWithTriggerOffset`` without a station number
  (with one it asks the database), its thresholds and trigger set from the station's config
  messages in the day file and the simulated electronics' thresholds in ADC counts.

Nothing here builds ``sapphire.api.Station``, ``Network`` or ``HiSPARCStations``, which
are the classes that reach for the network (the test makes sure by making the network
unreachable for SAPPHiRE).  The day file is only read: SAPPHiRE's processing rewrites the
tables it processes, and the datastore's day files must not be changed (docs/FORMAT.md,
4.7), so all results go to a file of their own.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hisparc_datastore.config import DEFAULT_STATE_DIR
from hisparc_datastore_dev.electronics import TriggerSettings
from hisparc_datastore_dev.local import StackFiles, read_stack_info
from hisparc_datastore_dev.showers import (
    DEFAULT_SHOWER_RATE,
    DETECTOR_LAYOUT,
    Position,
    Shower,
    ShowerStream,
    angle_between,
    default_position,
)

#: SAPPHiRE's coincidence window (ns): events of different stations this close together.
COINCIDENCE_WINDOW = 10_000
#: SAPPHiRE's marks for "no value" in its processed columns.
MISSING = (-1.0, -999.0)
_STATION_GROUP = re.compile(r"/hisparc/cluster_[^/]+/station_(\d+)$")


@dataclass
class Coincidence:
    """One coincidence SAPPHiRE found, with the direction it reconstructed (NaN: none)."""

    ext_timestamp: int
    stations: tuple[int, ...]
    zenith: float
    azimuth: float
    shower: Shower | None = None  # the simulated shower it matches, when known
    angle: float = math.nan  # between the reconstructed and the simulated direction


@dataclass
class Analysis:
    """What SAPPHiRE made of one day file."""

    stations: list[int]
    events: dict[int, int]  # CIC events per station
    #: Detectors with a signal SAPPHiRE times (pulse height at least 20 counts), and of
    #: those, the ones it found an arrival time for; events with a trigger time found.
    signals: int = 0
    timed: int = 0
    triggers: int = 0
    coincidences: list[Coincidence] = field(default_factory=list)

    @property
    def total_events(self) -> int:
        return sum(self.events.values())

    def reconstructed(self) -> list[Coincidence]:
        return [c for c in self.coincidences if not math.isnan(c.zenith)]


def day_file_stations(data: Any) -> dict[int, str]:
    """Station number -> group path of every station with events in an open day file."""
    found = {}
    for group in data.walk_groups("/hisparc"):
        match = _STATION_GROUP.match(group._v_pathname)
        if match and "events" in group and group.events.nrows:
            found[int(match.group(1))] = group._v_pathname
    return dict(sorted(found.items()))


def trigger_settings(data: Any, group: str) -> TriggerSettings:
    """The station's trigger as its last config message in the day file states it.

    The config gives the thresholds in millivolts; in ADC counts they are the simulated
    electronics' (what SAPPHiRE's history lists for HiSPARC III stations).  Without a
    config message, the electronics' defaults.
    """
    default = TriggerSettings()
    node = data.get_node(group)
    if "config" not in node or not node.config.nrows:
        return default
    last = node.config[-1]
    return TriggerSettings(
        low=default.low, high=default.high,
        n_low=int(last["trig_low_signals"]), n_high=int(last["trig_high_signals"]),
        and_or=bool(last["trig_and_or"]), external=bool(last["trig_external"]),
    )


def sapphire_cluster(positions: Mapping[int, Position]) -> Any:
    """A SAPPHiRE cluster of the simulated stations, with no timing offsets.

    Positions become east/north/up in the tangent plane at the first station, as
    ``HiSPARCStations`` does with the database's; every station has the simulation's
    detector layout, and ``gps_offset`` and each detector's ``offset`` are zero.
    """
    from sapphire.clusters import CompassStations
    from sapphire.transformations.geographic import FromWGS84ToENUTransformation

    numbers = sorted(positions)
    first = positions[numbers[0]]
    transform = FromWGS84ToENUTransformation((first.latitude, first.longitude, first.altitude))
    cluster = CompassStations()
    cluster.lla = (first.latitude, first.longitude, first.altitude)
    for number in numbers:
        place = positions[number]
        enu = transform.transform((place.latitude, place.longitude, place.altitude))
        cluster._add_station(enu, [list(d) for d in DETECTOR_LAYOUT], number=number)
    for station in cluster.stations:
        station.gps_offset = 0.0
        for detector in station.detectors:
            detector.offset = 0.0
    return cluster


def _count_timing(events: np.ndarray) -> tuple[int, int, int]:
    """Detectors with a signal to time, those timed, and events with a trigger time."""
    signals = timed = 0
    for channel in range(4):
        has_signal = events["pulseheights"][:, channel] >= 20  # SAPPHiRE's ADC_THRESHOLD
        times = events[f"t{channel + 1}"]
        signals += int(has_signal.sum())
        timed += int((has_signal & ~np.isin(times, MISSING)).sum())
    triggers = int((~np.isin(events["t_trigger"], MISSING)).sum())
    return signals, timed, triggers


def analyse(day_file: Path, out: Path, positions: Mapping[int, Position] | None = None,
            stations: Sequence[int] | None = None,
            window: int = COINCIDENCE_WINDOW) -> Analysis:
    """Process every station's events, search coincidences, reconstruct their directions.

    ``positions`` are where the stations stand (default places for those missing);
    ``stations`` limits the analysis to those numbers.  SAPPHiRE's results are in ``out``
    (overwritten): ``/s<number>/events`` with arrival and trigger times, and
    ``/coincidences`` with its ``reconstructions``.
    """
    import tables
    from sapphire.analysis.coincidences import CoincidencesESD
    from sapphire.analysis.process_events import ProcessEventsFromSourceWithTriggerOffset
    from sapphire.analysis.reconstructions import ReconstructESDCoincidences

    positions = dict(positions or {})
    with tables.open_file(str(day_file), "r") as source, tables.open_file(str(out), "w") as dest:
        groups = day_file_stations(source)
        if stations is not None:
            groups = {n: g for n, g in groups.items() if n in stations}
        result = Analysis(stations=list(groups), events={})
        for number, group in groups.items():
            process = ProcessEventsFromSourceWithTriggerOffset(
                source, dest, group, f"/s{number}", station=None, progress=False,
            )
            # station=None keeps it off the network; these replace its HiSPARC II guesses.
            process.thresholds, process.trigger = trigger_settings(source, group).as_sapphire()
            with warnings.catch_warnings():  # an MPV fit that fails only says so
                warnings.simplefilter("ignore")
                process.process_and_store_results()
            events = dest.get_node(f"/s{number}/events").read()
            result.events[number] = len(events)
            signals, timed, triggers = _count_timing(events)
            result.signals += signals
            result.timed += timed
            result.triggers += triggers
        if len(groups) < 2:
            return result
        numbers = list(groups)
        search = CoincidencesESD(dest, "/coincidences", [f"/s{n}" for n in numbers],
                                 overwrite=True, progress=False)
        search.search_and_store_coincidences(window=window, station_numbers=numbers)
        cluster = sapphire_cluster({n: positions.get(n) or default_position(n)
                                    for n in numbers})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nan means: not reconstructed
            reconstruction = ReconstructESDCoincidences(
                dest, "/coincidences", overwrite=True, progress=False, cluster=cluster,
            )
            reconstruction.reconstruct_and_store()
        found = dest.get_node("/coincidences/coincidences").read()
        directions = dest.get_node("/coincidences/reconstructions").read()
        for row, direction in zip(found, directions, strict=True):
            result.coincidences.append(Coincidence(
                ext_timestamp=int(row["ext_timestamp"]),
                stations=tuple(n for n in numbers if row[f"s{n}"]),
                zenith=float(direction["zenith"]), azimuth=float(direction["azimuth"]),
            ))
    return result


def match_showers(analysis: Analysis, stream: ShowerStream,
                  tolerance_ns: int = COINCIDENCE_WINDOW) -> None:
    """Pair each coincidence with the simulated shower that made it, and their angle.

    A coincidence's time is its first station's trigger, a few microseconds at most from
    the moment the shower's front passed its core.
    """
    for coincidence in analysis.coincidences:
        near = stream.between(coincidence.ext_timestamp - tolerance_ns,
                              coincidence.ext_timestamp + tolerance_ns)
        if not near:
            continue
        coincidence.shower = min(near, key=lambda s: abs(s.time_ns - coincidence.ext_timestamp))
        if not math.isnan(coincidence.zenith):
            shower = coincidence.shower
            coincidence.angle = angle_between(coincidence.zenith, coincidence.azimuth,
                                              shower.zenith, shower.azimuth)


def summary(analysis: Analysis) -> str:
    """A few lines for people: events, timing, coincidences, directions."""
    lines = [
        f"stations          {', '.join(map(str, analysis.stations)) or '-'}",
        f"events            {analysis.total_events} "
        f"({', '.join(f'{n}: {k}' for n, k in analysis.events.items())})",
    ]
    if analysis.signals:
        lines.append(f"arrival times     {analysis.timed} of {analysis.signals} detector "
                     f"signals ({100 * analysis.timed / analysis.signals:.1f} %)")
    if analysis.total_events:
        lines.append(f"trigger times     {analysis.triggers} of {analysis.total_events} events "
                     f"({100 * analysis.triggers / analysis.total_events:.1f} %)")
    sizes: dict[int, int] = {}
    for coincidence in analysis.coincidences:
        sizes[len(coincidence.stations)] = sizes.get(len(coincidence.stations), 0) + 1
    lines.append("coincidences      " + (", ".join(
        f"{count} of {size} stations" for size, count in sorted(sizes.items())) or "none"))
    done = analysis.reconstructed()
    lines.append(f"directions        {len(done)} reconstructed (3 or more stations)")
    angles = [c.angle for c in done if not math.isnan(c.angle)]
    if angles:
        degrees = np.degrees(angles)
        lines.append(f"vs. simulated     median {np.median(degrees):.1f} deg, 90 % within "
                     f"{np.percentile(degrees, 90):.1f} deg ({len(angles)} showers)")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- command


def _latest_day_file(data_dir: Path) -> Path | None:
    files = sorted(data_dir.glob("*/*/*_*_*.h5"),
                   key=lambda p: tuple(int(v) for v in p.stem.split("_")))
    return files[-1] if files else None


def _stack_positions(state_dir: Path) -> dict[int, Position]:
    """The local stack's station positions (stack.json while it runs, else positions.json)."""
    info = read_stack_info(state_dir)
    if info is not None:
        return info.positions()
    try:
        raw = json.loads(StackFiles.at(state_dir).positions.read_text(encoding="utf-8"))
        return {int(number): Position.from_dict(value) for number, value in raw.items()}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hisparc_datastore_dev.analysis",
        description="Run HiSPARC's analysis (SAPPHiRE) on a local stack's day file, offline.",
    )
    parser.add_argument("day_file", nargs="?", type=Path,
                        help="the day file (default: the newest under the stack's data/)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="the local stack (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("sapphire-analysis.h5"),
                        help="where SAPPHiRE's results go (default: %(default)s)")
    parser.add_argument("--seed", type=int,
                        help="the simulation's --seed: compare with the simulated showers")
    parser.add_argument("--shower-rate", type=float,
                        help="the simulation's --shower-rate (with --seed)")
    args = parser.parse_args(argv)
    day_file = args.day_file or _latest_day_file(args.state_dir / "data")
    if day_file is None:
        parser.error(f"no day files under {args.state_dir / 'data'}")
    analysis = analyse(day_file, args.out, _stack_positions(args.state_dir))
    if args.seed is not None:
        rate = DEFAULT_SHOWER_RATE if args.shower_rate is None else args.shower_rate
        match_showers(analysis, ShowerStream(args.seed, rate))
    sys.stdout.write(f"{day_file} -> {args.out}\n" + summary(analysis))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
