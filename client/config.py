"""The data owner's client config: named servers, each with its address, TLS files, token file and pinned owner key.

    default = "prod"
    [servers.prod]
    address = "owner.example.org:50051"
    tls_ca = "certs/ca.pem"          # tls_cert and tls_key too, for mTLS; relative to this file
    token_file = "~/.offsite/token"  # a path: a token itself is never kept here
    owner_key = "3b6a…"              # the owner's Ed25519 public key (hex), pinned

The file is at $OFFSITE_CLIENT_CONFIG, else $OFFSITE_HOME/client.toml, else $XDG_CONFIG_HOME/offsite/client.toml
(~/.config/offsite/client.toml). It is the one place that records pinned owner keys: the first pull from a server
with no pin records the key it presented, under that server's entry, or under an entry named by the address.

`--server` takes a NAME from the file or a HOST:PORT. Precedence, highest first: flags, OFFSITE_* variables, the
file's entry. The commands rewrite the file whole (0600, atomically), so comments written by hand are not kept.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from .connection import TOKEN_ENVIRONMENT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

CONFIG_ENVIRONMENT = "OFFSITE_CLIENT_CONFIG"
HOME_ENVIRONMENT = "OFFSITE_HOME"  # a directory for all client state; tests and the demo point it at a scratch one
CONFIG_NAME = "client.toml"
LEGACY_PINS_NAME = "known_owners.json"  # where pins lived before this file; imported once, then removed
# Named after the client's flags, not the file keys: the daemon's OFFSITE_TLS_CERT/KEY name its own server cert
ENVIRONMENT = {
    "server": "OFFSITE_SERVER",
    "token": TOKEN_ENVIRONMENT,
    "token_file": "OFFSITE_TOKEN_FILE",
    "tls_ca": "OFFSITE_CA",
    "tls_cert": "OFFSITE_CERT",
    "tls_key": "OFFSITE_KEY",
    "owner_key": "OFFSITE_OWNER_KEY",
}
TLS_KEYS = ("tls_ca", "tls_cert", "tls_key")
SERVER_KEYS = {"address": str, **dict.fromkeys((*TLS_KEYS, "token_file", "owner_key"), str), "insecure": bool}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # no colon, so a name never reads as HOST:PORT
OWNER_KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
HEADER = "# offsite client config, rewritten by `offsite servers` and by a first pull (see the README)\n"


class ClientConfigError(ValueError):
    """The client config cannot be used; the message names the file and the key at fault."""


@dataclass(frozen=True)
class ServerEntry:
    address: str
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token_file: str | None = None
    owner_key: str | None = None
    insecure: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The keys that are set, as the file writes them."""
        return {k: v for k, v in asdict(self).items() if v not in (None, False)}


@dataclass
class ClientConfig:
    path: Path
    servers: dict[str, ServerEntry] = field(default_factory=dict)
    default: str | None = None


@dataclass(frozen=True)
class Given:
    """What the command line says about the connection; None where a flag was not given."""

    server: str | None = None
    token: str | None = None
    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False
    owner_key: str | None = None


@dataclass(frozen=True)
class Target:
    """One owner to reach and how, after flags over OFFSITE_* variables over the file."""

    config: Path  # the client config file it was resolved against
    server: str  # as the user named it, for messages
    entry: str | None  # the [servers.NAME] it resolved through, if any
    address: str
    token: str | None
    token_file: Path | None
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None
    insecure: bool
    owner_key: str | None
    pinned_in_file: bool  # the owner key came from the file, not from a flag or variable


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get(CONFIG_ENVIRONMENT):
        return Path(environ[CONFIG_ENVIRONMENT]).expanduser()
    if environ.get(HOME_ENVIRONMENT):
        return Path(environ[HOME_ENVIRONMENT]).expanduser() / CONFIG_NAME
    base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "offsite" / CONFIG_NAME


def key_path(name: str, key: str = "") -> str:
    """How the file spells servers.NAME[.KEY], for messages: a name with a colon (an address) is quoted."""
    table = f"servers.{name}" if NAME_PATTERN.fullmatch(name) else f'servers."{name}"'
    return f"{table}.{key}" if key else table


