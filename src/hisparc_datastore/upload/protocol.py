"""The stations' upload protocol: one form in, one answer code out, a verified batch stored.

This is the functional core of the upload function.  It knows nothing about HTTP servers
(``functions/upload/main.py`` adapts a request to :func:`handle_upload`), so every protocol
decision is tested here directly against a real bucket, and the shell stays a few lines.

The checks run in the order of docs/FORMAT.md, section 1.4, because the station software only
looks at the body code and the reference's order is what operators know from its logs:
400 (form unusable), 206 (unknown station), 203 (wrong password), 201 (checksum), 208
(not decodable), then the put and 100.  Every answer but 100 means "resend later" to a
station, so a code never promises more than the check that produced it.

Why both readings of ``data``: the reference decodes the body as UTF-8 and maps the text
back to bytes with latin-1, which is right for clients that hand their HTTP library the
pickle as latin-1 text (Python 3 clients, and Python 2 clients whose pickle is ASCII) and
wrong for a client that percent-encodes the raw bytes.  The md5 ``checksum`` was computed
by the client over the real pickle bytes, so whichever reading matches it is the pickle.

Decisions beyond the answer table (docs/FORMAT.md, section 1.4):
- A body that is not ``multipart/form-data`` is read as urlencoded whatever its declared
  type (the reference did the same); ``multipart/form-data`` is accepted as well, because
  splitting on its boundary is cheap and bounded.  The first of repeated fields counts.
- A field that is present but empty is not "missing": it fails the check that reads it
  (empty ``station_id`` 400, empty ``password`` 203, empty ``checksum`` 201, empty
  ``data`` 208).
- Server-side trouble is never a refusal of the batch: the bucket failing is ``404``
  (the reference's "database unreachable") and running out of memory ``205``
  ("transaction failed"), both with HTTP 503, so the station resends.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime as dt
import email.message
import functools
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hisparc_datastore.format.keys import incoming_key, suspicious_key
from hisparc_datastore.format.origin import EVENT_DAYS, event_day_span, event_days_text
from hisparc_datastore.format.payload import PayloadError, decode_batch, is_suspicious
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.store import BucketError, Store

# Answer codes (docs/FORMAT.md, section 1).  Only the body matters to stations; 100 is success.
STORED = "100"
CHECKSUM_MISMATCH = "201"
WRONG_PASSWORD = "203"  # noqa: S105 - an answer code, not a password
TRANSACTION_FAILED = "205"
UNKNOWN_STATION = "206"
NOT_DECODABLE = "208"
BAD_REQUEST = "400"
DATABASE_UNREACHABLE = "404"

REQUIRED_FIELDS = ("station_id", "password", "data", "checksum")

#: More fields than this is not a station talking; refusing early bounds the work.
MAX_FIELDS = 64
#: Pieces between `&`, empty ones included (a trailing `&` or two is harmless).
MAX_PIECES = 4 * MAX_FIELDS

_STATION_ID = re.compile(rb"[0-9]{1,10}")

#: Characters left as they are in the ``cluster`` metadata value: printable ASCII but
#: ``%``, so ``urllib.parse.unquote`` restores any cluster name exactly.
_METADATA_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class FormError(ValueError):
    """The body is not a form this endpoint can read; answered 400."""


class StationLookup(Protocol):
    """What the upload needs of a station list (``stations.StationList`` is one)."""

    def get(self, number: int) -> Station | None: ...


@dataclass(frozen=True)
class UploadAnswer:
    """The outcome of one upload: the code for the station and the facts for the log line.

    ``reading`` says which encoding of ``data`` matched the checksum (``"raw"`` or
    ``"latin-1 text"``); ``reason`` is a short, password-free explanation of a refusal.
    """

    code: str
    http_status: int = 200
    station: int | None = None
    events: int = 0
    nbytes: int = 0
    key: str | None = None
    reason: str = ""
    reading: str | None = None
    suspicious: bool = False

    @property
    def stored(self) -> bool:
        return self.code == STORED


# --- form parsing -----------------------------------------------------------------------


def _split(body: bytes, separator: bytes) -> Iterator[bytes]:
    """Pieces of ``body`` between separators, without building a list of them all.

    A body of millions of separators must not become millions of objects at once.
    """
    start = 0
    while True:
        end = body.find(separator, start)
        if end < 0:
            yield body[start:]
            return
        yield body[start:end]
        start = end + len(separator)


def _hex_table() -> np.ndarray:
    table = np.full(256, 0xFF, dtype=np.uint8)
    for digit, char in enumerate(b"0123456789abcdef"):
        table[char] = digit
        table[bytes([char]).upper()[0]] = digit
    return table


_HEX_VALUE = _hex_table()

#: Below this size the standard library's percent-decoding is as fast as the vector one.
_VECTOR_MINIMUM = 4096


def percent_decode(value: bytes) -> bytes:
    """``urllib.parse.unquote_to_bytes``, in C for the large ``data`` field.

    The pure-Python loop of the standard library costs about 30 ms per MB of pickle,
    more than decoding the pickle itself.  A value whose every ``%`` starts a valid escape
    (what every form encoder sends) is decoded by the C escape decoder: each ``%`` becomes
    ``\\x`` and each backslash is doubled first, so nothing else in the value is an
    escape; about 2.5x faster than the vector path for a one-event batch.  An invalid
    escape (``%`` not followed by two hex digits) makes that decoder fail, and the value
    takes the vector path, which keeps it as it is, as the standard library does; so the
    result is always exactly what the standard library would give.
    """
    if len(value) < _VECTOR_MINIMUM:
        return urllib.parse.unquote_to_bytes(value)
    try:
        return codecs.escape_decode(value.replace(b"\\", b"\\\\").replace(b"%", b"\\x"))[0]
    except ValueError:  # an invalid escape somewhere
        return _percent_decode_vector(value)


def _percent_decode_vector(value: bytes) -> bytes:
    """:func:`percent_decode` with numpy: a few array passes, invalid escapes kept."""
    raw = np.frombuffer(value, dtype=np.uint8)
    at = np.flatnonzero(raw == ord("%"))
    at = at[at + 2 < raw.size]
    high = _HEX_VALUE[raw[at + 1]]
    low = _HEX_VALUE[raw[at + 2]]
    # Like the standard library, a `%` not followed by two hex digits stays as it is.  Hex
    # digits are never `%`, so valid escapes cannot overlap and are decoded independently.
    valid = (high != 0xFF) & (low != 0xFF)
    at, high, low = at[valid], high[valid], low[valid]
    if at.size == 0:
        return value
    decoded = raw.copy()
    decoded[at] = (high << 4) | low
    keep = np.ones(raw.size, dtype=bool)
    keep[at + 1] = False
    keep[at + 2] = False
    return decoded[keep].tobytes()


def _unquote_plus(value: bytes) -> bytes:
    """``application/x-www-form-urlencoded`` decoding of one name or value, byte exact."""
    return percent_decode(value.replace(b"+", b" "))


def parse_urlencoded(body: bytes) -> dict[str, bytes]:
    """The form's fields as raw bytes; the first occurrence of a repeated name wins.

    ``urllib.parse.parse_qsl`` cannot be used: given bytes it decodes them as ASCII and
    re-encodes its results as ASCII, so it fails on (or, given str, replaces) exactly the
    non-ASCII bytes the pickle is made of.
    """
    fields: dict[str, bytes] = {}
    count = pieces = 0
    for pair in _split(body, b"&"):
        pieces += 1
        if pieces > MAX_PIECES:  # empty pairs too: a body of separators costs nothing
            raise FormError(f"more than {MAX_PIECES} '&'-separated pieces")
        if not pair.strip():
            continue
        count += 1
        if count > MAX_FIELDS:
            raise FormError(f"more than {MAX_FIELDS} form fields")
        raw_name, _, raw_value = pair.partition(b"=")
        name = _unquote_plus(raw_name).decode("latin-1").strip()
        if name not in fields:
            fields[name] = _unquote_plus(raw_value)
    return fields


def _header_param(header: str, value: str, param: str) -> str | None:
    """A parameter of a MIME header value (quoting handled by the stdlib)."""
    message = email.message.Message()
    message[header] = value
    found = message.get_param(param, header=header)
    if found is None or isinstance(found, tuple):  # RFC 2231 forms are not for us
        return None
    return str(found)


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """``multipart/form-data`` fields as raw bytes (RFC 7578), first occurrence wins.

    Accepted because it costs one linear split: a client that posts ``data`` as a file
    part sends the pickle bytes untouched.  Parts are not decoded any further
    (RFC 7578 forbids Content-Transfer-Encoding), and a part without a name is ignored.
    """
    boundary = _header_param("content-type", content_type, "boundary")
    if not boundary or len(boundary) > 200:
        raise FormError("multipart body without a usable boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1", "replace")
    parts = _split(b"\r\n" + body, delimiter)
    next(parts)  # the preamble
    fields: dict[str, bytes] = {}
    closed = False
    for count, part in enumerate(parts, start=1):
        if part.startswith(b"--"):
            closed = True
            break
        if count > MAX_FIELDS:
            raise FormError(f"more than {MAX_FIELDS} multipart parts")
        # After the delimiter: optional padding, CRLF, header lines, empty line, content.
        line_end = part.find(b"\r\n")
        if line_end < 0 or part[:line_end].strip(b" \t"):
            raise FormError("malformed multipart delimiter line")
        rest = part[line_end + 2 :]
        if rest.startswith(b"\r\n"):
            head, content = b"", rest[2:]
        else:
            head, separator, content = rest.partition(b"\r\n\r\n")
            if not separator:
                raise FormError("multipart part headers not terminated")
        name = None
        for line in head.decode("latin-1").split("\r\n"):
            header, _, value = line.partition(":")
            if header.strip().lower() == "content-disposition":
                name = _header_param("content-disposition", value.strip(), "name")
        if name is not None and name not in fields:
            fields[name] = content
    if not closed:
        raise FormError("multipart body is not closed by its boundary")
    return fields


def parse_form(body: bytes, content_type: str) -> dict[str, bytes]:
    """The fields of the body; anything that is not multipart is read as urlencoded.

    The reference parses the body as a urlencoded form whatever the header says, so a
    client that forgot (or mislabelled) the content type keeps working; a body that is
    not a form at all simply lacks the fields and is answered 400.
    """
    mimetype = content_type.partition(";")[0].strip().lower()
    if mimetype == "multipart/form-data":
        return parse_multipart(body, content_type)
    return parse_urlencoded(body)


# --- the checks -------------------------------------------------------------------------


def pickle_readings(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The candidate pickles carried by the ``data`` field, cheapest first.

    ``raw``: the percent-decoded bytes are the pickle (Python 2 clients, naive Python 3
    clients).  ``latin-1 text``: the bytes are UTF-8 of the pickle's latin-1 text (a
    Python 3 client that passed a str).  For an ASCII pickle both are the same bytes.
    """
    yield "raw", data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    if text.isascii():
        return
    try:
        yield "latin-1 text", text.encode("latin-1")
    except UnicodeEncodeError:
        return


