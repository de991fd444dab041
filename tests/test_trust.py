"""Owner key pinning: the first pull (or remote memory build) records the owner's key; a later one refuses any
other key and says why, before any token id leaves. A pull never trusts the owner's file sizes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import InProcessOwner, sentiment_examples, write_jsonl

from offsite.client import pull as pull_module
from offsite.client.cli import main
from offsite.client.config import CONFIG_NAME, LEGACY_PINS_NAME, ServerEntry, load, save
from offsite.client.connection import Remote
from offsite.client.pull import BundleError, pull_emulator, pull_head
from offsite.common.rpc import pb


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def _pull(owner: InProcessOwner, out: Path, *extra: str, server: str | None = None) -> int:
    argv = ["pull", "--server", server or owner.address, "--token", owner.token, "--out", str(out), "--json"]
    return _run([*argv, *extra])


def _memory_build(owner: InProcessOwner, tmp_path: Path, out: str, *extra: str) -> int:
    data = write_jsonl(sentiment_examples(4), tmp_path / "data.jsonl")
    argv = ["memory", "build", "--server", owner.address, "--token", owner.token, "--yes", "--data", str(data)]
    return _run([*argv, "--out", str(tmp_path / out), "--json", *extra])


def test_first_pull_pins_the_owner_key_and_a_different_key_is_refused(
    owner: InProcessOwner, client_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _pull(owner, tmp_path / "first") == 0
    config = load(client_home / CONFIG_NAME)
    assert config.servers == {owner.address: ServerEntry(owner.address, owner_key=owner.service.public_key)}
    assert "trusting owner key" in capsys.readouterr().err

    assert _pull(owner, tmp_path / "second") == 0  # same key: accepted silently
    assert "trusting owner key" not in capsys.readouterr().err

    impostor_pin = "ab" * 32
    config.servers[owner.address] = ServerEntry(owner.address, owner_key=impostor_pin)
    save(config)
    code = _pull(owner, tmp_path / "third")
    captured = capsys.readouterr()
    assert code == 2
    assert f"the pinned key is {impostor_pin}" in captured.err
    assert f'pinned as servers."{owner.address}".owner_key in {client_home / CONFIG_NAME}' in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["ok"] is False
    assert not (tmp_path / "third").exists() or not any((tmp_path / "third").iterdir())

    code = _pull(owner, tmp_path / "fourth", "--owner-key", owner.service.public_key)
    assert code == 0, "an explicit --owner-key overrides the recorded pin"


def test_a_named_server_keeps_its_pin_in_its_own_entry(
    owner: InProcessOwner, client_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load(client_home / CONFIG_NAME)
    config.servers["lab"] = ServerEntry(owner.address)
    save(config)
    assert _pull(owner, tmp_path / "first", server="lab") == 0
    assert "recorded as servers.lab.owner_key" in capsys.readouterr().err
    assert load(client_home / CONFIG_NAME).servers == {
        "lab": ServerEntry(owner.address, owner_key=owner.service.public_key)
    }


def test_pins_of_the_old_known_owners_file_move_into_the_config(
    owner: InProcessOwner, client_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client_home.mkdir(parents=True)
    (client_home / LEGACY_PINS_NAME).write_text(json.dumps({owner.address: "ab" * 32}))
    assert _pull(owner, tmp_path / "e") == 2, "the imported pin is enforced"
    assert "the pinned key is " + "ab" * 32 in capsys.readouterr().err
    assert not (client_home / LEGACY_PINS_NAME).exists()
    assert load(client_home / CONFIG_NAME).servers[owner.address].owner_key == "ab" * 32


def test_a_corrupt_pin_file_is_explained(owner: InProcessOwner, client_home: Path, tmp_path: Path, capsys) -> None:
    client_home.mkdir(parents=True)
    (client_home / LEGACY_PINS_NAME).write_text("[not json")
    assert _pull(owner, tmp_path / "e") == 2
    assert "cannot read the pinned owner keys" in capsys.readouterr().err


def test_a_remote_memory_build_pins_on_first_use_and_sends_nothing_to_an_impostor(
    owner: InProcessOwner, client_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    assert _memory_build(owner, tmp_path, "memory") == 0
    assert "trusting owner key" in capsys.readouterr().err
    assert load(client_home / CONFIG_NAME).servers[owner.address].owner_key == owner.service.public_key

    sent: list[object] = []
    monkeypatch.setattr(Remote, "represent", lambda self, requests: sent.append(requests) or iter(()))
    config = load(client_home / CONFIG_NAME)
    config.servers[owner.address] = ServerEntry(owner.address, owner_key="ab" * 32)
    save(config)
    head = str(tmp_path / "memory-head")
    code = _memory_build(owner, tmp_path, "memory-2", "--head", head)
    captured = capsys.readouterr()
    assert code == 2 and f'pinned as servers."{owner.address}".owner_key' in captured.err
    assert not sent and not (tmp_path / "memory-2").exists()


def test_a_remote_memory_build_refuses_a_head_another_key_signed(
    owner: InProcessOwner, client_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    with owner.remote() as remote:
        pull_head(remote, tmp_path / "head", show_progress=False)
    real_card = Remote.model_card

    def card_of_another_owner(self: Remote) -> pb.ModelCard:
        card = real_card(self)
        card.owner_public_key = "cd" * 32
        return card

    monkeypatch.setattr(Remote, "model_card", card_of_another_owner)
    sent: list[object] = []
    monkeypatch.setattr(Remote, "represent", lambda self, requests: sent.append(requests) or iter(()))
    assert _memory_build(owner, tmp_path, "memory", "--head", str(tmp_path / "head")) == 2
    assert "cd" * 32 in capsys.readouterr().err, "refused as not signed by the key the owner presents"
    assert not sent and not (tmp_path / "memory").exists()


def _lying_pull(lie: str):
    """PullArtifact as an owner that lies about its sizes would answer it."""
    real_pull = Remote.pull

    def pull(self: Remote, artifact: str, name: str, offset: int):
        for chunk in real_pull(self, artifact, name, offset):
            if lie == "grows":  # the same bytes in two chunks, the second claiming one byte more
                half = len(chunk.data) // 2
                first = pb.ArtifactChunk()
                first.CopyFrom(chunk)
                first.data = chunk.data[:half]
                yield first
                chunk.offset, chunk.data, chunk.file_size = chunk.offset + half, chunk.data[half:], chunk.file_size + 1
            elif lie == "huge":
                chunk.file_size = 1 << 40
            yield chunk
            if lie == "endless":
                while True:
                    offset += len(chunk.data)
                    yield pb.ArtifactChunk(
                        offset=offset, data=chunk.data, file_size=chunk.file_size, file_sha256=chunk.file_sha256
                    )

    return pull


@pytest.mark.parametrize("lie", ["grows", "huge", "endless"])
def test_a_pull_does_not_trust_the_owners_file_sizes(
    owner: InProcessOwner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lie: str
) -> None:
    monkeypatch.setattr(Remote, "pull", _lying_pull(lie))
    with owner.remote() as remote, pytest.raises(BundleError, match="size|bytes"):
        pull_emulator(remote, tmp_path / "emulator", show_progress=False)
    assert not (tmp_path / "emulator").exists()
    staged = list(tmp_path.glob("**/*.part"))
    assert sum(p.stat().st_size for p in staged) <= 64 * 1024 * 1024, "the lie stopped before filling the disk"


def test_a_pull_the_disk_cannot_hold_is_refused_before_a_byte_arrives(
    owner: InProcessOwner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Usage:
        free = 1024

    monkeypatch.setattr(pull_module.shutil, "disk_usage", lambda path: Usage())
    pulled: list[str] = []
    monkeypatch.setattr(Remote, "pull", lambda self, artifact, name, offset: pulled.append(name) or iter(()))
    with owner.remote() as remote, pytest.raises(BundleError, match="free some space"):
        pull_emulator(remote, tmp_path / "emulator", show_progress=False)
    assert not pulled and not (tmp_path / "emulator").exists()


def test_a_pull_verifies_with_the_digests_it_took_while_receiving_and_still_checks_the_signed_manifest(
    owner: InProcessOwner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offsite.common import manifest as manifest_module

    read_back: list[str] = []
    real_sha256_file = manifest_module.sha256_file
    monkeypatch.setattr(
        manifest_module, "sha256_file", lambda path: read_back.append(path.name) or real_sha256_file(path)
    )
    with owner.remote() as remote:
        pull_emulator(remote, tmp_path / "emulator", show_progress=False)
    assert read_back == [], "every file was hashed as it arrived, none read back"

    real_pull = Remote.pull

    def other_weights(self: Remote, artifact: str, name: str, offset: int):
        """Bytes that agree with the chunks' own sha256, but not with the signed manifest."""
        for chunk in real_pull(self, artifact, name, offset):
            if name == "model.safetensors":
                chunk.data = bytes(len(chunk.data))
                chunk.file_sha256 = hashlib.sha256(bytes(chunk.file_size)).hexdigest()
            yield chunk

    monkeypatch.setattr(Remote, "pull", other_weights)
    with owner.remote() as remote, pytest.raises(BundleError, match="model.safetensors: sha256 does not match"):
        pull_emulator(remote, tmp_path / "swapped", show_progress=False)
    assert not (tmp_path / "swapped").exists()
