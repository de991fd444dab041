"""The client config: named servers, flags over OFFSITE_* over the file, a 0600 atomic file, errors naming the key."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import InProcessOwner

from offsite.client import config as client_config
from offsite.client.cli import main
from offsite.client.config import (
    CONFIG_NAME,
    ClientConfig,
    ClientConfigError,
    Given,
    ServerEntry,
    config_path,
    load,
    resolve,
    save,
)
from offsite.owner.certificates import init_certificates
from offsite.owner.server import ServerTls, start_server

KEY = "0123456789abcdef" * 4


def _run(*argv: str) -> int:
    """`offsite ARGV --json` in-process; its exit code (read the JSON with _json)."""
    code = 0
    try:
        main([*argv, "--json"])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_the_file_is_found_through_its_variable_the_home_variable_then_xdg(tmp_path: Path) -> None:
    assert config_path({"OFFSITE_CLIENT_CONFIG": "/a/b.toml", "OFFSITE_HOME": "/h"}) == Path("/a/b.toml")
    assert config_path({"OFFSITE_HOME": "/h", "XDG_CONFIG_HOME": "/x"}) == Path("/h/client.toml")
    assert config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/offsite/client.toml")
    assert config_path({"OFFSITE_CLIENT_CONFIG": ""}) == Path.home() / ".config/offsite/client.toml"


def test_a_name_resolves_to_its_entry_and_an_address_passes_through(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "conf" / CONFIG_NAME,
        f"""
default = "lab"
[servers.lab]
address = "owner.lab:50051"
tls_ca = "certs/ca.pem"
token_file = "/secrets/token"
owner_key = "{KEY}"
[servers.plain]
address = "10.0.0.5:50051"
insecure = true
""",
    )
    config = load(path)
    lab = resolve(config, Given(), {})
    assert (lab.entry, lab.address, lab.owner_key, lab.pinned_in_file) == ("lab", "owner.lab:50051", KEY, True)
    assert lab.tls_ca == tmp_path / "conf" / "certs" / "ca.pem", "relative paths are taken from the file's directory"
    assert lab.token_file == Path("/secrets/token") and lab.token is None and not lab.insecure
    assert resolve(config, Given(server="plain"), {}).insecure
    raw = resolve(config, Given(server="127.0.0.1:7"), {})
    assert (raw.entry, raw.address, raw.owner_key, raw.tls_ca) == (None, "127.0.0.1:7", None, None)
    with pytest.raises(ClientConfigError, match=r"no server named 'nope' in .*client.toml \(known: lab, plain\)"):
        resolve(config, Given(server="nope"), {})
    with pytest.raises(ClientConfigError, match="no server: pass --server"):
        resolve(ClientConfig(path), Given(), {})


def test_flags_override_variables_which_override_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path / CONFIG_NAME,
        f"""
