"""The flags of every command that talks to the owner, and the connection they resolve to through the client config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import Given, Target, key_path, open_config, pin_owner_key, resolve
from ..connection import TOKEN_ENVIRONMENT, ClientTls, Remote, read_token_file
from ..pull import OwnerKeyMismatch

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


@contextmanager
def owner_key_explained(where: Target) -> Iterator[None]:
    """A mismatch with a key pinned in the client config says where the pin lives and how to change it."""
    try:
        yield
    except OwnerKeyMismatch as error:
        if not where.pinned_in_file:
            raise
        raise OwnerKeyMismatch(
            f"{error} (pinned as {key_path(where.entry or where.address, 'owner_key')} in {where.config}; if the "
            "owner really changed its key, delete that key there or pass --owner-key)"
        ) from None


def trust_on_first_use(where: Target, presented_key: str) -> None:
    """Pins the key an owner with no pin presented, so that the next command refuses any other."""
    if where.owner_key is not None:
        return
    name = pin_owner_key(where, presented_key)
    print(
        f"trusting owner key {presented_key} on first use (recorded as {key_path(name, 'owner_key')} in "
        f"{where.config})",
        file=sys.stderr,
    )
