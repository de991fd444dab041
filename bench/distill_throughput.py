"""Distillation's throughput against a plain training step of the same emulator (issue 14, item 3).

A distillation step (owner/emulator/distill.py) is the frozen teacher's forward, which gives the targets, then the
student's forward and backward with the LM and NMSE losses. The limit is the plain step: the same student, the same
trainable middle blocks, batch and windows, with the LM loss alone and no teacher. Per layout, in one process,
rounds alternate the order of
- `plain`: the student's LM step;
- `distill_fp32`: the distillation step as shipped;
- `distill_bf16`: the same with the teacher under bf16 autocast (`teacher=bf16`);
each round a warm-up step, then `--steps` timed steps; the report takes each mode's median tokens/s and keeps every
round, with the teacher's share of the step. It also measures what bf16 does to the targets: their NMSE against the
fp32 teacher's at every kept boundary, on one batch.

There is nothing to precompute: the shipped budget (393k tokens) sees the 550k-token corpus's windows about once,
so each target is used once where it is computed.

    python bench/distill_throughput.py               # 2-8-2 and 3-14-3 on SmolLM2, 3 rounds of 6 steps
    python bench/distill_throughput.py --smoke       # tiny model, seconds (the test suite runs it)

writes bench/results/distill_throughput.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from offsite.common.architectures import depth
from offsite.common.contract import DEFAULT_MODEL
from offsite.common.model_loading import load_model
from offsite.owner.emulator import uniform
from offsite.owner.emulator.distill import (
    DistillConfig,
    DistillObjective,
    batch_order,
    gap_exits,
    kept_boundaries,
    middle_parameters,
    nmse,
    teacher_targets,
)
from offsite.owner.emulator.interface import BuildRequest
from offsite.owner.emulator.layout import Layout
from offsite.owner.emulator.public_text import GUTENBERG_TEXT, load_chunks

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from results_files import write_results  # noqa: E402
from threads import one_thread_if  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "distill_throughput"
MODES = ("plain", "distill_fp32", "distill_bf16")
LAYOUTS = "2-8-2,3-14-3"
ROUNDS = 3
STEPS = 6
WINDOWS = 256  # of the corpus, enough for every step of every round; loading all 4,300 would only cost time
TARGET = 0.7  # distillation's tokens/s over the plain step's, at least


def say(text: str) -> None:
    print(f"[distill_throughput] {text}", file=sys.stderr, flush=True)


class Student:
    """A uniform drop of `layout` whose middle blocks train, as distillation starts from it."""

    def __init__(self, full: PreTrainedModel, tokenizer: Any, layout: str, config: DistillConfig, work: Path):
        start = uniform.build(BuildRequest(full, tokenizer, Layout.parse(layout), {}, work, show_progress=False))
        self.full, self.emulator, self.config = full, start.model, config
        adapters = start.adapters or []
        self.boundaries = kept_boundaries(start.block_map, adapters, depth(full.config))
        exits = gap_exits(start.block_map, adapters, depth(full.config))
        self.objective = DistillObjective(self.emulator, config, self.boundaries, exits, [])
        for parameter in self.emulator.parameters():
            parameter.requires_grad_(False)
        self.params = list(middle_parameters(self.emulator, start.block_map, adapters).values())
        for parameter in self.params:
            parameter.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr)
        self.emulator.train()

    def step(self, mode: str, batch: torch.Tensor) -> float:
        """One optimiser step in `mode`; the seconds its teacher took (0 for the plain step)."""
        teacher_seconds = 0.0
        if mode == "plain":
            loss = self.emulator(input_ids=batch, labels=batch).loss
        else:
            started = time.perf_counter()
            targets = teacher_targets(self.full, batch, replace(self.config, bf16_teacher=mode == "distill_bf16"))
            teacher_seconds = time.perf_counter() - started
            loss = self.objective(batch, *targets)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return teacher_seconds


def timed_round(student: Student, mode: str, batches: Callable[[int], torch.Tensor], steps: int) -> dict[str, float]:
    """A warm-up step, then `steps` timed ones: tokens/s and the teacher's share of the time."""
    student.step(mode, batches(0))
    teacher, started = 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        teacher += student.step(mode, batches(step))
    seconds = time.perf_counter() - started
    tokens = steps * student.config.tokens_per_step
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "teacher_share": teacher / seconds}


def bf16_target_error(student: Student, batch: torch.Tensor) -> dict[str, float]:
    """NMSE of the bf16 teacher's targets against the fp32 teacher's, over the kept boundaries."""
    plain, _ = teacher_targets(student.full, batch, replace(student.config, bf16_teacher=False))
    fast, _ = teacher_targets(student.full, batch, replace(student.config, bf16_teacher=True))
    errors = [float(nmse(plain[t], fast[t])) for t, _ in student.boundaries]
    return {"mean": statistics.fmean(errors), "max": max(errors)}


