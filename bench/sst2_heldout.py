"""Tune on held-out training rows, not on dev: train an adapter on an emulator bundle, plug it into the full model.

Trains on rows [0, TRAIN) of client/data/sst2_train.jsonl and scores rows [TRAIN, TRAIN+HELDOUT), in process (no
server), and prints one JSON line per run. Example:

    python bench/sst2_heldout.py --emulator runs/x/owner-store/emulators/<fp>/distill-2-8-2 --train-blocks top
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common.contract import DEFAULT_MODEL
from offsite.common.emulator_loading import load_emulator, plug_into_emulator
from offsite.common.examples import read_jsonl
from offsite.common.model_loading import load_model
from offsite.common.scoring import evaluate
from offsite.owner.adapters.plugin import plug

TRAIN_FILE = Path(__file__).resolve().parents[1] / "client" / "data" / "sst2_train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulator", required=True, help="a pulled or owner-side emulator bundle directory")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--model-cache", help="where converted models are kept (an owner store's models/)")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--lr", type=float)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--train-blocks", default="all", choices=["all", "top", "bottom"])
    args = parser.parse_args()

    rows = read_jsonl(TRAIN_FILE)
    train, heldout = rows[: args.train], rows[args.train : args.train + args.heldout]
    loaded = load_model(args.model, cache_dir=Path(args.model_cache) if args.model_cache else None)
    emulator, tokenizer, manifest = load_emulator(Path(args.emulator))
    config = TrainConfig(method=args.method, learning_rate=args.lr, epochs=args.epochs, train_blocks=args.train_blocks)
    out = Path(tempfile.mkdtemp(prefix="offsite-heldout-"))
    started = time.perf_counter()
    train_adapter(Path(args.emulator), train, config, out)
    seconds = time.perf_counter() - started
    plugged = evaluate(plug(loaded.model, out, args.method), loaded.tokenizer, heldout)
    result = {
        "emulator": manifest["id"],
        "method": args.method,
        "lr": config.lr,
        "epochs": args.epochs,
        "train_blocks": args.train_blocks,
        "train_seconds": round(seconds, 1),
        "full_zero_shot": evaluate(loaded.model, loaded.tokenizer, heldout).accuracy,
        "emulator_zero_shot": evaluate(emulator, tokenizer, heldout).accuracy,
        "emulator_adapter": evaluate(plug_into_emulator(emulator, manifest, out), tokenizer, heldout).accuracy,
        "plug_in": plugged.accuracy,
        "plug_in_loss": plugged.loss,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
