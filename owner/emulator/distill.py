"""Offsite-Tuning's distilled emulator: start from the uniform drop, then train only the kept middle blocks.

The teacher is the full model's original middle stack; the student is the emulator. Both see the same public text,
and the loss is `LM + nmse_weight · NMSE` on the hidden state that leaves the middle (the input of the top adapter);
with an importance placement (`place=`) there are several gaps, and the NMSE is averaged over the state leaving each.
The adapter blocks, embeddings, final norm and head stay frozen, so the bargain (what the data owner may train)
does not change.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedModel

from ...common.architectures import block_prefix, depth, spec_for
from . import uniform
from .interface import BuildRequest, Built, positive_int
from .placement import gaps, parse_placement
from .public_text import TextChunks, load_chunks, window_perplexity

PROGRESS_FILE = "progress.json"
STATE_FILE = "state.safetensors"
BEST_FILE = "best.safetensors"


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    warmup_steps: int = 10
    nmse_weight: float = 30.0
    eval_every: int = 50
    heldout_fraction: float = 0.05
    max_heldout_chunks: int = 32  # keeps each checkpoint evaluation to seconds on CPU
    seed: int = 0


@dataclass
class DistillReport:
    steps: int
    best_step: int
    best_heldout_perplexity: float
    start_heldout_perplexity: float
    first_nmse: float
    last_nmse: float
    seconds: float
    resumed_from: int


def nmse(teacher: torch.Tensor, student: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """mean(((teacher − student) / rms(teacher))²), the rms taken per token over the hidden dimension."""
    rms = teacher.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(eps)
    return ((teacher - student) / rms).pow(2).mean()


def gap_exits(block_map: list[int], adapters: list[int], total_depth: int) -> list[tuple[int, int]]:
    """`hidden_states` indices (teacher, student) of the state leaving each gap; one gap with adapters at the ends."""
    exits = []
    for run in gaps(adapters, total_depth):
        exits.append((run[-1] + 1, sum(1 for block in block_map if block <= run[-1])))
    return exits


def middle_parameters(
    emulator: PreTrainedModel, block_map: list[int], adapters: list[int]
) -> dict[str, torch.nn.Parameter]:
    """The trainable (non-adapter) blocks' parameters, by their names in the emulator."""
    spec = spec_for(emulator.config)
    prefixes = tuple(block_prefix(spec, i) for i, block in enumerate(block_map) if block not in adapters)
    return {name: p for name, p in emulator.named_parameters() if name.startswith(prefixes)}