def check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ClientConfigError(f"server name {name!r}: use letters, digits, '.', '_' and '-', starting alphanumeric")


def check_entry(entry: ServerEntry, name: str, where: str = "") -> None:
    """The checks one entry passes whether read from the file or given to `servers add`; WHERE prefixes messages."""
    if not entry.address or any(c.isspace() for c in entry.address):
        raise ClientConfigError(f"{where}{key_path(name, 'address')}: {entry.address!r} is not HOST:PORT")
    if entry.owner_key is not None and not OWNER_KEY_PATTERN.fullmatch(entry.owner_key):
        raise ClientConfigError(
            f"{where}{key_path(name, 'owner_key')}: an owner key is 64 lowercase hex digits (an Ed25519 public key)"
        )
    if (entry.tls_cert is None) != (entry.tls_key is None):
        raise ClientConfigError(f"{where}{key_path(name)}: tls_cert and tls_key go together (a client certificate)")
    if entry.insecure and (entry.tls_ca or entry.tls_cert):
        raise ClientConfigError(f"{where}{key_path(name)}: insecure turns TLS off; it cannot go with tls_ca, tls_cert")


def _entry(path: Path, name: str, raw: Any) -> ServerEntry:
    if not isinstance(raw, dict):
        raise ClientConfigError(f"{path}: {key_path(name)} must be a table of keys")
    if "token" in raw:
        raise ClientConfigError(f"{path}: {key_path(name, 'token')}: keep tokens out of this file; name a token_file")
    for key, value in raw.items():
        if key not in SERVER_KEYS:
            raise ClientConfigError(
                f"{path}: {key_path(name, key)}: unknown key; the keys are {', '.join(SERVER_KEYS)}"
            )
        if not isinstance(value, SERVER_KEYS[key]):
            kind = "true or false" if SERVER_KEYS[key] is bool else "a string"
            raise ClientConfigError(f"{path}: {key_path(name, key)} must be {kind}")
    if "address" not in raw:
        raise ClientConfigError(f"{path}: {key_path(name, 'address')} is missing")
    entry = ServerEntry(**raw)
    check_entry(entry, name, f"{path}: ")
    return entry


def load(path: Path) -> ClientConfig:
    """The file's servers and default, checked; a missing file is an empty config."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ClientConfig(path)
    except OSError as error:
        raise ClientConfigError(f"cannot read the client config {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ClientConfigError(f"{path} is not valid TOML: {error}") from None
    for key in raw:
        if key not in ("default", "servers"):
            raise ClientConfigError(f"{path}: {key}: unknown key; the top-level keys are default and servers")
    servers = raw.get("servers", {})
    if not isinstance(servers, dict):
        raise ClientConfigError(f"{path}: servers must be a table of [servers.NAME] tables")
    config = ClientConfig(path, {name: _entry(path, name, entry) for name, entry in servers.items()})
    default = raw.get("default")
    if default is not None and (not isinstance(default, str) or default not in config.servers):
        raise ClientConfigError(f"{path}: default = {default!r} names no [servers.NAME] in the file")
    config.default = default
    return config


def save(config: ClientConfig) -> None:
    """Writes the whole file, 0600, through a temporary file renamed over it, so a reader never sees half of it."""
    document: dict[str, Any] = {"default": config.default} if config.default else {}
    document["servers"] = {name: entry.as_dict() for name, entry in config.servers.items()}
    text = HEADER + tomli_w.dumps(document)
    config.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=config.path.parent, prefix=f".{config.path.name}.")  # mode 0600
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, config.path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _import_legacy_pins(config: ClientConfig, legacy: Path) -> None:
    """Moves the pins of `known_owners.json` ({server: key}) into entries named by their server, then deletes it."""
    try:
        pins = json.loads(legacy.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ClientConfigError(f"cannot read the pinned owner keys in {legacy}: {error}") from None
    if not isinstance(pins, dict) or not all(isinstance(v, str) for v in pins.values()):
        raise ClientConfigError(f"{legacy} is not a JSON object of server -> owner key")
    for server, key in pins.items():
        entry = config.servers.get(server, ServerEntry(server))
        config.servers[server] = entry if entry.owner_key else replace(entry, owner_key=key)
    save(config)
    legacy.unlink()


def open_config(environ: Mapping[str, str] = os.environ) -> ClientConfig:
    config = load(config_path(environ))
    legacy = config.path.parent / LEGACY_PINS_NAME  # only beside this file: never another config's pins
    if legacy.is_file():
        _import_legacy_pins(config, legacy)
    return config


def _file_path(config: ClientConfig, value: str | None) -> Path | None:
    """A path from the file: `~` expanded, relative ones taken from the file's directory."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else config.path.parent / path


