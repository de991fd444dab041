"""Offsite-Tuning's distilled emulator: start from the uniform drop, then train only the kept middle blocks.

The teacher is the full model; the student is the emulator. Both read the same public text: by default the shipped
excerpts of ten Project Gutenberg novels, general prose disjoint from every evaluation task. The loss is

    LM + nmse_weight · mean NMSE over the kept boundaries + exit_weight · mean NMSE at the gap exits
       + whiten_weight · mean whitened error at the gap exits
       + kd_weight · KL(teacher ‖ student next-token distribution)

where a kept boundary is the state entering each block that follows a kept middle block: the student's state there
should be the teacher's state entering the same full-model block (for the last kept block of a gap, the state that
leaves the gap, i.e. the input of the next adapter block). Logit KD is off unless `kd=` gives it a weight. The
whitened error (`whiten=`, off by default; `whitening.ExitWhitening`) measures the exit error along the full model's
largest principal directions with each scaled to unit variance, fitted on the teacher's states for the first
WHITEN_WINDOWS training windows: NMSE lets the few largest directions decide, and the top adapter reads more.

`chat=F` recasts a fraction F of the windows as one turn of the model's chat template (`public_text.chat_shaped`):
an instruct model's data owner prompts through that template, which novels never show (the default emulator's gap
exit NMSE is 0.52 on chat-formatted TREC prompts, 0.25 on prose). Measured at a quarter of the budget, it lowers
that NMSE (to 0.37) but does not make the adapter transfer (bench/results/transfer_fidelity.md says why).
`sample=F` makes a fraction F of the windows the run sees the teacher's own text, written from the chat template's
head (`public_text.teacher_samples`): the kind of text the model was tuned to read, with no data owner's data.
Measured on 2-8-2 at a quarter of the budget, neither `whiten=10` nor `sample=0.5` raised the exit's fidelity on
a task's prompts in directions 17–64 (0.31 and 0.40 against the default's 0.36) or the plug-in.

Under `accelerate launch --num_processes N` the run is data-parallel (DDP): each process takes every N-th window of
the same global batch, and because every term is a mean over equally many tokens, DDP's gradient mean is the
one-process gradient; rank 0 alone writes checkpoints. Run plainly it is the single-process loop it always was.

The budget is `tokens=` (or `steps=`); the run checkpoints every `eval_every` steps into the build's work directory,
resumes from there after a crash, shows a progress bar, and keeps the checkpoint with the lowest loss (LM +
nmse_weight · NMSE at the gap exits) on the first windows of a held-out novel (Frankenstein) that it never trains
on; the report card scores the last windows of that novel. The adapter blocks, embeddings, final norm and head stay
frozen, so the bargain (what the data owner may train) does not change.

The teacher's forward is a third to a half of a step (its targets differ per window; the corpus is seen about once,
so there is nothing to cache). `teacher=bf16` runs it under bf16 autocast, for CPUs and GPUs with bf16 units: its
targets move by an NMSE of about 1e-4, far below what distillation reaches. bench/distill_throughput.py measures it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedModel

from ...common import processes
from ...common.architectures import block_prefix, depth, spec_for
from ...common.model_loading import input_device
from . import uniform
from .interface import BuildRequest, Built, positive_int
from .layout import LayoutError
from .placement import gaps, parse_placement
from .public_text import (
    GUTENBERG_HELDOUT_TEXT,
    GUTENBERG_TEXT,
    TextChunks,
    chat_shaped,
    load_chunks,
    with_teacher_samples,
)
from .statistics import counted_tokens
from .whitening import ExitWhitening, fit_exit_whitenings

PROGRESS_FILE = "progress.json"
STATE_FILE = "state.safetensors"
BEST_FILE = "best.safetensors"
IGNORE_INDEX = -100
DEFAULT_TOKENS = 393_216  # 768 steps of 4 × 128 tokens: about 22 minutes for SmolLM2 2-8-2 on 2 cores
OPTIONAL_PARAMS = ("chat_fraction", "sample_fraction", "whiten_weight", "bf16_teacher")  # in a manifest only when not 0
WHITEN_WINDOWS = 64  # training windows whose teacher states fit the whitening: 8k tokens for 64 directions


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 192
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    warmup_steps: int = 10
    nmse_weight: float = 30.0
    kd_weight: float = 0.0
    exit_weight: float = 0.0  # extra NMSE weight on the gap exits: the states the top adapter blocks read
    whiten_weight: float = 0.0  # weight of the whitened error at the gap exits (whitening.ExitWhitening)
    chat_fraction: float = 0.0  # of the windows recast as a chat turn in the model's template (public_text.chat_shaped)
    sample_fraction: float = 0.0  # of the windows seen written by the teacher itself (public_text.with_teacher_samples)
    bf16_teacher: bool = False  # the frozen teacher's forward under bf16 autocast: faster where the CPU has bf16 units
    eval_every: int = 48
    heldout_fraction: float = 0.05  # of a `data=` file; the shipped corpus holds out a whole novel instead
    max_heldout_chunks: int = 32  # keeps each checkpoint evaluation to seconds on CPU
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def with_tokens(self, tokens: int) -> DistillConfig:
        """The same run with as many steps as `tokens` training tokens need (rounded up)."""
        return DistillConfig(**{**asdict(self), "steps": math.ceil(tokens / self.tokens_per_step)})


@dataclass
class DistillReport:
    steps: int
    best_step: int
    best_heldout_perplexity: float
    start_heldout_perplexity: float
    best_heldout_nmse: float  # at the gap exits, on the held-out windows
    start_heldout_nmse: float
    best_heldout_whitened: float  # the whitened error at the gap exits, on the held-out windows
    start_heldout_whitened: float
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


def kept_boundaries(block_map: list[int], adapters: list[int], total_depth: int) -> list[tuple[int, int]]:
    """`hidden_states` indices (teacher, student) of the state after every kept middle block and at every gap exit.

    The student's state entering its block i should be the teacher's state entering full-model block block_map[i];
    after the model's last block both are the final state. A gap that keeps no block still has its exit compared.
    """
    after_kept = {
        (block_map[position] if position < len(block_map) else total_depth, position)
        for position in range(1, len(block_map) + 1)
        if block_map[position - 1] not in adapters
    }
    return sorted(after_kept | set(gap_exits(block_map, adapters, total_depth)))


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


def logit_kd(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions, averaged over tokens."""
    vocab = student_logits.shape[-1]
    return F.kl_div(
        F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1),
        F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1),
        log_target=True,
        reduction="batchmean",
    )


