"""Evaluation from the data owner's side: remotely on the plugged full model, or locally on the emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..common.contract import PLUG_IN
from ..common.emulator_loading import load_emulator, plug_into_emulator
from ..common.examples import Example
from ..common.rpc import pb
from ..common.scoring import evaluate
from .connection import Remote


def evaluate_remote(
    remote: Remote,
    examples: list[Example],
    adapter_id: str = "",
    batch_size: int = 0,
    show_progress: bool = True,
    delivery: str = PLUG_IN,
) -> dict[str, Any]:
    request = pb.EvaluateRequest(
        adapter_id=adapter_id,
        batch_size=batch_size,
        delivery=delivery,
        examples=[
            pb.Example(prompt=e.prompt, completion=e.completion, choices=list(e.choices), text=e.text) for e in examples
        ],
    )
    with tqdm(desc="owner evaluating", unit="seq", disable=not show_progress) as bar:
        for event in remote.evaluate(request):
            if event.WhichOneof("event") == "progress":
                bar.total = event.progress.total
                bar.n = event.progress.done
                bar.refresh()
            else:
                report = event.report
                return {
                    "where": "owner",
                    "adapter_id": adapter_id,
                    "delivery": delivery,
                    "examples": report.examples,
                    "tokens": report.tokens,
                    "loss": report.loss,
                    "perplexity": report.perplexity,
                    "accuracy": report.accuracy,
                    "scored_choices": report.scored_choices,
                    "seconds": report.seconds,
                    "peak_rss_bytes": report.peak_rss_bytes,
                    "accuracy_norm": report.accuracy_norm,
                    "correct": list(report.correct),
                }
    raise RuntimeError("the owner closed the evaluation without a report")


def evaluate_local(
    emulator_dir: Path,
    examples: list[Example],
    adapter_dir: Path | None = None,
    owner_key: str | None = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> dict[str, Any]:
    model, tokenizer, manifest = load_emulator(emulator_dir, owner_key)
    plugged = plug_into_emulator(model, manifest, adapter_dir) if adapter_dir else model
    with tqdm(desc="evaluating on the emulator", unit="seq", disable=not show_progress) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        report = evaluate(plugged, tokenizer, examples, batch_size=batch_size, progress=progress)
    return {
        "where": "local emulator",
        "emulator": manifest["id"],
        "adapter": str(adapter_dir or ""),
        **report.as_dict(),
    }
