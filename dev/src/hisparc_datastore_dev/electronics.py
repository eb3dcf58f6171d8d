"""A HiSPARC III station's electronics, simply: from particles in the detectors to an event.

The station software uploads, for each event, four traces and the numbers its DAQ derived
from them (baseline, its spread, peak count, pulse height, integral) plus the trigger
pattern.  HiSPARC's analysis (SAPPHiRE) recomputes those numbers from the traces and takes
the arrival times and the moment of the trigger from them, so simulated values must follow
from simulated traces exactly as the station's own would.  This module makes them that way:

- **traces**: 2.5 ns samples of a 12-bit ADC (0-4095), 2,400 of them (1 us before the
  trigger, 5 us after it: the DAQ's pre-coincidence, coincidence and post-coincidence
  windows), on a baseline of 26-31 counts (HiSPARC III) with white noise of 1-2 counts; a
  PMT pulse is a negative voltage, but in the stored counts a particle raises the trace
  (SAPPHiRE takes the pulse height as maximum minus baseline);
- **pulses**: each particle adds a scintillator/PMT pulse with a fast rise and an
  exponential decay, its height proportional to the energy it deposits (in units of a
  vertical minimum-ionising particle, the *MIP*, whose pulse height is set per channel);
- **trigger**: a channel is over its low threshold (81 counts) or high threshold (150
  counts) from the first sample at or above it; the station triggers at the first sample at
  which 3 channels are over the low or 2 over the high threshold (the HiSPARC default for
  four detectors), and the trace window is placed so that this sample is sample 400;
- **observables**: computed from the stored samples with the definitions of SAPPHiRE's
  ``TraceObservables`` (which says it follows the DAQ): the baseline and its spread over the
  first 26 samples, pulse height as maximum minus baseline, the integral of every sample more
  than 17 counts above the baseline, and peaks as rises and falls of more than 52 counts.

Simplified, on purpose: no analogue comparators (the trigger looks at the samples), no
coincidence-window limit, no data reduction or mean filter (the config says both are off),
no PMT non-linearity, after-pulses or ringing, and the baseline algorithm is SAPPHiRE's
rather than the DAQ firmware's own (SAPPHiRE notes the two differ by one count now and then).
The thresholds are SAPPHiRE's trigger history for current HiSPARC III stations (81 and 150
ADC counts, e.g. station 501 since 2017); the simulated config states them as HiSPARC's
defaults in millivolts (30 and 70), whose conversion to counts is not modelled here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Nanoseconds per sample of the 400 MHz ADC.
SAMPLE_NS = 2.5
#: Samples per trace: a 6 us window.
TRACE_SAMPLES = 2400
#: The sample the trigger sits at: 1 us of pre-coincidence time.
PRE_TRIGGER = 400
#: The 12-bit ADC's ceiling.
ADC_MAX = 4095
#: Samples the baseline and its spread are measured over (SAPPHiRE's ``TraceObservables``).
BASELINE_SAMPLES = 26
#: The largest spread of the baseline the DAQ can report (milli-ADC, a 16-bit field).
STD_DEV_MAX = 2**15 - 1
#: Counts above the baseline a sample needs to count toward the integral.
INTEGRAL_THRESHOLD = 17
#: Rise (from the last valley) and fall (from the top) of a peak, in counts: 82 - 30, the
#: HiSPARC III low threshold above a baseline of 30, as SAPPHiRE counts peaks.
PEAK_THRESHOLD = 52
#: Pulse shape: rise and decay time constants in nanoseconds (a MIP's pulse is ~30 ns wide).
RISE_NS = 2.0
DECAY_NS = 25.0
#: Samples a pulse is followed for: 12 decay times, when it is far below one count.
_PULSE_SAMPLES = math.ceil(12 * DECAY_NS / SAMPLE_NS)
#: Samples kept on either side of the trace window while the trigger is searched for: the
#: trigger must come within this many samples of the first particle (500 ns).
_MARGIN = 200
#: Particles simulated one by one per channel; more are merged (an ADC near the core of a
#: big shower saturates long before the difference shows).
_MAX_PARTICLES = 256


def _pulse_peak() -> float:
    """Height of ``exp(-t/decay) - exp(-t/rise)`` at its maximum: pulses are scaled by it."""
    t = RISE_NS * DECAY_NS / (DECAY_NS - RISE_NS) * math.log(DECAY_NS / RISE_NS)
    return math.exp(-t / DECAY_NS) - math.exp(-t / RISE_NS)


_PEAK = _pulse_peak()


@dataclass(frozen=True)
class TriggerSettings:
    """The station's trigger: thresholds in absolute ADC counts, and how many must fire.

    ``and_or`` True means "``n_low`` low *or* ``n_high`` high" (the default for four
    detectors: 3 low or 2 high); False means both.  ``external`` is False: the simulated
    stations never use the external trigger input.
    """

    low: int = 81
    high: int = 150
    n_low: int = 3
    n_high: int = 2
    and_or: bool = True
    external: bool = False

    def as_sapphire(self) -> tuple[list[tuple[int, int]], tuple[int, int, bool, int]]:
        """The thresholds and trigger the way SAPPHiRE's ``ProcessEventsWithTriggerOffset``
        holds them (``thresholds``, ``trigger``), for an analysis that must not ask the
        public database for them."""
        return ([(self.low, self.high)] * 4,
                (self.n_low, self.n_high, self.and_or, int(self.external)))


@dataclass(frozen=True)
class Channel:
    """One detector's channel: where its baseline sits, its noise, its gain."""

    baseline: float  # ADC counts, before digitisation
    noise: float  # standard deviation of the noise, ADC counts
    mip: float  # pulse height of one vertical minimum-ionising particle, ADC counts


