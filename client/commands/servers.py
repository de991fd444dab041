"""`servers add|list|remove`: the named servers of the client config, with their TLS files, token file and pin."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from ...common.addresses import is_loopback
from ...common.cli_output import emit
from ..config import ServerEntry, add_server, config_path, load, remove_server
from . import Commands, add_command


def _file(flag: str, value: str | None) -> str | None:
    """An absolute path, so the entry means the same file whichever directory a later command runs in."""
    if value is None:
        return None
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise ValueError(f"{flag} {value}: no such file")
    return str(path)


def _transport(entry: ServerEntry) -> str:
    if entry.insecure:
        return "plaintext"
    if entry.tls_cert:
        return "mTLS"
    if entry.tls_ca:
        return "TLS"
    return "loopback" if is_loopback(entry.address) else "TLS (system roots)"


def cmd_servers_add(args: argparse.Namespace) -> None:
    entry = ServerEntry(
        address=args.address,
        tls_ca=_file("--ca", args.ca),
        tls_cert=_file("--cert", args.cert),
        tls_key=_file("--key", args.key),
        token_file=_file("--token-file", args.token_file),
        owner_key=args.owner_key,
        insecure=args.insecure,
    )
    path = config_path()
    config = add_server(path, args.name, entry, args.default, args.replace)
    emit(
        {"ok": True, "config": str(path), "default": config.default, "server": {"name": args.name, **asdict(entry)}},
        args.json,
        f"server {args.name} ({entry.address}, {_transport(entry)}) saved in {path}"
        + (" as the default" if config.default == args.name else ""),
    )


def cmd_servers_list(args: argparse.Namespace) -> None:
    path = config_path()
    config = load(path)
    servers = [{"name": name, **asdict(entry)} for name, entry in config.servers.items()]
    width = max((len(name) for name in config.servers), default=0)
    lines = [
        f"{'*' if name == config.default else ' '} {name:<{width}}  {entry.address}  {_transport(entry)}"
        + (f"  token file {entry.token_file}" if entry.token_file else "")
        + (f"  owner key {entry.owner_key[:16]}…" if entry.owner_key else "  owner key not pinned yet")
        for name, entry in config.servers.items()
    ]
    human = f"servers in {path} (* the default):\n" + "\n".join(lines) if lines else f"no servers in {path}"
    emit({"ok": True, "config": str(path), "default": config.default, "servers": servers}, args.json, human)


def cmd_servers_remove(args: argparse.Namespace) -> None:
    path = config_path()
    config = remove_server(path, args.name)
    emit(
        {"ok": True, "config": str(path), "removed": args.name, "default": config.default},
        args.json,
        f"removed server {args.name} from {path}",
    )


def register(commands: Commands) -> None:
    servers = commands.add_parser("servers", help="the named servers of the client config (and their pinned keys)")
    actions = servers.add_subparsers(dest="action", required=True)
    add = add_command(actions, "add", "remember a server under a name, for --server NAME")
    add.add_argument("name", help="letters, digits, '.', '_' and '-'")
    add.add_argument("address", help="the owner's HOST:PORT")
    add.add_argument("--ca", help="TLS: the CA that signed the owner's certificate")
    add.add_argument("--cert", help="mTLS: this tenant's client certificate")
    add.add_argument("--key", help="mTLS: the client certificate's private key")
    add.add_argument("--token-file", help="the file holding the tenant token (the token itself is never stored)")
    add.add_argument("--owner-key", help="pin the owner's Ed25519 public key (hex); default: pinned on first pull")
    add.add_argument("--insecure", action="store_true", help="plaintext to a non-loopback owner")
    add.add_argument("--default", action="store_true", help="use this server when --server is not given")
    add.add_argument("--replace", action="store_true", help="overwrite a server of the same name")
    add.set_defaults(handler=cmd_servers_add)

    listing = add_command(actions, "list", "the servers, their transport, token file and pinned owner key")
    listing.set_defaults(handler=cmd_servers_list)

    remove = add_command(actions, "remove", "forget a server and its pinned owner key")
    remove.add_argument("name")
    remove.set_defaults(handler=cmd_servers_remove)
