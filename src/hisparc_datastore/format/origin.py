"""One stored object, planned: whose batch it is, when it arrived, its events per day.

The one path from an object's bytes to what the day files get, shared by the live writer
and by replay, so a rebuilt file holds what the live one does.  Pure: bytes, metadata and
a cluster lookup in, an :class:`ObjectPlan` out.

Station and cluster come from the object's metadata (the upload function sets both; the
cluster percent-encoded).  When they are missing, the station number comes from the key
(``incoming/<station>/<md5>.pickle``) and the cluster from the station list.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hisparc_datastore.format.keys import station_from_key
from hisparc_datastore.format.payload import decode_batch
from hisparc_datastore.format.rows import BatchPart, Context, SkipReport, split_by_day
from hisparc_datastore.stations import MAX_STATION

#: A station's cluster from the station list (None: not listed).
ClusterLookup = Callable[[int], str | None]

#: Object metadata: the first and last UTC date of the batch's events.
EVENT_DAYS = "event-days"


class NoCluster(Exception):
    """Neither the metadata nor the station list names the station's cluster."""


class BadOrigin(NoCluster):
    """The metadata contradicts the key or names a cluster that cannot be a group name.

    Only a writer of ``incoming/`` other than the upload can cause this (the upload takes
    both from the key it writes and the station list): the object is quarantined, not
    retried (docs/SECURITY.md, R10).
    """


def object_origin(
    key: str, metadata: Mapping[str, str], cluster_of: ClusterLookup
) -> tuple[int, str]:
    """(station, cluster) of an object: metadata first, then key and station list.

    The cluster becomes an HDF5 group name (``cluster_<name>``), so a ``/`` (a path
    separator there) or a control character is refused, as is a metadata station that
    differs from the key's.
    """
    station_text = metadata.get("station", "").strip()
    in_key = station_from_key(key)
    station = int(station_text) if station_text.isdigit() else in_key
    if station is None:
        raise NoCluster(f"no station number in the metadata or the key of {key}")
    if in_key is not None and station != in_key:
        raise BadOrigin(f"metadata station {station} differs from the key's {in_key}")
    if station > MAX_STATION:
        raise BadOrigin(f"station {station} is larger than {MAX_STATION}")
    cluster = urllib.parse.unquote(metadata.get("cluster", "")).strip()
    if any(c == "/" or ord(c) < 0x20 or ord(c) == 0x7F for c in cluster):
        raise BadOrigin(f"cluster {cluster!r} cannot name an HDF5 group")
    if not cluster:
        cluster = cluster_of(station) or ""
    if not cluster:
        raise NoCluster(
            f"station {station}: no cluster in the object metadata and none in the station list"
        )
    return station, cluster


def received_time(metadata: Mapping[str, str], last_modified: dt.datetime) -> dt.datetime:
    """The upload's receive time (metadata ``received``), else the object's LastModified."""
    text = metadata.get("received", "").strip()
    if text:
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            try:
                when = dt.datetime.fromtimestamp(float(text), dt.UTC)
            except (ValueError, OverflowError, OSError):
                when = None
        if when is not None:
            return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return last_modified


def event_day_span(events: Iterable[Any]) -> tuple[dt.date, dt.date] | None:
    """The first and last UTC date among the events' header datetimes; None when no
    event has one.

    It goes into the object's ``event-days`` metadata at upload, so that replay can pass
    over an object whose events are all outside the days it rebuilds without fetching or
    decoding it.  Every event with a datetime counts, also those the writer will skip
    (an unknown type, a year before the minimum): the span may be wider than the rows,
    never narrower.  Naive datetimes are UTC, as the writer takes them.
    """
    first = last = None
    for event in events:
        header = event.get("header") if isinstance(event, dict) else None
        moment = header.get("datetime") if isinstance(header, dict) else None
        if not isinstance(moment, dt.datetime):
            continue
        if moment.tzinfo is not None:
            try:
                moment = moment.astimezone(dt.UTC)
            except (OverflowError, ValueError):
                continue
        day = moment.date()
        if first is None or day < first:
            first = day
        if last is None or day > last:
            last = day
    return None if first is None or last is None else (first, last)


def event_days_text(span: tuple[dt.date, dt.date]) -> str:
    return f"{span[0].isoformat()}/{span[1].isoformat()}"


def event_days_of(metadata: Mapping[str, str]) -> tuple[dt.date, dt.date] | None:
    """The ``event-days`` an object's metadata records; None when absent or unreadable
    (objects stored before it existed, or by another tool), so the object is decoded."""
    first, sep, last = metadata.get(EVENT_DAYS, "").strip().partition("/")
    if not sep:
        return None
    try:
        span = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    except ValueError:
        return None
    return span if span[0] <= span[1] else None


@dataclass
class ObjectPlan:
    """What one object adds to which day file."""

    key: str  # the incoming/ key: the ledger's name for the object
    station: int
    cluster: str
    parts: dict[dt.date, BatchPart]  # per UTC day, its checked events
    events: int  # events decoded, skipped ones included
    skipped: SkipReport

    @property
    def days(self) -> list[dt.date]:
        return sorted(self.parts)


def plan_object(
    key: str,
    body: bytes,
    metadata: Mapping[str, str],
    etag: str,
    *,
    minimum_year: int,
    cluster_of: ClusterLookup,
    context: Context | None = None,
) -> ObjectPlan:
    """Decode ``body`` (through the allowlist), check and split its events by UTC day,
    and find its station and cluster.

    Raises :class:`~hisparc_datastore.format.payload.PayloadError` (undecodable),
    :class:`BadOrigin` (metadata that contradicts the key) or :class:`NoCluster`.
    ``context`` names the object in log lines (default: ``key``).
    """
    events = decode_batch(body)
    by_day, skipped = split_by_day(events, minimum_year, context=context or key)
    station, cluster = object_origin(key, metadata, cluster_of)
    parts = {
        day: BatchPart(key=key, etag=etag, station=station, cluster=cluster, events=checked)
        for day, checked in by_day.items()
    }
    return ObjectPlan(key, station, cluster, parts, len(events), skipped)
