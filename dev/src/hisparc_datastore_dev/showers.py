"""Extensive air showers over simulated stations: where stations stand, what reaches them.

Simulated stations stand on a compact hexagonal grid, 150 m apart, around the spot where
the real station 501 stands (Nikhef, Science Park Amsterdam): 501 in the middle, 502-507 on
the first ring, and so on (``default_position``).  The real Science Park stations stand
less regularly (501 to 504 almost on one line, which times a shower front badly in one
direction); the grid gives any three neighbours a well-shaped triangle.  Each station is a
standard four-detector HiSPARC station: three detectors on a triangle of 10 m sides with
the fourth, the GPS, in its centre (SAPPHiRE's default layout), each detector 0.5 m^2.

Showers arrive as a Poisson process over a disc of ``SHOWER_RADIUS`` around the middle of
the cluster.  Each has a core (uniform in the disc), a direction (zenith angle from
``cos^8`` per unit of cos(zenith), which peaks near 20 degrees, up to 60 degrees; azimuth
uniform), and an energy (a power law of index -2.7 from 10^16 to 10^18 eV) that sets its
number of electrons the way SAPPHiRE's LDF simulations do (10^4.8 at 1 PeV).  Smaller
showers are left out: they rarely reach two stations 150 m apart, and each station's own
triggers (small showers only it sees, ``local_hits``) stand for them.  A station sees a
shower through its detectors:

- particles: Poisson with the mean that the NKG lateral distribution (SAPPHiRE's
  parameters: Moliere-like radius 30 m, age 1.7) gives at the detector's distance from the
  shower axis, times its area as the inclined shower sees it;
- times: a flat front at the speed of light, plus for each particle a delay drawn from an
  exponential whose mean grows with the distance to the axis (2 ns plus 5 ns per 100 m), a
  crude stand-in for the front's thickness;
- deposits: Landau-like (Moyal) fluctuations around one MIP, times the longer path of an
  inclined particle.

What is simplified, on purpose: no curvature of the front, no separate electron, muon and
photon components, no ground-level energy spectrum, no shower-to-shower fluctuations beyond
the Poisson counts, no atmospheric or geomagnetic effects, GPS clocks good to a few
nanoseconds with no offsets between stations or detectors, and a flat earth below the
cluster only for the core (positions use WGS84).  It is enough to give SAPPHiRE
coincidences whose directions it can reconstruct, and it is not a physics simulation.

Every draw is seeded: the showers from the run's seed and the minute they fall in (so every
process simulating with the same seed sees the same showers, whichever stations it runs),
each station's view of a shower from the seed, the shower and the station number.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hisparc_datastore_dev.electronics import Hits

#: The speed of light in metres per nanosecond.
LIGHT_SPEED = 0.299792458
#: Detector area in m^2 (0.5 m x 1 m scintillators).
DETECTOR_AREA = 0.5
#: The default four-detector layout in SAPPHiRE's compass coordinates, relative to the GPS:
#: (r [m], alpha [degrees clockwise from north], z [m], beta [orientation, degrees]).
DETECTOR_LAYOUT: tuple[tuple[float, float, float, float], ...] = (
    (10 / math.sqrt(3), 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0),
    (10 / math.sqrt(3), -120.0, 0.0, 90.0),
    (10 / math.sqrt(3), 120.0, 0.0, 90.0),
)
#: Showers fall within this many metres of the middle of the cluster.
SHOWER_RADIUS = 600.0
#: Default showers per second on that disc: about what nature sends above MIN_ENERGY (the
#: all-particle flux above 10^16 eV is of the order of 10^-8 per m^2, s and sr).
DEFAULT_SHOWER_RATE = 0.05
#: Energies of the simulated showers (eV): smaller ones rarely reach two stations, and a
#: station's own triggers stand for them.
MIN_ENERGY = 1e16
MAX_ENERGY = 1e18
ENERGY_INDEX = -2.7
MAX_ZENITH = math.radians(60.0)
#: Exponent of the zenith distribution: dN/dcos(zenith) ~ cos(zenith)^ZENITH_POWER (a
#: cos^7 intensity times the cos of a flat detector's acceptance).
ZENITH_POWER = 8
#: NKG lateral distribution: its radius (m) and the shower age, SAPPHiRE's defaults.
NKG_RADIUS = 30.0
NKG_AGE = 1.7
#: The front's thickness: mean particle delay (ns) at the axis, and its growth per metre.
FRONT_DELAY = 2.0
FRONT_DELAY_PER_METRE = 0.05
#: Spread of the energy deposit around one MIP (scale of the Moyal fluctuation).
DEPOSIT_SPREAD = 0.15
#: A station whose detectors expect fewer particles than this in all is not looked at.
NEGLIGIBLE_PARTICLES = 0.02
#: Showers are drawn in blocks of this many seconds of Unix time.
BLOCK_SECONDS = 60

# --------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class Position:
    """A station's GPS position: WGS84 latitude and longitude in degrees, altitude in m."""

    latitude: float
    longitude: float
    altitude: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Position:
        return cls(float(values["latitude"]), float(values["longitude"]),
                   float(values["altitude"]))


