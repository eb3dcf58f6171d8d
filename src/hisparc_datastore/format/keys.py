"""The bucket's layout: which prefix holds what, and how each object's key is made.

Part of the contract like the HDF5 layout: stations' batches are found, archived and
replayed by these keys for years.

- ``incoming/<station>/<md5>.pickle``: a verified batch, waiting for the writer (the md5
  of its bytes, so a resent batch lands on the same key);
- ``archive/<YYYY>/<MM>/<DD>/<station>/<md5>.pickle``: written, by the upload's UTC date;
- ``failed/<station>/<md5>.pickle``: quarantined, with its reason in its metadata;
- ``suspicious/<station>/<md5>.pickle``: held back by the minimum-year rule, never written;
- ``deferred/``: the writer's retry records; ``retrying/``, ``legacy-import/``: operators'.
"""

from __future__ import annotations

import datetime as dt

INCOMING = "incoming/"
SUSPICIOUS = "suspicious/"
FAILED = "failed/"
ARCHIVE = "archive/"
PREFIXES = (INCOMING, SUSPICIOUS, FAILED, ARCHIVE)
#: Operators' prefixes: objects of an interrupted ``datastore failed retry`` (ops/failed.py),
#: markers of ``datastore import-legacy`` (ops/import_legacy.py).  No notification watches them.
RETRYING = "retrying/"
LEGACY_IMPORT = "legacy-import/"
#: The writer's retry records: why objects wait in incoming/ (writer/retries.py).  Not watched.
DEFERRED = "deferred/"


def valid_key(key: str) -> bool:
    """Whether ``key`` can be sent at all: UTF-8 (no lone surrogates), 1..1024 bytes."""
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return 0 < size <= 1024


def incoming_key(station: int, md5: str) -> str:
    """Where a verified batch lands; a resent batch maps to the same key."""
    return f"{INCOMING}{station}/{md5}.pickle"


def suspicious_key(station: int, md5: str) -> str:
    return f"{SUSPICIOUS}{station}/{md5}.pickle"


def failed_key(incoming: str) -> str:
    return FAILED + incoming.removeprefix(INCOMING)


def archive_key(incoming: str, received: dt.datetime) -> str:
    """``archive/<YYYY>/<MM>/<DD>/<station>/<md5>.pickle`` by the upload's UTC date."""
    day = received.astimezone(dt.UTC) if received.tzinfo else received
    return f"{ARCHIVE}{day:%Y/%m/%d}/" + incoming.removeprefix(INCOMING)


def station_from_key(key: str) -> int | None:
    """``incoming/<station>/<md5>.pickle`` -> station number (None if not that shape)."""
    parts = key.removeprefix(INCOMING).split("/")
    if len(parts) == 2 and parts[0].isdigit():
        return int(parts[0])
    return None
