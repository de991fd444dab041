"""Deliver the offsite adapter by proxy-tuning instead of plugging it in: does the full model gain more?

Plugged into the full model, the adapter's top blocks read the full model's middle, not the emulator's they learned
on, and much of what they learned does not carry over (TREC held-out: 63.0 on the emulator, 45.5 plugged in). With
proxy-tuning (common/proxy_tuning.py, arXiv 2401.08565) the adapter stays on the emulator and the owner steers the
full model's logits by the difference it makes there: z_full + α·(z_emulator+adapter − z_emulator), α = 1 (the
paper's). The same adapter is scored three ways on the same rows, with paired comparisons; the held-out training
rows (never test rows) by default, so that the delivery can be chosen here.

    python bench/transfer_proxy.py --tasks sst2,trec --seeds 0
    python bench/transfer_proxy.py --smoke        # a tiny model, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402
from results_files import write_results  # noqa: E402
from threads import one_thread_if  # noqa: E402

from offsite.client.training import train_adapter  # noqa: E402
from offsite.client.training.config import EVERY_BLOCK, TRAIN_BLOCKS  # noqa: E402
from offsite.common import confidence as stats  # noqa: E402
from offsite.common.emulator_loading import load_emulator, plug_into_emulator  # noqa: E402
from offsite.common.proxy_tuning import PROXY_ALPHA, ProxyTuned  # noqa: E402
from offsite.owner.adapters.plugin import plug  # noqa: E402

OUT = transfer.ROOT / "bench" / "results" / "transfer_proxy"
ROWS = ("zero_shot", "emulator_adapter", "plug_in", "proxy")


def adapter_dir(bench: transfer.TransferBench, task: str, spec: str, seed: int) -> Path:
    _, manifest = bench.emulator(spec)
    recipe = hashlib.sha256(json.dumps(transfer.asdict(bench.recipe), sort_keys=True).encode()).hexdigest()[:12]
    # beside the bench's owner store, and kept: the rows of a cell share one training
    return Path(bench.args.store).parent / "proxy-adapters" / f"{task}-{manifest['id']}-s{seed}-{recipe}"


def cell(bench: transfer.TransferBench, task: str, spec: str, seed: int, split: str) -> dict[str, Any]:
    data = bench.task(task)
    items = data.heldout if split == "heldout" else bench.test_items(data)
    facts = bench.probe_facts(data, f"proxy_{split}", spec, seed, len(items), alpha=PROXY_ALPHA)
    found = bench.cells.get(facts)
    if found is not None:
        return found
    directory, manifest = bench.emulator(spec)
    fmt = facts["format"]
    adapter = adapter_dir(bench, task, spec, seed)
    if not (adapter / "offsite.json").is_file():
        transfer.say(f"{task}: adapter on {spec}, seed {seed}")
        train = bench.examples(data.train[: bench.recipe.train_rows], fmt)
        train_adapter(directory, train, bench.recipe.train_config(seed), adapter, show_progress=bench.args.progress)
    emulator, _, _ = load_emulator(directory)
    tuned = plug_into_emulator(copy.deepcopy(emulator), manifest, adapter)  # the untuned one stays the anti-expert
    full = bench.loaded.model
    models = {"zero_shot": full, "emulator_adapter": tuned, "proxy": ProxyTuned(full, tuned, emulator)}
    if bench.recipe.train_blocks != EVERY_BLOCK:  # an adapter on every emulator block fits the emulator only
        models["plug_in"] = plug(full, adapter, "lora")
    result: dict[str, Any] = {"metric": data.metric}
    if split == "test":  # the bench's zero-shot cell scored these rows in this format already
        del models["zero_shot"]
        scored = bench.zero_shot(data)
        result["zero_shot"], result["zero_shot_bits"] = scored[data.metric], scored[f"{data.metric}_bits"]
    for row, model in models.items():
        transfer.say(f"{task} seed {seed}: scoring {row} on {len(items)} {split} rows")
        scored = bench.score(model, data, items, fmt)
        result[row] = scored[data.metric]
        result[f"{row}_bits"] = scored[f"{data.metric}_bits"]
    return bench.cells.put(facts, result)


def row_bits(cells: list[dict[str, Any]], row: str) -> np.ndarray:
    """Per-example outcomes [seed][example] of one row of these cells (one cell per seed)."""
    return np.array([[float(b) for b in c[f"{row}_bits"]] for c in cells])


def report(found: dict[tuple[str, str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per task, split and adapter blocks: each row's accuracy with its CI, and proxy against the others, paired."""
    out = []
    for (task, split, blocks), cells in found.items():
        record: dict[str, Any] = {"task": task, "split": split, "train_blocks": blocks}
        record["seeds"] = [c["seed"] for c in cells]
        record["n"] = len(cells[0]["proxy_bits"])
        for row in (r for r in ROWS if f"{r}_bits" in cells[0]):
            record[row] = stats.estimate(row_bits(cells, row)).as_dict()
            if row != "proxy":
                compared = stats.compare(row_bits(cells, "proxy"), row_bits(cells, row), same_seeds=True)
                record[f"proxy_minus_{row}"] = compared.as_dict()
        out.append(record)
    return out