def match_checksum(data: bytes, checksum: bytes) -> tuple[str, bytes, str] | None:
    """``(reading, pickle bytes, md5 hex)`` of the reading whose md5 is ``checksum``."""
    wanted = checksum.strip().lower()
    for reading, candidate in pickle_readings(data):
        digest = hashlib.md5(candidate).hexdigest()  # noqa: S324 - the protocol's checksum
        if hmac.compare_digest(digest.encode("ascii"), wanted):
            return reading, candidate, digest
    return None


def password_matches(given: bytes, station: Station) -> bool:
    """Constant-time comparison with the listed password, in the encodings clients use."""
    candidates = [station.password.encode("utf-8")]
    try:
        latin = station.password.encode("latin-1")
    except UnicodeEncodeError:
        latin = None
    if latin is not None and latin != candidates[0]:
        candidates.append(latin)
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(given, candidate)
    return matched


@functools.lru_cache(maxsize=4096)
def _metadata_text(value: str) -> str:
    """``value`` as S3 metadata carries it: ASCII, ``%`` and the rest percent-encoded."""
    return urllib.parse.quote(value, safe=_METADATA_SAFE)


def metadata_for(
    station: Station,
    events: int,
    received: dt.datetime,
    event_days: tuple[dt.date, dt.date] | None = None,
) -> dict[str, str]:
    """Object metadata; S3 carries ASCII only, so the cluster is percent-encoded if needed.

    ``event_days`` (:func:`~hisparc_datastore.format.origin.event_day_span`) lets replay
    pass over the object when it rebuilds other days.
    """
    metadata = {
        "station": str(station.number),
        "cluster": _metadata_text(station.cluster),
        "events": str(events),
        "received": received.astimezone(dt.UTC).isoformat(timespec="microseconds"),
    }
    if event_days is not None:
        metadata[EVENT_DAYS] = event_days_text(event_days)
    return metadata


