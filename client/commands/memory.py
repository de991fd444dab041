"""`memory build`: PEMA's external memory of (f(c), next token) rows, from the owner or from the emulator here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...common.cli_output import emit
from ...common.examples import read_jsonl
from ...common.pema.representation import CONTEXT_KINDS, TEACHER_FORCING
from ..memory import build_memory_local, build_memory_remote
from ..pull import pull_head
from . import Commands, add_command
from .remote import add_remote_flags, connect, owner_key_explained, target, trust_on_first_use


def cmd_memory_build(args: argparse.Namespace) -> None:
    if bool(args.server) == bool(args.emulator):  # an explicit --server only: a default never sends token ids
        raise ValueError("give --server ADDR (the owner computes f(c)) or --emulator DIR (computed here), one of them")
    examples = read_jsonl(Path(args.data), args.limit)
    out = Path(args.out)
    if args.emulator:
        memory = build_memory_local(
            Path(args.emulator),
            examples,
            out,
            args.dtype,
            args.max_length,
            args.owner_key,
            contexts=args.contexts,
            bridge=args.bridge,
        )
        bridged = ", through the owner's bridge" if memory.info["bridge"] else ""
        where = f"the emulator {args.emulator}{bridged}, on this machine; nothing was sent"
    else:
        sent = "prompts and completions" if args.contexts == TEACHER_FORCING else "prompts"
        if not args.yes:
            raise ValueError(
                f"--server sends the token ids of all {len(examples)} examples ({sent}) to the "
                "owner, who could read them. Pass --yes to agree, or use --emulator DIR to keep them here."
            )
        print(f"sending the token ids of {len(examples)} examples to {args.server}", file=sys.stderr)
        owner = target(args, args.owner_key)
        with connect(owner) as remote, owner_key_explained(owner):
            head = Path(args.head) if args.head else out.with_name(out.name + "-head")
            if not args.head:
                pull_head(remote, head, owner.owner_key)
            memory = build_memory_remote(
                remote, head, examples, out, args.dtype, args.max_length, owner.owner_key, contexts=args.contexts
            )
        trust_on_first_use(owner, memory.info["owner_public_key"])
        where = f"the owner at {args.server} (your token ids were sent)"
    emit(
        {"ok": True, "out": str(out), "rows": len(memory), "hidden_size": memory.hidden_size, **memory.info},
        args.json,
        f"memory of {len(memory):,} (f(c), next token) rows, hidden size {memory.hidden_size}, from {where}: {out}",
    )


def register(commands: Commands) -> None:
    memory = commands.add_parser("memory", help="PEMA's external memory").add_subparsers(dest="action", required=True)
    memory_build = add_command(memory, "build", "(f(c), next token) pairs from the owner or the emulator")
    add_remote_flags(
        memory_build, "the owner computes f(c): your contexts' token ids go to it (a server NAME or HOST:PORT)"
    )
    memory_build.add_argument("--yes", action="store_true", help="with --server: agree to send the token ids")
    memory_build.add_argument("--head", help="with --server: a pulled head (default: pull it into OUT-head)")
    memory_build.add_argument("--emulator", help="the pulled emulator computes f(c) here; nothing leaves (hybrid)")
    memory_build.add_argument(
        "--no-bridge",
        dest="bridge",
        action="store_false",
        help="with --emulator: keep the emulator's own states even where the bundle ships the owner's bridge to the "
        "full model's (memory.json records whether it was applied)",
    )
    memory_build.add_argument("--data", required=True, help="JSONL of {prompt, completion}")
    memory_build.add_argument("--out", required=True)
    memory_build.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="of the keys")
    memory_build.add_argument(
        "--contexts",
        choices=CONTEXT_KINDS,
        default=TEACHER_FORCING,
        help="prompt + gold prefixes, or prompt + the model's own greedy tokens (PEMA's option; slower)",
    )
    memory_build.add_argument("--limit", type=int)
    memory_build.add_argument("--max-length", type=int, default=256)
    memory_build.add_argument(
        "--owner-key", help="pinned owner key the bundles must be signed by (with --server: default the server's pin)"
    )
    memory_build.set_defaults(handler=cmd_memory_build)