@dataclass(frozen=True)
class Electronics:
    """A four-channel HiSPARC III station (master and slave board)."""

    channels: tuple[Channel, ...]
    trigger: TriggerSettings = field(default_factory=TriggerSettings)

    @classmethod
    def draw(cls, rng: random.Random) -> Electronics:
        """A station's hardware: baselines of 26-31 counts, noise of 1-2 counts, and a
        MIP pulse height of 140-200 counts (one particle crosses the high threshold)."""
        channels = tuple(
            Channel(
                baseline=min(31.0, max(26.0, rng.gauss(28.0, 1.5))),
                noise=rng.uniform(1.0, 2.0),
                mip=rng.uniform(140.0, 200.0),
            )
            for _ in range(4)
        )
        return cls(channels)


#: Particles in one channel: arrival times (ns, any common origin) and energy deposits
#: (in MIPs: 1.0 is a vertical minimum-ionising particle).
Hits = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Readout:
    """One triggered event as the DAQ reports it.

    ``trigger_pattern`` has bit ``n`` set when channel ``n + 1`` went over the low
    threshold in the trace and bit ``n + 4`` when over the high one: this simulator's
    reading of the pattern (the DAQ's own has more bits, which are not simulated).
    """

    adc: np.ndarray  # (4, samples) int64: the stored traces
    trigger_time: float  # ns, in the hits' time origin: the time of the trigger sample
    baseline: tuple[int, ...]
    std_dev: tuple[int, ...]  # milli-ADC
    n_peaks: tuple[int, ...]
    pulseheights: tuple[int, ...]
    integrals: tuple[int, ...]
    trigger_pattern: int


@dataclass(frozen=True)
class Observables:
    """What the DAQ derives from the traces (per channel)."""

    baseline: tuple[int, ...]
    std_dev: tuple[int, ...]
    n_peaks: tuple[int, ...]
    pulseheights: tuple[int, ...]
    integrals: tuple[int, ...]


def count_peaks(values: np.ndarray, threshold: int = PEAK_THRESHOLD) -> int:
    """Peaks in one baseline-subtracted trace.

    A peak starts when the trace has risen more than ``threshold`` above the lowest point
    (never below zero) since the last peak, and ends when it has fallen more than
    ``threshold`` below the highest point of the peak.  Nothing can start before the first
    sample over ``threshold`` or after the last one, so only that stretch is walked.
    """
    over = np.flatnonzero(values > threshold)
    if over.size == 0:
        return 0
    peaks = 0
    rising = True  # looking for the start of a peak
    valley = 0
    top = 0
    for value in values[over[0]: over[-1] + 1].tolist():
        if rising:
            if value < valley:
                valley = max(0, value)
            elif value - valley > threshold:
                rising, top = False, value
                peaks += 1
        elif value > top:
            top = value
        elif top - value > threshold:
            rising, valley = True, max(0, value)
    return peaks


def observables(adc: np.ndarray) -> Observables:
    """The DAQ's numbers for traces ``adc`` (channels by samples, integer counts).

    The definitions are SAPPHiRE's (``TraceObservables``): numpy's round-half-to-even,
    population standard deviation, integrals over samples strictly more than
    ``INTEGRAL_THRESHOLD`` above the rounded baseline.
    """
    head = adc[:, :BASELINE_SAMPLES]
    baseline = np.rint(head.mean(axis=1)).astype(np.int64)
    # A 16-bit field: only a trace shorter than a station's (tests use 48 or 64 samples)
    # can have a pulse in its first samples and a spread that needs the cap.
    std_dev = np.minimum(np.rint(head.std(axis=1) * 1000), STD_DEV_MAX).astype(np.int64)
    above = adc - baseline[:, None]
    pulseheights = above.max(axis=1)
    integrals = np.where(above > INTEGRAL_THRESHOLD, above, 0).sum(axis=1)
    return Observables(
        baseline=tuple(int(v) for v in baseline),
        std_dev=tuple(int(v) for v in std_dev),
        n_peaks=tuple(count_peaks(row) for row in above),
        pulseheights=tuple(int(v) for v in pulseheights),
        integrals=tuple(int(v) for v in integrals),
    )


def _first_at_or_above(adc: np.ndarray, level: int) -> list[int | None]:
    """Per channel, the first sample at or above ``level`` (None: never)."""
    over = adc >= level
    first = over.argmax(axis=1)
    return [int(index) if over[channel, index] else None
            for channel, index in enumerate(first)]