@dataclass(frozen=True)
class VerifiedUpload:
    """A batch that passed every check: what to store, and the answer for either outcome.

    The put is the caller's, so that a server can make it without holding a thread
    (:func:`handle_upload` makes it with the store's blocking ``put``).
    """

    key: str
    pickled: bytes
    metadata: dict[str, str]
    #: The answer once the object is stored.
    answer: UploadAnswer

    def failed(self, exc: BucketError) -> UploadAnswer:
        """The answer when the put failed: the station sends the batch again later."""
        return dataclasses.replace(
            self.answer,
            code=DATABASE_UNREACHABLE,
            http_status=503,
            key=None,
            reason=f"bucket: {exc}"[:300],
        )


def verify_upload(
    body: bytes,
    content_type: str,
    stations: StationLookup,
    minimum_year: int,
    now: dt.datetime,
) -> UploadAnswer | VerifiedUpload:
    """Every check of one station upload, in the answer table's order; nothing is stored.

    A refusal comes back as its :class:`UploadAnswer`; a batch that passes, as the
    :class:`VerifiedUpload` to put before answering ``100``.  ``minimum_year`` is
    ``[General] minimum_year``: a batch with an event before it goes under
    ``suspicious/`` instead of ``incoming/``.
    """
    nbytes = len(body)

    def refuse(
        code: str, reason: str, station: int | None = None, reading: str | None = None
    ) -> UploadAnswer:
        return UploadAnswer(
            code=code, nbytes=nbytes, reason=reason, station=station, reading=reading
        )

    # 1. The form and its fields.
    try:
        fields = parse_form(body, content_type)
    except FormError as exc:
        return refuse(BAD_REQUEST, str(exc))
    # Present but empty is not missing: each later check answers for its own field
    # (an empty `data` is not a pickle: 208), as the answer table (docs/FORMAT.md, 1.4)
    # lists the causes.
    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        return refuse(BAD_REQUEST, "missing field " + ", ".join(missing))
    station_text = fields["station_id"].strip()
    if not _STATION_ID.fullmatch(station_text):
        return refuse(BAD_REQUEST, "station_id is not a number")
    number = int(station_text)

    # 2. The station.
    station = stations.get(number)
    if station is None:
        return refuse(UNKNOWN_STATION, "station not in the station list", station=number)

    # 3. The password (never logged, never in a reason).
    if not password_matches(fields["password"], station):
        return refuse(WRONG_PASSWORD, "wrong password", station=number)

    # 4. The checksum decides which reading of `data` is the pickle.
    matched = match_checksum(fields["data"], fields["checksum"])
    if matched is None:
        return refuse(CHECKSUM_MISMATCH, "checksum matches no reading of data", number)
    reading, pickled, digest = matched

    # 5. The pickle, through the allowlist only.
    try:
        events = decode_batch(pickled)
    except PayloadError as exc:
        return refuse(NOT_DECODABLE, f"not decodable: {exc}", station=number, reading=reading)
    except MemoryError:
        # The decoder bounds what a payload can allocate, so this is the server's
        # transient trouble: a retryable server error, not a refusal of the batch.
        return UploadAnswer(
            code=TRANSACTION_FAILED,
            http_status=503,
            station=number,
            nbytes=nbytes,
            reason="out of memory while decoding",
            reading=reading,
        )

    # 6. What to store, and the answer once it is stored.
    suspicious = is_suspicious(events, minimum_year)
    key = (suspicious_key if suspicious else incoming_key)(number, digest)
    return VerifiedUpload(
        key=key,
        pickled=pickled,
        metadata=metadata_for(station, len(events), now, event_day_span(events)),
        answer=UploadAnswer(
            code=STORED,
            station=number,
            events=len(events),
            nbytes=nbytes,
            key=key,
            reason="suspicious: event before minimum year" if suspicious else "",
            reading=reading,
            suspicious=suspicious,
        ),
    )


