"""Events to table rows and blob payloads: the pure core of the writer (no I/O).

The semantics are those of the reference writer (docs/FORMAT.md, 2.5 and 4), applied to a whole
batch at once: every row starts at its columns' fills, each datalist item sets one cell,
blob values are appended to the station's ``blobs`` in event order then datalist order,
and the cell holds the blob's index.  The differences are deliberate:

- values are gathered per column and converted with numpy in one go per column, so a
  batch costs a few numpy calls per column instead of a PyTables row per event;
- a value that does not fit its column (wrong type, out of range, bad base64) skips only
  its event, and that event leaves no blob behind (the reference appended the blobs of a
  failing event before it failed, leaving orphans in ``blobs``);
- an indexed code outside its column (``PH5``, ``PH0``) or a digit on a scalar code is an
  unknown code (warned about and ignored), where the reference raised or wrote element -1.

Blob indices here are relative to the batch's first new blob; the store adds the length
of ``blobs`` at write time (see :meth:`TableRows.rows_with_blob_offset`).
"""

from __future__ import annotations

import binascii
import bisect
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np

from hisparc_datastore.format.schema import EVENT_TYPES, TABLES, EventType, cluster_node

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1)
_ONE_SECOND = timedelta(seconds=1)
_INT32_MAX = 2**31 - 1
#: Individual log lines per skip reason per call; the rest are summed up in one line.
_LOG_LINES_PER_REASON = 10

_INTEGRAL_TYPES: frozenset[type] = frozenset(
    {int, bool, np.bool_, np.int8, np.int16, np.int32, np.int64,
     np.uint8, np.uint16, np.uint32, np.uint64}
)
_NUMERIC_TYPES: frozenset[type] = _INTEGRAL_TYPES | {float, np.float16, np.float32, np.float64}
_PLAIN_INTS: frozenset[type] = frozenset({int, bool})
_PLAIN_NUMBERS: frozenset[type] = frozenset({int, bool, float})

# Skip reasons, as counted in SkipReport.
BAD_HEADER = "bad_header"
UNKNOWN_TYPE = "unknown_type"
NO_DATETIME = "no_datetime"
BEFORE_MINIMUM_YEAR = "before_minimum_year"
BAD_VALUE = "bad_value"


@dataclass
class SkipReport:
    """How many events were skipped, per reason (the log has the details)."""

    counts: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, count: int = 1) -> None:
        self.counts[reason] += count

    def merge(self, other: SkipReport) -> None:
        self.counts.update(other.counts)


#: Where an event came from, for log lines: a bucket key, or a function of the event's
#: position in the batch (a batch gathered from many objects names the right one).
Context = str | Callable[[int], str]


def _describe(context: Context, position: int) -> str:
    if callable(context):
        return context(position)
    return f"#{position} ({context})" if context else f"#{position}"


class _SkipLog:
    """Counts skips and logs them, but not a thousand lines for one bad batch."""

    def __init__(self, context: Context) -> None:
        self.report = SkipReport()
        self._context = context

    def skip(self, reason: str, position: int, detail: str) -> None:
        self.report.add(reason)
        if self.report.counts[reason] <= _LOG_LINES_PER_REASON:
            log.error("discarding event %s: %s", _describe(self._context, position), detail)

    def close(self) -> None:
        for reason, count in self.report.counts.items():
            if count > _LOG_LINES_PER_REASON:
                where = "" if callable(self._context) or not self._context else (
                    f" ({self._context})"
                )
                log.error(
                    "discarded %d more events%s for the same reason (%s)",
                    count - _LOG_LINES_PER_REASON, where, reason,
                )


def _header_problem(event: Any) -> tuple[str, str] | tuple[EventType, datetime]:
    """The event's type and naive-UTC datetime, or (skip reason, detail)."""
    header = event.get("header") if isinstance(event, dict) else None
    if not isinstance(header, dict):
        return BAD_HEADER, "no header"
    code = header.get("eventtype_uploadcode")
    event_type = EVENT_TYPES.get(code) if isinstance(code, str) else None
    if event_type is None:
        return UNKNOWN_TYPE, f"unknown event type {code!r}"
    moment = header.get("datetime")
    if not isinstance(moment, datetime):
        return NO_DATETIME, f"no valid datetime ({type(moment).__name__})"
    if moment.tzinfo is not None:
        try:
            moment = moment.astimezone(UTC).replace(tzinfo=None)
        except (OverflowError, ValueError) as exc:
            return NO_DATETIME, f"datetime cannot be put in UTC ({exc})"
    return event_type, moment


