"""Owner key pinning: the first pull records the owner's key; a later pull refuses any other key and says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import InProcessOwner

from offsite.client.cli import main
from offsite.client.trust import KNOWN_OWNERS_FILE


def _pull(owner: InProcessOwner, out: Path, *extra: str) -> int:
    argv = ["pull", "--server", owner.address, "--token", owner.token, "--out", str(out), "--json", *extra]
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
    known = json.loads((client_home / KNOWN_OWNERS_FILE).read_text())
    assert known == {owner.address: owner.service.public_key}
    assert "trusting owner key" in capsys.readouterr().err

    assert _pull(owner, tmp_path / "second") == 0  # same key: accepted silently
    assert "trusting owner key" not in capsys.readouterr().err

    impostor_pin = "ab" * 32
    (client_home / KNOWN_OWNERS_FILE).write_text(json.dumps({owner.address: impostor_pin}))
    code = _pull(owner, tmp_path / "third")
    captured = capsys.readouterr()
    assert code == 2
    assert f"the pinned key is {impostor_pin}" in captured.err and "pinned on first use in" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["ok"] is False
    assert not (tmp_path / "third").exists() or not any((tmp_path / "third").iterdir())

    code = _pull(owner, tmp_path / "fourth", "--owner-key", owner.service.public_key)
    assert code == 0, "an explicit --owner-key overrides the recorded pin"


def test_a_corrupt_pin_file_is_explained(owner: InProcessOwner, client_home: Path, tmp_path: Path, capsys) -> None:
    client_home.mkdir(parents=True)
    (client_home / KNOWN_OWNERS_FILE).write_text("[not json")
    assert _pull(owner, tmp_path / "e") == 2
    assert "cannot read the pinned owner keys" in capsys.readouterr().err
