"""Deliver each task's adapter the way held-out rows favour, then measure it on test rows.

The plug-in's top blocks read the full model's middle, not the emulator's they learned on; proxy-tuning
(common/proxy_tuning.py) keeps the adapter on the emulator and steers the full model's logits by the difference it
makes there, and so can also serve an adapter on every emulator block, middle included (`--train-blocks every`),
which could never plug in. None of the three wins everywhere (bench/results/transfer_proxy.md), so the choice is
made per task on held-out training rows, never on test rows: the delivery that scored highest there (a tie keeps
the plug-in, which needs no emulator when serving, then the recipe's top-block adapter). The delivered model is
then compared on the test rows as bench/transfer.py compares the plug-in: against zero-shot, the emulator + the same
adapter and the ceiling, per task and over the suite, with the same targets.

    python bench/transfer_delivery.py                       # fills what is missing (resumable), then reports
    python bench/transfer_delivery.py --report              # only the report, from the cells
    python bench/transfer_delivery.py --smoke               # a tiny model, seconds (the test suite runs it)
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402
import transfer_proxy  # noqa: E402
from cells import Cells  # noqa: E402
from results_files import write_results  # noqa: E402
from threads import one_thread_if  # noqa: E402

from offsite.client.training.config import EVERY_BLOCK  # noqa: E402
from offsite.common import confidence as stats  # noqa: E402
from offsite.common.proxy_tuning import PROXY_ALPHA  # noqa: E402

OUT = transfer.ROOT / "bench" / "results" / "transfer_delivery"
# In order of preference on a tie: the plug-in needs no emulator when serving; the top-block adapter is the recipe's.
# `proxy_every`: proxy-tuning with an adapter on every emulator block (`--train-blocks every`), which cannot plug in.
EVERY_DELIVERY = "proxy_every"
DELIVERIES = ("plug_in", "proxy", EVERY_DELIVERY)


def every_block_recipe(recipe: transfer.Recipe) -> transfer.Recipe:
    return replace(recipe, train_blocks=EVERY_BLOCK)


def every_block(bench: transfer.TransferBench) -> transfer.TransferBench:
    """The same bench (model, cells, store) training its adapters on every emulator block."""
    twin = copy.copy(bench)
    twin.recipe = every_block_recipe(bench.recipe)
    return twin


def _proxy_cells(cells: Cells, recipe: transfer.Recipe, emulator: str, split: str) -> dict[str, list[dict[str, Any]]]:
    by_task: dict[str, list[dict[str, Any]]] = {}
    for c in cells.all():
        if (
            c["row"] == f"proxy_{split}"
            and c.get("emulator") == emulator
            and c.get("alpha") == PROXY_ALPHA
            and c.get("recipe") == asdict(recipe)
        ):
            by_task.setdefault(c["task"], []).append(c)
    return {task: sorted(found, key=lambda c: c["seed"]) for task, found in by_task.items()}


def _delivery_cells(cells: Cells, recipe: transfer.Recipe, emulator: str, split: str) -> dict[str, dict[str, Any]]:
    """Per task and delivery, the proxy bench's cells that score it: the top-block adapter's for plug-in and proxy,
    the every-block adapter's for proxy_every."""
    top = _proxy_cells(cells, recipe, emulator, split)
    every = _proxy_cells(cells, every_block_recipe(recipe), emulator, split)
    out: dict[str, dict[str, Any]] = {}
    for task in sorted(top.keys() | every.keys()):
        found = {"plug_in": top.get(task), "proxy": top.get(task), EVERY_DELIVERY: every.get(task)}
        out[task] = {delivery: cells for delivery, cells in found.items() if cells}
    return out


def delivered_bits(found: list[dict[str, Any]], delivery: str) -> np.ndarray:
    return transfer_proxy.row_bits(found, "plug_in" if delivery == "plug_in" else "proxy")


