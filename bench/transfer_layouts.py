"""Which emulator layouts transfer? The adapter recipe on held-out rows, one training per layout and task.

The privacy-utility probe behind the choice of the default emulator: for each emulator, the chosen recipe's
offsite adapter scored on each task's held-out training rows (never test rows), plugged in and on the emulator,
against the full model's zero-shot accuracy on the same rows. `uniform:L-M-R` with M the whole middle is the
identity emulator: its plug-in is LoRA on the adapter blocks trained on the full model itself, the ceiling of
any emulator with those adapter blocks. Cells are shared with bench/transfer.py (rows `*_heldout`).

    python bench/transfer_layouts.py --emulators uniform:2-26-2,uniform:4-18-4,distill:2-8-2 --tasks sst2,trec
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402
from results_files import write_results  # noqa: E402

OUT = transfer.ROOT / "bench" / "results" / "transfer_layouts"


def probe(bench: transfer.TransferBench, emulators: list[str], tasks: list[str]) -> dict[str, Any]:
    rows = []
    for spec in emulators:
        for name in tasks:
            data = bench.task(name)
            metric = data.metric
            emulated, plugged = bench.offsite(data, spec, 0, items=data.heldout, row_suffix="_heldout")
            _, manifest = bench.emulator(spec)
            card = manifest.get("report_card", {})
            rows.append(
                {
                    "emulator": spec,
                    "task": name,
                    "metric": metric,
                    "heldout_rows": len(data.heldout),
                    "zero_shot": bench.heldout_zero_shot(data),
                    "emulator_adapter": emulated[metric],
                    "plug_in": plugged[metric],
                    "emulator_parameters": card.get("parameters"),
                    "novel_perplexity": card.get("gutenberg_perplexity"),
                    "full_novel_perplexity": card.get("full_gutenberg_perplexity"),
                }
            )
            transfer.say(f"{spec} {name}: plug-in {rows[-1]['plug_in']:.3f}, zero-shot {rows[-1]['zero_shot']:.3f}")
    return {"recipe": transfer.asdict(bench.recipe), "seed": 0, "rows": rows}


def markdown(report: dict[str, Any], plot_name: str) -> str:
    lines = [
        "# Which layouts transfer (held-out training rows, seed 0)",
        "",
        "Accuracy on each task's 200 held-out training rows (the rows recipes are chosen on, never test rows).",
        f"Recipe: `{json.dumps(report['recipe'])}`. One training per cell: read differences under about 5 points",
        "as noise (200 rows).",
        "",
        "| emulator | params | novel ppl (full) | task | zero-shot | emulator + adapter | plug-in "
        "| plug-in − zero-shot |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        ppl = f"{r['novel_perplexity']:.1f} ({r['full_novel_perplexity']:.1f})" if r["novel_perplexity"] else "—"
        lines.append(
            f"| {r['emulator']} | {r['emulator_parameters'] or 0:,} | {ppl} | {r['task']} | {r['zero_shot']:.3f} "
            f"| {r['emulator_adapter']:.3f} | {r['plug_in']:.3f} | {(r['plug_in'] - r['zero_shot']) * 100:+.1f} |"
        )
    lines += ["", f"![frontier]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """The held-out frontier: what each emulator reveals against what its plug-in gains, one marker per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full_parameters = max(r["emulator_parameters"] or 0 for r in report["rows"])  # the identity emulator
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    tasks = sorted({r["task"] for r in report["rows"]})
    colours = {task: f"C{i}" for i, task in enumerate(tasks)}
    for task, marker in zip(tasks, "osD^v<>", strict=False):
        rows = [r for r in report["rows"] if r["task"] == task and r["emulator_parameters"]]
        for r in rows:
            gain = (r["plug_in"] - r["zero_shot"]) * 100
            xs = (r["emulator_parameters"] / full_parameters, r["novel_perplexity"])
            for ax, x in zip(axes, xs, strict=True):
                ax.scatter([x], [gain], marker=marker, color=colours[task], label=task if r is rows[0] else None)
                ax.annotate(r["emulator"], (x, gain), fontsize=5, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(
        axes, ("emulator parameters / full model's", "emulator perplexity on the held-out novel (log)"), strict=True
    ):
        ax.axhspan(-5, 5, color="grey", alpha=0.15, label="about the noise of 200 rows")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xlabel(label)
        ax.set_ylabel("plug-in − zero-shot, points (held-out rows)")
        ax.legend(fontsize=7)
    axes[1].set_xscale("log")
    figure.suptitle("Which layouts transfer: one training per emulator and task, held-out training rows", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulators", required=True)
    parser.add_argument("--tasks", default="sst2,trec")
    parser.add_argument("--out", default=str(OUT))
    known, rest = parser.parse_known_args(argv)
    args = transfer.parse_args(rest)
    bench = transfer.TransferBench(args, transfer.load_recipe(Path(args.recipe)))
    specs = list(dict.fromkeys(transfer.split_specs(known.emulators)))  # a repeated spec would repeat its rows
    report = probe(bench, specs, [t for t in known.tasks.split(",") if t])
    out = Path(known.out)
    write_results(out, report, markdown(report, out.with_suffix(".png").name))
    plot(report, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
