"""Does the hybrid PEMA carry over to the full model's states? Its loss on them, on held-out examples, with key noise.

The hybrid adapter learns on a memory of the bridged emulator's states and is applied, at generation, to the full
model's. On the PEMA validation examples of each task's training rows (whole examples, never test rows) this
measures the adapter's next-token cross-entropy on both: on the memory it learned from, and on the full model's
states of the same rows (the owner's memory), next to the frozen model's and the remote adapter's (trained on the
full model's states). `mixed` is the distribution generation samples from at constant λ = λ_max.

Key noise: every training key gets F·z added, F·Fᵀ the covariance of the bridge's residual (full − bridged emulator)
on public text no fit saw (the held-out novel's report-card windows), times scale². Scale 0 is the hybrid as it is.
A scale is chosen here, on held-out examples, by the mixed loss on the full model's states.

Reading λ (`--reading-lambdas`): the bench's own hybrid adapter as `offsite generate --emulator` runs it, PEMA
reading the bridged emulator's states and mixed with the full model's P_LM, by λ, on the held-out examples of its
own split; beside it the same adapter reading the full model's states, and the remote adapter. The λ with the lowest
mixed loss is the reading mode's, chosen here and never on test rows.

    python bench/pema_key_noise.py --tasks e2e --scales 0,1,2
    python bench/pema_key_noise.py --emulator distill:3-14-3 --tasks e2e,multi30k_en_de --seeds 0 --scales "" \
        --reading-lambdas 0.3,0.5,0.7,0.9
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pema  # noqa: E402
from cells import Cells  # noqa: E402
from results_files import write_results  # noqa: E402

from offsite.common.pema.adapter import PemaAdapter  # noqa: E402
from offsite.common.pema.config import PemaConfig  # noqa: E402
from offsite.common.pema.head import Head  # noqa: E402
from offsite.common.pema.memory import Memory  # noqa: E402
from offsite.common.pema.training import evaluate_loss, split_examples, train_pema  # noqa: E402
from offsite.common.pema.unrolling import mix  # noqa: E402

OUT = pema.ROOT / "bench" / "results" / "pema_key_noise"
CELLS = pema.ROOT / "bench" / "results" / "pema_key_noise_cells"


def losses(adapter: PemaAdapter, head: Head, memory: Memory, rows: np.ndarray, lambda_max: float, batch: int) -> dict:
    """PEMA's own next-token CE and that of its mixture with the frozen model at λ = `lambda_max`, on `rows`."""

    def own(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head.logits(adapter.predict_hidden(keys)), values)

    def mixed(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        lm = torch.log_softmax(head.logits(keys), dim=-1)
        ours = torch.log_softmax(head.logits(adapter.predict_hidden(keys)), dim=-1)
        return F.nll_loss(mix(ours, lm, lambda_max), values)

    with torch.no_grad():
        return {
            "pema_ce": round(evaluate_loss([adapter], own, memory, rows, batch), 4),
            "mixed_ce": round(evaluate_loss([adapter], mixed, memory, rows, batch), 4),
        }


def probe_config(bench: pema.PemaBench, task: pema.Task, seed: int) -> PemaConfig:
    """The bench's PEMA at the task's chosen rank, without the gate or the length predictor: only the loss counts."""
    return replace(bench.pema_config, rank=bench.rank(task), seed=seed, gate_width=0, length_predictor=False)


def paired_memories(bench: pema.PemaBench, task: pema.Task) -> tuple[Memory, Memory]:
    """The hybrid memory (bridged emulator states) and the owner's (full model states) of the same rows."""
    hybrid, _ = bench.memory(task, "hybrid")
    owner, _ = bench.memory(task, "owner")
    if len(hybrid) != len(owner) or not np.array_equal(hybrid.values[:], owner.values[:]):
        raise SystemExit(f"{task.slug}: the hybrid and owner memories do not hold the same rows")
    return hybrid, owner


def cell(bench: pema.PemaBench, cells: Cells, task: pema.Task, scale: float, seed: int) -> dict[str, Any]:
    config = probe_config(bench, task, seed)
    facts = {
        **bench.facts(task, "hybrid_key_noise", seed=seed, rank=config.rank, pema=asdict(config)),
        "emulator_id": bench.emulator_manifest["id"],
        "scale": scale,
        "noise_text": "held-out novel, report-card windows",
    }
    found = cells.get(facts)
    if found is not None:
        return found
    hybrid, owner = paired_memories(bench, task)
    rows = split_examples(owner, config.validation_fraction, seed).validation_rows
    noise = bench.key_noise(scale)
    pema.say(f"{task.slug}: hybrid PEMA with key noise at scale {scale}, seed {seed}")
    adapter, report = train_pema(hybrid, bench.head, config, show_progress=bench.args.progress, key_noise=noise)
    result = {
        "on_emulator": losses(adapter, bench.head, hybrid, rows, config.lambda_max, config.batch_size),
        "on_full": losses(adapter, bench.head, owner, rows, config.lambda_max, config.batch_size),
        "train_seconds": round(report.seconds, 1),
        "validation_rows": len(rows),
    }
    return cells.put(facts, result)


def references(bench: pema.PemaBench, cells: Cells, task: pema.Task, seed: int) -> dict[str, Any]:
    """The frozen model's CE and the remote adapter's (same config, trained on the full model's states)."""
    config = probe_config(bench, task, seed)
    facts = bench.facts(task, "remote_key_noise_reference", seed=seed, rank=config.rank, pema=asdict(config))
    found = cells.get(facts)
    if found is not None:
        return found
    owner, _ = bench.memory(task, "owner")
    rows = split_examples(owner, config.validation_fraction, seed).validation_rows
    pema.say(f"{task.slug}: remote PEMA reference, seed {seed}")
    adapter, _ = train_pema(owner, bench.head, config, show_progress=bench.args.progress)

    def frozen(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(bench.head.logits(keys), values)

    with torch.no_grad():
        model_ce = round(evaluate_loss([], frozen, owner, rows, config.batch_size), 4)
    remote = losses(adapter, bench.head, owner, rows, config.lambda_max, config.batch_size)
    return cells.put(facts, {"model_ce": model_ce, "remote": remote})


def mixed_by_lambda(
    adapter: PemaAdapter, head: Head, reads: Memory, lm: Memory, rows: np.ndarray, lambdas: list[float], batch: int
) -> dict[str, float]:
    """Mixed CE by λ: PEMA on the states of `reads`, the frozen model's P_LM from the states of `lm` (same rows)."""
    adapter.eval()
    totals = dict.fromkeys(lambdas, 0.0)
    with torch.no_grad():
        for first in range(0, len(rows), batch):
            part = rows[first : first + batch]
            (read_keys, values), (lm_keys, _) = reads.batch(part), lm.batch(part)
            lm_log_probs = torch.log_softmax(head.logits(lm_keys), dim=-1)
            ours = torch.log_softmax(head.logits(adapter.predict_hidden(read_keys)), dim=-1)
            for lam in lambdas:
                totals[lam] += float(F.nll_loss(mix(ours, lm_log_probs, lam), values, reduction="sum"))
    return {f"{lam:g}": round(total / len(rows), 4) for lam, total in totals.items()}


def reading_cell(bench: pema.PemaBench, cells: Cells, task: pema.Task, seed: int, lambdas: list[float]) -> dict:
    rank = bench.rank(task)
    facts = {
        **bench.facts(task, "hybrid_reading_lambda", seed=seed, rank=rank, pema=asdict(bench.pema_config)),
        "emulator_id": bench.emulator_manifest["id"],
        "lambdas": lambdas,
    }
    found = cells.get(facts)
    if found is not None:
        return found
    hybrid, owner = paired_memories(bench, task)
    adapter, config, _ = bench.pema(task, "hybrid", seed, rank)
    remote, _, _ = bench.pema(task, "owner", seed, rank)
    rows = split_examples(owner, config.validation_fraction, seed).validation_rows
    pema.say(f"{task.slug}: reading λ on {len(rows)} held-out rows, seed {seed}")
    batch = config.batch_size
    result = {
        "reading": mixed_by_lambda(adapter, bench.head, hybrid, owner, rows, lambdas, batch),
        "hybrid_on_full": mixed_by_lambda(adapter, bench.head, owner, owner, rows, lambdas, batch),
        "remote": mixed_by_lambda(remote, bench.head, owner, owner, rows, lambdas, batch),
        "frozen": mixed_by_lambda(remote, bench.head, owner, owner, rows, [0.0], batch)["0"],
        "validation_rows": len(rows),
    }
    return cells.put(facts, result)


def chosen_lambdas(reading: list[dict[str, Any]]) -> dict[str, float]:
    """Per task, the λ whose reading-mode mixed CE, averaged over the seeds probed, is lowest."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in reading):
        found = [r["reading"] for r in reading if r["task"] == task]
        out[task] = float(min(found[0], key=lambda lam: np.mean([f[lam] for f in found])))
    return out


def reading_markdown(reading: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Reading λ: the hybrid adapter as generation runs it with `--emulator`",
        "",
        "Mixed next-token CE (nats) on the same held-out examples, by λ: PEMA reading the bridged emulator's states",
        "mixed with the full model's P_LM (`reading`), the same adapter reading the full model's states, and the",
        "remote adapter (trained on the full model's states). λ = 0 is the frozen model.",
        "",
        "| task | seed | λ | reading | hybrid on full | remote | frozen |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reading:
        for lam in r["reading"]:
            lines.append(
                f"| {r['task']} | {r['seed']} | {lam} | {r['reading'][lam]:.3f} | {r['hybrid_on_full'][lam]:.3f} "
                f"| {r['remote'][lam]:.3f} | {r['frozen']:.3f} |"
            )
    chosen = chosen_lambdas(reading)
    lines += ["", "Chosen λ for the reading mode: " + ", ".join(f"{t} {v:g}" for t, v in chosen.items()) + "."]
    return lines


def markdown(rows: list[dict[str, Any]], reading: list[dict[str, Any]]) -> str:
    lines = [
        "# Hybrid PEMA on the full model's states: held-out examples, key noise",
        "",
        "Next-token cross-entropy (nats) on the PEMA validation examples of each task's training rows (never test",
        "rows). The hybrid adapter trains on the bridged emulator's states (`on emulator`) and is scored on the full",
        "model's states of the same rows (`on full`); `mixed` is its mixture with the frozen model at λ = λ_max, the",
        "distribution constant-λ generation uses. Key noise: training keys + F·z, F·Fᵀ = scale² × the covariance of",
        "the bridge's residual on held-out public text. No gate or length predictor. Made by",
        "`python bench/pema_key_noise.py`.",
    ]
    if rows:
        lines += [
            "",
            "| task | seed | scale | on emulator: PEMA / mixed | on full: PEMA / mixed | frozen model "
            "| remote PEMA / mixed |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
    for r in rows:
        emu, full, remote = r["on_emulator"], r["on_full"], r["remote"]
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['scale']:g} | {emu['pema_ce']:.3f} / {emu['mixed_ce']:.3f} "
            f"| {full['pema_ce']:.3f} / {full['mixed_ce']:.3f} | {r['model_ce']:.3f} "
            f"| {remote['pema_ce']:.3f} / {remote['mixed_ce']:.3f} |"
        )
    if reading:
        lines += reading_markdown(reading)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="0,1,2")
    parser.add_argument("--key-noise-cells", default=str(CELLS))
    parser.add_argument("--key-noise-out", default=str(OUT))
    parser.add_argument("--reading-lambdas", default="", help="λ grid for the reading mode (empty: no probe)")
    known, rest = parser.parse_known_args(argv)
    args = pema.parse_args(rest)
    if args.smoke:
        args = pema.smoke_arguments(args)
        known.key_noise_cells, known.key_noise_out = f"{args.cells}-noise", f"{args.out}-noise"
    bench, cells = pema.PemaBench(args), Cells(Path(known.key_noise_cells))
    rows, reading = [], []
    lambdas = [float(v) for v in known.reading_lambdas.split(",") if v]
    for task in pema.load_tasks(args).values():
        for seed in (int(s) for s in args.seeds.split(",") if s):
            scales = [float(s) for s in known.scales.split(",") if s]
            reference = references(bench, cells, task, seed) if scales else {}
            for scale in scales:
                found = cell(bench, cells, task, scale, seed)
                rows.append({"task": task.slug, "seed": seed, "scale": scale, **found, **reference})
            if lambdas:
                reading.append({"task": task.slug, "seed": seed, **reading_cell(bench, cells, task, seed, lambdas)})
    report = {"emulator": bench.emulator_manifest["id"], "pema": asdict(bench.pema_config), "rows": rows}
    if reading:
        report |= {"reading": reading, "reading_lambda": chosen_lambdas(reading)}
    write_results(Path(known.key_noise_out), report, markdown(rows, reading))
    return report


if __name__ == "__main__":
    main()
