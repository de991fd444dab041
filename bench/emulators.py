"""Emulator builders side by side on SmolLM2: size, WikiText-2 test perplexity, SST-2 transfer and the privacy gap.

Every row builds (or reuses) a signed bundle in an owner store, trains the same LoRA on it (rank 8, the top adapter
blocks, 1 epoch, the method's default learning rate) on the same SST-2 training rows, and is scored on the same dev
rows: on the emulator with the adapter (what the data owner gets) and plugged into the full model (what the owner
serves). The privacy gap is plug-in minus emulator + adapter: how much more the full model is worth than what left
the owner. After the builders (CRaSh with and without layer sharing), the best of them by plug-in accuracy that
takes `place=` is run again with importance-aware adapter placement. Reference rows: the full model zero-shot, and
the same LoRA trained on the full model itself (a `uniform` emulator that keeps every block).

    python bench/emulators.py --store runs/bench-emulators/owner-store

writes bench/results/emulators.{json,md,png}. Building the distilled rows takes about 10 minutes each on 2 CPU
cores; bundles already in the store are reused, and so are rows measured under the same configuration
(`<store>/bench-rows/`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common.architectures import blocks
from offsite.common.contract import DEFAULT_MODEL
from offsite.common.emulator_loading import load_emulator, plug_into_emulator
from offsite.common.examples import read_jsonl
from offsite.common.model_loading import fingerprint, load_model
from offsite.common.scoring import evaluate
from offsite.owner.adapters.plugin import plug
from offsite.owner.emulator import BUILDERS, EmulatorSpec, build_emulator
from offsite.owner.emulator.public_text import token_chunks, window_perplexity
from offsite.owner.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_files import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "client" / "data"
WIKITEXT_TEST = ROOT.parent / "shared" / "datasets" / "wikitext2_valid_test" / "test.txt"
RESULTS = ROOT / "bench" / "results" / "emulators"
# (row name, builder options after the layout); CRaSh runs both ways, as its paper's gains come with sharing
BUILDER_ROWS = (
    ("uniform", "uniform", ""),
    ("distill", "distill", ""),
    ("crash", "crash", ""),
    ("crash + layer sharing", "crash", ",share=true"),
    ("lowrank", "lowrank", ""),
)


def bundle_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def effective_parameters(manifest: dict[str, Any]) -> int:
    """The low-rank builder stores its factors dense; count what the rank-r factors would hold."""
    params = manifest["params"]
    if "middle_effective_parameters" not in params:
        return manifest["parameters"]
    return manifest["parameters"] - params["middle_dense_parameters"] + params["middle_effective_parameters"]


def wikitext_perplexity(model: torch.nn.Module, tokenizer: Any, text: str, seq_len: int, windows: int) -> float:
    return window_perplexity(model, token_chunks(tokenizer, text, seq_len, windows))


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.store = Store(Path(args.store))
        self.loaded = load_model(args.model, cache_dir=self.store.models_dir)
        self.fingerprint = fingerprint(self.loaded.model)
        self.train = read_jsonl(Path(args.train_data), limit=args.train)
        self.dev = read_jsonl(Path(args.eval_data), limit=args.eval)
        self.wikitext = Path(args.wikitext).read_text(encoding="utf-8")
        self.config = TrainConfig(train_blocks=args.train_blocks)
        self.scratch = Path(tempfile.mkdtemp(prefix="offsite-bench-"))
        self.reused: list[str] = []

    def bundle(self, spec: EmulatorSpec) -> tuple[Path, dict[str, Any], float]:
        directory = self.store.emulator_dir(self.fingerprint, spec.id)
        started = time.perf_counter()
        if not (directory / "offsite.json").is_file():
            print(f"[bench] building {spec.method}:{spec.layout} ({spec.id}) ...", file=sys.stderr)
            build_emulator(
                self.loaded.model,
                self.loaded.tokenizer,
                spec,
                directory,
                self.store.signing_key(),
                self.fingerprint,
                self.loaded.name,
            )
        _, _, manifest = load_emulator(directory)
        return directory, manifest, time.perf_counter() - started

    def zero_shot_row(self) -> dict[str, Any]:
        full, tokenizer = self.loaded.model, self.loaded.tokenizer
        return {
            "row": "full model, zero-shot",
            "spec": None,
            "parameters": sum(p.numel() for p in full.parameters()),
            "wikitext2_test_perplexity": wikitext_perplexity(
                full, tokenizer, self.wikitext, self.args.seq_len, self.args.windows
            ),
            "plug_in_accuracy": evaluate(full, tokenizer, self.dev).accuracy,
        }

    def row_key(self, name: str, spec: EmulatorSpec) -> str:
        """Everything a row's numbers depend on; a row measured under the same key is reused, not re-run."""
        a = self.args
        facts = [self.fingerprint, name, spec.id, a.train_data, a.train, a.eval_data, a.eval, a.wikitext, a.seq_len]
        facts += [a.windows, self.config.method, self.config.lr, self.config.epochs, self.config.train_blocks]
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]

    def row(self, name: str, spec: EmulatorSpec) -> dict[str, Any]:
        cached = self.store.root / "bench-rows" / f"{self.row_key(name, spec)}.json"
        if cached.is_file():
            print(f"[bench] {name}: reusing the row measured earlier ({cached})", file=sys.stderr)
            self.reused.append(name)
            return json.loads(cached.read_text())
        row = self.measure_row(name, spec)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(row, indent=2) + "\n")
        return row

    def measure_row(self, name: str, spec: EmulatorSpec) -> dict[str, Any]:
        directory, manifest, build_seconds = self.bundle(spec)
        emulator, tokenizer, _ = load_emulator(directory)
        print(f"[bench] {name}: scoring and training on {spec.id} ...", file=sys.stderr)
        perplexity = wikitext_perplexity(emulator, tokenizer, self.wikitext, self.args.seq_len, self.args.windows)
        zero_shot = evaluate(emulator, tokenizer, self.dev).accuracy
        adapter = self.scratch / spec.id
        trained = train_adapter(directory, self.train, self.config, adapter)
        with_adapter = evaluate(plug_into_emulator(emulator, manifest, adapter), tokenizer, self.dev)
        plugged = evaluate(plug(self.loaded.model, adapter, self.config.method), self.loaded.tokenizer, self.dev)
        shutil.rmtree(adapter)
        return {
            "row": name,
            "spec": f"{spec.method}:{spec.layout}" + "".join(f",{k}={v}" for k, v in spec.options),
            "emulator_id": spec.id,
            "block_map": manifest["block_map"],
            "adapter_blocks": manifest["adapter_blocks"]["full"],
            "parameters": manifest["parameters"],
            "effective_parameters": effective_parameters(manifest),
            "bytes": bundle_bytes(directory),
            "report_card": manifest["report_card"],
            "build_or_load_seconds": round(build_seconds, 1),
            "wikitext2_test_perplexity": perplexity,
            "emulator_zero_shot_accuracy": zero_shot,
            "emulator_adapter_accuracy": with_adapter.accuracy,
            "plug_in_accuracy": plugged.accuracy,
            "plug_in_loss": plugged.loss,
            "privacy_gap": plugged.accuracy - with_adapter.accuracy,
            "train_seconds": round(trained.seconds, 1),
            "train_first_loss": trained.first_loss,
            "train_last_loss": trained.last_loss,
        }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    bench = Bench(args)
    layout, depth = args.layout, bench.loaded.model.config.num_hidden_layers
    rows = [bench.zero_shot_row()]
    bottom, _, top = (int(part) for part in layout.split("-"))
    full_layout = f"{bottom}-{depth - bottom - top}-{top}"  # keeps every block: the emulator is the full model
    rows.append(bench.row("full model + LoRA", EmulatorSpec.parse(f"uniform:{full_layout}")))
    for name, method, options in BUILDER_ROWS:
        rows.append(bench.row(name, EmulatorSpec.parse(f"{method}:{layout}{options}")))
    placeable = [r for r in rows[2:] if "place" in BUILDERS[r["spec"].split(":")[0]].OPTIONS]
    best = max(placeable, key=lambda r: r["plug_in_accuracy"])
    overall = max(rows[2:], key=lambda r: r["plug_in_accuracy"])
    rows.append(
        bench.row(f"{best['row']} + {args.place} placement", EmulatorSpec.parse(f"{best['spec']},place={args.place}"))
    )
    return {
        "model": bench.loaded.name,
        "layout": layout,
        "parameters_per_block": sum(p.numel() for p in blocks(bench.loaded.model)[0].parameters()),
        "train_examples": len(bench.train),
        "eval_examples": len(bench.dev),
        "training": {
            "method": bench.config.method,
            "lr": bench.config.lr,
            "epochs": bench.config.epochs,
            "lora_rank": bench.config.lora_rank,
            "train_blocks": bench.config.train_blocks,
        },
        "wikitext2_test": {"seq_len": args.seq_len, "windows": args.windows},
        "importance_on": best["row"],
        "best_builder_by_plug_in": overall["row"],
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "total_seconds": round(time.perf_counter() - started, 1),
        "rows_reused": bench.reused,
        "rows": rows,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _parameters(row: dict[str, Any], per_block: int) -> str:
    effective = row.get("effective_parameters", row["parameters"])
    if effective != row["parameters"]:
        return f"{_fmt(row['parameters'])} (rank-r: {effective:,})"
    repeats = len(row.get("block_map", [])) - len(set(row.get("block_map", [])))
    if repeats:  # layer sharing stores each repeated block again on disk; say what is unique
        return f"{_fmt(row['parameters'])} (unique: {row['parameters'] - repeats * per_block:,})"
    return _fmt(row["parameters"])


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Emulator builders on {result['model']}, layout {result['layout']}",
        "",
        f"SST-2: LoRA r={result['training']['lora_rank']} on the {result['training']['train_blocks']} adapter blocks, "
        f"lr {result['training']['lr']}, {result['training']['epochs']} epoch on {result['train_examples']} training "
        f"rows; accuracy on {result['eval_examples']} dev rows. WikiText-2 test perplexity on "
        f"{result['wikitext2_test']['windows']} windows of {result['wikitext2_test']['seq_len']} tokens. "
        f"Privacy gap = plug-in − emulator + adapter. {result['device']}, {result['total_seconds']:.0f} s in all"
        + (
            f"; rows measured by an earlier run of this configuration: {', '.join(result['rows_reused'])}."
            if result.get("rows_reused")
            else "."
        ),
        "",
        "| row | parameters | bytes | WikiText-2 ppl | emulator zero-shot | emulator + adapter | plug-in "
        "| privacy gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['row']} | {_parameters(row, result['parameters_per_block'])} | {_fmt(row.get('bytes'))} "
            f"| {_fmt(row['wikitext2_test_perplexity'], 1)} | {_fmt(row.get('emulator_zero_shot_accuracy'))} "
            f"| {_fmt(row.get('emulator_adapter_accuracy'))} | {_fmt(row['plug_in_accuracy'])} "
            f"| {_fmt(row.get('privacy_gap'))} |"
        )
    lines += ["", "Adapter blocks and block maps:", ""]
    for row in result["rows"][1:]:
        lines.append(f"- {row['row']} (`{row['spec']}`): adapter {row['adapter_blocks']}, blocks {row['block_map']}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"][1:]
    names = [row["row"] for row in rows]
    positions = range(len(rows))
    figure, (accuracy_axes, perplexity_axes) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.4
    accuracy_axes.bar(
        [p - width / 2 for p in positions],
        [r["emulator_adapter_accuracy"] for r in rows],
        width,
        label="emulator + adapter",
    )
    accuracy_axes.bar(
        [p + width / 2 for p in positions],
        [r["plug_in_accuracy"] for r in rows],
        width,
        label="plug-in (full model + adapter)",
    )
    accuracy_axes.axhline(
        result["rows"][0]["plug_in_accuracy"], color="black", linestyle="--", linewidth=1, label="full model zero-shot"
    )
    accuracy_axes.set_xticks(list(positions), names, rotation=25, ha="right")
    accuracy_axes.set_ylim(0.4, 1.0)
    accuracy_axes.set_ylabel(f"SST-2 dev accuracy ({result['eval_examples']})")
    accuracy_axes.legend(loc="upper left", fontsize=8)
    perplexity_axes.bar(list(positions), [r["wikitext2_test_perplexity"] for r in rows], color="tab:gray")
    perplexity_axes.axhline(
        result["rows"][0]["wikitext2_test_perplexity"], color="black", linestyle="--", linewidth=1, label="full model"
    )
    perplexity_axes.set_yscale("log")
    perplexity_axes.set_xticks(list(positions), names, rotation=25, ha="right")
    perplexity_axes.set_ylabel("WikiText-2 test perplexity (log)")
    perplexity_axes.legend(fontsize=8)
    figure.suptitle(f"Emulators of {result['model']} at {result['layout']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--store", required=True, help="owner store: its key signs the bundles, which it caches")
    parser.add_argument("--layout", default="2-8-2")
    parser.add_argument("--place", default="gradnorm", choices=["gradnorm", "cka"])
    parser.add_argument("--train-data", default=str(SAMPLE_DATA / "sst2_train.jsonl"))
    parser.add_argument("--eval-data", default=str(SAMPLE_DATA / "sst2_dev.jsonl"))
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--eval", type=int, default=872)
    parser.add_argument("--train-blocks", default="top", choices=["all", "top", "bottom"])
    parser.add_argument("--wikitext", default=str(WIKITEXT_TEST))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS), help="results path without extension")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    result = run(args)
    out = Path(args.out)
    write_results(out, result, markdown(result))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