default = "lab"
[servers.lab]
address = "owner.lab:50051"
tls_ca = "/file/ca.pem"
tls_cert = "/file/c.pem"
tls_key = "/file/c.key"
token_file = "/file/token"
owner_key = "{KEY}"
[servers.other]
address = "other:1"
""",
    )
    config = load(path)
    environ = {
        "OFFSITE_SERVER": "other",
        "OFFSITE_TOKEN": "ofs_env",
        "OFFSITE_CA": "/env/ca.pem",
        "OFFSITE_OWNER_KEY": "ee" * 32,
    }
    from_env = resolve(config, Given(), environ)
    assert from_env.address == "other:1" and from_env.token == "ofs_env" and from_env.token_file is None
    assert from_env.tls_ca == Path("/env/ca.pem") and from_env.owner_key == "ee" * 32 and not from_env.pinned_in_file

    on_lab = resolve(config, Given(server="lab"), environ)
    assert on_lab.tls_ca == Path("/env/ca.pem"), "a variable beats the file"
    assert (on_lab.tls_cert, on_lab.tls_key) == (Path("/file/c.pem"), Path("/file/c.key")), "one setting at a time"
    assert on_lab.token == "ofs_env" and on_lab.token_file is None, "a layer naming a token hides the file's"

    flagged = resolve(
        config, Given(server="lab", token_file="mine", tls_ca="/flag/ca.pem", owner_key="ff" * 32), environ
    )
    assert flagged.token is None and flagged.token_file == Path("mine"), "--token-file beats $OFFSITE_TOKEN"
    assert flagged.tls_ca == Path("/flag/ca.pem") and flagged.owner_key == "ff" * 32

    assert resolve(config, Given(server="lab"), {}).token_file == Path("/file/token")
    insecure = resolve(config, Given(server="lab", insecure=True), {})
    assert insecure.insecure and (insecure.tls_ca, insecure.tls_cert) == (None, None), "--insecure drops the file's TLS"
    assert resolve(config, Given(server="lab"), {"OFFSITE_SERVER": "", "OFFSITE_CA": ""}).tls_ca == Path(
        "/file/ca.pem"
    ), "an empty variable counts as unset"


def test_the_file_is_written_0600_through_a_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "new" / CONFIG_NAME
    save(ClientConfig(path, {"lab": ServerEntry("owner.lab:1", owner_key=KEY)}, "lab"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load(path).servers == {"lab": ServerEntry("owner.lab:1", owner_key=KEY)} and load(path).default == "lab"
    assert path.read_text().startswith("# offsite client config")

    before = path.read_bytes()

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(client_config.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save(ClientConfig(path, {"other": ServerEntry("other:1")}))
    assert path.read_bytes() == before, "a failed write leaves the old file whole"
    assert os.listdir(path.parent) == [CONFIG_NAME], "and no temporary file behind"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[servers.lab\n", r"client.toml is not valid TOML"),
        ('[servers.lab]\naddress = "a:1"\ntls_ca = 3\n', r"client.toml: servers.lab.tls_ca must be a string"),
        ('[servers.lab]\naddress = "a:1"\ninsecure = "yes"\n', r"servers.lab.insecure must be true or false"),
        ('[servers.lab]\naddress = "a:1"\ntls-ca = "x"\n', r"servers.lab.tls-ca: unknown key; the keys are address"),
        ('[servers.lab]\naddress = "a:1"\ntoken = "ofs_x"\n', r"servers.lab.token: keep tokens out of this file"),
        ("[servers.lab]\ntls_ca = 'x'\n", r"servers.lab.address is missing"),
        ('[servers.lab]\naddress = "no host:1"\n', r"servers.lab.address: 'no host:1' is not HOST:PORT"),
        ('[servers.lab]\naddress = "a:1"\nowner_key = "abc"\n', r"servers.lab.owner_key: an owner key is 64"),
        ('[servers.lab]\naddress = "a:1"\ntls_cert = "c"\n', r"servers.lab: tls_cert and tls_key go together"),
        ('[servers."h:1"]\naddress = "h:1"\ntls_ca = 1\n', r'servers."h:1".tls_ca must be a string'),
        ('default = "gone"\n', r"client.toml: default = 'gone' names no \[servers.NAME\]"),
        ('servers = "x"\n', r"client.toml: servers must be a table"),
        ('server = "x"\n', r"client.toml: server: unknown key"),
    ],
)
def test_a_malformed_file_is_an_error_naming_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ClientConfigError, match=message):
        load(_write(tmp_path / CONFIG_NAME, text))


def test_servers_add_list_remove(client_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = _write(tmp_path / "ca.pem", "pem")
    token = _write(tmp_path / "token", "ofs_secret")
    assert _run("servers", "list") == 0
    assert _json(capsys) == {"ok": True, "config": str(client_home / CONFIG_NAME), "default": None, "servers": []}

    assert _run("servers", "add", "lab", "owner.lab:50051", "--ca", str(ca), "--token-file", str(token)) == 0
    added = _json(capsys)
    assert added["server"] == {
        "name": "lab",
        "address": "owner.lab:50051",
        "tls_ca": str(ca),
        "tls_cert": None,
        "tls_key": None,
        "token_file": str(token),
        "owner_key": None,
        "insecure": False,
    }
    assert "ofs_secret" not in (client_home / CONFIG_NAME).read_text(), "the token file is named, never copied"
    assert _run("servers", "add", "lab", "other:1") == 2
    assert "already has a server 'lab'; pass --replace" in _json(capsys)["error"]
    assert _run("servers", "add", "box", "box:1", "--owner-key", KEY, "--default") == 0
    assert _json(capsys)["default"] == "box"
    assert _run("servers", "add", "bad", "bad:1", "--ca", str(tmp_path / "missing.pem")) == 2
    assert "missing.pem: no such file" in _json(capsys)["error"]
    assert _run("servers", "add", "a:b", "x:1") == 2
    assert "server name 'a:b'" in _json(capsys)["error"]

    assert _run("servers", "list") == 0
    listed = _json(capsys)
    assert listed["default"] == "box" and [s["name"] for s in listed["servers"]] == ["lab", "box"]
    assert listed["servers"][1]["owner_key"] == KEY
    main(["servers", "list"])
    human = capsys.readouterr().out
    assert "* box  box:1  TLS (system roots)  owner key 0123456789abcdef…" in human
    assert f"  lab  owner.lab:50051  TLS  token file {token}  owner key not pinned yet" in human

    assert _run("servers", "remove", "box") == 0
    assert _json(capsys) == {"ok": True, "config": str(client_home / CONFIG_NAME), "removed": "box", "default": None}
    assert list(load(client_home / CONFIG_NAME).servers) == ["lab"]
    assert _run("servers", "remove", "box") == 2
    assert "no server named 'box'" in _json(capsys)["error"]


def test_a_named_server_reaches_the_owner_with_its_token_file(
    owner: InProcessOwner, client_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = _write(tmp_path / "token", owner.token + "\n")
    assert _run("servers", "add", "lab", owner.address, "--token-file", str(token), "--default") == 0
    capsys.readouterr()
    assert _run("adapters", "list") == 0, "the default server, with its token file"
    assert _json(capsys) == {"ok": True, "adapters": []}
    assert _run("adapters", "list", "--server", "lab", "--token", "ofs_wrong") == 2, "a flag beats the file"
    assert "UNAUTHENTICATED" in _json(capsys)["error"]


def test_a_default_server_never_switches_eval_to_sending_examples(
    client_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run("servers", "add", "lab", "127.0.0.1:1", "--default") == 0
    data = _write(tmp_path / "dev.jsonl", '{"prompt": "a", "completion": " b"}\n')
    capsys.readouterr()
    assert _run("eval", "--data", str(data)) == 2
    assert "give --server ADDR" in _json(capsys)["error"]


def test_completion_prints_a_script_from_the_parser(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    main(["completion", "bash"])
    script = capsys.readouterr().out
    assert "servers" in script and "--token-file" in script and "complete " in script
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


def test_a_named_mtls_server_takes_its_files_from_the_config(
    owner: InProcessOwner, client_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issued = init_certificates(tmp_path / "certs", "localhost", ["alice"])
    cert, key = issued.clients["alice"]
    server, port = start_server(
        owner.service, owner.store, "localhost:0", tls=ServerTls(issued.server_cert, issued.server_key, issued.ca)
    )
    try:
        flags = ["--ca", str(issued.ca), "--cert", str(cert), "--key", str(key)]
        assert _run("servers", "add", "lab", f"localhost:{port}", *flags) == 0
        capsys.readouterr()
        pulled = _run("pull", "--server", "lab", "--out", str(tmp_path / "emulator"))
        assert pulled == 0, "no token: the certificate names alice"
        assert _json(capsys)["owner_public_key"] == owner.service.public_key
        assert load(client_home / CONFIG_NAME).servers["lab"].owner_key == owner.service.public_key
        assert _run("adapters", "list", "--server", "lab", "--insecure") == 2
        assert "no tenant token" in _json(capsys)["error"], "--insecure drops the file's TLS files, its cert too"
    finally:
        server.stop(None)