#: Where the real station 501 stands (Nikhef, Science Park Amsterdam; its latest GPS
#: position in SAPPHiRE's station data): the middle of the simulated cluster.
CLUSTER_MIDDLE = Position(52.3558963, 4.9509827, 56.18)
#: Distance (m) between neighbouring stations of the simulated cluster.
STATION_SPACING = 150.0
#: Places on the grid: the middle and three rings around it.
GRID_PLACES = 37

_WGS84_A = 6378137.0
_WGS84_F = 1 / 298.257223563
_WGS84_E2 = _WGS84_F * (2 - _WGS84_F)


def _ecef(position: Position) -> np.ndarray:
    lat, lon = math.radians(position.latitude), math.radians(position.longitude)
    n = _WGS84_A / math.sqrt(1 - _WGS84_E2 * math.sin(lat) ** 2)
    h = position.altitude
    return np.array([
        (n + h) * math.cos(lat) * math.cos(lon),
        (n + h) * math.cos(lat) * math.sin(lon),
        (n * (1 - _WGS84_E2) + h) * math.sin(lat),
    ])


def to_enu(position: Position, reference: Position) -> np.ndarray:
    """East, north, up (m) of ``position`` in the tangent plane at ``reference``."""
    lat, lon = math.radians(reference.latitude), math.radians(reference.longitude)
    d = _ecef(position) - _ecef(reference)
    sin_lat, cos_lat, sin_lon, cos_lon = math.sin(lat), math.cos(lat), math.sin(lon), math.cos(lon)
    return np.array([
        -sin_lon * d[0] + cos_lon * d[1],
        -sin_lat * cos_lon * d[0] - sin_lat * sin_lon * d[1] + cos_lat * d[2],
        cos_lat * cos_lon * d[0] + cos_lat * sin_lon * d[1] + sin_lat * d[2],
    ])


def moved(reference: Position, east: float, north: float) -> Position:
    """The position ``east`` and ``north`` metres from ``reference``, at its altitude.

    Uses the ellipsoid's radii of curvature at ``reference``: over a few hundred metres it
    is good to millimetres, and the position it returns is what the station then reports.
    """
    lat = math.radians(reference.latitude)
    w = math.sqrt(1 - _WGS84_E2 * math.sin(lat) ** 2)
    meridian = _WGS84_A * (1 - _WGS84_E2) / w**3 + reference.altitude
    prime = _WGS84_A / w + reference.altitude
    return Position(
        round(reference.latitude + math.degrees(north / meridian), 7),
        round(reference.longitude + math.degrees(east / (prime * math.cos(lat))), 7),
        reference.altitude,
    )


def _grid() -> list[tuple[int, int]]:
    """The grid's places in axial hex coordinates, the middle first, then ring by ring.

    Each ring starts east and goes round counter-clockwise, a side of ``ring`` steps at a
    time toward the next corner (60, 120, ... degrees).
    """
    sides = ((-1, 1), (-1, 0), (0, -1), (1, -1), (1, 0), (0, 1))
    places = [(0, 0)]
    ring = 1
    while len(places) < GRID_PLACES:
        q, r = ring, 0
        for dq, dr in sides:
            for _ in range(ring):
                places.append((q, r))
                q, r = q + dq, r + dr
        ring += 1
    return places[:GRID_PLACES]


_GRID = _grid()


def grid_place(slot: int) -> tuple[float, float]:
    """East and north (m) of place ``slot`` of the hexagonal grid.

    Place 0 is the middle, places 1-6 the first ring (east first, then every 60 degrees
    counter-clockwise), 7-18 the second, 19-36 the third: the middle and any two
    neighbours on the first ring form a triangle of sides ``STATION_SPACING``, the
    best-conditioned shape for timing a shower front.
    """
    q, r = _GRID[slot % GRID_PLACES]
    return STATION_SPACING * (q + r / 2), STATION_SPACING * r * math.sqrt(3) / 2


def default_position(number: int) -> Position:
    """Where station ``number`` stands unless told otherwise.

    A function of the number alone, so every process (the local stack, the simulator, a
    test) places a station the same way: 501 in the middle, 502, 503, ... on the rings of
    a hexagonal grid around it (``grid_place``), numbers 37 apart sharing a place.
    """
    east, north = grid_place((number - 501) % GRID_PLACES)
    return moved(CLUSTER_MIDDLE, east, north)


