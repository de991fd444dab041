"""How faithful must an emulator be for the top adapter to transfer? A dose-response on held-out rows.

A diagnostic, not a product path. While the offsite adapter trains (and while it is scored on the emulator), the
state entering the emulator's first top adapter block is replaced by (1 − α)·(the emulator's) + α·(the full model's
at the same block), with the full model run alongside on the same tokens, which no data owner can do. α = 0 is the
emulator as shipped, α = 1 the identity emulator; the NMSE of that state against the full model's scales as
(1 − α)². The plug-in (the full model + the adapter) then says how close the gap exit must be for what the adapter
learns to carry over. Rows are each task's held-out training rows, never test rows; one training per cell.

    python bench/transfer_fidelity.py --emulator distill:2-8-2 --tasks trec --alphas 0,0.25,0.5
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer  # noqa: E402
from results_files import write_results  # noqa: E402

import offsite.client.training as training  # noqa: E402
from offsite.common.architectures import blocks  # noqa: E402
from offsite.common.emulator_loading import load_emulator, plug_into_emulator  # noqa: E402
from offsite.owner.adapters.plugin import plug  # noqa: E402
from offsite.owner.emulator.distill import DistillConfig, nmse  # noqa: E402
from offsite.owner.emulator.public_text import GUTENBERG_HELDOUT_TEXT, GUTENBERG_TEXT, load_chunks  # noqa: E402
from offsite.owner.emulator.statistics import counted_tokens  # noqa: E402
from offsite.owner.emulator.whitening import principal_directions  # noqa: E402

OUT = transfer.ROOT / "bench" / "results" / "transfer_fidelity"
SEQ_LEN = DistillConfig.seq_len  # the public text's windows, as distillation and its report card cut them


def first_top_block(manifest: dict[str, Any]) -> tuple[int, int]:
    """(emulator, full-model) index of the first top adapter block: its input is the gap exit."""
    return min(training.chosen_blocks(manifest, "top").items())


def blend_gap_exit(emulator: torch.nn.Module, full: torch.nn.Module, manifest: dict[str, Any], alpha: float) -> None:
    """Hooks `emulator` so that its first top adapter block reads (1 − α)·its own state + α·the full model's."""
    if alpha == 0:
        return  # the emulator as it is: no need to run the full model alongside
    top, full_block = first_top_block(manifest)
    seen: dict[str, torch.Tensor] = {}

    def remember(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen["ids"] = args[0]

    def blend(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():  # right padding: the real tokens' states do not depend on the pads after them
            target = full(input_ids=seen["ids"], output_hidden_states=True).hidden_states[full_block]
        mixed = hidden + alpha * (target.to(hidden.dtype) - hidden)
        if args:
            return (mixed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": mixed}

    emulator.get_input_embeddings().register_forward_pre_hook(remember)
    blocks(emulator)[top].register_forward_pre_hook(blend, with_kwargs=True)


@contextmanager
def hooked_training(hook: Callable[[torch.nn.Module], None]) -> Iterator[None]:
    """train_adapter's emulator, loaded inside it, gets `hook(emulator)` before it trains."""
    load = training.AutoModelForCausalLM.from_pretrained

    def hooked(*args: Any, **kwargs: Any) -> Any:
        model = load(*args, **kwargs)
        hook(model)
        return model

    with mock.patch.object(training.AutoModelForCausalLM, "from_pretrained", side_effect=hooked):
        yield


# Bands of the full model's principal directions at the gap exit, largest variance first.
BANDS = ((0, 4), (4, 16), (16, 64), (64, 128), (128, 256), (256, None))
PUBLIC_WINDOWS = 24  # of the held-out novel's last windows (the report card's text): about 3,000 counted tokens
NOVEL_BAND = 2  # directions 17-64, whose fidelity on task prompts ranked the plug-in gains
TOKENS_RULE = "statistics.counted_tokens"  # which tokens the bands count; part of each cell's key


def band_fidelity(teacher: torch.Tensor, student: torch.Tensor) -> list[dict[str, Any]]:
    """Per band of the teacher's principal directions: the error's variance over the teacher's, and the correlation
    of the two models' coordinates. `teacher` and `student` are [tokens, width] states of the same tokens."""
    centre = teacher.mean(0)
    directions = principal_directions(teacher)[0].to(teacher.dtype)
    ours, theirs = (teacher - centre) @ directions.T, (student - centre) @ directions.T
    error_ratio = (theirs - ours).var(0) / ours.var(0)
    correlation = torch.nn.functional.cosine_similarity(ours - ours.mean(0), theirs - theirs.mean(0), dim=0)
    return [
        {
            "directions": f"{start + 1}-{stop or ours.shape[1]}",
            "error_ratio": float(error_ratio[start:stop].mean()),
            "correlation": float(correlation[start:stop].mean()),
        }
        for start, stop in BANDS
    ]


def exit_states(
    bench: transfer.TransferBench, emulator: torch.nn.Module, manifest: dict[str, Any], ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(full model's, emulator's) gap-exit states of the counted tokens of `ids`, [tokens, width], and their NMSE."""
    top, full_block = first_top_block(manifest)
    with torch.no_grad():
        hidden = bench.loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
        student = emulator(input_ids=ids, output_hidden_states=True).hidden_states[top]
    mask = counted_tokens(ids, hidden)
    return hidden[full_block][mask], student[mask], float(nmse(hidden[full_block], student))


def exit_fidelity(bench: transfer.TransferBench, task: str, spec: str) -> dict[str, Any]:
    """How the emulator's gap-exit states match the full model's on the held-out prompts (with their answers).

    NMSE as distillation measures it, and per band of the full model's principal directions the error's variance
    over the full model's and the correlation of the two models' coordinates (`band_fidelity`; the tokens that
    `statistics.counted_tokens` counts: no sink, no massive token): NMSE is dominated by the few largest
    directions, and the bands show what it leaves out.
    """
    data = bench.task(task)
    facts = {**bench.emulator_facts(data, "exit_fidelity_heldout", spec), "scored_rows": len(data.heldout)}

    def prompts() -> Iterator[torch.Tensor]:
        for example in bench.examples(data.heldout, facts["format"]):
            ids = bench.tokenizer(example.prompt + example.completion, add_special_tokens=False, return_tensors="pt")
            yield ids.input_ids[:, -bench.recipe.max_length :]

    return measured_fidelity(bench, facts, spec, prompts())


def public_fidelity(bench: transfer.TransferBench, task: str, spec: str) -> dict[str, Any]:
    """The same bands on public text the distillation never trained on: the held-out novel's last windows.

    Next to `exit_fidelity` on a task's prompts it separates an emulator that is unfaithful everywhere from one
    that is faithful on the kind of text it was distilled on and not on the data owner's. (Keyed by the task only
    to share the emulator's cell facts; the text is the same for every task.)
    """
    facts = {**bench.emulator_facts(bench.task(task), "exit_fidelity_public", spec), "windows": PUBLIC_WINDOWS}
    return measured_fidelity(bench, facts, spec, public_windows(bench))


def public_windows(bench: transfer.TransferBench) -> Iterator[torch.Tensor]:
    """The held-out novel's last PUBLIC_WINDOWS windows of ids, in batches of 4."""
    text = load_chunks(bench.tokenizer, GUTENBERG_TEXT, SEQ_LEN, 0.0, heldout_path=GUTENBERG_HELDOUT_TEXT)
    yield from text.heldout[-PUBLIC_WINDOWS:].split(4)


def measured_fidelity(
    bench: transfer.TransferBench, facts: dict[str, Any], spec: str, inputs: Iterator[torch.Tensor]
) -> dict[str, Any]:
    """The cell of `facts`, or else the gap exit's NMSE (the mean over `inputs`, batches of ids) and bands, stored."""
    facts = {**facts, "tokens_rule": TOKENS_RULE}
    found = bench.cells.get(facts)
    if found is not None:
        return found
    directory, manifest = bench.emulator(spec)
    emulator, _, _ = load_emulator(directory)
    states = [exit_states(bench, emulator, manifest, ids) for ids in inputs]
    teacher, student = torch.cat([t for t, _, _ in states]), torch.cat([s for _, s, _ in states])
    result = {
        "exit_nmse": sum(error for _, _, error in states) / len(states),
        "bands": band_fidelity(teacher, student),
        "tokens": len(teacher),
    }
    return bench.cells.put(facts, result)


def cell(bench: transfer.TransferBench, task: str, spec: str, alpha: float) -> dict[str, Any]:
    data = bench.task(task)
    facts = bench.probe_facts(data, "plug_in_blended_heldout", spec, 0, len(data.heldout), alpha=alpha)
    found = bench.cells.get(facts)
    if found is not None:
        return found
    directory, manifest = bench.emulator(spec)
    fmt = facts["format"]
    transfer.say(f"{task}: adapter on {spec} with the gap exit blended at α = {alpha}")
    adapter = bench.scratch / f"{task}-blend-{alpha}"
    train = bench.examples(data.train[: bench.recipe.train_rows], fmt)
    with hooked_training(lambda model: blend_gap_exit(model, bench.loaded.model, manifest, alpha)):
        trained = training.train_adapter(directory, train, bench.recipe.train_config(0), adapter, show_progress=False)
    emulator, _, _ = load_emulator(directory)
    blend_gap_exit(emulator, bench.loaded.model, manifest, alpha)
    metric = data.metric
    on_emulator = bench.score(plug_into_emulator(emulator, manifest, adapter), data, data.heldout, fmt)
    plugged = bench.score(plug(bench.loaded.model, adapter, "lora"), data, data.heldout, fmt)
    result = {
        "metric": metric,
        "zero_shot": bench.heldout_zero_shot(data),
        "emulator_adapter": on_emulator[metric],
        "plug_in": plugged[metric],
        "plug_in_bits": plugged[f"{metric}_bits"],
        "train_seconds": round(trained.seconds, 1),
        "last_loss": trained.last_loss,
    }
    return bench.cells.put(facts, result)


def spectrum_row(bench: transfer.TransferBench, task: str, spec: str) -> dict[str, Any]:
    """One emulator's exit fidelity next to its plug-in on the same held-out rows (the layouts probe's cells)."""
    data = bench.task(task)
    metric = data.metric
    _, plugged = bench.offsite(data, spec, 0, items=data.heldout, row_suffix="_heldout")
    fidelity = exit_fidelity(bench, task, spec)
    public = public_fidelity(bench, task, spec)
    return {
        "task": task,
        "emulator": spec,
        "exit_nmse": fidelity["exit_nmse"],
        "bands": fidelity["bands"],
        "public_exit_nmse": public["exit_nmse"],
        "public_bands": public["bands"],
        "plug_in_gain": plugged[metric] - bench.heldout_zero_shot(data),
    }


def markdown(rows: list[dict[str, Any]], spectrum: list[dict[str, Any]]) -> str:
    lines = [
        "# How faithful must the emulator be? (held-out training rows, seed 0)",
        "",
        "The state entering the emulator's top adapter block is blended toward the full model's: (1 − α)·emulator +",
        "α·full, while the adapter trains and when it is scored on the emulator. The gap exit's NMSE scales as",
        "(1 − α)²; the NMSE column is the emulator's, measured on the task's held-out prompts with their answers,",
        "times (1 − α)². One training per cell, 200 held-out rows: about ±5 points of noise. Made by",
        "`python bench/transfer_fidelity.py`.",
        "",
        "| emulator | task | α | exit NMSE | zero-shot | emulator + adapter | plug-in | plug-in − zero-shot |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['emulator']} | {r['task']} | {r['alpha']:.2f} | {r['exit_nmse']:.3f} | {r['zero_shot']:.3f} "
            f"| {r['emulator_adapter']:.3f} | {r['plug_in']:.3f} | {(r['plug_in'] - r['zero_shot']) * 100:+.1f} |"
        )
    if spectrum:
        bands = [b["directions"] for b in spectrum[0]["bands"]]
        lines += [
            "",
            "## Which directions each emulator gets right at the gap exit",
            "",
            "Per band of the full model's principal directions at the exit (1 = largest variance; held-out prompts",
            "with their answers; no sink or massive token): the correlation of the emulator's coordinates with the",
            "full model's. The novel columns measure the same on public text the distillation never trained on (the",
            f"held-out novel's last {PUBLIC_WINDOWS} windows). Plug-in − zero-shot is the layouts probe's",
            "(`transfer_layouts*.md`), on the same rows.",
            "",
            "| emulator | task | exit NMSE | "
            + " | ".join(f"r, {b}" for b in bands)
            + f" | novel: exit NMSE | novel: r, {bands[NOVEL_BAND]} | plug-in − zero-shot |",
            "|---|---|---:|" + "---:|" * len(bands) + "---:|---:|---:|",
        ]
        for r in spectrum:
            correlations = " | ".join(f"{b['correlation']:.2f}" for b in r["bands"])
            lines.append(
                f"| {r['emulator']} | {r['task']} | {r['exit_nmse']:.3f} | {correlations} "
                f"| {r['public_exit_nmse']:.3f} | {r['public_bands'][NOVEL_BAND]['correlation']:.2f} "
                f"| {r['plug_in_gain'] * 100:+.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emulator", default=transfer.DEFAULT_EMULATOR)
    parser.add_argument("--tasks", default="trec")
    parser.add_argument("--alphas", default="0,0.25,0.5")
    parser.add_argument("--spectrum", default="", help="emulators whose exit fidelity to tabulate (comma-separated)")
    parser.add_argument("--out", default=str(OUT))
    known, rest = parser.parse_known_args(argv)
    bench = transfer.TransferBench(transfer.parse_args(rest), transfer.load_recipe())
    tasks = [t for t in known.tasks.split(",") if t]
    rows = []
    for task in tasks:
        error = exit_fidelity(bench, task, known.emulator)["exit_nmse"]
        for alpha in (float(a) for a in known.alphas.split(",")):
            found = cell(bench, task, known.emulator, alpha)
            keep = ("task", "emulator", "alpha", "metric", "zero_shot", "emulator_adapter", "plug_in", "train_seconds")
            rows.append({**{k: found[k] for k in keep}, "exit_nmse": error * (1 - alpha) ** 2})
            transfer.say(f"{task} α = {alpha}: plug-in {found['plug_in']:.3f}")
    spectrum = [spectrum_row(bench, t, spec) for t in tasks for spec in transfer.split_specs(known.spectrum)]
    report = {"recipe": transfer.asdict(bench.recipe), "seed": 0, "rows": rows, "spectrum": spectrum}
    write_results(Path(known.out), report, markdown(rows, spectrum))


if __name__ == "__main__":
    main()
