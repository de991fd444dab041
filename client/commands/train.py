"""`train`: an adapter trained here, on the pulled emulator (LoRA, full blocks) or on a PEMA memory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...common import output_dir
from ...common.cli_output import emit
from ...common.examples import read_jsonl
from ...common.memory import peak_rss_bytes
from ...common.pema.config import HYBRID_KEY_NOISE, SCHEDULES, PemaConfig
from ...common.processes import is_main_process
from ..training import train_adapter
from ..training.config import DEFAULT_LEARNING_RATE, EVERY_BLOCK, TRAIN_BLOCKS, TrainConfig
from ..training.pema import train_pema_bundle
from . import Commands, add_command


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
        gate_width=args.gate_width,
        seed=args.seed,
    )
    out = Path(args.out)
    output_dir.check(out, output_dir.ADAPTER)  # before training
    with output_dir.staged(out, output_dir.ADAPTER) as work:
        result = train_pema_bundle(
            Path(args.memory), Path(args.head), config, work, args.owner_key, key_noise=args.key_noise
        )
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
        lora_dropout=args.lora_dropout,
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
    if not is_main_process():  # under accelerate launch rank 0 alone wrote the adapter; it alone reports
        return
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


def register(commands: Commands) -> None:
    train = add_command(commands, "train", "train an adapter on the emulator, locally")
    train.add_argument("--emulator", help="lora/full: the pulled emulator")
    train.add_argument("--data", help="lora/full: JSONL of {prompt, completion} or {text}")
    train.add_argument("--method", choices=["lora", "full", "pema"], default="lora")
    train.add_argument("--memory", help="pema: a memory from `offsite memory build`")
    train.add_argument("--head", help="pema: a pulled head (`pull --head`) or the emulator")
    train.add_argument("--pema-rank", type=int, default=PemaConfig.rank)
    train.add_argument("--kappa", type=float, default=PemaConfig.kappa, help="pema: weight of reconstruction")
    train.add_argument("--lambda-max", type=float, default=PemaConfig.lambda_max)
    train.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=PemaConfig.schedule,
        help="pema: how λ mixes PEMA with the model at generation: gradual (GU), constant, or the learned gate",
    )
    train.add_argument(
        "--gate-width", type=int, default=PemaConfig.gate_width, help="pema: hidden width of the learned gate (0: none)"
    )
    train.add_argument(
        "--key-noise",
        type=float,
        default=HYBRID_KEY_NOISE,
        help="pema, on a memory built through the owner's bridge with --head the emulator: train on keys plus this "
        "many times the bridge's residual noise (0: off)",
    )
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
    train.add_argument("--lora-dropout", type=float, default=TrainConfig.lora_dropout)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--train-blocks",
        choices=TRAIN_BLOCKS,
        default=TrainConfig.train_blocks,
        help=f"which adapter blocks learn; {EVERY_BLOCK}: every emulator block, served by --delivery proxy only",
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