def cosine_lr(config: DistillConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_order(count: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Window indices of batch `step`: a fresh shuffle per epoch, so a resumed run draws the same batches."""
    per_epoch = max(1, count // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[position * batch_size : (position + 1) * batch_size]


class _Checkpoint:
    """Resumable state in `directory`: safetensors for weights and optimizer moments, JSON for the rest."""

    def __init__(self, directory: Path, identity: dict[str, Any]):
        self.directory = directory
        self.identity = identity

    def load(self, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.AdamW) -> dict[str, Any] | None:
        progress_path = self.directory / PROGRESS_FILE
        if not progress_path.is_file():
            return None
        progress = json.loads(progress_path.read_text())
        if progress.get("identity") != self.identity:
            return None  # another run's checkpoint: start over rather than mix them
        tensors = load_file(self.directory / STATE_FILE)
        with torch.no_grad():
            for name, parameter in params.items():
                parameter.copy_(tensors[f"param/{name}"])
        state = optimizer.state_dict()
        for index, name in enumerate(params):
            if f"exp_avg/{name}" in tensors:
                state["state"][index] = {
                    "step": torch.tensor(float(progress["step"])),
                    "exp_avg": tensors[f"exp_avg/{name}"],
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"],
                }
        optimizer.load_state_dict(state)
        return progress

    def save(
        self, progress: dict[str, Any], params: dict[str, torch.nn.Parameter], optimizer: torch.optim.AdamW
    ) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"param/{name}": p.detach().contiguous() for name, p in params.items()}
        for index, name in enumerate(params):
            moments = optimizer.state_dict()["state"].get(index)
            if moments:
                tensors[f"exp_avg/{name}"] = moments["exp_avg"].contiguous()
                tensors[f"exp_avg_sq/{name}"] = moments["exp_avg_sq"].contiguous()
        save_file(tensors, self.directory / (STATE_FILE + ".tmp"))
        (self.directory / (STATE_FILE + ".tmp")).replace(self.directory / STATE_FILE)
        (self.directory / (PROGRESS_FILE + ".tmp")).write_text(json.dumps(dict(progress, identity=self.identity)))
        (self.directory / (PROGRESS_FILE + ".tmp")).replace(self.directory / PROGRESS_FILE)

    def save_best(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in params.items()}, self.directory / (BEST_FILE + ".tmp"))
        (self.directory / (BEST_FILE + ".tmp")).replace(self.directory / BEST_FILE)

    def load_best(self, params: dict[str, torch.nn.Parameter]) -> None:
        tensors = load_file(self.directory / BEST_FILE)
        with torch.no_grad():
            for name, parameter in params.items():
                parameter.copy_(tensors[name])


def distill_middle(
    full: PreTrainedModel,
    emulator: PreTrainedModel,
    block_map: list[int],
    adapters: list[int],
    text: TextChunks,
    config: DistillConfig,
    checkpoint_dir: Path,
    show_progress: bool = True,
) -> DistillReport:
    """Trains `emulator`'s non-adapter blocks in place; leaves the best checkpoint by held-out perplexity loaded."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    exits = gap_exits(block_map, adapters, depth(full.config))
    full.eval()
    for parameter in emulator.parameters():
        parameter.requires_grad_(False)
    params = middle_parameters(emulator, block_map, adapters)
    for parameter in params.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    heldout = text.heldout[: config.max_heldout_chunks]
    identity = {"config": asdict(config), "text_sha256": text.sha256, "block_map": block_map}
    checkpoint = _Checkpoint(checkpoint_dir, identity)

    progress = checkpoint.load(params, optimizer)
    if progress is None:
        start = window_perplexity(emulator, heldout, config.batch_size)
        progress = {"step": 0, "start_perplexity": start, "best_perplexity": start, "best_step": 0, "nmse": []}
        checkpoint.save_best(params)
    start_step = progress["step"]
    nmse_history: list[float] = progress["nmse"]

    emulator.train()
    with tqdm(total=config.steps, initial=start_step, desc="distilling", unit="step", disable=not show_progress) as bar:
        for step in range(start_step, config.steps):
            batch = text.train[batch_order(len(text.train), config.batch_size, config.seed, step)]
            with torch.no_grad():
                targets = full.base_model(input_ids=batch, output_hidden_states=True).hidden_states
            out = emulator(input_ids=batch, labels=batch, output_hidden_states=True)
            distance = torch.stack([nmse(targets[t], out.hidden_states[s]) for t, s in exits]).mean()
            loss = out.loss + config.nmse_weight * distance
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config, step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            nmse_history.append(distance.item())
            bar.update(1)
            bar.set_postfix(
                lm=f"{out.loss.item():.3f}",
                nmse=f"{nmse_history[-1]:.4f}",
                best_ppl=f"{progress['best_perplexity']:.2f}",
            )
            done = step + 1
            if done % config.eval_every == 0 or done == config.steps:
                current = window_perplexity(emulator, heldout, config.batch_size)
                if current < progress["best_perplexity"]:
                    progress.update(best_perplexity=current, best_step=done)
                    checkpoint.save_best(params)
                checkpoint.save(dict(progress, step=done), params, optimizer)

    checkpoint.load_best(params)
    for parameter in emulator.parameters():
        parameter.requires_grad_(False)
    emulator.eval()
    window = max(1, min(10, len(nmse_history) // 4)) if nmse_history else 1
    return DistillReport(
        steps=config.steps,
        best_step=progress["best_step"],
        best_heldout_perplexity=progress["best_perplexity"],
        start_heldout_perplexity=progress["start_perplexity"],
        first_nmse=sum(nmse_history[:window]) / window if nmse_history else float("nan"),
        last_nmse=sum(nmse_history[-window:]) / window if nmse_history else float("nan"),
        seconds=time.perf_counter() - started,
        resumed_from=start_step,
    )


OPTIONS: Mapping[str, Callable[[str], Any]] = {"steps": positive_int, "data": Path, "place": parse_placement}


def build(request: BuildRequest) -> Built:
    """The uniform drop, then distillation of its kept blocks on the owner's public text (default WikiText-2)."""
    start = uniform.build(request)
    config = DistillConfig(steps=request.options.get("steps", DistillConfig.steps))
    text = load_chunks(request.tokenizer, request.options.get("data"), config.seq_len, config.heldout_fraction)
    report = distill_middle(
        request.full,
        start.model,
        start.block_map,
        start.adapters or [],
        text,
        config,
        request.work_dir,
        request.show_progress,
    )
    params = {
        **start.params,
        "steps": config.steps,
        "tokens_per_step": config.batch_size * config.seq_len,
        "lr": config.lr,
        "nmse_weight": config.nmse_weight,
        "public_text_sha256": text.sha256,
        "best_step": report.best_step,
        "heldout_perplexity_before": round(report.start_heldout_perplexity, 4),
        "heldout_perplexity_after": round(report.best_heldout_perplexity, 4),
        "nmse_first": round(report.first_nmse, 6),
        "nmse_last": round(report.last_nmse, 6),
    }
    return Built(start.model, start.block_map, params, start.adapters)