def detector_offsets() -> np.ndarray:
    """East, north, up (m) of each detector from the station's GPS (4 x 3)."""
    return np.array([
        (r * math.sin(math.radians(alpha)), r * math.cos(math.radians(alpha)), z)
        for r, alpha, z, _ in DETECTOR_LAYOUT
    ])


# ---------------------------------------------------------------------------- showers


@dataclass(frozen=True)
class Shower:
    """One air shower: when its front passes the core, where, from where, how big.

    ``zenith`` and ``azimuth`` (radians) give the direction the shower comes from, the
    azimuth counter-clockwise from east, as SAPPHiRE reports reconstructed directions.  The
    core is in metres east and north of the stream's middle (``CLUSTER_MIDDLE``), at its
    altitude.
    """

    block: int
    index: int
    time_ns: int  # Unix time in nanoseconds
    core_east: float
    core_north: float
    zenith: float
    azimuth: float
    energy: float  # eV
    size: float  # electrons at ground level

    @property
    def axis(self) -> np.ndarray:
        """Unit vector toward where the shower comes from."""
        sin_zenith = math.sin(self.zenith)
        return np.array([sin_zenith * math.cos(self.azimuth),
                         sin_zenith * math.sin(self.azimuth), math.cos(self.zenith)])


def _seed_words(*parts: int) -> list[int]:
    """Non-negative words for numpy's SeedSequence from any integers (negative seeds too)."""
    return [part % 2**64 for part in parts]


