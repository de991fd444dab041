"""Owner key pinning: the first pull records the owner's key; a later pull refuses any other key and says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import InProcessOwner

from offsite.client.cli import main
from offsite.client.config import CONFIG_NAME, LEGACY_PINS_NAME, ServerEntry, load, save


def _pull(owner: InProcessOwner, out: Path, *extra: str, server: str | None = None) -> int:
    argv = ["pull", "--server", server or owner.address, "--token", owner.token, "--out", str(out), "--json", *extra]
    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code


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