def teacher_targets(
    full: PreTrainedModel, batch: torch.Tensor, config: DistillConfig
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The frozen teacher's hidden states for one batch, and its logits when KD needs them; computed once, in fp32."""
    with torch.no_grad(), torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=config.bf16_teacher):
        out = (full if config.kd_weight else full.base_model)(input_ids=batch, output_hidden_states=True)
    states = tuple(state.float() for state in out.hidden_states)
    return states, out.logits.float() if config.kd_weight else None


class DistillObjective(torch.nn.Module):
    """The training loss of one batch as a module: DDP syncs gradients only for calls through its own forward."""

    def __init__(
        self,
        emulator: PreTrainedModel,
        config: DistillConfig,
        boundaries: list[tuple[int, int]],
        exits: list[tuple[int, int]],
        whitenings: list[ExitWhitening],
    ):
        super().__init__()
        self.emulator, self.config, self.boundaries, self.exits = emulator, config, boundaries, exits
        self.whitenings = whitenings

    def forward(
        self, batch: torch.Tensor, teacher_states: tuple[torch.Tensor, ...], teacher_logits: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, LM loss, NMSE over the kept boundaries)."""
        config = self.config
        out = self.emulator(input_ids=batch, labels=batch, output_hidden_states=True)
        distance = torch.stack([nmse(teacher_states[t], out.hidden_states[s]) for t, s in self.boundaries]).mean()
        loss = out.loss + config.nmse_weight * distance
        if config.exit_weight:
            at_exits = torch.stack([nmse(teacher_states[t], out.hidden_states[s]) for t, s in self.exits]).mean()
            loss = loss + config.exit_weight * at_exits
        if config.whiten_weight:
            mask = counted_tokens(batch, teacher_states)
            whitened = whitened_exit_error(self.whitenings, self.exits, teacher_states, out.hidden_states, mask)
            loss = loss + config.whiten_weight * whitened
        if teacher_logits is not None:
            loss = loss + config.kd_weight * logit_kd(teacher_logits, out.logits)
        return loss, out.loss, distance


def whitened_exit_error(
    whitenings: list[ExitWhitening],
    exits: list[tuple[int, int]],
    teacher_states: Mapping[int, torch.Tensor] | tuple[torch.Tensor, ...],
    student_states: tuple[torch.Tensor, ...],
    mask: torch.Tensor,
) -> torch.Tensor:
    """The whitened error averaged over the gap exits, on the `mask`ed tokens (`statistics.counted_tokens`)."""
    errors = [
        whitening.error(teacher_states[t], student_states[s], mask)
        for whitening, (t, s) in zip(whitenings, exits, strict=True)
    ]
    return torch.stack(errors).mean()


def heldout_loss(config: DistillConfig, perplexity: float, exit_nmse: float, exit_whitened: float) -> float:
    """What picks the checkpoint: the training loss without KD, on held-out text and at the gap exits only."""
    return math.log(perplexity) + config.nmse_weight * exit_nmse + config.whiten_weight * exit_whitened


class HeldOut:
    """The held-out windows, the teacher's gap-exit states and counted tokens on them, computed once (it is frozen)."""

    def __init__(
        self,
        full: PreTrainedModel,
        windows: torch.Tensor,
        exits: list[tuple[int, int]],
        batch_size: int,
        whitenings: list[ExitWhitening],
    ):
        self.windows, self.exits, self.batch_size = windows.to(input_device(full)), exits, batch_size
        self.whitenings = whitenings
        self.targets: list[dict[int, torch.Tensor]] = []
        self.masks: list[torch.Tensor] = []
        with torch.no_grad():
            for batch in self.windows.split(batch_size):
                states = full.base_model(input_ids=batch, output_hidden_states=True).hidden_states
                self.targets.append({t: states[t] for t, _ in exits})
                self.masks.append(counted_tokens(batch, states))

    @torch.no_grad()
    def score(self, emulator: PreTrainedModel) -> tuple[float, float, float]:
        """The emulator's perplexity on the windows, its NMSE and its whitened error at the gap exits."""
        was_training = emulator.training
        emulator.eval()
        loss = distance = whitened = 0.0
        batches = zip(self.windows.split(self.batch_size), self.targets, self.masks, strict=True)
        for batch, targets, mask in batches:
            out = emulator(input_ids=batch, labels=batch, output_hidden_states=True)
            loss += float(out.loss) * len(batch)
            exits = [nmse(targets[t], out.hidden_states[s]) for t, s in self.exits]
            distance += float(torch.stack(exits).mean()) * len(batch)
            error = whitened_exit_error(self.whitenings, self.exits, targets, out.hidden_states, mask)
            whitened += float(error) * len(batch)
        emulator.train(was_training)
        count = len(self.windows)
        return math.exp(loss / count), distance / count, whitened / count


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
    """Trains `emulator`'s non-adapter blocks in place; leaves the checkpoint with the best `heldout_loss` loaded."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    total = depth(full.config)
    boundaries = kept_boundaries(block_map, adapters, total)
    exits = gap_exits(block_map, adapters, total)
    full.eval()
    accelerator = Accelerator() if processes.process_count() > 1 else None
    if accelerator is not None:
        if config.batch_size % accelerator.num_processes:
            raise LayoutError(
                f"distillation's batch of {config.batch_size} windows does not split evenly over "
                f"{accelerator.num_processes} processes; launch a number of processes that divides it"
            )
        full.to(accelerator.device)
        emulator.to(accelerator.device)
    for parameter in emulator.parameters():
        parameter.requires_grad_(False)
    params = middle_parameters(emulator, block_map, adapters)
    for parameter in params.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=0.0)
    main = processes.is_main_process()
    # Fitted and reported even when not trained on: the held-out whitened error is how emulators compare.
    train_windows = text.train[:WHITEN_WINDOWS].to(input_device(full))
    whitenings = fit_exit_whitenings(full.base_model, train_windows, [t for t, _ in exits], 4)
    heldout = HeldOut(full, text.heldout[: config.max_heldout_chunks], exits, 4, whitenings)
    identity = {"config": asdict(config), "text_sha256": text.sha256, "block_map": block_map}
    checkpoint = _Checkpoint(checkpoint_dir, identity)

    progress = checkpoint.load(params, optimizer)
    if progress is None:
        perplexity, distance, whitened = heldout.score(emulator)
        progress = {
            "step": 0,
            "start_perplexity": perplexity,
            "best_perplexity": perplexity,
            "start_heldout_nmse": distance,
            "best_heldout_nmse": distance,
            "start_heldout_whitened": whitened,
            "best_heldout_whitened": whitened,
            "best_step": 0,
            "nmse": [],
        }
        if main:
            checkpoint.save_best(params)
    start_step = progress["step"]
    nmse_history: list[float] = progress["nmse"]

    objective = DistillObjective(emulator, config, boundaries, exits, whitenings)
    if accelerator is not None:
        objective, optimizer = accelerator.prepare(objective, optimizer)
    emulator.train()
    show_progress = show_progress and main  # one bar, not one per process
    with tqdm(total=config.steps, initial=start_step, desc="distilling", unit="step", disable=not show_progress) as bar:
        for step in range(start_step, config.steps):
            batch = text.train[batch_order(len(text.train), config.batch_size, config.seed, step)]
            if accelerator is not None:  # this process's share of the global batch
                batch = batch[accelerator.process_index :: accelerator.num_processes].to(accelerator.device)
            loss, lm, distance = objective(batch, *teacher_targets(full, batch, config))
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config, step)
            if accelerator is not None:
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(list(params.values()), 1.0)
                lm, distance = (accelerator.reduce(x.detach(), reduction="mean") for x in (lm, distance))
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            nmse_history.append(distance.item())
            bar.update(1)
            bar.set_postfix(
                lm=f"{lm.item():.3f}",
                nmse=f"{nmse_history[-1]:.4f}",
                best_ppl=f"{progress['best_perplexity']:.2f}",
            )
            done = step + 1
            if done % config.eval_every == 0 or done == config.steps:
                perplexity, heldout_nmse, whitened = heldout.score(emulator)
                best = (progress["best_perplexity"], progress["best_heldout_nmse"], progress["best_heldout_whitened"])
                if heldout_loss(config, perplexity, heldout_nmse, whitened) < heldout_loss(config, *best):
                    progress.update(
                        best_perplexity=perplexity,
                        best_heldout_nmse=heldout_nmse,
                        best_heldout_whitened=whitened,
                        best_step=done,
                    )
                    if main:
                        checkpoint.save_best(params)
                if main:
                    checkpoint.save(dict(progress, step=done), params, optimizer)

    processes.wait_for_everyone()  # rank 0's best checkpoint is on disk before anyone reads it
    checkpoint.load_best(params)
    if accelerator is not None:  # the report card and the bundle are made on the CPU, as in a plain run
        full.cpu()
        emulator.cpu()
    for parameter in emulator.parameters():
        parameter.requires_grad_(False)
    emulator.eval()
    window = max(1, min(10, len(nmse_history) // 4)) if nmse_history else 1
    return DistillReport(
        steps=config.steps,
        best_step=progress["best_step"],
        best_heldout_perplexity=progress["best_perplexity"],
        start_heldout_perplexity=progress["start_perplexity"],
        best_heldout_nmse=progress["best_heldout_nmse"],
        start_heldout_nmse=progress["start_heldout_nmse"],
        best_heldout_whitened=progress["best_heldout_whitened"],
        start_heldout_whitened=progress["start_heldout_whitened"],
        first_nmse=sum(nmse_history[:window]) / window if nmse_history else float("nan"),
        last_nmse=sum(nmse_history[-window:]) / window if nmse_history else float("nan"),
        seconds=time.perf_counter() - started,
        resumed_from=start_step,
    )


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:  # also refuses nan
        raise ValueError("must be a number ≥ 0")
    return value


def teacher_precision(text: str) -> bool:
    """`teacher=bf16` or `teacher=fp32` (the default): True for bf16."""
    if text not in ("bf16", "fp32"):
        raise ValueError("must be bf16 or fp32")
    return text == "bf16"


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError("must be a fraction in [0, 1]")
    return value


OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "tokens": positive_int,
    "steps": positive_int,
    "kd": non_negative_float,
    "exit": non_negative_float,
    "whiten": non_negative_float,
    "chat": fraction,
    "sample": fraction,
    "data": Path,
    "place": parse_placement,
    "teacher": teacher_precision,
}


def config_for(options: Mapping[str, Any]) -> DistillConfig:
    """The run the builder options ask for: `tokens=` or `steps=` (not both), `kd=`; DEFAULT_TOKENS otherwise."""
    if "tokens" in options and "steps" in options:
        raise LayoutError("give the distillation budget as tokens= or as steps=, not both")
    config = DistillConfig(
        kd_weight=options.get("kd", DistillConfig.kd_weight),
        exit_weight=options.get("exit", DistillConfig.exit_weight),
        whiten_weight=options.get("whiten", DistillConfig.whiten_weight),
        chat_fraction=options.get("chat", DistillConfig.chat_fraction),
        sample_fraction=options.get("sample", DistillConfig.sample_fraction),
        bf16_teacher=options.get("teacher", DistillConfig.bf16_teacher),
    )
    if "steps" in options:
        return DistillConfig(**{**asdict(config), "steps": options["steps"]})
    return config.with_tokens(options.get("tokens", DEFAULT_TOKENS))


def build(request: BuildRequest) -> Built:
    """The uniform drop, then distillation of its kept blocks on the owner's public text (default: the novels)."""
    config = config_for(request.options)
    data = request.options.get("data")
    if data is None:
        text = load_chunks(request.tokenizer, GUTENBERG_TEXT, config.seq_len, 0.0, heldout_path=GUTENBERG_HELDOUT_TEXT)
    else:
        text = load_chunks(request.tokenizer, data, config.seq_len, config.heldout_fraction)
    if config.chat_fraction:
        shape = partial(chat_shaped, request.tokenizer, fraction=config.chat_fraction, seed=config.seed)
        text = replace(text, train=shape(text.train), heldout=shape(text.heldout))
    if config.sample_fraction:
        seen, share = config.steps * config.batch_size, config.sample_fraction
        own = with_teacher_samples(
            request.full, request.tokenizer, text.train, seen, share, config.seed, request.show_progress
        )
        text = replace(text, train=own)
    start = uniform.build(request)
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
        "tokens": config.steps * config.tokens_per_step,
        "tokens_per_step": config.tokens_per_step,
        "lr": config.lr,
        "nmse_weight": config.nmse_weight,
        "kd_weight": config.kd_weight,
        "exit_weight": config.exit_weight,
        # only when set, so that the manifests (and bench cells) of builds without them keep their keys
        **{name: getattr(config, name) for name in OPTIONAL_PARAMS if getattr(config, name)},
        "boundaries": len(kept_boundaries(start.block_map, start.adapters or [], depth(request.full.config))),
        "public_text": "gutenberg" if data is None else "data",
        "public_text_sha256": text.sha256,
        "best_step": report.best_step,
        "heldout_perplexity_before": round(report.start_heldout_perplexity, 4),
        "heldout_perplexity_after": round(report.best_heldout_perplexity, 4),
        "heldout_nmse_before": round(report.start_heldout_nmse, 6),
        "heldout_nmse_after": round(report.best_heldout_nmse, 6),
        "heldout_whitened_before": round(report.start_heldout_whitened, 6),
        "heldout_whitened_after": round(report.best_heldout_whitened, 6),
        "nmse_first": round(report.first_nmse, 6),
        "nmse_last": round(report.last_nmse, 6),
        "seconds": round(report.seconds, 1),
    }
    return Built(start.model, start.block_map, params, start.adapters)
