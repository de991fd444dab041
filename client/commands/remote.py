"""The flags of every command that talks to the owner, and the connection they resolve to through the client config."""

from __future__ import annotations

import argparse

from ..config import Given, Target, open_config, resolve
from ..connection import TOKEN_ENVIRONMENT, ClientTls, Remote, read_token_file

SERVER_HELP = (
    "a server NAME from the client config (offsite servers list) or the owner's HOST:PORT "
    "(default: $OFFSITE_SERVER, then the config's default)"
)
INSECURE_HELP = "plaintext to a non-loopback owner (default there: TLS with --ca or the system's roots)"
TOKEN_HELP = f"tenant token; other users can read it in `ps`: prefer ${TOKEN_ENVIRONMENT} or --token-file"
TOKEN_FILE_HELP = (
    f"read the tenant token from this file (default: --token, then ${TOKEN_ENVIRONMENT} or $OFFSITE_TOKEN_FILE, then "
    "the server's token_file)"
)


def add_remote_flags(sub: argparse.ArgumentParser, server_help: str = SERVER_HELP) -> None:
    sub.add_argument("--server", help=server_help)
    sub.add_argument("--token", help=TOKEN_HELP)
    sub.add_argument("--token-file", help=TOKEN_FILE_HELP)
    sub.add_argument("--ca", help="TLS: the CA that signed the owner's certificate (from certs init)")
    sub.add_argument("--cert", help="mTLS: this tenant's client certificate (names the tenant)")
    sub.add_argument("--key", help="mTLS: the client certificate's private key")
    sub.add_argument("--insecure", action="store_true", help=INSECURE_HELP)


def target(args: argparse.Namespace, owner_key: str | None = None) -> Target:
    given = Given(
        server=args.server,
        token=args.token,
        token_file=args.token_file,
        tls_ca=args.ca,
        tls_cert=args.cert,
        tls_key=args.key,
        insecure=args.insecure,
        owner_key=owner_key,
    )
    return resolve(open_config(), given)


def connect(where: Target) -> Remote:
    paths = (where.tls_ca, where.tls_cert, where.tls_key)
    tls = ClientTls(*paths) if any(paths) else None
    token = where.token or (read_token_file(where.token_file) if where.token_file else None)
    return Remote(where.address, token, tls=tls, insecure=where.insecure)
