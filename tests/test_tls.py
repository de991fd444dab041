"""Transport security: certs init, TLS, mTLS (a tenant named by its certificate), and the plain-text bind refusal."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import TINY_LAYOUT
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from offsite.client.connection import ClientTls, Remote, RemoteError, connection_hint
from offsite.common.model_loading import load_model
from offsite.owner.certificates import CertificateError, Issued, init_certificates, issue_client
from offsite.owner.cli import main as owner_main
from offsite.owner.emulator import EmulatorSpec
from offsite.owner.server import BindRefused, ServerTls, start_server
from offsite.owner.service import OwnerService
from offsite.owner.store import Store


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Issued:
    return init_certificates(tmp_path_factory.mktemp("certs"), "localhost", ["alice", "mallory"])


@pytest.fixture
def service(tiny_model_dir, tmp_path: Path) -> Iterator[tuple[OwnerService, Store, str]]:
    store = Store(tmp_path / "store")
    token = store.add_tenant("alice")
    service = OwnerService(
        load_model(str(tiny_model_dir("llama"))), store, [EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}")]
    )
    yield service, store, token
    store.close()


def _serve(service, store, tls: ServerTls | None) -> tuple[grpc.Server, str]:
    server, port = start_server(service, store, "localhost:0", tls=tls)
    return server, f"localhost:{port}"


def test_certs_init_makes_a_ca_a_server_and_named_clients(issued: Issued) -> None:
    ca = x509.load_pem_x509_certificate(issued.ca.read_bytes())
    server = x509.load_pem_x509_certificate(issued.server_cert.read_bytes())
    alice = x509.load_pem_x509_certificate(issued.clients["alice"][0].read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    alice.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert alice.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    usage = alice.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for key in [issued.server_key, issued.directory / "ca.key", *(k for _, k in issued.clients.values())]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_certs_init_refuses_bad_names_and_an_existing_ca(issued: Issued, tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="client names"):
        init_certificates(tmp_path / "a", "localhost", ["../evil"])
    with pytest.raises(CertificateError, match="exists; refusing to replace a CA"):
        init_certificates(issued.directory, "localhost", [])


def test_mtls_refuses_a_client_without_a_certificate_and_names_a_tenant_by_its_certificate(
    service, issued: Issued
) -> None:
    owner, store, token = service
    server, address = _serve(owner, store, ServerTls(issued.server_cert, issued.server_key, issued.ca))
    try:
        with Remote(address, token, timeout=20, tls=ClientTls(issued.ca)) as remote:
            with pytest.raises(RemoteError) as refused:
                remote.model_card()
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no certificate
        alice_cert, alice_key = issued.clients["alice"]
        with Remote(address, timeout=20, tls=ClientTls(issued.ca, alice_cert, alice_key)) as remote:
            assert remote.model_card().emulators, "alice's certificate alone names her"
            assert list(remote.list_adapters().adapters) == []
        mallory_cert, mallory_key = issued.clients["mallory"]  # signed by the CA, but no such tenant
        with Remote(address, timeout=20, tls=ClientTls(issued.ca, mallory_cert, mallory_key)) as remote:
            with pytest.raises(RemoteError) as unknown:
                remote.model_card()
            assert unknown.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Remote(address, "ofs_wrong", timeout=20, tls=ClientTls(issued.ca, alice_cert, alice_key)) as remote:
            with pytest.raises(RemoteError) as wrong:  # a bad token is not rescued by a good certificate
                remote.model_card()
            assert wrong.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)


def test_tls_without_client_certificates_works_with_a_token_and_needs_the_ca(service, issued: Issued) -> None:
    owner, store, token = service
    server, address = _serve(owner, store, ServerTls(issued.server_cert, issued.server_key))
    try:
        with Remote(address, token, timeout=20, tls=ClientTls(issued.ca)) as remote:
            assert remote.model_card().emulators
        with Remote(address, token, timeout=20, tls=ClientTls()) as remote:  # system roots do not know our CA
            with pytest.raises(RemoteError) as untrusted:
                remote.model_card()
            assert untrusted.value.code == grpc.StatusCode.UNAVAILABLE
            assert "pass --ca" in str(untrusted.value) and "not signed by a CA" in str(untrusted.value)
        with Remote(address, token, timeout=20) as remote:  # plain text to a TLS port
            with pytest.raises(RemoteError) as plain:
                remote.model_card()
            assert "it serves TLS, so pass --ca" in str(plain.value)
    finally:
        server.stop(None)
    plain_server, plain_address = _serve(owner, store, None)
    try:
        with Remote(plain_address, token, timeout=20, tls=ClientTls(issued.ca)) as remote:  # TLS to a plain port
            with pytest.raises(RemoteError) as no_tls:
                remote.model_card()
            assert "does not serve TLS" in str(no_tls.value)
    finally:
        plain_server.stop(None)
    with Remote(plain_address, token, timeout=20) as remote:  # the daemon is gone
        with pytest.raises(RemoteError) as refused:
            remote.model_card()
        assert "nothing listens at that address" in str(refused.value)
    assert connection_hint(grpc.StatusCode.UNAVAILABLE, "Socket closed") is None  # a dropped stream is no TLS hint


def test_a_non_loopback_bind_without_tls_is_refused_with_the_reason(service, issued: Issued) -> None:
    owner, store, _ = service
    with pytest.raises(BindRefused, match="without TLS.*--insecure"):
        start_server(owner, store, "0.0.0.0:0")
    server, _ = start_server(owner, store, "0.0.0.0:0", tls=ServerTls(issued.server_cert, issued.server_key))
    server.stop(None)
    with pytest.raises(ValueError, match="both --cert and --key"):
        ClientTls(issued.ca, cert=issued.clients["alice"][0]).credentials()
    with pytest.raises(BindRefused, match="cannot read a TLS file"):
        ServerTls(issued.server_cert, Path("/nonexistent/server.key")).credentials()


# Issue 16, finding 6: a new client meant a new CA, nothing could be revoked, and a token overrode the certificate


def _status(remote: Remote) -> grpc.StatusCode | None:
    try:
        remote.list_adapters()
    except RemoteError as error:
        return error.code
    return None


def test_certs_issue_adds_a_client_signed_by_the_existing_ca_without_replacing_it(tmp_path: Path) -> None:
    first = init_certificates(tmp_path, "localhost", ["alice"])
    ca_before = first.ca.read_bytes()
    bob = issue_client(tmp_path, "bob")
    assert first.ca.read_bytes() == ca_before and (tmp_path / "ca.key").exists()
    ca = x509.load_pem_x509_certificate(ca_before)
    for path in (bob.cert, first.clients["alice"][0]):  # the new one and the old one both chain to the same CA
        x509.load_pem_x509_certificate(path.read_bytes()).verify_directly_issued_by(ca)
    issued_bob = x509.load_pem_x509_certificate(bob.cert.read_bytes())
    assert issued_bob.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bob"
    assert issued_bob.serial_number == bob.serial and bob.replaced_serial is None
    assert stat.S_IMODE(bob.key.stat().st_mode) == 0o600
    with pytest.raises(CertificateError, match="exists; pass --force"):
        issue_client(tmp_path, "bob")
    again = issue_client(tmp_path, "bob", overwrite=True)
    assert again.replaced_serial == bob.serial != again.serial
    with pytest.raises(CertificateError, match="cannot read the CA"):
        issue_client(tmp_path / "elsewhere", "carol")


def test_a_revoked_certificate_and_a_removed_tenant_are_refused_by_a_running_daemon(
    service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner, store, token = service
    certs = init_certificates(tmp_path / "certs", "localhost", ["alice"])
    server, address = _serve(owner, store, ServerTls(certs.server_cert, certs.server_key, certs.ca))
    alice_cert, alice_key = certs.clients["alice"]
    try:
        with Remote(address, timeout=20, tls=ClientTls(certs.ca, alice_cert, alice_key)) as remote:
            assert _status(remote) is None
            owner_main(["certs", "revoke", "--store", str(store.root), "--cert", str(alice_cert), "--json"])
            revoked = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert revoked["ok"] and not revoked["already_revoked"]
            assert _status(remote) == grpc.StatusCode.UNAUTHENTICATED  # the same channel, no restart
        with Remote(address, token, timeout=20, tls=ClientTls(certs.ca, alice_cert, alice_key)) as remote:
            assert _status(remote) == grpc.StatusCode.UNAUTHENTICATED  # her token does not rescue a revoked cert

        owner_main(["certs", "issue", "--dir", str(certs.directory), "--tenant", "alice", "--force", "--json"])
        reissued = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert reissued["replaced_serial"] == revoked["serial"]
        with Remote(address, timeout=20, tls=ClientTls(certs.ca, alice_cert, alice_key)) as remote:
            assert _status(remote) is None  # the new certificate, from the same CA: the server was not touched
            owner_main(["tenants", "remove", "alice", "--store", str(store.root), "--json"])
            capsys.readouterr()
            assert _status(remote) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(None)


def test_under_mtls_a_token_cannot_override_the_certificates_tenant(service, issued: Issued) -> None:
    owner, store, alice_token = service
    bob_token = store.add_tenant("bob")
    server, address = _serve(owner, store, ServerTls(issued.server_cert, issued.server_key, issued.ca))
    alice_cert, alice_key = issued.clients["alice"]
    mallory_cert, mallory_key = issued.clients["mallory"]  # signed by the CA, no such tenant
    try:
        with Remote(address, alice_token, timeout=20, tls=ClientTls(issued.ca, alice_cert, alice_key)) as remote:
            assert _status(remote) is None  # token and certificate agree
        for cert, key in ((alice_cert, alice_key), (mallory_cert, mallory_key)):
            with Remote(address, bob_token, timeout=20, tls=ClientTls(issued.ca, cert, key)) as remote:
                assert _status(remote) == grpc.StatusCode.PERMISSION_DENIED
        audited = [json.loads(line) for line in (store.root / "audit.jsonl").read_text().splitlines()]
        assert [(a["tenant"], a["status"]) for a in audited] == [
            ("alice", "OK"),
            (None, "PERMISSION_DENIED"),
            (None, "PERMISSION_DENIED"),
        ]
    finally:
        server.stop(None)


def test_certs_init_force_makes_keys_owner_only_even_over_looser_old_files(tmp_path: Path) -> None:
    first = init_certificates(tmp_path, "localhost", ["alice"])
    keys = [first.directory / "ca.key", first.server_key, first.clients["alice"][1]]
    for key in keys:
        key.chmod(0o644)
    init_certificates(tmp_path, "localhost", ["alice"], overwrite=True)
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
