"""The README's result tables, rendered from the committed bench/results/*.json files.

Each table sits in the README between `<!-- results:NAME -->` and `<!-- /results:NAME -->`. `--write` refreshes them;
`--check` exits 1 when a table in the README disagrees with its results file (tests/test_readme.py runs it), so no
number in the README can drift from the file that backs it.

    python bench/readme_tables.py --write
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.DOTALL)


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _points(est: dict[str, Any] | None) -> str:
    if est is None:
        return "—"
    return f"{est['mean'] * 100:.1f} [{est['ci_low'] * 100:.1f}, {est['ci_high'] * 100:.1f}]"


def transfer_table() -> str:
    report = _load("transfer.json")
    default = report["default_emulator"]
    runs = {(r["task"], r["emulator"], r["row"]): r for r in report["runs"]}
    versus = {(c["task"], c["a"], c["b"]): c for c in report["comparisons"] if c["emulator"] == default}
    lines = [
        "| task (metric, test rows) | zero-shot | emulator zero-shot | emulator + adapter | plug-in | ceiling "
        "| plug-in − zero-shot | seeds (plug-in / ceiling) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for task, info in report["tasks"].items():
        row = {name: runs.get((task, default, name)) for name in ROWS}
        if row["zero_shot"] is None:
            continue
        gain = versus.get((task, "plug_in", "zero_shot"))
        shown_gain = (
            f"{gain['difference_mean'] * 100:+.1f} [{gain['difference_ci_low'] * 100:+.1f}, "
            f"{gain['difference_ci_high'] * 100:+.1f}]"
            if gain
            else "—"
        )
        seeds = "/".join(str(len(row[name]["seeds"])) if row[name] else "0" for name in ("plug_in", "ceiling"))
        lines.append(
            f"| {task} ({info['metric']}, {row['zero_shot']['n']}) | "
            + " | ".join(_points(row[name]) for name in ROWS)
            + f" | {shown_gain} | {seeds} |"
        )
    suite = report["suite"]
    if suite.get("tasks"):
        lines.append(
            f"| **suite mean** ({len(suite['tasks'])} tasks) | "
            + " | ".join(_points(suite[name]) for name in ROWS)
            + f" | {_points(suite['plug_in_minus_zero_shot'])} | |"
        )
    return "\n".join(lines)


def transfer_targets() -> str:
    report = _load("transfer.json")
    lines = ["| target | over | measured | met |", "|---|---|---|---|"]
    for target in report["targets"]:
        value = target["value"]
        if "mean" in value and "ratio" not in target["target"] and "0.7" not in target["target"]:
            shown = f"{_points(value)} points"
        elif "mean" in value:
            shown = f"{value['mean']:.2f} [{value['ci_low']:.2f}, {value['ci_high']:.2f}]"
        else:
            shown = ", ".join(f"{k}: {v}" for k, v in value.items())
        over = ", ".join(target.get("tasks", [])) or "every task with the rows"
        lines.append(f"| {target['target']} | {over} | {shown} | {'yes' if target['met'] else 'no'} |")
    return "\n".join(lines)


def transfer_emulators() -> str:
    report = _load("transfer.json")
    lines = [
        "| emulator | parameters | tasks | seeds | emulator + adapter | plug-in | plug-in − zero-shot |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for emulator, entry in report["per_emulator"].items():
        seeds = max(len(r["seeds"]) for r in report["runs"] if r["emulator"] == emulator and r["row"] == "plug_in")
        parameters = entry.get("report_card", {}).get("parameters")
        shown = f"{parameters / 1e6:.0f}M" if parameters else "—"
        lines.append(
            f"| {emulator} | {shown} | {', '.join(entry['tasks'])} | {seeds} | {_points(entry['emulator_adapter'])} "
            f"| {_points(entry['plug_in'])} | {_points(entry['plug_in_minus_zero_shot'])} |"
        )
    return "\n".join(lines)


def transfer_delivery_table() -> str:
    report = _load("transfer_delivery.json")
    lines = [
        "| task (test rows) | delivery (held-out plug-in / proxy / proxy, every block) | seeds | zero-shot "
        "| delivered | ceiling | delivered − zero-shot |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in report["tasks"]:
        choice = report["choice"][t["task"]]
        heldout = " / ".join(
            f"{choice[key] * 100:.1f}" if key in choice else "—"
            for key in ("heldout_plug_in", "heldout_proxy", "heldout_proxy_every")
        )
        gain = t["delivered_minus_zero_shot"]
        lines.append(
            f"| {t['task']} ({t['n']}) | {t['delivery']} ({heldout}) | {len(t['seeds'])} | "
            + " | ".join(_points(t[row]) for row in ("zero_shot", "delivered", "ceiling"))
            + f" | {gain['difference_mean'] * 100:+.1f} [{gain['difference_ci_low'] * 100:+.1f}, "
            f"{gain['difference_ci_high'] * 100:+.1f}] |"
        )
    suite = report["suite"]
    if suite:
        gain = suite["delivered_minus_zero_shot"]
        lines.append(
            f"| **suite mean** ({len(suite['tasks'])} tasks) | | | "
            + " | ".join(_points(suite[row]) for row in ("zero_shot", "delivered", "ceiling"))
            + f" | {gain['mean'] * 100:+.1f} [{gain['ci_low'] * 100:+.1f}, {gain['ci_high'] * 100:+.1f}] |"
        )
        lines += [
            "",
            "| target | measured | met |",
            "|---|---|---|",
            *(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]),
        ]
    if report["missing"]:
        lines += ["", f"Not yet measured on test rows: {', '.join(report['missing'])}."]
    return "\n".join(lines)


def transfer_layouts_table() -> str:
    report = _load("transfer_layouts.json")
    lines = [
        "| emulator | novel perplexity (full model) | task | zero-shot | emulator + adapter | plug-in "
        "| plug-in − zero-shot |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        ppl = f"{r['novel_perplexity']:.1f} ({r['full_novel_perplexity']:.1f})" if r["novel_perplexity"] else "—"
        lines.append(
            f"| {r['emulator']} | {ppl} | {r['task']} | {r['zero_shot'] * 100:.1f} | {r['emulator_adapter'] * 100:.1f} "
            f"| {r['plug_in'] * 100:.1f} | {(r['plug_in'] - r['zero_shot']) * 100:+.1f} |"
        )
    return "\n".join(lines)


def demo_table() -> str:
    result = _load("demo.json")
    lines = ["| row | accuracy | loss |", "|---|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['row']} | {row['accuracy']:.4f} | {row['loss']:.4f} |")
    gain = result["plug_in_gain"]
    lines.append("")
    lines.append(
        f"plug-in − zero-shot: {gain['points']:+.2f} points, 95% CI [{gain['ci_low']:+.2f}, {gain['ci_high']:+.2f}] "
        f"on {result['eval_examples']} dev rows ({gain['verdict']}); emulator `{result['emulator']}`, "
        f"{result['train_examples']} training rows, {result['total_seconds']:.0f} s in all."
    )
    return "\n".join(lines)


def _pema_tasks(result: dict[str, Any]) -> list[str]:
    """The tasks of a PEMA report that have runs, in the report's order."""
    return [t for t in result["tasks"] if any(r["task"] == t for r in result["runs"])]


