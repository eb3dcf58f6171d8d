"""The upload protocol's core, called directly against the real S3 server (no HTTP).

Every answer code, in the spec's order, both encodings of ``data``, the Python 2 and
Python 3 pickle flavours and the hostile corpus; the HTTP shell has its own tests in
test_upload_http.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import pickle
import random
import socket
import sys
import urllib.parse
from pathlib import Path

import pytest
import requests
from conftest import TEST_STATIONS
from hisparc_datastore_dev import samples
from hisparc_datastore_dev.py2pickle import Py2Unicode, dumps_py2
from hostile_pickles import HOSTILE, MARKER
from hypothesis import given, settings
from hypothesis import strategies as st

from hisparc_datastore.config import Settings
from hisparc_datastore.format import payload
from hisparc_datastore.format.keys import incoming_key, suspicious_key
from hisparc_datastore.format.payload import decode_batch
from hisparc_datastore.stations import StationList
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.upload import protocol as core

NOW = dt.datetime(2024, 3, 1, 12, 30, 5, 250000, tzinfo=dt.UTC)
STATION, PASSWORD = 501, TEST_STATIONS[501][1]


def events(n: int = 3, year: int = 2024, seed: int = 1) -> list[dict]:
    return samples.batch(n, dt.datetime(year, 3, 1, 12, 0, 0), random.Random(seed))


def py3_pickle(batch: list[dict], protocol: int = 4) -> bytes:
    return pickle.dumps(samples.numpy_flavour(batch), protocol=protocol)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324


def form(
    data: bytes,
    station: object = STATION,
    password: str = PASSWORD,
    checksum: str | None = None,
    encoding: str = "text",
    drop: str | None = None,
) -> bytes:
    """A urlencoded body the way clients build it.

    ``text``: the pickle as latin-1 text, which an HTTP library sends UTF-8 percent-encoded
    (requests with a str; the reference's reading).  ``raw``: the bytes percent-encoded.
    """
    value: bytes | str = data.decode("latin-1") if encoding == "text" else data
    fields = {
        "station_id": str(station),
        "password": password,
        "data": value,
        "checksum": md5(data) if checksum is None else checksum,
    }
    if drop:
        del fields[drop]
    return urllib.parse.urlencode(fields).encode("ascii")


FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def stations(settings: Settings) -> StationList:
    return StationList(settings.station_list)


@pytest.fixture
def upload(stations: StationList, bucket: Bucket, settings: Settings):
    def send(body: bytes, content_type: str = FORM, store: object = None) -> core.UploadAnswer:
        return core.handle_upload(
            body, content_type, stations, store or bucket, settings.minimum_year, NOW
        )

    return send


def keys(bucket: Bucket) -> list[str]:
    return [item.key for item in bucket.list("")]


# --- 100 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["text", "raw"])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python3_pickle_with_numpy_scalars_is_stored_byte_for_byte(
    upload, bucket: Bucket, encoding: str, protocol: int
) -> None:
    batch = events(4)
    data = py3_pickle(batch, protocol)
    assert not data.isascii()  # so the two encodings really differ on the wire
    answer = upload(form(data, encoding=encoding))
    assert (answer.code, answer.http_status) == ("100", 200)
    assert answer.key == incoming_key(STATION, md5(data))
    assert answer.events == 4
    assert answer.reading == ("latin-1 text" if encoding == "text" else "raw")
    stored = bucket.get(answer.key)
    assert stored.body == data
    assert stored.metadata == {
        "station": "501",
        "cluster": "Amsterdam",
        "events": "4",
        "received": "2024-03-01T12:30:05.250000+00:00",
        "event-days": "2024-03-01/2024-03-01",
    }
    assert decode_batch(stored.body) == decode_batch(dumps_py2(batch))


def test_pysparc_coincidences_with_traces_are_stored(upload, bucket: Bucket) -> None:
    """Protocol 3 with numpy scalars and traces of thousands of characters, as PySPARC
    sends them: CPython 3.11.0-3.11.4 answered every such batch 208 (gh-106052)."""
    batch = samples.batch(3, dt.datetime(2024, 3, 1, 12, 0, 0), random.Random(3))
    data = pickle.dumps(samples.numpy_flavour(batch), protocol=3)
    traces = [item["data"] for event in batch for item in event["datalist"]
              if item["data_uploadcode"] in ("TR1", "TR2", "TR3", "TR4")]  # fmt: skip
    assert len(traces) == 12 and min(map(len, traces)) >= 256
    answer = upload(form(data))
    assert (answer.code, answer.events) == ("100", 3), answer.reason
    assert bucket.get(answer.key).body == data


@pytest.mark.parametrize("encoding", ["text", "raw"])
def test_python2_protocol0_batch_is_stored(upload, bucket: Bucket, encoding: str) -> None:
    batch = events(100, seed=7)
    data = dumps_py2(batch)
    answer = upload(form(data, encoding=encoding))
    assert answer.code == "100"
    assert answer.events == 100
    assert bucket.get(answer.key).body == data


def test_python2_pickle_with_non_ascii_text_both_encodings(upload, bucket: Bucket) -> None:
    batch = events(2)
    batch[0]["datalist"].append(
        {"data_uploadcode": "ERRMSG", "data": Py2Unicode("caf\u00e9 \u00ff")}
    )
    data = dumps_py2(batch)
    assert not data.isascii()
    for encoding in ("text", "raw"):
        answer = upload(form(data, encoding=encoding))
        assert answer.code == "100", encoding
        assert bucket.get(answer.key).body == data


def test_resent_batch_overwrites_the_same_object(upload, bucket: Bucket) -> None:
    data = py3_pickle(events(5))
    first = upload(form(data, encoding="text"))
    second = upload(form(data, encoding="raw"))
    assert first.code == second.code == "100"
    assert first.key == second.key
    assert keys(bucket) == [first.key]


def test_suspicious_batch_goes_to_suspicious(upload, bucket: Bucket) -> None:
    batch = events(3) + events(1, year=2019)
    data = dumps_py2(batch)
    answer = upload(form(data))
    assert answer.code == "100"
    assert answer.suspicious
    assert answer.key == suspicious_key(STATION, md5(data))
    assert keys(bucket) == [answer.key]
    assert bucket.get(answer.key).body == data


def test_odd_events_are_accepted_for_the_writer_to_skip(upload, bucket: Bucket) -> None:
    batch = [
        {"header": {"eventtype_uploadcode": "XYZ", "datetime": dt.datetime(2024, 1, 1),
                    "nanoseconds": 0}, "datalist": []},
        {"header": {"eventtype_uploadcode": "CIC", "datetime": None, "nanoseconds": 0},
         "datalist": [{"data_uploadcode": "NOPE", "data": 1}]},
        {"datalist": []},
        {},
    ]
    for data in (dumps_py2(batch), pickle.dumps(batch, protocol=4)):
        answer = upload(form(data))
        assert answer.code == "100"
        assert answer.events == 4
        # The one datetime counts, though the writer skips its unknown type.
        assert bucket.get(answer.key).metadata["event-days"] == "2024-01-01/2024-01-01"
    empty = pickle.dumps([], protocol=2)
    answer = upload(form(empty))
    assert answer.code == "100"
    assert "event-days" not in bucket.get(answer.key).metadata


def test_event_days_span_every_datetime_in_utc() -> None:
    from hisparc_datastore.format.origin import event_day_span, event_days_of

    plus2 = dt.timezone(dt.timedelta(hours=2))
    batch = [
        {"header": {"datetime": dt.datetime(2024, 3, 2, 1, 0, tzinfo=plus2)}},  # 1 March UTC
        {"header": {"datetime": dt.datetime(2024, 3, 3, 23, 59)}},  # naive: UTC
        {"header": {"datetime": "2024-03-09"}},
        {"header": None},
        "not an event",
    ]
    assert event_day_span(batch) == (dt.date(2024, 3, 1), dt.date(2024, 3, 3))
    assert event_day_span(batch[2:]) is None
    assert event_days_of({"event-days": "2024-03-01/2024-03-03"}) == (
        dt.date(2024, 3, 1), dt.date(2024, 3, 3))
    for unreadable in ("", "2024-03-01", "2024-03-03/2024-03-01", "x/y", "2024-03-01/"):
        assert event_days_of({"event-days": unreadable}) is None
    assert event_days_of({}) is None


def test_station_with_awkward_password_and_uppercase_checksum(upload) -> None:
    data = dumps_py2(events(1))
    body = form(data, station=502, password=TEST_STATIONS[502][1], checksum=md5(data).upper())
    assert upload(body).code == "100"


def test_multipart_form_with_file_and_text_parts(upload, bucket: Bucket) -> None:
    data = py3_pickle(events(3))
    fields = {"station_id": str(STATION), "password": PASSWORD, "checksum": md5(data)}
    # A file part carries the bytes; a text part (no filename) carries str as UTF-8.
    for part in (("batch.pickle", data), (None, data.decode("latin-1"))):
        prepared = requests.Request(
            "POST", "http://unused/", data=fields, files={"data": part}
        ).prepare()
        assert prepared.headers["Content-Type"].startswith("multipart/form-data")
        answer = upload(prepared.body, prepared.headers["Content-Type"])
        assert answer.code == "100"
        assert answer.reading == ("raw" if part[0] else "latin-1 text")
        assert bucket.get(answer.key).body == data


# --- refusals, in the spec's order ---------------------------------------------------------


@pytest.mark.parametrize("field", core.REQUIRED_FIELDS)
def test_missing_field_is_400(upload, bucket: Bucket, field: str) -> None:
    answer = upload(form(dumps_py2(events(1)), drop=field))
    assert answer.code == "400"
    assert field in answer.reason
    assert keys(bucket) == []


def test_empty_fields_are_answered_by_their_own_check(upload, bucket: Bucket) -> None:
    data = dumps_py2(events(1))
    assert upload(form(data, station="")).code == "400"
    assert upload(form(data, password="")).code == "203"
    assert upload(form(data, checksum="")).code == "201"
    assert upload(form(b"")).code == "208"
    assert keys(bucket) == []


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"", FORM),
        (b"\x00\xff\xfe garbage", FORM),
        (b'{"station_id": 501}', "application/json"),
        (b"station_id=501&password=x", "multipart/form-data"),
        (b"--b\r\nnot closed", "multipart/form-data; boundary=b"),
        (b"&" * 100_000, FORM),
        (b"a=1&" * 1000, FORM),
    ],
)
def test_unusable_body_is_400(upload, bucket: Bucket, body: bytes, content_type: str) -> None:
    assert upload(body, content_type).code == "400"
    assert keys(bucket) == []


@pytest.mark.parametrize(
    "station", ["abc", "5.01", "-501", "501x", "", "+501", "\u0665\u0660\u0661"]
)
def test_non_integer_station_id_is_400(upload, station: str) -> None:
    assert upload(form(dumps_py2(events(1)), station=station)).code == "400"


def test_unknown_station_is_206_before_the_password(upload, bucket: Bucket) -> None:
    answer = upload(form(b"junk", station=999, password="wrong", checksum="0" * 32))
    assert (answer.code, answer.station) == ("206", 999)
    assert keys(bucket) == []


def test_wrong_password_is_203_before_the_checksum(upload, bucket: Bucket) -> None:
    answer = upload(form(b"junk", password=PASSWORD + "x", checksum="0" * 32))
    assert answer.code == "203"
    assert PASSWORD not in core.log_line(answer, 1.0)
    assert upload(form(b"junk", password=TEST_STATIONS[7001][1])).code == "203"
    assert keys(bucket) == []


def test_checksum_mismatch_is_201_before_decoding(upload, bucket: Bucket) -> None:
    data = py3_pickle(events(2))
    assert upload(form(data, checksum=md5(data + b"x"))).code == "201"
    assert upload(form(b"not a pickle", checksum="not hex at all")).code == "201"
    # The text reading's checksum does not make the raw reading right, and vice versa.
    utf8_of_text = data.decode("latin-1").encode("utf-8")
    assert upload(form(data, encoding="raw", checksum=md5(utf8_of_text))).code == "201"
    assert keys(bucket) == []


@pytest.mark.parametrize(
    "data",
    [
        b"not a pickle",
        pickle.dumps({"not": "a list"}, protocol=2),
        pickle.dumps([1, 2, 3], protocol=4),
        pickle.dumps([{"a": 1}], protocol=4)[:-5],
    ],
    ids=["garbage", "dict", "list-of-ints", "truncated"],
)
def test_undecodable_data_is_208(upload, bucket: Bucket, data: bytes) -> None:
    answer = upload(form(data))
    assert answer.code == "208"
    assert keys(bucket) == []


def test_every_hostile_pickle_is_208_and_nothing_runs(upload, bucket: Bucket) -> None:
    assert not MARKER.exists()
    wrong = []
    for name, data in HOSTILE:
        for encoding in ("text", "raw"):
            answer = upload(form(data, encoding=encoding))
            if answer.code != "208":
                wrong.append((name, encoding, answer.code, answer.reason))
    assert wrong == []
    assert keys(bucket) == []
    assert not MARKER.exists()


# --- start-up ----------------------------------------------------------------------------

MAIN = Path(__file__).resolve().parents[1] / "functions" / "upload" / "main.py"


def test_a_decoder_that_fails_its_self_check_stops_the_upload_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check runs before the configuration is read (none is set here): a function
    whose decoder is wrong never answers a station."""

    def self_check() -> None:
        raise RuntimeError("decoder self-check failed on Python 3.11.2: a Python 3 batch ...")

    monkeypatch.setattr(payload, "self_check", self_check)
    monkeypatch.delenv("DATASTORE_CONFIG", raising=False)
    spec = importlib.util.spec_from_file_location("upload_main_self_check", MAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    with pytest.raises(SystemExit) as stopped:
        spec.loader.exec_module(module)
    assert str(stopped.value) == (
        "upload function: decoder self-check failed on Python 3.11.2: a Python 3 batch ..."
    )


# --- bucket down ------------------------------------------------------------------------------


def closed_port() -> tuple[socket.socket, int]:
    """A loopback port that refuses connections while the returned socket stays open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def test_bucket_down_is_404_with_503(upload, bucket: Bucket, settings: Settings) -> None:
    sock, port = closed_port()
    with sock:
        down = Bucket(settings.bucket_name, endpoint=f"http://127.0.0.1:{port}",
                      access_key="x", secret_key="y", connect_timeout=1, max_attempts=1)
        answer = upload(form(dumps_py2(events(2))), store=down)
    assert (answer.code, answer.http_status) == ("404", 503)
    assert answer.key is None
    assert keys(bucket) == []


# --- pieces -------------------------------------------------------------------------------


def test_urlencoded_parsing_keeps_raw_bytes() -> None:
    body = b"a=%00%ff%C3%A9+x&b=1&a=second&=empty&c&&d=%zz"
    fields = core.parse_urlencoded(body)
    assert fields["a"] == b"\x00\xff\xc3\xa9 x"
    assert fields["b"] == b"1"
    assert fields["c"] == b""
    assert fields["d"] == b"%zz"


def test_readings_of_data() -> None:
    data = bytes(range(256))
    text_on_wire = data.decode("latin-1").encode("utf-8")
    assert dict(core.pickle_readings(text_on_wire))["latin-1 text"] == data
    assert dict(core.pickle_readings(data)) == {"raw": data}
    assert list(core.pickle_readings(b"ascii")) == [("raw", b"ascii")]


def test_cluster_metadata_is_ascii_and_reversible() -> None:
    from hisparc_datastore.stations import Station

    meta = core.metadata_for(Station(1, "Z\u00fcrich 100%", "pw"), 3, NOW)
    assert meta["cluster"].isascii()
    assert urllib.parse.unquote(meta["cluster"]) == "Z\u00fcrich 100%"
    assert meta["events"] == "3"


_ESCAPE_LIKE = st.sampled_from([
    b"%41", b"%e9", b"%E9", b"%00", b"%5C", b"%5c", b"%25", b"%2B", b"+", b"a", b"\\",
    b"\\x41", b"\\\\", b"\\n", b"\\0", b"\\'", b"\\\n", b"\\%41", b"x\\", b"\xff", b"\n"])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(pieces=st.lists(_ESCAPE_LIKE, min_size=1, max_size=40), repeat=st.integers(1, 600),
       tail=st.sampled_from([b"", b"%", b"%4", b"\\", b"%zz", b"%41"]))
def test_percent_decoding_in_c_equals_the_standard_library(
    pieces: list[bytes], repeat: int, tail: bytes
) -> None:
    """Large values go through the C escape decoder (backslashes, which it would read as
    escapes, doubled first; ``%`` turned into its hex escape), or, when a ``%`` starts no
    valid escape, through the vector path: both give unquote_to_bytes's bytes."""
    value = b"".join(pieces) * repeat + tail
    expected = urllib.parse.unquote_to_bytes(value)
    assert core.percent_decode(value) == expected
    assert core._percent_decode_vector(value) == expected


def test_a_valid_large_value_takes_the_c_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(value: bytes) -> bytes:
        raise AssertionError("the vector path")

    monkeypatch.setattr(core, "_percent_decode_vector", refused)
    value = urllib.parse.quote_from_bytes(bytes(range(256)) * 40).encode() + b"\\x41\\"
    assert len(value) >= core._VECTOR_MINIMUM
    assert core.percent_decode(value) == urllib.parse.unquote_to_bytes(value)
    with pytest.raises(AssertionError, match="vector"):
        core.percent_decode(value + b"%zz")  # an invalid escape: the vector path


def test_the_cluster_metadata_of_a_station_is_worked_out_once() -> None:
    from hisparc_datastore.stations import Station

    core._metadata_text.cache_clear()
    for _ in range(3):
        meta = core.metadata_for(Station(2, "Caf\u00e9 de 100%", "pw"), 1, NOW)
    assert urllib.parse.unquote(meta["cluster"]) == "Caf\u00e9 de 100%"
    info = core._metadata_text.cache_info()
    assert (info.misses, info.hits) == (1, 2)


def test_the_text_log_format_is_loggings_with_each_second_formatted_once() -> None:
    import logging

    from hisparc_datastore.logs import FORMAT, TextFormatter

    cached, plain = TextFormatter(FORMAT), logging.Formatter(FORMAT)
    record = logging.LogRecord("hisparc_datastore.upload.protocol", logging.INFO, __file__, 1,
                               "upload station=501 code=100", (), None)
    for created in (1_700_000_000.0, 1_700_000_000.25, 1_700_000_000.999, 1_700_000_001.0,
                    1_700_000_000.5, 1_700_003_600.123):
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert cached.format(record) == plain.format(record)
    assert cached.formatTime(record, "%H") == plain.formatTime(record, "%H")
