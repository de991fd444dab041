"""`offsite`: the data owner's command line. Each command parses, calls one function, and reports."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..common import output_dir
from ..common.cli_output import emit, fail, quiet_libraries
from ..common.contract import DEFAULT_EMULATOR
from ..common.examples import DataError, read_jsonl
from ..common.manifest import BundleError
from ..common.memory import peak_rss_bytes
from ..common.pema.config import SCHEDULES, PemaConfig
from ..common.pema.representation import CONTEXT_KINDS, TEACHER_FORCING
from ..common.rpc import pb
from .connection import TOKEN_ENVIRONMENT, ClientTls, Remote, RemoteError, read_token_file
from .evaluation import evaluate_local, evaluate_remote
from .memory import build_memory_local, build_memory_remote
from .pema_generation import generate_remote_pema
from .pull import OwnerKeyMismatch, pull_emulator, pull_head
from .push import push_adapter
from .training import train_adapter
from .training.config import DEFAULT_LEARNING_RATE, TRAIN_BLOCKS, TrainConfig
from .training.pema import train_pema_bundle
from .trust import KnownOwners

MiB = 1024 * 1024
INSECURE_HELP = "plaintext to a non-loopback owner (default there: TLS with --ca or the system's roots)"
TOKEN_HELP = f"tenant token; other users can read it in `ps`: prefer ${TOKEN_ENVIRONMENT} or --token-file"
TOKEN_FILE_HELP = f"read the tenant token from this file (default: --token, then ${TOKEN_ENVIRONMENT})"


def _remote(args: argparse.Namespace) -> Remote:
    paths = [Path(p) if p else None for p in (args.ca, args.cert, args.key)]
    tls = ClientTls(*paths) if any(paths) else None
    token = args.token or (read_token_file(Path(args.token_file)) if args.token_file else None)
    return Remote(args.server, token, tls=tls, insecure=args.insecure)


def cmd_pull(args: argparse.Namespace) -> None:
    known = KnownOwners()
    pinned = args.owner_key or known.expected(args.server)
    with _remote(args) as remote:
        try:
            if args.head:
                result = pull_head(remote, Path(args.out), pinned)
            else:
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


def cmd_train_pema(args: argparse.Namespace) -> None:
    if not args.memory or not args.head:
        raise ValueError(
            "--method pema needs --memory DIR (offsite memory build) and --head DIR (a pulled head or emulator)"
        )
    config = PemaConfig(
        rank=args.pema_rank,
        kappa=args.kappa,
        lr=args.lr or PemaConfig.lr,
        max_epochs=int(args.epochs) if args.epochs is not None else PemaConfig.max_epochs,
        lambda_max=args.lambda_max,
        schedule=args.schedule,
        seed=args.seed,
    )
    out = Path(args.out)
    output_dir.check(out, output_dir.ADAPTER)  # before training
    with output_dir.staged(out, output_dir.ADAPTER) as work:
        result = train_pema_bundle(Path(args.memory), Path(args.head), config, work, args.owner_key)
    result["adapter_dir"] = str(out)
    emit(
        {"ok": True, **result, "peak_rss_bytes": peak_rss_bytes()},
        args.json,
        f"trained a PEMA adapter on {result['memory_rows']:,} memory rows in {result['seconds']:.1f} s: validation "
        f"cross-entropy {result['validation_ce']:.4f}; {result['parameters']:,} parameters written to {args.out}",
    )


def cmd_train(args: argparse.Namespace) -> None:
    if args.method == "pema":
        cmd_train_pema(args)
        return
    if not args.emulator or not args.data:
        raise ValueError(f"--method {args.method} needs --emulator DIR and --data FILE")
    config = TrainConfig(
        method=args.method,
        epochs=args.epochs if args.epochs is not None else TrainConfig.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        limit=args.limit,
        lora_rank=args.lora_rank,
        seed=args.seed,
        train_blocks=args.train_blocks,
        dp_epsilon=args.dp_epsilon,
        dp_delta=args.dp_delta,
        dp_max_grad_norm=args.dp_max_grad_norm,
        record_examples=args.record_examples,
    )
    if config.private and config.method != "lora":
        raise ValueError("--dp-epsilon trains with differential privacy for --method lora only")
    output_dir.check(Path(args.out), output_dir.ADAPTER)  # before training, not after
    examples = read_jsonl(Path(args.data), args.limit)
    result = train_adapter(Path(args.emulator), examples, config, Path(args.out), args.owner_key)
    out = {"ok": True, **result.as_dict(), "peak_rss_bytes": peak_rss_bytes()}
    spent = (
        f"; differential privacy: ε = {result.privacy['epsilon']:.3g} spent of {config.dp_epsilon:g}, "
        f"δ = {config.dp_delta:g}, noise multiplier {result.privacy['noise_multiplier']:.3g}"
        if result.privacy
        else ""
    )
    emit(
        out,
        args.json,
        f"trained a {result.method} adapter on {result.examples} examples in {result.steps} steps "
        f"({result.seconds:.1f} s): loss {result.first_loss:.4f} → {result.last_loss:.4f}; "
        f"{result.parameters:,} parameters written to {result.adapter_dir}{spent}",
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
        if not args.yes:
            raise ValueError(
                f"--server sends every prompt, completion and choice of the {len(examples)} examples to the owner, "
                "who could read them. Pass --yes to agree, or evaluate here with --emulator DIR."
            )
        print(f"sending {len(examples)} examples to {args.server}", file=sys.stderr)
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
    else:
        raise ValueError("give --server ADDR (the owner's full model) or --emulator DIR (local)")
    emit({"ok": True, **report}, args.json, _format_report(report))


def _check_generate_method(args: argparse.Namespace, remote: Remote) -> None:
    """`--method` states what the adapter is; a mismatch is refused before any token is generated."""
    if not args.method:
        return
    if args.adapter and args.method != "pema":
        raise ValueError(
            f"--adapter generates here with a PEMA bundle; --method {args.method} runs on the owner: "
            "push the adapter and pass --adapter-id"
        )
    if args.adapter_id:
        stored = {info.adapter_id: info.method for info in remote.list_adapters().adapters}
        if args.adapter_id not in stored:
            raise ValueError(f"no adapter {args.adapter_id} of yours on the owner (offsite adapters list)")
        if stored[args.adapter_id] != args.method:
            raise ValueError(f"adapter {args.adapter_id} is a {stored[args.adapter_id]} adapter, not {args.method}")
    elif not args.adapter:
        raise ValueError(f"--method {args.method} needs --adapter-id ID (on the owner) or --adapter DIR (PEMA, here)")


def _pieces(args: argparse.Namespace, remote: Remote) -> Iterator[str]:
    _check_generate_method(args, remote)
    if args.adapter:  # PEMA here, the owner's model through Represent
        if not args.head:
            raise ValueError("--adapter (a local PEMA bundle) needs --head DIR")
        steps = generate_remote_pema(
            remote, Path(args.adapter), Path(args.head), args.prompt, args.max_new_tokens, args.planned_length
        )
        return (text for _, text in steps)
    request = pb.GenerateRequest(
        adapter_id=args.adapter_id or "",
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        planned_length=args.planned_length or 0,
    )
    return (event.text for event in remote.generate(request) if event.text)


def cmd_generate(args: argparse.Namespace) -> None:
    pieces: list[str] = []
    with _remote(args) as remote:
        for piece in _pieces(args, remote):
            pieces.append(piece)
            if not args.json:
                print(piece, end="", flush=True)
    if not args.json:
        print()
    text = "".join(pieces)
    if args.json:
        emit({"ok": True, "text": text, "adapter_id": args.adapter_id or ""}, True, text)


def cmd_memory_build(args: argparse.Namespace) -> None:
    if bool(args.server) == bool(args.emulator):
        raise ValueError("give --server ADDR (the owner computes f(c)) or --emulator DIR (computed here), one of them")
    examples = read_jsonl(Path(args.data), args.limit)
    out = Path(args.out)
    if args.emulator:
        memory = build_memory_local(
            Path(args.emulator), examples, out, args.dtype, args.max_length, args.owner_key, contexts=args.contexts
        )
        where = f"the emulator {args.emulator}, on this machine; nothing was sent"
    else:
        sent = "prompts and completions" if args.contexts == TEACHER_FORCING else "prompts"
        if not args.yes:
            raise ValueError(
                f"--server sends the token ids of all {len(examples)} examples ({sent}) to the "
                "owner, who could read them. Pass --yes to agree, or use --emulator DIR to keep them here."
            )
        print(f"sending the token ids of {len(examples)} examples to {args.server}", file=sys.stderr)
        with _remote(args) as remote:
            head = Path(args.head) if args.head else out.with_name(out.name + "-head")
            if not args.head:
                pull_head(remote, head, args.owner_key)
            memory = build_memory_remote(
                remote, head, examples, out, args.dtype, args.max_length, args.owner_key, contexts=args.contexts
            )
        where = f"the owner at {args.server} (your token ids were sent)"
    emit(
        {"ok": True, "out": str(out), "rows": len(memory), "hidden_size": memory.hidden_size, **memory.info},
        args.json,
        f"memory of {len(memory):,} (f(c), next token) rows, hidden size {memory.hidden_size}, from {where}: {out}",
    )


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
            sub.add_argument("--token", help=TOKEN_HELP)
            sub.add_argument("--token-file", help=TOKEN_FILE_HELP)
            sub.add_argument("--ca", help="TLS: the CA that signed the owner's certificate (from certs init)")
            sub.add_argument("--cert", help="mTLS: this tenant's client certificate (names the tenant)")
            sub.add_argument("--key", help="mTLS: the client certificate's private key")
            sub.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
        return sub

    pull = add("pull", "pull and verify an emulator", remote=True)
    pull.add_argument("--out", required=True)
    pull.add_argument("--emulator", help="emulator id (default: the first offered)")
    pull.add_argument(
        "--owner-key", help="pin the owner's Ed25519 public key (hex); default: the key recorded on first use"
    )
    pull.set_defaults(handler=cmd_pull)

    pull.add_argument("--head", action="store_true", help="pull the LM head + final norm + tokenizer (for PEMA)")

    memory = commands.add_parser("memory", help="PEMA's external memory").add_subparsers(dest="action", required=True)
    memory_build = memory.add_parser("build", help="(f(c), next token) pairs from the owner or the emulator")
    memory_build.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    memory_build.add_argument("--server", help="the owner computes f(c): your contexts' token ids go to it")
    memory_build.add_argument("--yes", action="store_true", help="with --server: agree to send the token ids")
    memory_build.add_argument("--head", help="with --server: a pulled head (default: pull it into OUT-head)")
    memory_build.add_argument("--emulator", help="the pulled emulator computes f(c) here; nothing leaves (hybrid)")
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
    memory_build.add_argument("--owner-key", help="pinned owner key the bundles must be signed by")
    for flag, text in (
        ("--token", TOKEN_HELP),
        ("--token-file", TOKEN_FILE_HELP),
        ("--ca", "TLS CA"),
        ("--cert", "mTLS cert"),
        ("--key", "mTLS key"),
    ):
        memory_build.add_argument(flag, help=text)
    memory_build.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    memory_build.set_defaults(handler=cmd_memory_build)

    train = add("train", "train an adapter on the emulator, locally")
    train.add_argument("--emulator", help="lora/full: the pulled emulator")
    train.add_argument("--data", help="lora/full: JSONL of {prompt, completion} or {text}")
    train.add_argument("--method", choices=["lora", "full", "pema"], default="lora")
    train.add_argument("--memory", help="pema: a memory from `offsite memory build`")
    train.add_argument("--head", help="pema: a pulled head (`pull --head`) or the emulator")
    train.add_argument("--pema-rank", type=int, default=PemaConfig.rank)
    train.add_argument("--kappa", type=float, default=PemaConfig.kappa, help="pema: weight of reconstruction")
    train.add_argument("--lambda-max", type=float, default=PemaConfig.lambda_max)
    train.add_argument("--schedule", choices=SCHEDULES, default=PemaConfig.schedule, help="pema: λ over the output")
    train.add_argument("--out", required=True)
    train.add_argument(
        "--epochs",
        type=float,
        help=f"default {TrainConfig.epochs:g} (lora/full), at most 20 with early stopping (pema)",
    )
    train.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default: {DEFAULT_LEARNING_RATE['lora']:g} lora, "
        f"{DEFAULT_LEARNING_RATE['full']:g} full, 1e-3 pema)",
    )
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--max-length", type=int, default=256)
    train.add_argument("--limit", type=int)
    train.add_argument("--lora-rank", type=int, default=8)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--train-blocks", choices=TRAIN_BLOCKS, default=TrainConfig.train_blocks, help="which adapter blocks learn"
    )
    train.add_argument(
        "--dp-epsilon",
        type=float,
        help="lora: train with differential privacy (DP-SGD, Opacus) spending at most this ε; the manifest records it",
    )
    train.add_argument(
        "--dp-delta",
        type=float,
        default=TrainConfig.dp_delta,
        help=f"with --dp-epsilon: δ, well below 1/examples (default {TrainConfig.dp_delta:g})",
    )
    train.add_argument(
        "--dp-max-grad-norm",
        type=float,
        default=TrainConfig.dp_max_grad_norm,
        help=f"with --dp-epsilon: each example's gradient is clipped to this L2 norm (default "
        f"{TrainConfig.dp_max_grad_norm:g})",
    )
    train.add_argument(
        "--record-examples",
        action="store_true",
        help="write the training-example count (and steps, --limit) into the manifest the owner receives",
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
    evaluate.add_argument("--yes", action="store_true", help="with --server: agree to send the examples to the owner")
    evaluate.set_defaults(handler=cmd_eval)

    generate = add("generate", "generate with the owner's model and an adapter", remote=True)
    generate.add_argument("--adapter-id")
    generate.add_argument(
        "--method", choices=["lora", "full", "pema"], help="what the adapter is; checked before generating"
    )
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument(
        "--adapter", help="a local PEMA bundle: generate here, asking the owner only for f(x) and P_LM each step"
    )
    generate.add_argument("--head", help="with --adapter: the pulled head")
    generate.add_argument(
        "--planned-length", type=int, help="PEMA: L of Gradual Unrolling (default: --max-new-tokens, never the answer)"
    )
    generate.set_defaults(handler=cmd_generate)

    adapters = add("adapters", "list or delete your adapters on the owner", remote=True)
    adapters.add_argument("action", choices=["list", "delete"])
    adapters.add_argument("adapter_id", nargs="?")
    adapters.set_defaults(handler=cmd_adapters)

    demo = add("demo", "the whole workflow on the default model, on loopback")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--train-data", help="JSONL (default: the committed SST-2 sample)")
    demo.add_argument("--eval-data", help="JSONL (default: the committed SST-2 dev sample)")
    demo.add_argument("--train-limit", type=int, default=1000)
    demo.add_argument("--eval-limit", type=int, default=872, help="dev rows scored (the sample has 872)")
    demo.add_argument(
        "--emulator", default=DEFAULT_EMULATOR, help="METHOD:L-N-R[,key=value...], e.g. distill:2-8-2,tokens=50000"
    )
    demo.add_argument("--method", choices=["lora", "full"], default="lora")
    demo.add_argument("--epochs", type=float, help="default: the training recipe's")
    demo.add_argument("--lr", type=float, help="default: the training recipe's")
    demo.add_argument("--train-blocks", choices=["all", "top", "bottom"], help="default: the training recipe's")
    demo.add_argument(
        "--workdir", default="runs/demo", help="store, bundles and results; kept, so a built emulator is reused"
    )
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