def measure_layout(args: argparse.Namespace, full: PreTrainedModel, tokenizer: Any, layout: str) -> dict[str, Any]:
    config = DistillConfig()
    with tempfile.TemporaryDirectory(prefix="offsite-distill-throughput-") as work:
        student = Student(full, tokenizer, layout, config, Path(work))
        text = load_chunks(tokenizer, GUTENBERG_TEXT, config.seq_len, 0.0, WINDOWS)

        def batches(step: int) -> torch.Tensor:
            return text.train[batch_order(len(text.train), config.batch_size, config.seed, step)]

        rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                say(f"{layout}: round {round_ + 1}/{args.rounds}, {mode}")
                rounds[mode].append(timed_round(student, mode, batches, args.steps))
        error = bf16_target_error(student, batches(0))
    median = {mode: statistics.median(r["tokens_per_s"] for r in found) for mode, found in rounds.items()}
    return {
        "layout": layout,
        "trainable_parameters": sum(p.numel() for p in student.params),
        "boundaries": len(student.boundaries),
        "modes": {
            mode: {
                "tokens_per_s": median[mode],
                "teacher_share": statistics.median(r["teacher_share"] for r in rounds[mode]),
                "ratio_to_plain": median[mode] / median["plain"],
                "rounds": rounds[mode],
            }
            for mode in MODES
        },
        "bf16_target_nmse": error,
    }


def markdown(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        "# Distillation throughput against the plain training step",
        "",
        f"{report['model']}; {report['machine']}; {report['date']}. Batch {setup['batch_size']} × "
        f"{setup['seq_len']} tokens, {setup['rounds']} rounds of {setup['steps']} timed steps after one warm-up, "
        "the order alternating; medians. `python bench/distill_throughput.py`.",
        "",
        "| layout | mode | tokens/s | × plain | teacher's share of the step |",
        "|---|---|---:|---:|---:|",
    ]
    for layout in report["layouts"]:
        for mode, row in layout["modes"].items():
            share = f"{row['teacher_share']:.0%}" if mode != "plain" else "—"
            lines.append(
                f"| {layout['layout']} | {mode} | {row['tokens_per_s']:.0f} | {row['ratio_to_plain']:.2f} | {share} |"
            )
    lines += ["", "bf16 teacher's targets against the fp32 teacher's (NMSE over the kept boundaries, one batch):", ""]
    for layout in report["layouts"]:
        error = layout["bf16_target_nmse"]
        lines.append(f"- {layout['layout']}: mean {error['mean']:.2e}, max {error['max']:.2e}")
    lines += ["", f"Target: distillation ≥ {TARGET:.0%} of the plain step's tokens/s.", ""]
    for target in report["targets"]:
        met = "met" if target["met"] else "not met"
        lines.append(f"- {target['layout']}, {target['mode']}: {target['ratio']:.2f} — {met}")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = report["layouts"]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(MODES)
    for index, mode in enumerate(MODES):
        positions = [i + (index - 1) * width for i in range(len(layouts))]
        axis.bar(positions, [layout["modes"][mode]["tokens_per_s"] for layout in layouts], width, label=mode)
    axis.set_xticks(range(len(layouts)), [layout["layout"] for layout in layouts])
    axis.set_ylabel("training tokens/s")
    axis.set_title(f"{report['model']}: distillation against the plain step", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default=LAYOUTS, help="comma-separated L-N-R")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds; the order reverses every other one")
    parser.add_argument("--steps", type=int, default=STEPS, help="timed steps per mode and round")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", help="results path without extension (default bench/results/distill_throughput)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and two steps, seconds")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import save_tiny_model

        work = Path(args.out).parent if args.out else Path(tempfile.mkdtemp(prefix="offsite-distill-smoke-"))
        args.model = str(save_tiny_model("llama", work / "model"))
        args.layouts, args.rounds, args.steps = "1-2-1", 2, 2
    with one_thread_if(args.smoke):
        loaded = load_model(args.model)
        full = loaded.model.eval()
        for parameter in full.parameters():
            parameter.requires_grad_(False)
        layouts = [measure_layout(args, full, loaded.tokenizer, layout) for layout in args.layouts.split(",") if layout]
        where = machine()
    report: dict[str, Any] = {
        "model": loaded.name,
        "machine": where,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "setup": {**asdict(DistillConfig()), "rounds": args.rounds, "steps": args.steps},
        "layouts": layouts,
        "targets": [
            {
                "layout": layout["layout"],
                "mode": mode,
                "ratio": layout["modes"][mode]["ratio_to_plain"],
                "met": layout["modes"][mode]["ratio_to_plain"] >= TARGET,
            }
            for layout in layouts
            for mode in MODES[1:]
        ],
    }
    out = Path(args.out) if args.out else RESULTS
    write_results(out, report, markdown(report))
    plot(report, out.with_suffix(".png"))
    return report


if __name__ == "__main__":
    main()
