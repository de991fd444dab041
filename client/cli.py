"""`offsite`: the data owner's command line. Each command parses, calls one function, and reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..common.cli_output import emit, fail, quiet_libraries
from ..common.contract import DEFAULT_EMULATOR
from ..common.examples import DataError, read_jsonl
from ..common.manifest import BundleError
from ..common.memory import peak_rss_bytes
from ..common.rpc import pb
from .connection import ClientTls, Remote, RemoteError
from .evaluation import evaluate_local, evaluate_remote
from .pull import OwnerKeyMismatch, pull_emulator
from .push import push_adapter
from .training import train_adapter
from .training.config import TrainConfig
from .trust import KnownOwners

MiB = 1024 * 1024


def _remote(args: argparse.Namespace) -> Remote:
    paths = [Path(p) if p else None for p in (args.ca, args.cert, args.key)]
    tls = ClientTls(*paths) if any(paths) else None
    return Remote(args.server, args.token, tls=tls)


def cmd_pull(args: argparse.Namespace) -> None:
    known = KnownOwners()
    pinned = args.owner_key or known.expected(args.server)
    with _remote(args) as remote:
        try:
            result = pull_emulator(remote, Path(args.out), args.emulator, pinned)
        except OwnerKeyMismatch as error:
            if args.owner_key:
                raise
            raise OwnerKeyMismatch(
                f"{error} (pinned on first use in {known.path}; if the owner really changed its key, remove the "
                f"{args.server} entry there or pass --owner-key)"
            ) from None
    if pinned is None:
        known.remember(args.server, result["owner_public_key"])
        print(
            f"trusting owner key {result['owner_public_key']} on first use (recorded in {known.path})", file=sys.stderr
        )
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


def cmd_train(args: argparse.Namespace) -> None:
    if args.method == "pema":
        raise ValueError("--method pema is not available yet; use lora or full")
    config = TrainConfig(
        method=args.method,
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        limit=args.limit,
        lora_rank=args.lora_rank,
        seed=args.seed,
        train_blocks=args.train_blocks,
    )
    examples = read_jsonl(Path(args.data), args.limit)
    result = train_adapter(Path(args.emulator), examples, config, Path(args.out), args.owner_key)
    out = {"ok": True, **result.as_dict(), "peak_rss_bytes": peak_rss_bytes()}
    emit(
        out,
        args.json,
        f"trained a {result.method} adapter on {result.examples} examples in {result.steps} steps "
        f"({result.seconds:.1f} s): loss {result.first_loss:.4f} → {result.last_loss:.4f}; "
        f"{result.parameters:,} parameters written to {result.adapter_dir}",
    )


def cmd_push(args: argparse.Namespace) -> None:
    with _remote(args) as remote:
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


def _format_report(report: dict[str, Any]) -> str:
    accuracy = report["accuracy"]
    parts = [f"{report['examples']} examples", f"loss {report['loss']:.4f}", f"perplexity {report['perplexity']:.3f}"]
    if report.get("scored_choices"):
        parts.append(f"accuracy {accuracy:.4f} ({report['scored_choices']} with choices)")
    return f"{report['where']}: " + ", ".join(parts) + f" in {report['seconds']:.1f} s"


def cmd_eval(args: argparse.Namespace) -> None:
    examples = read_jsonl(Path(args.data), args.limit)
    if args.server:
        if args.emulator or args.adapter:
            raise ValueError("use --server [--adapter-id] or --emulator [--adapter], not both")
        with _remote(args) as remote:
            report = evaluate_remote(remote, examples, args.adapter_id or "", args.batch_size)
    elif args.emulator:
        if args.adapter_id:
            raise ValueError("--adapter-id needs --server; locally use --adapter DIR")
        report = evaluate_local(
            Path(args.emulator),
            examples,
            Path(args.adapter) if args.adapter else None,
            args.owner_key,
            args.batch_size or 16,
        )
        report["peak_rss_bytes"] = peak_rss_bytes()
    else:
        raise ValueError("give --server ADDR (the owner's full model) or --emulator DIR (local)")
    emit({"ok": True, **report}, args.json, _format_report(report))


def cmd_generate(args: argparse.Namespace) -> None:
    request = pb.GenerateRequest(
        adapter_id=args.adapter_id or "",
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    pieces: list[str] = []
    with _remote(args) as remote:
        for event in remote.generate(request):
            if event.text:
                pieces.append(event.text)
                if not args.json:
                    print(event.text, end="", flush=True)
    if not args.json:
        print()
    text = "".join(pieces)
    if args.json:
        emit({"ok": True, "text": text, "adapter_id": args.adapter_id or ""}, True, text)


def cmd_adapters(args: argparse.Namespace) -> None:
    with _remote(args) as remote:
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


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="offsite", description="Tune a remote model on private data, offsite.")
    commands = root.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, remote: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        if remote:
            sub.add_argument("--server", required=name != "eval", help="the owner's HOST:PORT")
            sub.add_argument("--token", help="tenant token (default: $OFFSITE_TOKEN)")
            sub.add_argument("--ca", help="TLS: the CA that signed the owner's certificate (from certs init)")
            sub.add_argument("--cert", help="mTLS: this tenant's client certificate (names the tenant)")
            sub.add_argument("--key", help="mTLS: the client certificate's private key")
        return sub

    pull = add("pull", "pull and verify an emulator", remote=True)
    pull.add_argument("--out", required=True)
    pull.add_argument("--emulator", help="emulator id (default: the first offered)")
    pull.add_argument(
        "--owner-key", help="pin the owner's Ed25519 public key (hex); default: the key recorded on first use"
    )
    pull.set_defaults(handler=cmd_pull)

    train = add("train", "train an adapter on the emulator, locally")
    train.add_argument("--emulator", required=True)
    train.add_argument("--data", required=True, help="JSONL of {prompt, completion} or {text}")
    train.add_argument("--method", choices=["lora", "full", "pema"], default="lora")
    train.add_argument("--out", required=True)
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--lr", type=float, help="learning rate (default: 5e-4 for lora, 3e-5 for full)")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--max-length", type=int, default=256)
    train.add_argument("--limit", type=int)
    train.add_argument("--lora-rank", type=int, default=8)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--train-blocks", choices=["all", "top", "bottom"], default="all", help="which adapter blocks learn"
    )
    train.add_argument("--owner-key", help="pinned owner key the emulator must be signed by")
    train.set_defaults(handler=cmd_train)

    push = add("push", "push an adapter to the owner", remote=True)
    push.add_argument("--adapter", required=True)
    push.set_defaults(handler=cmd_push)

    evaluate = add("eval", "evaluate on the owner's full model, or locally on the emulator", remote=True)
    evaluate.add_argument("--adapter-id", help="a pushed adapter (with --server)")
    evaluate.add_argument("--emulator", help="evaluate locally on this emulator")
    evaluate.add_argument("--adapter", help="a local adapter directory (with --emulator)")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--batch-size", type=int, default=0)
    evaluate.add_argument("--owner-key")
    evaluate.set_defaults(handler=cmd_eval)

    generate = add("generate", "generate with the owner's model and an adapter", remote=True)
    generate.add_argument("--adapter-id")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(handler=cmd_generate)

    adapters = add("adapters", "list or delete your adapters on the owner", remote=True)
    adapters.add_argument("action", choices=["list", "delete"])
    adapters.add_argument("adapter_id", nargs="?")
    adapters.set_defaults(handler=cmd_adapters)

    demo = add("demo", "the whole workflow on the default model, on loopback")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--train-data", help="JSONL (default: the committed SST-2 sample)")
    demo.add_argument("--eval-data", help="JSONL (default: the committed SST-2 dev sample)")
    demo.add_argument("--train-limit", type=int, default=400)
    demo.add_argument("--eval-limit", type=int, default=200)
    demo.add_argument(
        "--emulator", default=DEFAULT_EMULATOR, help="METHOD:L-N-R[,key=value...], e.g. distill:2-8-2,steps=100"
    )
    demo.add_argument("--method", choices=["lora", "full"], default="lora")
    demo.add_argument("--epochs", type=float, default=1.0)
    demo.add_argument("--lr", type=float)
    demo.add_argument("--train-blocks", choices=["all", "top", "bottom"], default="all")
    demo.add_argument("--workdir", help="keep the store, bundles and results here (default: a temp dir)")
    demo.set_defaults(handler=cmd_demo)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    quiet_libraries()
    if args.command == "adapters" and args.action == "delete" and not args.adapter_id:
        fail("adapters delete needs an ADAPTER_ID", args.json)
    try:
        args.handler(args)
    except (DataError, BundleError, RemoteError, ValueError, OSError) as error:
        fail(str(error), args.json)
    except KeyboardInterrupt:
        fail("interrupted", args.json, code=130)


if __name__ == "__main__":
    main(sys.argv[1:])