class CheckedEvent(NamedTuple):
    """An event whose header passed the checks: its type and UTC time, found once."""

    event_type: EventType
    timestamp: int  # seconds since the epoch (UTC)
    event: dict[str, Any]


def _check(event: Any, position: int, skips: _SkipLog) -> tuple[CheckedEvent, datetime] | None:
    checked = _header_problem(event)
    if isinstance(checked[0], str):
        skips.skip(checked[0], position, str(checked[1]))
        return None
    event_type, moment = checked
    assert isinstance(event_type, EventType) and isinstance(moment, datetime)
    return CheckedEvent(event_type, (moment - _EPOCH) // _ONE_SECOND, event), moment


def split_by_day(
    events: Iterable[Any], minimum_year: int, *, context: Context = ""
) -> tuple[dict[date, list[CheckedEvent]], SkipReport]:
    """Check every event's header once and group the good ones by UTC date, in order.

    Events without a usable header, of an unknown type, without a valid datetime or
    before ``minimum_year`` (GPS cold starts report 2019) are skipped, counted and logged.
    Naive datetimes are UTC (GPS-derived); aware ones are converted.  What comes out is
    what :func:`build_rows` takes: nothing is checked twice.
    """
    skips = _SkipLog(context)
    days: dict[date, list[CheckedEvent]] = {}
    for position, event in enumerate(events):
        found = _check(event, position, skips)
        if found is None:
            continue
        checked, moment = found
        if moment.year < minimum_year:
            skips.skip(
                BEFORE_MINIMUM_YEAR, position, f"{moment:%Y-%m-%d} is before {minimum_year}"
            )
            continue
        days.setdefault(moment.date(), []).append(checked)
    skips.close()
    return days, skips.report


def check_events(events: Iterable[Any], *, context: Context = "") -> tuple[
    list[CheckedEvent], SkipReport
]:
    """Every event's header checked, in order (no day split, no year rule)."""
    skips = _SkipLog(context)
    checked = [found[0] for position, event in enumerate(events)
               if (found := _check(event, position, skips)) is not None]
    skips.close()
    return checked, skips.report


@dataclass(frozen=True)
class TableRows:
    """The new rows of one table from one batch.

    ``rows`` has the table's dtype with ``event_id`` left 0 (the store numbers rows at
    write time).  ``blob_cells`` marks, per blob column, the cells holding a blob index
    relative to the batch's first new blob; unmarked cells hold the column's fill.
    ``positions`` is each row's event position in the batch (ascending).
    """

    table: str
    rows: np.ndarray
    blob_cells: Mapping[str, np.ndarray]
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def rows_with_blob_offset(self, offset: int) -> np.ndarray:
        """A copy of ``rows`` whose blob cells point ``offset`` further into ``blobs``."""
        rows = self.rows.copy()
        if offset:
            for column, cells in self.blob_cells.items():
                rows[column][cells] += offset
        return rows


@dataclass(frozen=True)
class BatchRows(Mapping[str, TableRows]):
    """Table name -> new rows, plus the batch's blobs in reference order.

    A mapping so callers can treat it as ``dict[table_name, TableRows]``; ``blobs`` are
    shared by all tables of the station, ``blobs[i]`` being blob index ``i`` of the batch,
    and ``blob_positions[i]`` the position in the batch of the event it belongs to.
    """

    tables: Mapping[str, TableRows]
    blobs: Sequence[bytes]
    blob_positions: np.ndarray
    skipped: SkipReport

    def __getitem__(self, table: str) -> TableRows:
        return self.tables[table]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)

    @property
    def row_count(self) -> int:
        return sum(len(rows) for rows in self.tables.values())


