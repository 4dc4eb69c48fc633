"""A small PKI made in the test: a CA, a server certificate for 127.0.0.1/localhost, a client
certificate, and a second CA with a client certificate of its own (trusted by nobody)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Pki:
    ca: Path  # signed server.pem and client.pem
    server_cert: Path  # SANs localhost, 127.0.0.1
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody trusts
    rogue_cert: Path  # a client certificate signed by other_ca
    rogue_key: Path


def _issue(tmp_path: Path, stem: str, subject: str, issuer, issuer_key, *, ca: bool = False, server: bool = False):
    """Write <stem>.pem and <stem>.key; returns (cert, key) objects. Self-signed when issuer is None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    (tmp_path / f"{stem}.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / f"{stem}.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


@pytest.fixture
def pki(tmp_path) -> Pki:
    ca, ca_key = _issue(tmp_path, "ca", "keel test CA", None, None, ca=True)
    _issue(tmp_path, "server", "localhost", ca, ca_key, server=True)
    _issue(tmp_path, "client", "keel rollout", ca, ca_key)
    other, other_key = _issue(tmp_path, "other-ca", "some other CA", None, None, ca=True)
    _issue(tmp_path, "rogue", "keel rollout", other, other_key)
    return Pki(
        ca=tmp_path / "ca.pem",
        server_cert=tmp_path / "server.pem",
        server_key=tmp_path / "server.key",
        client_cert=tmp_path / "client.pem",
        client_key=tmp_path / "client.key",
        other_ca=tmp_path / "other-ca.pem",
        rogue_cert=tmp_path / "rogue.pem",
        rogue_key=tmp_path / "rogue.key",
    )
