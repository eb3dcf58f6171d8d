"""Baseline for bench/upload.py: the old datastore's upload app, as a plain WSGI callable.

It does what the reference does, in the reference's way: read the body, decode it as
UTF-8, parse the form, map ``data`` back to bytes with latin-1, compare the password, check
the md5, unpickle with plain ``pickle.loads``, and write the pickle into a queue directory
(temp file, then rename).  It exists only to be measured against the new function on the
benchmark's own generated batches; plain ``pickle.loads`` of network data is exactly the
reference defect the new system removes, so this file must never serve real traffic.

Serve it with ``gunicorn --chdir bench reference_upload:application`` and the environment
variables ``REFERENCE_STATION_LIST`` (CSV number,cluster,password) and
``REFERENCE_QUEUE_DIR``.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import pickle
import tempfile
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path

MINIMUM_YEAR = 2020


def _stations() -> dict[int, str]:
    path = Path(os.environ["REFERENCE_STATION_LIST"])
    with path.open(newline="", encoding="utf-8") as handle:
        return {int(row[0]): row[2] for row in csv.reader(handle) if row}


STATIONS = _stations()
QUEUE = Path(os.environ["REFERENCE_QUEUE_DIR"])


def _answer(environ: dict) -> str:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    form = urllib.parse.parse_qs(body.decode("utf-8"))
    try:
        station_id = form["station_id"][0]
        password = form["password"][0]
        data = form["data"][0]
        checksum = form["checksum"][0]
    except KeyError:
        return "400"
    number = int(station_id)  # the reference crashes here on a non-integer
    if number not in STATIONS:
        return "206"
    if password != STATIONS[number]:
        return "203"
    pickled = data.encode("iso-8859-1")
    if hashlib.md5(pickled).hexdigest() != checksum:  # noqa: S324
        return "201"
    try:
        # Plain pickle.loads: the reference's defect, run here on the bench's own data only.
        # latin1 is how Python 3 reads the Python 2 stations' byte strings.
        events = pickle.loads(pickled, encoding="latin1")
    except Exception:
        return "208"
    suspicious = any(
        isinstance(event["header"]["datetime"], dt.datetime)
        and event["header"]["datetime"].year < MINIMUM_YEAR
        for event in events
    )
    folder = QUEUE / ("suspicious" if suspicious else "incoming")
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=QUEUE, prefix=".tmp-")
    with os.fdopen(handle, "wb") as file:
        file.write(pickled)
    os.replace(temporary, folder / f"{number}_{checksum}.pickle")
    return "100"


def application(
    environ: dict, start_response: Callable[[str, list[tuple[str, str]]], object]
) -> Iterable[bytes]:
    code = _answer(environ).encode()
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(code)))]
    )
    return [code]
