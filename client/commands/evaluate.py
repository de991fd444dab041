"""`eval` and `generate`: scoring and generating, on the owner's full model or on the emulator here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...common.cli_output import emit
from ...common.contract import DELIVERIES, MAX_STOP_STRINGS, PLUG_IN, PROXY
from ...common.examples import read_jsonl
from ...common.generation.sampling import SamplingConfig
from ...common.rpc import pb
from ..connection import Remote
from ..evaluation import evaluate_local, evaluate_remote
from ..pema_generation import generate_remote_pema
from . import Commands, add_command
from .remote import add_remote_flags, connect, target


def _format_report(report: dict[str, Any]) -> str:
    accuracy = report["accuracy"]
    parts = [f"{report['examples']} examples", f"loss {report['loss']:.4f}", f"perplexity {report['perplexity']:.3f}"]
    if report.get("scored_choices"):
        parts.append(f"accuracy {accuracy:.4f} ({report['scored_choices']} with choices)")
    where = f"{report['where']} ({report['delivery']})" if report.get("delivery") else report["where"]
    return f"{where}: " + ", ".join(parts) + f" in {report['seconds']:.1f} s"


def cmd_eval(args: argparse.Namespace) -> None:
    examples = read_jsonl(Path(args.data), args.limit)
    if args.server:  # only an explicit --server: a configured default never sends examples on its own
        if args.emulator or args.adapter:
            raise ValueError("use --server [--adapter-id] or --emulator [--adapter], not both")
        if not args.yes:
            raise ValueError(
                f"--server sends every prompt, completion and choice of the {len(examples)} examples to the owner, "
                "who could read them. Pass --yes to agree, or evaluate here with --emulator DIR."
            )
        print(f"sending {len(examples)} examples to {args.server}", file=sys.stderr)
        with connect(target(args)) as remote:
            report = evaluate_remote(remote, examples, args.adapter_id or "", args.batch_size, delivery=args.delivery)
    elif args.emulator:
        if args.adapter_id:
            raise ValueError("--adapter-id needs --server; locally use --adapter DIR")
        if args.delivery != PLUG_IN:
            raise ValueError(f"--delivery {args.delivery} runs on the owner: give --server and --adapter-id")
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


def _pieces(args: argparse.Namespace, remote: Remote) -> Iterator[tuple[str, str]]:
    """(new text, finish reason: '' until the last) as the tokens come."""
    _check_generate_method(args, remote)
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    sampling.check()  # before any token id reaches the owner
    if args.emulator and not args.adapter:
        raise ValueError("--emulator is read by a local hybrid PEMA adapter: give --adapter DIR too")
    if args.adapter:  # PEMA here, the owner's model through Represent
        if args.delivery != PLUG_IN:
            raise ValueError(f"--delivery {args.delivery} runs a pushed LoRA adapter on the owner: give --adapter-id")
        if not args.head:
            raise ValueError("--adapter (a local PEMA bundle) needs --head DIR")
        reader = Path(args.emulator) if args.emulator else None
        steps = generate_remote_pema(
            remote, Path(args.adapter), Path(args.head), args.prompt, sampling, args.planned_length, emulator_dir=reader
        )
        return ((piece.text, piece.finish or "") for piece in steps)
    request = pb.GenerateRequest(
        adapter_id=args.adapter_id or "",
        prompt=args.prompt,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=list(sampling.stop),
        planned_length=args.planned_length or 0,
        delivery=args.delivery,
    )
    return ((event.text, event.finish_reason) for event in remote.generate(request))


def cmd_generate(args: argparse.Namespace) -> None:
    pieces: list[str] = []
    finish = ""
    if args.adapter_id and not args.json:
        print(f"adapter {args.adapter_id}, delivery {args.delivery}", file=sys.stderr)
    with connect(target(args)) as remote:
        for piece, reason in _pieces(args, remote):
            pieces.append(piece)
            finish = reason or finish
            if not args.json:
                print(piece, end="", flush=True)
    if not args.json:
        print()
    text = "".join(pieces)
    if args.json:
        result = {"adapter_id": args.adapter_id or "", "delivery": args.delivery, "finish_reason": finish}
        emit({"ok": True, "text": text, **result}, True, text)


def add_delivery_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--delivery",
        choices=DELIVERIES,
        default=PLUG_IN,
        help=f"how the owner serves --adapter-id: {PLUG_IN} into the full model, or {PROXY}: the full model steered "
        "by the adapter on its emulator (LoRA only; about 1.5-2x the compute)",
    )


def register(commands: Commands) -> None:
    evaluate = add_command(commands, "eval", "evaluate on the owner's full model, or locally on the emulator")
    add_remote_flags(evaluate, "evaluate on this owner: a server NAME from the client config or HOST:PORT")
    evaluate.add_argument("--adapter-id", help="a pushed adapter (with --server)")
    evaluate.add_argument("--emulator", help="evaluate locally on this emulator")
    evaluate.add_argument("--adapter", help="a local adapter directory (with --emulator)")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--batch-size", type=int, default=0)
    add_delivery_flag(evaluate)
    evaluate.add_argument("--owner-key")
    evaluate.add_argument("--yes", action="store_true", help="with --server: agree to send the examples to the owner")
    evaluate.set_defaults(handler=cmd_eval)

    generate = add_command(commands, "generate", "generate with the owner's model and an adapter")
    add_remote_flags(generate)
    generate.add_argument("--adapter-id")
    generate.add_argument(
        "--method", choices=["lora", "full", "pema"], help="what the adapter is; checked before generating"
    )
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument(
        "--top-p", type=float, default=1.0, help="with --temperature: sample from the smallest set holding this mass"
    )
    generate.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help=f"end before this text (repeatable, up to {MAX_STOP_STRINGS}); the output excludes it",
    )
    generate.add_argument("--seed", type=int, default=0)
    add_delivery_flag(generate)
    generate.add_argument(
        "--adapter", help="a local PEMA bundle: generate here, asking the owner only for f(x) and P_LM each step"
    )
    generate.add_argument("--head", help="with --adapter: the pulled head")
    generate.add_argument(
        "--emulator",
        help="with --adapter (hybrid PEMA): read the states of this pulled emulator, the one its memory was built "
        "with, here; the owner still gives P_LM",
    )
    generate.add_argument(
        "--planned-length",
        type=int,
        help="PEMA: L of Gradual Unrolling (default: the adapter's prediction from the prompt, else --max-new-tokens; "
        "never the answer)",
    )
    generate.set_defaults(handler=cmd_generate)
