"""`certs init`: a private CA, the daemon's server certificate and one client certificate per tenant (mTLS).

Keys are ECDSA P-256 (every gRPC TLS stack accepts them), written owner-readable only. A client certificate's
common name is the tenant's name, which is how the daemon can tell tenants apart by certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_VALID_DAYS = 365
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class CertificateError(ValueError):
    """Certificates that cannot be made as asked."""


@dataclass(frozen=True)
class Issued:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # tenant -> (certificate, key)

    def as_dict(self) -> dict[str, object]:
        return {
            "directory": str(self.directory),
            "ca": str(self.ca),
            "server_cert": str(self.server_cert),
            "server_key": str(self.server_key),
            "clients": {name: {"cert": str(c), "key": str(k)} for name, (c, k) in self.clients.items()},
        }


def client_files(name: str) -> tuple[str, str]:
    return f"client-{name}.pem", f"client-{name}.key"


def _subject_alternative_name(server_name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        return x509.DNSName(server_name)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _write_cert(path: Path, certificate: x509.Certificate) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: str,
    signing_key: ec.EllipticCurvePrivateKey,
    days: int,
    is_ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    alternative_names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if alternative_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def init_certificates(
    out: Path, server_name: str, clients: list[str], days: int = DEFAULT_VALID_DAYS, overwrite: bool = False
) -> Issued:
    """Writes ca.pem/ca.key, server.pem/server.key and client-NAME.pem/.key for each client into `out`."""
    bad = [name for name in clients if not CLIENT_NAME.fullmatch(name)]
    if bad:
        raise CertificateError(f"client names must be letters, digits, '.', '_' or '-': {', '.join(bad)}")
    if len(set(clients)) != len(clients):
        raise CertificateError("client names repeat")
    if not server_name:
        raise CertificateError("the server name (the host clients dial) is empty")
    if days < 1:
        raise CertificateError("certificates must be valid for at least one day")
    out.mkdir(parents=True, exist_ok=True)
    if (out / CA_KEY).exists() and not overwrite:
        raise CertificateError(f"{out / CA_KEY} exists; refusing to replace a CA (pass --force to do it anyway)")

    ca_name = f"offsite CA for {server_name}"
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, days, is_ca=True)
    _write_key(out / CA_KEY, ca_key)
    _write_cert(out / CA_CERT, ca)

    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        server_name,
        server_key.public_key(),
        ca_name,
        ca_key,
        days,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        alternative_names=[_subject_alternative_name(server_name)],
    )
    _write_key(out / SERVER_KEY, server_key)
    _write_cert(out / SERVER_CERT, server)

    issued: dict[str, tuple[Path, Path]] = {}
    for name in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate(name, key.public_key(), ca_name, ca_key, days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        cert_name, key_name = client_files(name)
        _write_key(out / key_name, key)
        _write_cert(out / cert_name, certificate)
        issued[name] = (out / cert_name, out / key_name)
    return Issued(out, out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY, issued)