def handle_upload(
    body: bytes,
    content_type: str,
    stations: StationLookup,
    store: Store,
    minimum_year: int,
    now: dt.datetime,
) -> UploadAnswer:
    """Answer one station upload; store the verified pickle bytes before answering 100."""
    verified = verify_upload(body, content_type, stations, minimum_year, now)
    if isinstance(verified, UploadAnswer):
        return verified
    try:
        store.put(verified.key, verified.pickled, verified.metadata)
    except BucketError as exc:
        return verified.failed(exc)
    return verified.answer


def too_large(nbytes: int | None, limit: int) -> UploadAnswer:
    """The answer to a body over ``[Upload] max_body_bytes``, decided before reading it.

    HTTP 413 says what happened to proxies and people; the body ``400`` is what the
    station software reads (it ignores the status) and is the answer table's "body unreadable".
    """
    size = "unknown size" if nbytes is None else f"{nbytes} bytes"
    return UploadAnswer(
        code=BAD_REQUEST,
        http_status=413,
        nbytes=nbytes or 0,
        reason=f"body of {size} over max_body_bytes {limit}",
    )


def log_fields(answer: UploadAnswer, milliseconds: float) -> dict[str, object]:
    """The log line's facts as fields, for a JSON log (``[General] log_format = json``)."""
    fields: dict[str, object] = {
        "station": answer.station, "code": answer.code, "events": answer.events,
        "bytes": answer.nbytes, "ms": round(milliseconds, 1),
    }
    if answer.key:
        fields["key"] = answer.key
    if answer.reason:
        fields["reason"] = answer.reason
    return fields


def log_line(answer: UploadAnswer, milliseconds: float) -> str:
    """The one log line per request: what an operator greps for, never a password."""
    parts = [
        f"station={answer.station if answer.station is not None else '-'}",
        f"code={answer.code}",
        f"events={answer.events}",
        f"bytes={answer.nbytes}",
        f"ms={milliseconds:.1f}",
    ]
    if answer.key:
        parts.append(f"key={answer.key}")
    if answer.reading and answer.reading != "raw":
        parts.append(f"reading={answer.reading!r}")
    if answer.reason:
        parts.append(f"reason={answer.reason!r}")
    return "upload " + " ".join(parts)
