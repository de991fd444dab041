"""`pull`, `push` and `adapters`: moving bundles and adapters between here and the owner's store."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...common.cli_output import emit
from ..pull import pull_emulator, pull_head
from ..push import push_adapter
from . import Commands, MiB, add_command
from .remote import add_remote_flags, connect, owner_key_explained, target, trust_on_first_use


def cmd_pull(args: argparse.Namespace) -> None:
    where = target(args, args.owner_key)
    with connect(where) as remote, owner_key_explained(where):
        if args.head:
            result = pull_head(remote, Path(args.out), where.owner_key)
        else:
            result = pull_emulator(remote, Path(args.out), args.emulator, where.owner_key)
    trust_on_first_use(where, result["owner_public_key"])
    if args.head:
        emit(
            {"ok": True, **result},
            args.json,
            f"pulled the head artifact into {result['out']}; signature and {len(result['files'])} file hashes verified",
        )
        return
    emit(
        {"ok": True, **result},
        args.json,
        f"pulled {result['emulator']} into {result['out']} ({result['bytes'] / MiB:.1f} MiB); signature and "
        f"{len(result['files'])} file hashes verified against owner key {result['owner_public_key'][:16]}…"
        + (
            f"\nowner's report card: perplexity {card['perplexity']:.2f} vs full {card['full_perplexity']:.2f} "
            f"(×{card['perplexity_ratio']:.2f})"
            if (card := result["report_card"])
            else ""
        ),
    )


def cmd_push(args: argparse.Namespace) -> None:
    with connect(target(args)) as remote:
        response = push_adapter(remote, Path(args.adapter))
    checks = [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in response.checks]
    emit(
        {
            "ok": True,
            "adapter_id": response.adapter_id,
            "method": response.method,
            "bytes": response.bytes,
            "parameters": response.parameters,
            "checks": checks,
            "already_stored": response.already_stored,
        },
        args.json,
        f"adapter {response.adapter_id} stored ({response.method}, {response.bytes / MiB:.2f} MiB); checks: "
        + ", ".join(c["name"] for c in checks),
    )


def cmd_adapters(args: argparse.Namespace) -> None:
    if args.action == "delete" and not args.adapter_id:
        raise ValueError("adapters delete needs an ADAPTER_ID")
    with connect(target(args)) as remote:
        if args.action == "delete":
            remote.delete_adapter(args.adapter_id)
            emit({"ok": True, "deleted": args.adapter_id}, args.json, f"deleted {args.adapter_id}")
            return
        adapters = [
            {
                "adapter_id": a.adapter_id,
                "method": a.method,
                "emulator": a.emulator,
                "bytes": a.bytes,
                "parameters": a.parameters,
                "created": a.created,
            }
            for a in remote.list_adapters().adapters
        ]
    lines = [
        f"{a['adapter_id']}  {a['method']:<5} {a['emulator']:<16} {a['bytes'] / MiB:8.2f} MiB  {a['created']}"
        for a in adapters
    ]
    emit({"ok": True, "adapters": adapters}, args.json, "\n".join(lines) or "no adapters")


def register(commands: Commands) -> None:
    pull = add_command(commands, "pull", "pull and verify an emulator")
    add_remote_flags(pull)
    pull.add_argument("--out", required=True)
    pull.add_argument("--emulator", help="emulator id (default: the first offered)")
    pull.add_argument(
        "--owner-key",
        help="pin the owner's Ed25519 public key (hex); default: $OFFSITE_OWNER_KEY, then the server's owner_key in "
        "the client config, recorded there on first use",
    )
    pull.add_argument("--head", action="store_true", help="pull the LM head + final norm + tokenizer (for PEMA)")
    pull.set_defaults(handler=cmd_pull)

    push = add_command(commands, "push", "push an adapter to the owner")
    add_remote_flags(push)
    push.add_argument("--adapter", required=True)
    push.set_defaults(handler=cmd_push)

    adapters = add_command(commands, "adapters", "list or delete your adapters on the owner")
    add_remote_flags(adapters)
    adapters.add_argument("action", choices=["list", "delete"])
    adapters.add_argument("adapter_id", nargs="?")
    adapters.set_defaults(handler=cmd_adapters)