def choose(heldout: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, the delivery with the highest held-out accuracy among those measured there (a tie keeps the
    earlier of DELIVERIES), and each one's difference from the plug-in, paired over the same rows."""
    chosen = {}
    for task, by_delivery in heldout.items():
        if "plug_in" not in by_delivery:
            continue  # the top-block cells are the reference every other delivery is compared with
        accuracy = {d: delivered_bits(by_delivery[d], d) for d in DELIVERIES if d in by_delivery}
        best = max(accuracy, key=lambda d: (accuracy[d].mean(), -DELIVERIES.index(d)))
        plug_in = accuracy["plug_in"]
        chosen[task] = {
            "delivery": best,
            "heldout_rows": int(plug_in.shape[1]),
            "heldout_seeds": [c["seed"] for c in by_delivery["plug_in"]],
            **{f"heldout_{d}": float(bits.mean()) for d, bits in accuracy.items()},
            **{
                f"heldout_{d}_minus_plug_in": stats.compare(bits, plug_in, same_seeds=True).as_dict()
                for d, bits in accuracy.items()
                if d != "plug_in"
            },
        }
    return chosen


def build_report(cells: Cells, recipe: transfer.Recipe, emulator: str) -> dict[str, Any]:
    """The delivered model per task and over the suite; tasks lacking a cell the comparison needs are listed."""
    choice = choose(_delivery_cells(cells, recipe, emulator, "heldout"))
    tested = _delivery_cells(cells, recipe, emulator, "test")
    groups = transfer.collect(cells, recipe, None)
    per_task, missing = [], []
    matrices: dict[str, dict[str, np.ndarray]] = {}
    for task, picked in choice.items():
        metric = next((found[0]["metric"] for (t, _, _), found in groups.items() if t == task), None)
        zero_shot, ceiling = groups.get((task, None, "zero_shot")), groups.get((task, None, "ceiling"))
        if picked["delivery"] != "plug_in":
            found = tested.get(task, {}).get(picked["delivery"], [])
            delivered = delivered_bits(found, picked["delivery"]) if found else None
            with_adapter = transfer_proxy.row_bits(found, "emulator_adapter") if found else None
            seeds = [c["seed"] for c in found]
        else:
            plugged = groups.get((task, emulator, "plug_in"), [])
            on_emulator = groups.get((task, emulator, "emulator_adapter"), [])
            delivered = transfer._matrix(plugged, metric) if plugged and metric else None
            with_adapter = transfer._matrix(on_emulator, metric) if on_emulator and metric else None
            seeds = sorted(c["seed"] for c in plugged)
        if delivered is None or with_adapter is None or not zero_shot or not ceiling:
            missing.append(task)
            continue
        rows = {
            "zero_shot": transfer._matrix(zero_shot, metric),
            "emulator_adapter": with_adapter,
            "delivered": delivered,
            "ceiling": transfer._matrix(ceiling, metric),
        }
        matrices[task] = rows
        per_task.append(
            {
                "task": task,
                "metric": metric,
                "delivery": picked["delivery"],
                "seeds": seeds,
                "n": int(delivered.shape[1]),
                **{row: stats.estimate(m).as_dict() for row, m in rows.items()},
                "delivered_minus_zero_shot": stats.compare(delivered, rows["zero_shot"]).as_dict(),
                "delivered_minus_emulator_adapter": stats.compare(delivered, with_adapter, same_seeds=True).as_dict(),
            }
        )
    summary = suite(matrices)
    return {
        "emulator": emulator,
        "alpha": PROXY_ALPHA,
        "rule": "the delivery with the highest held-out accuracy (a tie keeps the plug-in, then the top-block proxy)",
        "choice": choice,
        "tasks": per_task,
        "missing": missing,
        "suite": summary,
        "targets": targets(summary, per_task),
    }


def targets(summary: dict[str, Any], per_task: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bench/transfer.py's targets for the plug-in, asked of the delivered model."""
    if not summary:
        return []
    ratio, gap = summary["gain_recovered"], summary["delivered_minus_emulator_adapter"]
    below = [t["task"] for t in per_task if t["delivered_minus_zero_shot"]["difference_mean"] < 0]
    above = [t["task"] for t in per_task if t["delivered_minus_zero_shot"]["difference_ci_low"] > 0]
    return [
        {
            "target": f"delivered − zero-shot ≥ {transfer.GAIN_RECOVERED_TARGET:g} × (ceiling − zero-shot)",
            "measured": f"{_ratio(ratio)} of the ceiling's gain",
            "met": bool(ratio["mean"] >= transfer.GAIN_RECOVERED_TARGET),
        },
        {
            "target": f"delivered − (emulator + adapter) ≥ {transfer.EMULATOR_GAP_TARGET * 100:g} points",
            "measured": f"{_suite_difference(gap)} points",
            "met": bool(gap["mean"] >= transfer.EMULATOR_GAP_TARGET),
        },
        {
            "target": "delivered ≥ zero-shot on every task (in the mean)",
            "measured": f"below on {', '.join(below)}" if below else f"all {len(per_task)}",
            "met": not below,
        },
        {
            "target": f"delivered significantly above zero-shot on ≥ {transfer.SIGNIFICANT_TASKS_TARGET} tasks",
            "measured": f"{len(above)} of {len(per_task)}" + (f" ({', '.join(above)})" if above else ""),
            "met": len(above) >= transfer.SIGNIFICANT_TASKS_TARGET,
        },
    ]


def suite(matrices: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    if not matrices:
        return {}
    rows = list(matrices.values())
    out: dict[str, Any] = {"tasks": list(matrices)}
    for row in ("zero_shot", "emulator_adapter", "delivered", "ceiling"):
        out[row] = stats.suite_estimate([m[row] for m in rows]).as_dict()
    out["delivered_minus_zero_shot"] = stats.suite_difference(
        [(m["delivered"], m["zero_shot"]) for m in rows]
    ).as_dict()
    out["delivered_minus_emulator_adapter"] = stats.suite_difference(
        [(m["delivered"], m["emulator_adapter"]) for m in rows], same_seeds=True
    ).as_dict()
    out["gain_recovered"] = stats.suite_ratio([(m["delivered"], m["zero_shot"], m["ceiling"]) for m in rows]).as_dict()
    return out


def _points(e: dict[str, float]) -> str:
    return f"{e['mean'] * 100:.1f} [{e['ci_low'] * 100:.1f}, {e['ci_high'] * 100:.1f}]"


def _difference(c: dict[str, Any]) -> str:
    return (
        f"{c['difference_mean'] * 100:+.1f} [{c['difference_ci_low'] * 100:+.1f}, "
        f"{c['difference_ci_high'] * 100:+.1f}] (p {c['p_value']:.3f})"
    )


def _suite_difference(e: dict[str, float], scale: float = 100) -> str:
    return f"{e['mean'] * scale:+.1f} [{e['ci_low'] * scale:+.1f}, {e['ci_high'] * scale:+.1f}]"


def _ratio(e: dict[str, float]) -> str:
    return f"{e['mean']:.2f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# The delivered model: plug-in or proxy-tuning, chosen per task on held-out rows",
        "",
        f"Emulator `{report['emulator']}`; rule: {report['rule']} (α = {report['alpha']:g}). `plug_in` and",
        "`proxy` deliver the recipe's adapter (LoRA on the top adapter blocks); `proxy_every` an adapter with LoRA",
        "on every emulator block, which only proxy-tuning can serve; `emulator + adapter` is the delivered adapter",
        "on the emulator. Accuracy in points (acc_norm for multi-token tasks), mean [95% bootstrap CI over examples",
        "and seeds]; differences paired on the same test rows. Made by `python bench/transfer_delivery.py`.",
        "",
        "Choice on held-out training rows:",
        "",
        "| task | held-out rows | plug-in | proxy | proxy, every block | proxy − plug-in "
        "| proxy, every block − plug-in | delivery |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for task, c in report["choice"].items():
        accuracy = [f"{c[f'heldout_{d}'] * 100:.1f}" if f"heldout_{d}" in c else "—" for d in DELIVERIES]
        versus = [_difference(c[f"heldout_{d}_minus_plug_in"]) if f"heldout_{d}" in c else "—" for d in DELIVERIES[1:]]
        lines.append(
            f"| {task} | {c['heldout_rows']} | {' | '.join(accuracy)} | {' | '.join(versus)} | {c['delivery']} |"
        )
    lines += [
        "",
        "Test rows:",
        "",
        "| task (n) | delivery | seeds | zero-shot | emulator + adapter | delivered | ceiling "
        "| delivered − zero-shot | delivered − emu+adapter |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in report["tasks"]:
        lines.append(
            f"| {t['task']} ({t['n']}) | {t['delivery']} | {','.join(map(str, t['seeds']))} | "
            + " | ".join(_points(t[row]) for row in ("zero_shot", "emulator_adapter", "delivered", "ceiling"))
            + " | "
            + " | ".join(_difference(t[f"delivered_minus_{o}"]) for o in ("zero_shot", "emulator_adapter"))
            + " |"
        )
    if report["missing"]:
        lines += ["", f"Not yet measured on test rows: {', '.join(report['missing'])}."]
    s = report["suite"]
    if s:
        lines += [
            "",
            f"Suite average over {len(s['tasks'])} tasks ({', '.join(s['tasks'])}):",
            "",
            "| zero-shot | emulator + adapter | delivered | ceiling | delivered − zero-shot "
            "| delivered − emu+adapter | gain recovered |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            "| "
            + " | ".join(_points(s[row]) for row in ("zero_shot", "emulator_adapter", "delivered", "ceiling"))
            + f" | {_suite_difference(s['delivered_minus_zero_shot'])}"
            + f" | {_suite_difference(s['delivered_minus_emulator_adapter'])}"
            + f" | {_ratio(s['gain_recovered'])} |",
            "",
            targets_table(report["targets"]),
        ]
    return "\n".join(lines) + "\n"


def targets_table(found: list[dict[str, Any]]) -> str:
    lines = ["| target (suite of the tasks above) | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in found]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choice-seeds", default="0", help="adapters whose held-out rows make the choice")
    parser.add_argument("--ceiling-seeds", default="0", help="the ceiling is the same for either delivery")
    known, rest = parser.parse_known_args(argv)
    args = transfer.parse_args(rest)
    args.ceiling_seeds = known.ceiling_seeds
    recipe = transfer.load_recipe(Path(args.recipe))
    if args.smoke:
        args, recipe = transfer.smoke_arguments(args)
        args.out = args.out + "-delivery"
    else:
        args.out = str(OUT) if args.out == str(transfer.RESULTS) else args.out
    with one_thread_if(args.smoke):
        if not args.report:
            fill(transfer.TransferBench(args, recipe), args, [int(s) for s in known.choice_seeds.split(",") if s])
        report = build_report(Cells(Path(args.cells)), recipe, args.default_emulator)
    write_results(Path(args.out), report, markdown(report))
    return report


def fill(bench: transfer.TransferBench, args: argparse.Namespace, choice_seeds: list[int]) -> None:
    """Every cell the report needs: the held-out choice, then the chosen delivery's test cells (cached ones skip)."""
    tasks = [t for t in args.tasks.split(",") if t]
    emulator = args.default_emulator
    every = every_block(bench)
    for task in tasks:
        for seed in choice_seeds:
            transfer_proxy.cell(bench, task, emulator, seed, "heldout")
            transfer_proxy.cell(every, task, emulator, seed, "heldout")
    choice = choose(_delivery_cells(bench.cells, bench.recipe, emulator, "heldout"))
    for task in tasks:
        data = bench.task(task)
        bench.zero_shot(data)
        for seed in (int(s) for s in args.ceiling_seeds.split(",") if s):
            bench.ceiling(data, seed)
    for seed in (int(s) for s in args.seeds.split(",") if s):  # seed by seed: a stopped run leaves whole seeds
        for task in tasks:
            if choice[task]["delivery"] != "plug_in":
                chosen = every if choice[task]["delivery"] == EVERY_DELIVERY else bench
                transfer_proxy.cell(chosen, task, emulator, seed, "test")
            else:
                bench.offsite(bench.task(task), emulator, seed)


if __name__ == "__main__":
    main()