class _BadValue(Exception):
    """A datalist value that cannot be stored: the event is skipped."""


@dataclass(frozen=True)
class _Slots:
    """Per event type: concrete upload code -> slot, and what each slot is."""

    slot_of: dict[str, int]
    columns: tuple[str, ...]  # per slot
    elements: tuple[int | None, ...]  # per slot
    base64: tuple[bool, ...]  # per slot
    fills: tuple[Any, ...]  # per slot: the value a cell keeps when no item sets it
    first_blob: int  # slots >= first_blob are blob slots
    #: per column: (name, its slots in element order, whether it holds blob indices)
    groups: tuple[tuple[str, tuple[int, ...], bool], ...]


def _slots_of(event_type: EventType) -> _Slots:
    # Blob slots last, so one comparison tells them apart in the hot loop.
    items = sorted(event_type.fields.items(), key=lambda item: item[1].blob)
    groups: dict[str, list[int]] = {}
    for slot, (_, f) in enumerate(items):
        groups.setdefault(f.column, []).append(slot)
    for column, slots in groups.items():
        elements = [items[slot][1].element for slot in slots]
        if elements != [None] and elements != list(range(len(slots))):
            raise ValueError(f"{column}: indexed codes must cover the elements in order")
    return _Slots(
        slot_of={code: slot for slot, (code, _) in enumerate(items)},
        columns=tuple(f.column for _, f in items),
        elements=tuple(f.element for _, f in items),
        base64=tuple(f.base64 for _, f in items),
        # Blob cells start at -1 (every blob column's fill): >= 0 marks a blob index.
        fills=tuple(-1 if f.blob else event_type.column_map[f.column].fill for _, f in items),
        first_blob=sum(1 for _, f in items if not f.blob),
        groups=tuple(
            (column, tuple(slots), items[slots[0]][1].blob) for column, slots in groups.items()
        ),
    )


_SLOTS: dict[str, _Slots] = {t.table: _slots_of(t) for t in EVENT_TYPES.values()}


class _Table:
    """One table's cells, gathered per slot as Python lists pre-set to the fills.

    Each datalist item is then one list store; the conversion to numpy happens per slot
    for the whole batch.  A code sent twice in one event simply overwrites (the last
    value wins, as in the reference).
    """

    def __init__(self, event_type: EventType, count: int) -> None:
        self.event_type = event_type
        self.slots = plan = _SLOTS[event_type.table]
        self.cells: list[list[Any]] = [[fill] * count for fill in plan.fills]
        self.positions: list[int] = []  # batch position of each row's event
        self.timestamps: list[int] = []
        self.nanoseconds: list[Any] = []


def _blob_payload(value: Any, base64: bool, where: str) -> bytes:
    if base64:
        if isinstance(value, str):
            try:
                return binascii.a2b_base64(value)
            except binascii.Error as exc:
                raise _BadValue(f"bad base64 ({exc})") from None
            except ValueError:
                # Non-ASCII text: like the reference, take its latin-1 bytes and let the
                # lenient decoder drop what is not base64.
                try:
                    value = value.encode("latin-1")
                except UnicodeEncodeError:
                    raise _BadValue("trace text is not latin-1") from None
        if isinstance(value, bytes | bytearray | memoryview):
            try:
                return binascii.a2b_base64(value)
            except binascii.Error as exc:
                raise _BadValue(f"bad base64 ({exc})") from None
        raise _BadValue(f"trace of type {type(value).__name__}, not text")
    if isinstance(value, str):
        try:
            return value.encode("latin-1")
        except UnicodeEncodeError:
            log.warning("blob text is not latin-1, stored as UTF-8 (event %s)", where)
            return value.encode("utf-8")
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise _BadValue(f"blob of type {type(value).__name__}, not text")


