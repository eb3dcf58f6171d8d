"""A self-signed certificate for the local stack's HTTPS (``datastore local --https``).

Stations upload over HTTPS; in production Knative's gateway ends their TLS with a
certificate from cert-manager (infra/README.md, "HTTPS for the stations").  On one
machine the upload function serves TLS itself with this certificate, for 127.0.0.1 and
localhost, so a client (``datastore simulate``, or a station's own software pointed at the
stack) can be tried over HTTPS.  A client trusts it by the certificate file itself, which
is its own CA: nothing is added to the system's trust store.

The key is EC P-256, the certificate valid for 30 days and made again when it has less
than a day left or does not name these hosts; the key file is readable by its owner only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: What the certificate is for: the stack binds 127.0.0.1.
HOST_NAMES = ("localhost",)
HOST_ADDRESSES = ("127.0.0.1",)
VALID_DAYS = 30
RENEW_BEFORE = dt.timedelta(days=1)


@dataclass(frozen=True)
class TlsFiles:
    """The certificate (also what clients trust) and its private key, PEM."""

    cert: Path
    key: Path


def ensure_certificate(directory: Path, now: dt.datetime | None = None) -> TlsFiles:
    """The certificate in ``directory``, made (again) when missing, expiring or not for
    these hosts."""
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    now = now or dt.datetime.now(dt.UTC)
    if _usable(files, now):
        return files
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "HiSPARC datastore, local stack"),
        x509.NameAttribute(NameOID.COMMON_NAME, HOST_NAMES[0]),
    ])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(host) for host in HOST_NAMES]
            + [x509.IPAddress(ipaddress.ip_address(a)) for a in HOST_ADDRESSES]
        ), critical=False)
        # Its own CA, so that clients can trust this file and nothing else.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    descriptor = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key_pem)
    files.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return files


def _usable(files: TlsFiles, now: dt.datetime) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    hosts = set(names.value.get_values_for_type(x509.DNSName)) | {
        str(address) for address in names.value.get_values_for_type(x509.IPAddress)
    }
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    matches = certificate.public_key().public_bytes(*public) == key.public_key().public_bytes(
        *public)
    return (matches and set(HOST_NAMES) | set(HOST_ADDRESSES) <= hosts
            and certificate.not_valid_after_utc - RENEW_BEFORE > now)
