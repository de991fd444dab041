"""`certs init`: a private CA, the daemon's server certificate and one client certificate per tenant (mTLS).

`certs issue` adds a client certificate signed by the existing CA, so a new tenant never means a new CA; a
certificate is withdrawn by recording its serial as revoked in the store (`certs revoke`), which the daemon checks
on every call. gRPC's Python TLS credentials take no CRL, so that list is what the daemon enforces; `write_crl` also
publishes it as a standard X.509 CRL signed by the CA, for a TLS proxy in front of the daemon or any other verifier.
Keys are ECDSA P-256 (every gRPC TLS stack accepts them), written owner-readable only. A client certificate's common
name is the tenant's name, which is how the daemon can tell tenants apart by certificate.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
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
CRL_FILE = "crl.pem"
DEFAULT_VALID_DAYS = 365
DEFAULT_CRL_DAYS = 30  # a verifier refuses a CRL past its next update: `certs crl` signs a fresh one
KEY_MODE = 0o600
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
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, KEY_MODE)
    # open's mode applies only to a new file: an old key file keeps its own mode unless it is set here, before the
    # new key is written into it
    os.fchmod(descriptor, KEY_MODE)
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


def _check_names(clients: list[str]) -> None:
    bad = [name for name in clients if not CLIENT_NAME.fullmatch(name)]
    if bad:
        raise CertificateError(f"client names must be letters, digits, '.', '_' or '-': {', '.join(bad)}")


def init_certificates(
    out: Path, server_name: str, clients: list[str], days: int = DEFAULT_VALID_DAYS, overwrite: bool = False
) -> Issued:
    """Writes ca.pem/ca.key, server.pem/server.key and client-NAME.pem/.key for each client into `out`."""
    _check_names(clients)
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

    issued = {name: _write_client(out, name, ca_name, ca_key, days)[:2] for name in clients}
    return Issued(out, out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY, issued)


def _write_client(
    out: Path, name: str, ca_name: str, ca_key: ec.EllipticCurvePrivateKey, days: int
) -> tuple[Path, Path, int]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _certificate(name, key.public_key(), ca_name, ca_key, days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    cert_name, key_name = client_files(name)
    _write_key(out / key_name, key)
    _write_cert(out / cert_name, certificate)
    return out / cert_name, out / key_name, certificate.serial_number


@dataclass(frozen=True)
class IssuedClient:
    tenant: str
    cert: Path
    key: Path
    serial: int
    replaced_serial: int | None  # the certificate this one overwrote: revoke it if its key may be out there

    def as_dict(self) -> dict[str, object]:
        replaced = None if self.replaced_serial is None else f"{self.replaced_serial:x}"
        return {
            "tenant": self.tenant,
            "cert": str(self.cert),
            "key": str(self.key),
            "serial": f"{self.serial:x}",
            "replaced_serial": replaced,
        }


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise CertificateError(f"cannot read the CA in {directory} (run certs init first): {error}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or ca_key.public_key() != ca.public_key():
        raise CertificateError(f"{directory / CA_KEY} is not the key of {directory / CA_CERT}")
    return ca, ca_key


def issue_client(directory: Path, name: str, days: int = DEFAULT_VALID_DAYS, overwrite: bool = False) -> IssuedClient:
    """One more client certificate (client-NAME.pem/.key in `directory`), signed by the CA already there."""
    _check_names([name])
    if days < 1:
        raise CertificateError("certificates must be valid for at least one day")
    ca, ca_key = _load_ca(directory)
    cert_path = directory / client_files(name)[0]
    replaced = None
    if cert_path.exists():
        if not overwrite:
            raise CertificateError(f"{cert_path} exists; pass --force to replace it (then revoke the old one)")
        replaced = certificate_serial(cert_path.read_bytes())
    ca_name = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    cert, key, serial = _write_client(directory, name, str(ca_name), ca_key, days)
    return IssuedClient(name, cert, key, serial, replaced)


def write_crl(directory: Path, revoked: Sequence[tuple[int, datetime.datetime]], days: int = DEFAULT_CRL_DAYS) -> Path:
    """Writes `directory`/crl.pem: every (serial, revocation time) in `revoked`, signed by the CA there."""
    if days < 1:
        raise CertificateError("a CRL must be valid for at least one day")
    ca, ca_key = _load_ca(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)  # grows with each CRL signed
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    path, partial = directory / CRL_FILE, directory / f"{CRL_FILE}.partial"
    partial.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(partial, path)  # a reader sees the old CRL or the new one, never half of one
    return path


def certificate_serial(pem: bytes) -> int:
    """The serial number of a PEM certificate, the number `certs revoke` records."""
    try:
        return x509.load_pem_x509_certificate(pem).serial_number
    except ValueError as error:
        raise CertificateError(f"not a PEM certificate: {error}") from None


def parse_serial(text: str) -> int:
    """A serial as `certs issue` prints it (hex, colons allowed)."""
    try:
        return int(text.replace(":", ""), 16)
    except ValueError:
        raise CertificateError(f"serial {text!r} is not hexadecimal") from None


@dataclass(frozen=True)
class PeerCertificate:
    tenant: str  # the common name of a client certificate the server's client CA verified
    serial: int


@functools.lru_cache(maxsize=1024)
def _serial_of(pem: bytes) -> int:
    return certificate_serial(pem)  # parsed once per distinct certificate, not once per call


def peer_certificate(auth_context: Mapping[str, Sequence[bytes]]) -> PeerCertificate | None:
    """The verified client certificate of a call, from gRPC's auth context; None when the peer presented none.

    gRPC fills `x509_common_name` only for a certificate the server's client CA verified (mTLS).
    """
    names = auth_context.get("x509_common_name", [])
    if not names:
        return None
    pems = auth_context.get("x509_pem_cert", [])
    if len(names) != 1 or len(pems) != 1:
        raise CertificateError("the client certificate has no single common name and PEM")
    return PeerCertificate(names[0].decode("utf-8", "replace"), _serial_of(pems[0]))
