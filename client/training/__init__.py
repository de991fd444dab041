"""Local training on a pulled emulator: only the adapter blocks learn, and only their weights are written."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ...common import output_dir, processes
from ...common.adapter_format import (
    BLOCK_INDICES_FIELD,
    EMULATOR_INDICES,
    FULL,
    LORA,
    METHODS,
    adapter_manifest_body,
)
from ...common.architectures import ArchitectureSpec, spec_for
from ...common.examples import Example, tokenize_for_training
from ...common.manifest import verify_bundle, write_manifest
from ...common.model_loading import ensure_pad_token
from . import full, lora
from .config import EVERY_BLOCK, TRAIN_BLOCKS, TrainConfig
from .loop import LoopStats, fit

# Manifest fields from which the training-example count can be read (steps × batch size ÷ epochs; --limit). Under DP
# the noise multiplier with ε, δ, epochs and batch size gives the sampling rate, so those two are withheld too.
COUNT_FIELDS = ("examples", "steps", "limit")
DP_COUNT_FIELDS = ("epochs", "batch_size", "sample_rate", "steps")


@dataclass
class TrainResult:
    adapter_dir: str
    method: str
    emulator: str
    examples: int
    steps: int
    parameters: int
    first_loss: float
    last_loss: float
    seconds: float
    privacy: dict[str, Any] | None = None  # the DP run's spent ε, δ and noise multiplier; None without DP

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def chosen_blocks(manifest: dict[str, Any], which: str) -> dict[int, int]:
    """Emulator index → the index the adapter's keys use: the full model's for adapter blocks (top/bottom split at
    the full model's middle), the emulator's own for every block."""
    if which not in TRAIN_BLOCKS:
        raise ValueError(f"train blocks must be one of {', '.join(TRAIN_BLOCKS)}, not {which!r}")
    if which == EVERY_BLOCK:
        return {i: i for i in range(len(manifest["block_map"]))}
    blocks = manifest["adapter_blocks"]
    middle = manifest["base_depth"] / 2
    pairs = zip(blocks["emulator"], blocks["full"], strict=True)
    chosen = {e: f for e, f in pairs if which == "all" or (f >= middle) == (which == "top")}
    if not chosen:
        raise ValueError(f"this emulator has no {which} adapter blocks")
    return chosen


def manifest_extra(config: TrainConfig, examples: int, stats: LoopStats) -> dict[str, Any]:
    """The manifest's training record: it goes to the owner with the push, so no example count unless asked."""
    training: dict[str, Any] = {**asdict(config), "lr": config.lr, "examples": examples, "steps": stats.steps}
    privacy = dict(stats.privacy) if stats.privacy is not None else None
    if not config.record_examples:
        withheld = COUNT_FIELDS + (DP_COUNT_FIELDS if privacy is not None else ())
        training = {k: v for k, v in training.items() if k not in withheld}
        privacy = {k: v for k, v in privacy.items() if k not in withheld} if privacy is not None else None
    return {"training": training} if privacy is None else {"training": training, "privacy": privacy}


def train_adapter(
    emulator_dir: Path,
    examples: list[Example],
    config: TrainConfig,
    out: Path,
    owner_key: str | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Verifies the emulator bundle, trains its adapter blocks on `examples`, writes the adapter bundle."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.train_blocks == EVERY_BLOCK and config.method != LORA:
        raise ValueError(f"train blocks {EVERY_BLOCK} trains LoRA; a {config.method} adapter would be the emulator")
    manifest = verify_bundle(emulator_dir, owner_key)
    torch.manual_seed(config.seed)
    emulator = AutoModelForCausalLM.from_pretrained(emulator_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(emulator_dir)
    spec = spec_for(emulator.config)
    mapping = chosen_blocks(manifest, config.train_blocks)
    emulator_blocks = sorted(mapping)

    model = (
        lora.attach(emulator, spec, emulator_blocks, config)
        if config.method == LORA
        else full.attach(emulator, spec, emulator_blocks)
    )
    data = tokenize_for_training(tokenizer, examples, config.max_length)
    stats = fit(model, data, ensure_pad_token(tokenizer), config, show_progress)
    extra = manifest_extra(config, len(examples), stats)
    if config.train_blocks == EVERY_BLOCK:
        extra[BLOCK_INDICES_FIELD] = EMULATOR_INDICES
    # under accelerate launch every rank holds the same weights: rank 0 writes them (and reports the count)
    parameters = _write(model, spec, mapping, manifest, config, extra, out) if processes.is_main_process() else 0
    processes.wait_for_everyone()
    return TrainResult(
        str(out),
        config.method,
        manifest["id"],
        len(examples),
        stats.steps,
        parameters,
        stats.first_loss,
        stats.last_loss,
        stats.seconds,
        stats.privacy,
    )


def _write(
    model: torch.nn.Module,
    spec: ArchitectureSpec,
    mapping: dict[int, int],
    manifest: dict[str, Any],
    config: TrainConfig,
    extra: dict[str, Any],
    out: Path,
) -> int:
    """Writes the adapter bundle to `out` (staged, then renamed); returns its parameter count."""
    partial = output_dir.begin(out, output_dir.ADAPTER)  # refuses an --out holding anything but an adapter
    partial.mkdir()
    if config.method == LORA:
        parameters = lora.export(model, spec, mapping, manifest.get("base_model", ""), partial)
    else:
        assert config.method == FULL
        parameters = full.export(model, spec, mapping, partial)
    write_manifest(partial, adapter_manifest_body(config.method, manifest, extra))
    output_dir.commit(partial, out, output_dir.ADAPTER)
    return parameters
