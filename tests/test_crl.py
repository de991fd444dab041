"""Revocation as a standard X.509 CRL (issue 16, finding 6): signed by the CA, readable by any verifier."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from offsite.owner.certificates import CRL_FILE, CertificateError, init_certificates, write_crl
from offsite.owner.cli import main
from offsite.owner.store import Store


def owner_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        main([*argv, "--json"])
    finally:
        os.umask(umask)  # main sets the store's umask for the rest of the process
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_certs_revoke_writes_a_crl_signed_by_the_ca_that_lists_the_revoked_serial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs, store = tmp_path / "certs", tmp_path / "store"
    issued = init_certificates(certs, "localhost", ["alice", "bob"])
    alice, bob = (issued.clients[name][0] for name in ("alice", "bob"))
    ca = x509.load_pem_x509_certificate(issued.ca.read_bytes())

    result = owner_cli(["certs", "revoke", "--store", str(store), "--cert", str(alice), "--dir", str(certs)], capsys)
    assert result["crl"] == str(certs / CRL_FILE)
    crl = x509.load_pem_x509_crl((certs / CRL_FILE).read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and crl.issuer == ca.subject
    revoked = crl.get_revoked_certificate_by_serial_number(serial_of(alice))
    assert revoked is not None and crl.get_revoked_certificate_by_serial_number(serial_of(bob)) is None
    assert revoked.revocation_date_utc <= datetime.datetime.now(datetime.timezone.utc)
    assert crl.next_update_utc is not None and crl.next_update_utc > datetime.datetime.now(datetime.timezone.utc)
    first_number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    owner_cli(
        ["certs", "revoke", "--store", str(store), "--serial", f"{serial_of(bob):x}", "--dir", str(certs)], capsys
    )
    crl = x509.load_pem_x509_crl((certs / CRL_FILE).read_bytes())
    assert {entry.serial_number for entry in crl} == {serial_of(alice), serial_of(bob)}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > first_number
    assert Store(store).is_revoked(serial_of(bob))  # the daemon's own deny-list is still what it enforces


def test_certs_crl_signs_a_fresh_crl_and_revoke_without_dir_writes_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs, store = tmp_path / "certs", tmp_path / "store"
    issued = init_certificates(certs, "localhost", ["alice"])
    result = owner_cli(["certs", "revoke", "--store", str(store), "--cert", str(issued.clients["alice"][0])], capsys)
    assert result["crl"] is None and not (certs / CRL_FILE).exists()

    result = owner_cli(["certs", "crl", "--store", str(store), "--dir", str(certs), "--days", "7"], capsys)
    crl = x509.load_pem_x509_crl((certs / CRL_FILE).read_bytes())
    assert result["revoked"] == 1 and len(crl) == 1
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(days=7)
    with pytest.raises(CertificateError, match="at least one day"):
        write_crl(certs, [], days=0)
    with pytest.raises(CertificateError, match="cannot read the CA"):
        write_crl(tmp_path / "no-ca", [])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_refuses_the_revoked_certificate_with_the_crl_and_accepts_the_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs, store = tmp_path / "certs", tmp_path / "store"
    issued = init_certificates(certs, "localhost", ["alice", "bob"])
    alice, bob = (issued.clients[name][0] for name in ("alice", "bob"))
    owner_cli(["certs", "revoke", "--store", str(store), "--cert", str(alice), "--dir", str(certs)], capsys)

    def verify(cert: Path) -> subprocess.CompletedProcess[str]:
        command = ["openssl", "verify", "-crl_check", "-CAfile", str(issued.ca), "-CRLfile", str(certs / CRL_FILE)]
        return subprocess.run([*command, str(cert)], capture_output=True, text=True, timeout=60)

    refused, accepted = verify(alice), verify(bob)
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