def pema_table() -> str:
    """Every row of the PEMA report in the benchmark's own order: BLEU with its CI, chrF, how often the limit hit."""
    result = _load("pema.json")
    tasks = _pema_tasks(result)
    runs = {(r["task"], r["row"]): r for r in result["runs"]}
    rows = list(dict.fromkeys(r["row"] for r in result["runs"]))
    names = [result["tasks"][t]["name"] for t in tasks]
    lines = [
        "| row | " + " | ".join(f"{n}: BLEU [95% CI] | chrF | at the limit | seeds" for n in names) + " |",
        "|---|" + "---:|---:|---:|---:|" * len(tasks),
    ]
    for row in rows:
        cells = []
        for task in tasks:
            found = runs.get((task, row))
            cells.append(
                f"{found['bleu']:.2f} [{found['ci_low']:.2f}, {found['ci_high']:.2f}] | {found['chrf']:.1f} | "
                f"{100 * found['hit_limit_fraction']:.1f}% | {len(found['seeds'])}"
                if found
                else "— | — | — | —"
            )
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pema_targets() -> str:
    """The issue's targets, one line per target, one column per task: the measured value, the goal, met or not."""
    result = _load("pema.json")
    tasks = _pema_tasks(result)
    found = {(t["target"], t["task"]): t for t in result["targets"]}
    lines = [
        "| target | " + " | ".join(result["tasks"][t]["name"] for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for what in dict.fromkeys(t["target"] for t in result["targets"]):
        cells = []
        for task in tasks:
            target = found.get((what, task))
            if target is None or target["value"] is None:
                cells.append("—")
            else:
                verdict = "met" if target["met"] else "**not met**"
                worst = f", {target['worst_row']}" if "worst_row" in target else ""
                cells.append(f"{target['value']:g}{worst} (goal {target['goal']:g}): {verdict}")
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def transport_table() -> str:
    report = _load("transport.json")
    lines = [
        "| owner chunk | pull MB/s | push MB/s | disk read + sha256 MB/s | pull / disk |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in report["chunks"]:
        lines.append(
            f"| {row['chunk_kib']} KiB | {row['pull']['mb_per_s']} | {row['push']['mb_per_s']} | "
            f"{row['disk_read_sha256']['mb_per_s']} | {row['pull_over_disk']:.2f} |"
        )
    return "\n".join(lines)


def load_table() -> str:
    report = _load("load.json")
    memory = (
        f"{report['daemon_rss_at_ready_mib']} / {report['daemon_rss_peak_mib']} (bound "
        f"{report['daemon_rss_bound_mib']}: {'within' if report['daemon_rss_within_bound'] else 'OVER'})"
    )
    return "\n".join(
        [
            "| clients | seconds | loops | errors | small-call p50 / p99 ms | model-call p50 / p99 ms | audit "
            "| daemon RSS at ready / peak MiB |",
            "|---:|---:|---:|---:|---:|---:|---|---|",
            f"| {report['clients']} | {report['seconds']} | {report['loops']} | {report['errors']} | "
            f"{report['small_rpc_p50_ms']} / {report['small_rpc_p99_ms']} | {report['model_rpc_p50_ms']} / "
            f"{report['model_rpc_p99_ms']} | "
            + ("one line per mutating request" if report["audit_one_line_per_mutating_request"] else "MISMATCH")
            + f" | {memory} |",
        ]
    )


def efficiency_table() -> str:
    report = _load("efficiency.json")

    def versus(run: dict[str, Any], key: str) -> str:
        return f"{run['vs_full_ft'][key]:.2f}×" if "vs_full_ft" in run else "—"

    def bound(run: dict[str, Any]) -> str:
        return versus(run, "block_pass_bound") if "block_pass_bound" in run.get("vs_full_ft", {}) else "—"

    lines = [
        "| row | tokens/s | speed-up over full FT | its work bound | s | peak RSS MiB | less memory than full FT |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        lines.append(
            f"| `{run['row']}` | {run['tokens_per_s']:,.0f} | {versus(run, 'tokens_per_s')} | {bound(run)} "
            f"| {run['seconds']:.1f} | {run['peak_mib']:,.0f} | {versus(run, 'peak_mib')} |"
        )
    return "\n".join(lines)


def distill_throughput_table() -> str:
    report = _load("distill_throughput.json")
    lines = ["| layout | mode | tokens/s | × plain step | teacher's share of the step |", "|---|---|---:|---:|---:|"]
    for layout in report["layouts"]:
        for mode, run in layout["modes"].items():
            share = f"{run['teacher_share']:.0%}" if run["teacher_share"] else "—"
            lines.append(
                f"| {layout['layout']} | {mode} | {run['tokens_per_s']:.0f} | {run['ratio_to_plain']:.2f} | {share} |"
            )
    return "\n".join(lines)


ROWS = ("zero_shot", "emulator_zero_shot", "emulator_adapter", "plug_in", "ceiling")
TABLES: dict[str, Callable[[], str]] = {
    "transfer": transfer_table,
    "transfer-targets": transfer_targets,
    "transfer-emulators": transfer_emulators,
    "transfer-layouts": transfer_layouts_table,
    "transfer-delivery": transfer_delivery_table,
    "demo": demo_table,
    "pema": pema_table,
    "pema-targets": pema_targets,
    "transport": transport_table,
    "load": load_table,
    "efficiency": efficiency_table,
    "distill-throughput": distill_throughput_table,
}


def render(readme: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise KeyError(f"README names an unknown results table {name!r}; known: {', '.join(TABLES)}")
        return f"{match.group(1)}{TABLES[name]()}\n{match.group(4)}"

    return BLOCK.sub(replace, readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    current = README.read_text(encoding="utf-8")
    rendered = render(current)
    if args.write:
        README.write_text(rendered, encoding="utf-8")
        return 0
    if rendered != current:
        print("README tables disagree with bench/results; run: python bench/readme_tables.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