def _points(estimate: dict[str, float] | None) -> str:
    if estimate is None:
        return "—"
    return f"{estimate['mean'] * 100:.1f} [{estimate['ci_low'] * 100:.1f}, {estimate['ci_high'] * 100:.1f}]"


def _difference(compared: dict[str, Any] | None) -> str:
    if compared is None:
        return "—"
    low, high, mean = (compared[f"difference_{k}"] * 100 for k in ("ci_low", "ci_high", "mean"))
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] (p {compared['p_value']:.3f})"


HEADER = (
    "| task | split | adapter blocks | n | seeds | zero-shot | emulator + adapter | plug-in | proxy "
    "| proxy − plug-in | proxy − emu+adapter | proxy − zero-shot |"
)


def markdown(records: list[dict[str, Any]], spec: str) -> str:
    lines = [
        "# Proxy-tuning against plugging in: the same offsite adapter delivered two ways",
        "",
        f"Emulator `{spec}`. One adapter per task and seed (the transfer recipe, trained on the emulator), scored",
        "on the emulator, plugged into the full model, and as proxy-tuning of the full model: z_full +",
        f"α·(z_emulator+adapter − z_emulator), α = {PROXY_ALPHA:g}. Adapter blocks `top`: the recipe's, LoRA on the",
        f"emulator's top adapter blocks; `{EVERY_BLOCK}`: LoRA on every emulator block, its compressed middle too, an",
        "adapter that fits the emulator only (no plug-in row). Accuracy in points (acc_norm for multi-token tasks),",
        "mean [95% bootstrap CI]; differences paired on the same rows. `heldout`: held-out training rows (never test",
        "rows). Made by `python bench/transfer_proxy.py [--train-blocks every]`.",
        "",
        HEADER,
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['task']} | {r['split']} | {r['train_blocks']} | {r['n']} | {','.join(map(str, r['seeds']))} | "
            + " | ".join(_points(r.get(row)) for row in ROWS)
            + " | "
            + " | ".join(_difference(r.get(f"proxy_minus_{o}")) for o in ("plug_in", "emulator_adapter", "zero_shot"))
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulator", default=transfer.DEFAULT_EMULATOR)
    parser.add_argument("--tasks", default="sst2,trec")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--split", default="heldout", choices=["heldout", "test"])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument(
        "--train-blocks",
        choices=TRAIN_BLOCKS,
        help=f"the emulator blocks the adapter trains on, instead of the recipe's ({EVERY_BLOCK}: no plug-in row)",
    )
    known, rest = parser.parse_known_args(argv)
    args = transfer.parse_args(rest)
    recipe = transfer.load_recipe()
    if args.smoke:
        args, recipe = transfer.smoke_arguments(args)
        known.tasks, known.emulator, known.out = args.tasks, args.default_emulator, args.out + "-proxy"
    if known.train_blocks:
        recipe = replace(recipe, train_blocks=known.train_blocks)
    with one_thread_if(args.smoke):
        return run(known, transfer.TransferBench(args, recipe))


def run(known: argparse.Namespace, bench: transfer.TransferBench) -> list[dict[str, Any]]:
    for task in (t for t in known.tasks.split(",") if t):
        for seed in (int(s) for s in known.seeds.split(",")):
            cell(bench, task, known.emulator, seed, known.split)
    found: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in bench.cells.all():
        if c["row"].startswith("proxy_") and c.get("emulator") == known.emulator and c["alpha"] == PROXY_ALPHA:
            key = (c["task"], c["row"].removeprefix("proxy_"), c["recipe"]["train_blocks"])
            found.setdefault(key, []).append(c)
    records = report({k: sorted(v, key=lambda c: c["seed"]) for k, v in sorted(found.items())})
    write_results(
        Path(known.out),
        {"emulator": known.emulator, "alpha": PROXY_ALPHA, "rows": records},
        markdown(records, known.emulator),
    )
    return records


if __name__ == "__main__":
    main()