def resolve(config: ClientConfig, given: Given, environ: Mapping[str, str] = os.environ) -> Target:
    """The server named by --server, else $OFFSITE_SERVER, else the file's default; each setting from the flag, else
    its variable, else the entry. An empty variable counts as unset."""
    env = {key: environ.get(variable) or None for key, variable in ENVIRONMENT.items()}
    server = given.server or env["server"] or config.default
    if server is None:
        raise ClientConfigError(
            f"no server: pass --server NAME or HOST:PORT, set {ENVIRONMENT['server']}, or set default in "
            f"{config.path} (offsite servers add NAME ADDRESS --default)"
        )
    entry = config.servers.get(server)
    if entry is None and ":" not in server:
        known = ", ".join(config.servers) or "none"
        raise ClientConfigError(
            f"no server named {server!r} in {config.path} (known: {known}); an address is HOST:PORT"
        )
    entry = entry or ServerEntry(server)

    # within a layer a token beats a token file; a layer that names either hides the layers below
    layers = [(given.token, given.token_file), (env["token"], env["token_file"])]
    token, token_file = next(((t, Path(f) if f else None) for t, f in layers if t or f), (None, None))
    if not token and not token_file:
        token_file = _file_path(config, entry.token_file)
    flagged = {key: getattr(given, key) or env[key] for key in TLS_KEYS}
    # --insecure overrides the file's TLS files; a TLS flag or variable overrides the file's `insecure`
    from_file = {} if given.insecure else {key: _file_path(config, getattr(entry, key)) for key in TLS_KEYS}
    tls = {key: Path(flagged[key]) if flagged[key] else from_file.get(key) for key in TLS_KEYS}
    owner_key = given.owner_key or env["owner_key"]
    return Target(
        config=config.path,
        server=server,
        entry=server if server in config.servers else None,
        address=entry.address,
        token=token,
        token_file=token_file,
        tls_ca=tls["tls_ca"],
        tls_cert=tls["tls_cert"],
        tls_key=tls["tls_key"],
        insecure=given.insecure or (entry.insecure and not any(flagged.values())),
        owner_key=owner_key or entry.owner_key,
        pinned_in_file=owner_key is None and entry.owner_key is not None,
    )


def pin_owner_key(target: Target, key: str) -> str:
    """Records KEY for the target's entry (or a new entry named by its address); returns the entry's name."""
    config = load(target.config)  # afresh: another command may have written the file since
    name = target.entry or target.address
    entry = config.servers.get(name, ServerEntry(target.address))
    config.servers[name] = replace(entry, owner_key=key)
    save(config)
    return name


def add_server(path: Path, name: str, entry: ServerEntry, make_default: bool, overwrite: bool) -> ClientConfig:
    check_name(name)
    check_entry(entry, name)
    config = load(path)
    if name in config.servers and not overwrite:
        raise ClientConfigError(f"{path} already has a server {name!r}; pass --replace to overwrite it")
    config.servers[name] = entry
    if make_default:
        config.default = name
    save(config)
    return config


def remove_server(path: Path, name: str) -> ClientConfig:
    config = load(path)
    if name not in config.servers:
        raise ClientConfigError(f"no server named {name!r} in {path}")
    del config.servers[name]
    if config.default == name:
        config.default = None
    save(config)
    return config