def _decode_blobs(
    raw: list[Any], plain: set[int], owners: list[int], context: Context
) -> tuple[list[bytes], dict[int, str]]:
    """Blob values to bytes, and why some cannot be (blob index -> problem).

    Done after the gathering loop, in one C-level pass over the traces when nothing is
    odd: decoding them inside the loop, between dict lookups, costs a third more.
    """
    a2b_base64 = binascii.a2b_base64
    try:
        if not plain:
            return list(map(a2b_base64, raw)), {}
        decoded = list(raw)
        for index, value in enumerate(raw):
            if index not in plain:
                decoded[index] = a2b_base64(value)
        for index in plain:
            decoded[index] = _blob_payload(raw[index], False, _describe(context, owners[index]))
        return decoded, {}
    except (ValueError, TypeError, _BadValue):
        pass  # something is odd: go one by one and say what
    decoded, problems = [], {}
    for index, value in enumerate(raw):
        try:
            decoded.append(
                _blob_payload(value, index not in plain, _describe(context, owners[index]))
            )
        except _BadValue as exc:
            decoded.append(b"")
            problems[index] = str(exc)
    return decoded, problems


def _to_floats(values: list[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """Values as float64 (exact for every <=32-bit integer), and which are unusable."""
    if set(map(type, values)) <= _NUMERIC_TYPES:
        try:
            return np.array(values, dtype=np.float64), None
        except (OverflowError, ValueError, TypeError):
            pass  # a Python int beyond float: find it below
    floats = np.empty(len(values), dtype=np.float64)
    bad = np.zeros(len(values), dtype=bool)
    for index, value in enumerate(values):
        if type(value) in _NUMERIC_TYPES:
            try:
                floats[index] = float(value)
                continue
            except OverflowError:
                pass
        floats[index] = 0.0
        bad[index] = True
    return floats, bad


def convert_values(values: list[Any], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Values for one column as ``dtype``, and a mask of those that do not fit.

    Numbers only (Python or numpy scalars, bools count as numbers); text, None and other
    objects do not fit.  Floats into integer columns truncate toward zero like a numpy
    assignment (and the reference) do, when finite and in range; a number beyond a
    float32 column's range does not fit.
    """
    kind = dtype.kind
    fast = _convert_fast(values, dtype, kind)
    if fast is not None:
        return fast, np.zeros(len(values), dtype=bool)
    floats, bad = _to_floats(values)
    if bad is None:
        bad = np.zeros(len(values), dtype=bool)
    if kind == "b":
        return floats != 0, bad
    if kind == "f":
        if dtype.itemsize >= 8:
            return floats.astype(dtype), bad
        with np.errstate(over="ignore"):
            narrowed = floats.astype(dtype)
        return narrowed, bad | (np.isinf(narrowed) & np.isfinite(floats))
    info = np.iinfo(dtype)
    truncated = np.trunc(floats)
    fits = np.isfinite(floats) & (truncated >= info.min) & (truncated <= info.max)
    return np.where(fits, truncated, 0).astype(dtype), bad | ~fits


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _convert_fast(values: list[Any], dtype: np.dtype, kind: str) -> np.ndarray | None:
    """The common case in one numpy call: Python ints for integer and bool columns,
    Python floats/ints for float columns, all in range.  None: take the careful path.
    """
    types = set(map(type, values))
    try:
        if kind in "iu" and types <= _PLAIN_INTS:
            ints = np.array(values, dtype=np.int64)
            info = np.iinfo(dtype)
            if len(ints) and (ints.min() < info.min or ints.max() > info.max):
                return None
            return ints.astype(dtype)
        if kind == "b" and types <= _PLAIN_INTS:
            return np.array(values, dtype=np.int64) != 0
        if kind == "f" and types <= _PLAIN_NUMBERS:
            floats = np.array(values, dtype=np.float64)
            if dtype.itemsize < 8 and len(floats) and not np.abs(floats).max() <= _FLOAT32_MAX:
                return None  # overflow, or NaN/inf: let the careful path sort them out
            return floats.astype(dtype)
    except (OverflowError, ValueError, TypeError):
        return None
    return None


def build_table_rows(events: Sequence[Any], *, context: Context = "") -> BatchRows:
    """One station's raw events into rows: :func:`check_events`, then :func:`build_rows`.

    For callers holding plain events (tests, tools); the writer checks headers once, in
    :func:`split_by_day`, and builds with :func:`build_rows`.
    """
    checked, header_skips = check_events(events, context=context)
    rows = build_rows(checked, context=_renumbered(context, events, checked))
    rows.skipped.merge(header_skips)
    return rows


def _renumbered(context: Context, events: Sequence[Any], checked: Sequence[CheckedEvent]
                ) -> Context:
    """``context`` for positions in ``checked`` (log lines name the event's own position)."""
    if not callable(context) or len(checked) == len(events):
        return context
    index = {id(event): position for position, event in enumerate(events)}
    return lambda position: context(index[id(checked[position].event)])


def build_rows(events: Sequence[CheckedEvent], *, context: Context = "") -> BatchRows:
    """Turn one station's checked events into per-table rows and the blobs they point to.

    ``context`` (the bucket key, or a function naming an event's origin from its
    position in ``events``) goes into log lines.  A value that does not fit its column
    skips only its event (see the module docstring).
    """
    skips = _SkipLog(context)
    per_table: Counter[str] = Counter(item.event_type.table for item in events)
    accepted = events
    tables = {
        name: _Table(TABLES[name], count) for name, count in per_table.items()
    }
    raw_blobs: list[Any] = []  # blob values as sent, decoded after the loop
    plain_blobs: set[int] = set()  # those that are text, not base64 (messages, versions)
    blob_owner: list[int] = []
    bad_events: set[int] = set()
    unknown_codes: set[tuple[str, Any]] = set()

    for position, (event_type, timestamp, event) in enumerate(accepted):
        table = tables[event_type.table]
        row = len(table.positions)
        table.positions.append(position)
        table.timestamps.append(timestamp)
        if event_type.extended_time:
            table.nanoseconds.append(event["header"].get("nanoseconds"))
        plan = table.slots
        slot_of = plan.slot_of
        first_blob = plan.first_blob
        base64 = plan.base64
        cells = table.cells
        try:
            datalist = event.get("datalist")
            if not isinstance(datalist, list | tuple):
                raise _BadValue(f"datalist is {type(datalist).__name__}, not a list")
            for item in datalist:
                code = item["data_uploadcode"]
                try:
                    slot = slot_of[code]
                except KeyError:
                    if (event_type.upload_code, code) not in unknown_codes:
                        unknown_codes.add((event_type.upload_code, code))
                        log.warning(
                            "Datatype not known on server side: %r (%s), event %s",
                            code, event_type.upload_code, _describe(context, position),
                        )
                    continue
                if slot < first_blob:
                    cells[slot][row] = item["data"]
                else:
                    if not base64[slot]:
                        plain_blobs.add(len(raw_blobs))
                    cells[slot][row] = len(raw_blobs)
                    raw_blobs.append(item["data"])
                    blob_owner.append(position)
        except _BadValue as exc:
            problem = str(exc)
        except (KeyError, TypeError, AttributeError) as exc:
            problem = f"malformed datalist item ({type(exc).__name__}: {exc})"
        else:
            continue
        bad_events.add(position)
        skips.skip(BAD_VALUE, position, f"{event_type.upload_code}: {problem}")

    blobs, problems = _decode_blobs(raw_blobs, plain_blobs, blob_owner, context)
    for index, problem in problems.items():
        position = blob_owner[index]
        if position not in bad_events:
            bad_events.add(position)
            code = events[position].event_type.upload_code
            skips.skip(BAD_VALUE, position, f"{code}: {problem}")

    built = {name: _assemble(table, bad_events, skips) for name, table in tables.items()}

    kept_blobs: list[bytes] = blobs
    blob_positions = np.array(blob_owner, dtype=np.int64)
    if bad_events and any(owner in bad_events for owner in blob_owner):
        keep = np.fromiter(
            (owner not in bad_events for owner in blob_owner), dtype=bool, count=len(blob_owner)
        )
        new_index = np.cumsum(keep) - 1
        for array, blob_cells, _ in built.values():
            for column, mask in blob_cells.items():
                array[column][mask] = new_index[array[column][mask]]
        kept_blobs = [blob for blob, kept in zip(blobs, keep, strict=True) if kept]
        blob_positions = blob_positions[keep]

    skips.close()
    return BatchRows(
        tables={
            name: TableRows(name, array, blob_cells, positions)
            for name, (array, blob_cells, positions) in built.items()
        },
        blobs=kept_blobs,
        blob_positions=blob_positions,
        skipped=skips.report,
    )


def _misfit(
    name: str, column: Any, values: list[Any], where: np.ndarray, row: int, count: int
) -> str:
    """Name the first value of ``row`` that did not fit (for the log line)."""
    index = next(int(i) for i in where if i % count == row)
    value = values[index]
    return f"{name}: {type(value).__name__} {value!r:.60} does not fit {column.dtype}"


def _assemble(
    table: _Table, bad_events: set[int], skips: _SkipLog
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Convert one table's gathered cells column-wise and drop the rows that failed."""
    event_type, plan = table.event_type, table.slots
    count = len(table.positions)
    assert count
    array = np.empty(count, dtype=event_type.dtype)
    array[...] = event_type.fill_row
    positions = np.array(table.positions, dtype=np.int64)
    if bad_events:
        bad = np.isin(positions, np.fromiter(bad_events, dtype=np.int64, count=len(bad_events)))
    else:
        bad = np.zeros(count, dtype=bool)
    problems: dict[int, str] = {}

    def reject(rows: np.ndarray, describe: Any) -> None:
        for row in rows.tolist():
            if not bad[row] and row not in problems:
                problems[row] = describe(row)

    timestamps = np.array(table.timestamps, dtype=np.int64)
    out_of_range = (timestamps < 0) | (timestamps > _INT32_MAX)
    reject(np.flatnonzero(out_of_range), lambda _: "datetime outside the int32 timestamp range")
    timestamps[out_of_range] = 0
    array["timestamp"] = timestamps
    if event_type.extended_time:
        nanoseconds, unfit = convert_values(table.nanoseconds, np.dtype("<u4"))
        reject(np.flatnonzero(unfit), lambda _: "nanoseconds missing or not a uint32")
        array["nanoseconds"] = nanoseconds
        array["ext_timestamp"] = timestamps.astype(np.uint64) * np.uint64(10**9) + nanoseconds

    blob_cells: dict[str, np.ndarray] = {}
    for name, slots, blob in plan.groups:
        # All slots of a column at once: an indexed column's elements are its slots in
        # order, so one conversion of (elements x rows) values fills the whole column.
        values = table.cells[slots[0]] if len(slots) == 1 else [
            value for slot in slots for value in table.cells[slot]
        ]
        column = event_type.column_map[name]
        if blob:
            converted = np.array(values, dtype=np.int32)
            present = converted >= 0
            if len(slots) > 1:
                present = present.reshape(len(slots), count).T
            blob_cells[name] = present
        else:
            converted, unfit = convert_values(values, column.np_dtype)
            if unfit.any():
                where = np.flatnonzero(unfit)
                reject(
                    where % count,
                    lambda row, values=values, where=where, name=name, column=column: (
                        _misfit(name, column, values, where, row, count)
                    ),
                )
        array[name] = converted if len(slots) == 1 else converted.reshape(len(slots), count).T

    for row, detail in sorted(problems.items()):
        bad[row] = True
        position = table.positions[row]
        bad_events.add(position)
        skips.skip(BAD_VALUE, position, f"{event_type.upload_code}: {detail}")
    if bad.any():
        keep = ~bad
        return (
            array[keep], {name: cells[keep] for name, cells in blob_cells.items()}, positions[keep]
        )
    return array, blob_cells, positions


__all__ = [
    "BAD_HEADER",
    "BAD_VALUE",
    "BEFORE_MINIMUM_YEAR",
    "NO_DATETIME",
    "UNKNOWN_TYPE",
    "BatchRows",
    "SkipReport",
    "TableRows",
    "build_table_rows",
    "convert_values",
    "split_by_day",
]


# -- one station's rows for one append ----------------------------------------------------


@dataclass(frozen=True)
class BatchPart:
    """The checked events of one bucket object that fall on one UTC day."""

    key: str
    etag: str
    station: int
    cluster: str
    events: Sequence[CheckedEvent]


@dataclass(frozen=True)
class StationBatch:
    """One station's share of an append: the rows of all its parts, built in one call.

    A sweep of thousands of one-event objects then costs one conversion per column, not
    thousands; ``starts`` maps rows and blobs back to their parts (the ledger's ranges).
    """

    cluster: str
    station: int
    parts: Sequence[BatchPart]
    starts: Sequence[int]  # each part's first event in the concatenated events
    rows: BatchRows
    events: int = 0  # events of all parts (positions run 0 .. events - 1)

    def owners(self, positions: np.ndarray) -> list[tuple[int, int]]:
        """(index into ``parts``, count) for each part owning some of ``positions``."""
        owners = np.searchsorted(np.asarray(self.starts), positions, side="right") - 1
        counts = np.bincount(owners, minlength=len(self.parts))
        return [(index, int(n)) for index, n in enumerate(counts.tolist()) if n]


class RowsError(Exception):
    """Building rows failed unexpectedly: some part's events trip a bug (its batch's
    fault, not the day file's); ``__cause__`` holds the original exception."""


def gather(parts: Sequence[BatchPart]) -> list[StationBatch]:
    """Group parts by station, in order, and build each station's rows once.

    A station is its cluster's node name and its number (the day file's group path), so
    parts that spell the cluster differently but name the same group go together.  A
    value that does not fit skips its event (logged); anything unexpected raises
    :class:`RowsError`.
    """
    grouped: dict[tuple[str, int], list[BatchPart]] = {}
    for part in parts:
        grouped.setdefault((cluster_node(part.cluster), part.station), []).append(part)
    batches = []
    for members in grouped.values():
        starts: list[int] = []
        events: list[CheckedEvent] = []
        for part in members:
            starts.append(len(events))
            events.extend(part.events)
        try:
            rows = build_rows(events, context=_origin(members, starts))
        except Exception as exc:
            raise RowsError(f"station {members[0].station}: {type(exc).__name__}: {exc}"
                            ) from exc
        batches.append(StationBatch(members[0].cluster, members[0].station, members, starts,
                                    rows, len(events)))
    return batches


def merge_batches(batches: Sequence[StationBatch]) -> StationBatch:
    """One station's batches as one, as if their parts had been gathered together.

    The rows are those :func:`gather` builds from all the parts at once (an event's row
    does not depend on its neighbours): tables and blobs concatenated in order, blob
    indices and event positions shifted past the batches before.  Lets rows be built
    per object elsewhere (replay's worker processes) and still be written with one
    resize and one write per dataset.
    """
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    parts: list[BatchPart] = []
    starts: list[int] = []
    blobs: list[bytes] = []
    blob_positions: list[np.ndarray] = []
    pieces: dict[str, list[tuple[TableRows, int, int]]] = {}
    skipped = SkipReport()
    events = 0
    for batch in batches:
        parts.extend(batch.parts)
        starts.extend(start + events for start in batch.starts)
        for name, table in batch.rows.items():
            pieces.setdefault(name, []).append((table, len(blobs), events))
        blob_positions.append(np.asarray(batch.rows.blob_positions) + events)
        blobs.extend(batch.rows.blobs)
        skipped.merge(batch.rows.skipped)
        events += batch.events
    tables = {}
    for name, members in pieces.items():
        rows = np.concatenate([table.rows_with_blob_offset(offset)
                               for table, offset, _ in members])
        cells = {column: np.concatenate([table.blob_cells[column] for table, _, _ in members])
                 for column in members[0][0].blob_cells}
        positions = np.concatenate([table.positions + shift for table, _, shift in members])
        tables[name] = TableRows(name, rows, cells, positions)
    merged = BatchRows(tables, blobs, np.concatenate(blob_positions), skipped)
    return StationBatch(first.cluster, first.station, parts, starts, merged, events)


def _origin(parts: Sequence[BatchPart], starts: Sequence[int]) -> Callable[[int], str]:
    """Which object (and which of its events) a position came from, for log lines."""

    def origin(position: int) -> str:
        index = bisect.bisect_right(starts, position) - 1
        return f"#{position - starts[index]} of {parts[index].key}"

    return origin