def trigger_sample(adc: np.ndarray, settings: TriggerSettings) -> int | None:
    """The sample at which the trigger condition is first met, or None.

    Each channel counts from its first sample over a threshold on; with ``and_or`` the
    earlier of "``n_low`` over low" and "``n_high`` over high" triggers.  Otherwise both are
    needed, and the channels over the high threshold count among the low ones too (so
    "``n_low`` low and ``n_high`` high" takes ``n_low + n_high`` channels over low), as
    SAPPHiRE reconstructs it.
    """
    lows = sorted(i for i in _first_at_or_above(adc, settings.low) if i is not None)
    highs = sorted(i for i in _first_at_or_above(adc, settings.high) if i is not None)

    def nth(crossings: list[int], n: int) -> int | None:
        return crossings[n - 1] if n and len(crossings) >= n else None

    if settings.and_or:
        candidates = [t for t in (nth(lows, settings.n_low), nth(highs, settings.n_high))
                      if t is not None]
        return min(candidates) if candidates else None
    needed = []
    if settings.n_low:
        needed.append(nth(lows, settings.n_low + settings.n_high))
    if settings.n_high:
        needed.append(nth(highs, settings.n_high))
    if not needed or None in needed:
        return None
    return max(t for t in needed if t is not None)


def could_trigger(hits: Sequence[Hits], settings: TriggerSettings) -> bool:
    """Whether enough channels have particles for ``settings`` to trigger at all.

    A cheap necessary condition (one channel never triggers a station, however many
    particles it has), checked before the work of a read-out.
    """
    channels = sum(1 for times, _ in hits if times.size)
    if settings.and_or:
        either = [n for n in (settings.n_low, settings.n_high) if n]
        return bool(either) and channels >= min(either)
    return channels >= settings.n_low + settings.n_high


def _add_pulses(wave: np.ndarray, grid_start: float, times: np.ndarray,
                heights: np.ndarray) -> None:
    """Add one pulse per particle (arrival ``times`` in ns, peak ``heights`` in counts)."""
    if times.size > _MAX_PARTICLES:  # merge the rest into the first _MAX_PARTICLES
        order = np.argsort(times)
        times, heights = times[order], heights[order]
        heights = heights[:_MAX_PARTICLES] * (heights.sum() / heights[:_MAX_PARTICLES].sum())
        times = times[:_MAX_PARTICLES]
    offsets = np.arange(_PULSE_SAMPLES, dtype=np.float64) * SAMPLE_NS
    for time, height in zip(times.tolist(), heights.tolist(), strict=True):
        first = max(0, math.ceil((time - grid_start) / SAMPLE_NS))
        if first >= wave.size:
            continue
        last = min(wave.size, first + _PULSE_SAMPLES)
        t = grid_start + first * SAMPLE_NS - time + offsets[: last - first]
        wave[first:last] += (height / _PEAK) * (np.exp(-t / DECAY_NS) - np.exp(-t / RISE_NS))


def read_out(
    electronics: Electronics,
    hits: Sequence[Hits],
    gen: np.random.Generator,
    samples: int = TRACE_SAMPLES,
) -> Readout | None:
    """Digitise the particles ``hits`` (one entry per channel) and trigger; None: no event.

    The ADC clock runs free, so the samples fall at a random phase to the particles.  The
    trace window is cut around the trigger sample; ``trigger_time`` says when that sample
    was, in the time origin of ``hits``.  A short ``samples`` (tests) keeps the trigger in
    its middle.
    """
    pre_trigger = min(PRE_TRIGGER, samples // 2)
    arrivals = [times for times, _ in hits if times.size]
    if not arrivals or not could_trigger(hits, electronics.trigger):
        return None
    first = min(float(times.min()) for times in arrivals)
    phase = gen.uniform(0.0, SAMPLE_NS)
    grid_start = phase + SAMPLE_NS * (math.floor((first - phase) / SAMPLE_NS)
                                      - pre_trigger - _MARGIN)
    length = samples + 2 * _MARGIN
    analog = np.empty((len(electronics.channels), length))
    for row, (channel, (times, deposits)) in enumerate(
        zip(electronics.channels, hits, strict=True)
    ):
        analog[row] = gen.normal(channel.baseline, channel.noise, length)
        if times.size:
            _add_pulses(analog[row], grid_start, times, deposits * channel.mip)
    adc = np.clip(np.rint(analog), 0, ADC_MAX).astype(np.int64)
    triggered = trigger_sample(adc, electronics.trigger)
    if triggered is None or triggered - pre_trigger + samples > length:
        return None
    start = triggered - pre_trigger
    window = np.ascontiguousarray(adc[:, start: start + samples])
    found = observables(window)
    pattern = 0
    for channel, row in enumerate(window):
        peak = int(row.max())
        pattern |= (peak >= electronics.trigger.low) << channel
        pattern |= (peak >= electronics.trigger.high) << (channel + 4)
    return Readout(
        adc=window,
        trigger_time=grid_start + triggered * SAMPLE_NS,
        baseline=found.baseline,
        std_dev=found.std_dev,
        n_peaks=found.n_peaks,
        pulseheights=found.pulseheights,
        integrals=found.integrals,
        trigger_pattern=pattern,
    )