def _tag(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


_SHOWERS_TAG = _tag("hisparc-datastore showers")
_STATION_TAG = _tag("hisparc-datastore station response")


def _zenith(draw: float) -> float:
    """Inverse of the cumulative ``cos^ZENITH_POWER`` distribution of cos(zenith)."""
    power = ZENITH_POWER + 1
    lowest = math.cos(MAX_ZENITH) ** power
    return math.acos((lowest + draw * (1 - lowest)) ** (1 / power))


def _energy(draw: float) -> float:
    """Inverse of the cumulative power law between MIN_ENERGY and MAX_ENERGY."""
    k = ENERGY_INDEX + 1
    lo, hi = MIN_ENERGY**k, MAX_ENERGY**k
    return (lo + draw * (hi - lo)) ** (1 / k)


def shower_size(energy: float) -> float:
    """Electrons at ground level: 10^4.8 at 10^15 eV, proportional to the energy."""
    return 10 ** (math.log10(energy) - 15 + 4.8)


def random_direction(rng: random.Random) -> tuple[float, float]:
    """A zenith angle and an azimuth from the distributions showers are drawn from."""
    return _zenith(rng.random()), rng.uniform(-math.pi, math.pi)


class ShowerStream:
    """The showers of one simulation: a deterministic function of the seed and the time.

    Safe to share between the threads of the simulated stations: blocks are computed once
    and kept (a run of hours keeps a few thousand small objects).
    """

    def __init__(self, seed: int, rate: float = DEFAULT_SHOWER_RATE,
                 middle: Position = CLUSTER_MIDDLE, radius: float = SHOWER_RADIUS) -> None:
        if rate < 0:
            raise ValueError("the shower rate cannot be negative")
        self.seed = seed
        self.rate = rate
        self.middle = middle
        self.radius = radius
        self._blocks: dict[int, list[Shower]] = {}
        self._lock = threading.Lock()

    def _block(self, block: int) -> list[Shower]:
        with self._lock:
            cached = self._blocks.get(block)
        if cached is not None:
            return cached
        gen = np.random.default_rng(_seed_words(_SHOWERS_TAG, self.seed, block))
        count = int(gen.poisson(self.rate * BLOCK_SECONDS))
        offsets = np.sort(gen.integers(0, BLOCK_SECONDS * 10**9, count))
        showers = []
        for index, offset in enumerate(offsets.tolist()):
            distance = self.radius * math.sqrt(gen.random())
            bearing = gen.uniform(-math.pi, math.pi)
            energy = _energy(gen.random())
            showers.append(Shower(
                block=block, index=index,
                time_ns=block * BLOCK_SECONDS * 10**9 + offset,
                core_east=distance * math.cos(bearing),
                core_north=distance * math.sin(bearing),
                zenith=_zenith(gen.random()),
                azimuth=gen.uniform(-math.pi, math.pi),
                energy=energy,
                size=shower_size(energy),
            ))
        with self._lock:
            return self._blocks.setdefault(block, showers)

    def between(self, start_ns: int, end_ns: int) -> list[Shower]:
        """The showers whose front passes the core in ``[start_ns, end_ns)``, in time order."""
        if self.rate == 0 or end_ns <= start_ns:
            return []
        block_ns = BLOCK_SECONDS * 10**9
        found = []
        for block in range(start_ns // block_ns, (end_ns - 1) // block_ns + 1):
            found += [s for s in self._block(block) if start_ns <= s.time_ns < end_ns]
        return found


# ----------------------------------------------------------------------- a station's view


#: The NKG function's normalisation: its integral over the plane is the shower size.
_NKG_NORM = math.gamma(4.5 - NKG_AGE) / (
    2 * math.pi * NKG_RADIUS**2 * math.gamma(NKG_AGE) * math.gamma(4.5 - 2 * NKG_AGE)
)


def nkg_density(distance: float, size: float) -> float:
    """Particles per m^2 at ``distance`` m from the axis, in the plane of the front."""
    r = max(distance, 1.0)  # the function diverges at the axis; nobody stands there
    s = NKG_AGE
    return size * _NKG_NORM * (r / NKG_RADIUS) ** (s - 2) * (1 + r / NKG_RADIUS) ** (s - 4.5)


def deposits(gen: np.random.Generator, count: int, zenith: float) -> np.ndarray:
    """Energy deposits (MIPs) of ``count`` particles crossing a detector at ``zenith``.

    A Moyal variate (``-ln z^2`` for normal ``z``) approximates the Landau tail of thin
    scintillators; the path through the scintillator grows as 1/cos(zenith).
    """
    z = gen.standard_normal(count)
    moyal = -np.log(np.maximum(z * z, 1e-12))
    return np.maximum(0.3, 1.0 + DEPOSIT_SPREAD * moyal) / math.cos(zenith)


def station_hits(shower: Shower, detectors: np.ndarray,
                 gen: np.random.Generator) -> list[Hits] | None:
    """The particles ``shower`` puts in each detector (ENU positions from the middle).

    Times are in ns after the front passes the core.  None when the station is too far from
    the axis to expect a particle (the caller then has no event to make).
    """
    axis = shower.axis
    relative = detectors - np.array([shower.core_east, shower.core_north, 0.0])
    along = relative @ axis
    distances = np.sqrt(np.maximum((relative * relative).sum(axis=1) - along**2, 0.0))
    cos_zenith = math.cos(shower.zenith)
    expected = [nkg_density(d, shower.size) * DETECTOR_AREA * cos_zenith
                for d in distances.tolist()]
    if sum(expected) < NEGLIGIBLE_PARTICLES:
        return None
    hits: list[Hits] = []
    for mean, plane_time, distance in zip(expected, (-along / LIGHT_SPEED).tolist(),
                                          distances.tolist(), strict=True):
        count = int(gen.poisson(mean))
        delay = FRONT_DELAY + FRONT_DELAY_PER_METRE * distance
        hits.append((plane_time + gen.exponential(delay, count),
                     deposits(gen, count, shower.zenith)))
    return hits


def station_generator(seed: int, shower: Shower, station: int) -> np.random.Generator:
    """The random numbers of ``station``'s view of ``shower``: its own, whatever else runs."""
    return np.random.default_rng(
        _seed_words(_STATION_TAG, seed, shower.block, shower.index, station)
    )


def local_hits(rng: random.Random, gen: np.random.Generator, offsets: np.ndarray,
               attempt: int = 0) -> list[Hits]:
    """The particles of a small shower only this station sees (its ordinary triggers).

    Not derived from a shower: a density drawn around two particles per m^2 (more on each
    ``attempt``, for callers that draw again until the station triggers), a direction from
    the showers' distribution, a thin front through the station.  Times in ns from the
    front passing the GPS.
    """
    zenith, azimuth = random_direction(rng)
    axis = np.array([math.sin(zenith) * math.cos(azimuth),
                     math.sin(zenith) * math.sin(azimuth), math.cos(zenith)])
    density = math.exp(rng.gauss(math.log(2.0), 0.8)) * 1.5**attempt
    mean = density * DETECTOR_AREA * math.cos(zenith)
    hits: list[Hits] = []
    for plane_time in (-(offsets @ axis) / LIGHT_SPEED).tolist():
        count = int(gen.poisson(mean))
        hits.append((plane_time + gen.exponential(FRONT_DELAY, count),
                     deposits(gen, count, zenith)))
    return hits


def angle_between(zenith1: float, azimuth1: float, zenith2: float, azimuth2: float) -> float:
    """The angle (radians) between two directions given as zenith and azimuth."""
    cosine = (math.sin(zenith1) * math.sin(zenith2) * math.cos(azimuth1 - azimuth2)
              + math.cos(zenith1) * math.cos(zenith2))
    return math.acos(max(-1.0, min(1.0, cosine)))


def detectors_enu(position: Position, middle: Position = CLUSTER_MIDDLE) -> np.ndarray:
    """East, north, up (m) of a station's four detectors from ``middle`` (4 x 3)."""
    return to_enu(position, middle) + detector_offsets()

