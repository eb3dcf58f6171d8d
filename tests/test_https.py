"""HTTPS on one machine: the launcher serving TLS, and `datastore local --https`.

Stations upload over HTTPS.  In production Knative's gateway ends their TLS; here the
upload function serves it itself with a self-signed certificate (dev/.../tls.py), so a
client can be tried over TLS locally: answered 100 with the certificate trusted, refused
without it, and nothing answered to plain HTTP on the HTTPS port.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hisparc_datastore_dev import processes
from hisparc_datastore_dev.py2pickle import dumps_py2
from hisparc_datastore_dev.tls import ensure_certificate

from hisparc_datastore import serve
from hisparc_datastore.storage.store import Bucket

try:
    from .conftest import TEST_STATIONS
    from .reliability_support import make_batch
    from .test_local_stack import Stack, _environment
except ImportError:
    from conftest import TEST_STATIONS  # type: ignore[no-redef]
    from reliability_support import make_batch  # type: ignore[no-redef]
    from test_local_stack import Stack, _environment  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]


def test_the_certificate_is_made_once_and_again_when_it_expires(tmp_path: Path) -> None:
    from cryptography import x509

    files = ensure_certificate(tmp_path / "tls")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    certificate = x509.load_pem_x509_certificate(files.cert.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    first = files.cert.read_bytes()
    assert ensure_certificate(tmp_path / "tls").cert.read_bytes() == first  # reused
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=29, hours=12)
    assert ensure_certificate(tmp_path / "tls", now=later).cert.read_bytes() != first
    files.key.write_text("not a key")
    ensure_certificate(tmp_path / "tls")
    assert b"PRIVATE KEY" in files.key.read_bytes()


def test_the_launcher_takes_both_tls_files_or_neither(tmp_path: Path) -> None:
    args = serve.add_arguments  # the parser the launcher builds
    parser = __import__("argparse").ArgumentParser()
    args(parser)
    parsed = parser.parse_args(["--source", "x.py", "--target", "upload"])
    files = ensure_certificate(tmp_path)
    assert serve.options(parsed, {}).tls is None
    on = serve.options(parsed, {"TLS_CERT_FILE": str(files.cert),
                                "TLS_KEY_FILE": str(files.key)})
    assert on.tls == (files.cert, files.key)
    assert on.gunicorn()["certfile"] == str(files.cert)
    assert "certfile" not in serve.options(parsed, {}).gunicorn()
    with pytest.raises(ValueError, match="go together"):
        serve.options(parsed, {"TLS_CERT_FILE": str(files.cert)})
    with pytest.raises(ValueError, match="not a readable file"):
        serve.options(parsed, {"TLS_CERT_FILE": str(files.cert),
                               "TLS_KEY_FILE": str(tmp_path / "missing.pem")})


@pytest.fixture
def https_upload(datastore_env: dict[str, str], bucket: Bucket,
                 tmp_path: Path) -> Iterator[processes.Served]:
    files = ensure_certificate(tmp_path / "tls")
    served = processes.serve_function(ROOT / "functions" / "upload" / "main.py", "upload",
                                      datastore_env, tmp_path / "upload.log",
                                      tls=(files.cert, files.key), cwd=ROOT)
    try:
        yield served
    finally:
        served.stop()


def upload_form(station: int = 501) -> dict[str, str]:
    body = dumps_py2(make_batch(2, station))
    return {"station_id": str(station), "password": TEST_STATIONS[station][1],
            "data": body.decode("latin-1"),
            "checksum": hashlib.md5(body).hexdigest()}  # noqa: S324


def test_the_upload_function_serves_https(https_upload: processes.Served) -> None:
    assert https_upload.url.startswith("https://127.0.0.1:")
    assert https_upload.ca_file is not None
    answer = requests.post(https_upload.url, data=upload_form(), timeout=30,
                           verify=str(https_upload.ca_file))
    assert (answer.status_code, answer.text) == (200, "100")
    # Not trusted by the system's CAs: refused, as a station would refuse a forged server.
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(https_upload.url, data=upload_form(), timeout=30)
    # Plain HTTP to the HTTPS port gets no answer.
    plain = https_upload.url.replace("https://", "http://")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(plain, data=upload_form(), timeout=30)
    assert https_upload.alive()
    assert "Traceback" not in https_upload.log()


@pytest.mark.long
@pytest.mark.timeout(300)
def test_local_stack_with_https(tmp_path: Path) -> None:
    """`datastore local --https`: the banner names the certificate, and simulate, which
    trusts it from stack.json, uploads over TLS."""
    stack = Stack(tmp_path / "state", tmp_path, "--https", "--stations", "1")
    try:
        info = stack.info
        assert info.upload_url.startswith("https://") and info.upload_ca
        assert Path(info.upload_ca) == tmp_path / "state" / "tls" / "cert.pem"
        banner = stack.output.read_text()
        assert "certificate" in banner and "cert.pem" in banner
        result = subprocess.run(
            [sys.executable, "-m", "hisparc_datastore.cli", "simulate", "--state-dir",
             str(tmp_path / "state"), "--batches", "2", "--batch-size", "5",
             "--max-retries", "2"],
            cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"batches accepted\s+2 of 2", result.stdout), result.stdout
        # An explicit --url needs --ca-cert: without it the certificate is not trusted.
        station = info.demo_stations()[0]
        refused = subprocess.run(
            [sys.executable, "-m", "hisparc_datastore.cli", "simulate", "--url",
             info.upload_url, "--station", str(station.number), "--password",
             station.password, "--batches", "1", "--batch-size", "2", "--max-retries", "0"],
            cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=120,
            check=False,
        )
        assert refused.returncode != 0, refused.stdout
        assert stack.stop()
    finally:
        stack.clean_up()
    assert os.path.exists(tmp_path / "state" / "tls" / "key.pem")
