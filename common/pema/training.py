"""PEMA's training on a memory: two phases from the paper, then the gate and the length predictor.

Phase 1: an autoencoder `A_rct`, `B_rct` learns to rebuild a context representation x from r numbers. Phase 2: a new
`A` and `B_pd`, with `B_rct` frozen, learn `κ·rct(B_rct(A x), x) + (1−κ)·CE(W_hd · norm(B_pd(A x)), y)`: `A` must
keep what rebuilds the context while `B_pd` turns it into the next token of the data owner's task. Each phase stops
early on its validation loss.

Two departures from the reference, both in docs/pema.md: validation holds out whole examples (grouped by prompt), so
no validation row is a prefix of a training sentence; and the reconstruction error is measured per channel in units
of that channel's standard deviation, because a few channels of the pre-norm state hold most of its energy (one
holds 28% on SmolLM2) and would otherwise be all the autoencoder learns.

After PEMA: the mixing gate (gate.py) on the held-out examples, PEMA frozen; the length predictor (length.py) on the
training examples' prompts, its ridge chosen on the held-out ones.

Key noise (hybrid PEMA): a memory built on the emulator holds keys that differ from the full model's states PEMA
will read. Given a factor F of that difference's covariance (the owner measures it on public text), every training
batch of every phase reads keys + F·z, z ~ N(0, I): for PEMA's linear maps this is ridge regression that penalises
leaning on the directions where the two models disagree. Validation rows stay clean.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..chunked_loss import chunked_mean
from .adapter import PemaAdapter
from .config import PemaConfig
from .head import Head
from .memory import Memory
from .unrolling import mix

STATISTICS_ROWS = 50_000  # rows sampled for the per-channel scale of the reconstruction error
LENGTH_RIDGES = (1e-3, 1e-2, 1e-1, 1.0)
MIN_SCALE = 1e-6

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PhaseReport:
    epochs: int = 0
    best_epoch: int = 0
    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)


@dataclass
class PemaTrainReport:
    rows: int
    validation_rows: int
    validation_examples: int
    phase1: PhaseReport
    phase2: PhaseReport
    phase2_validation_ce: float
    model_validation_ce: float  # the frozen model's own, on the same held-out rows: what PEMA must beat
    gate: PhaseReport | None
    length_mae_tokens: float | None  # on the held-out examples
    length_ridge: float | None
    seconds: float


@dataclass(frozen=True)
class Split:
    train_rows: np.ndarray
    validation_rows: np.ndarray
    train_examples: np.ndarray  # example indices
    validation_examples: np.ndarray


def rows_of(memory: Memory, examples: np.ndarray) -> np.ndarray:
    """Every memory row of the given examples."""
    starts, counts, _ = memory.examples()
    return np.concatenate([np.arange(starts[e], starts[e] + counts[e]) for e in examples])


def split_examples(memory: Memory, fraction: float, seed: int) -> Split:
    """Holds out whole prompt groups: every example of a held-out prompt, and all of its rows."""
    _, _, groups = memory.examples()
    distinct = np.unique(groups)
    if len(distinct) < 2:
        raise ValueError("the memory holds one prompt: at least two are needed to hold out a validation split")
    order = np.random.default_rng(seed).permutation(distinct)
    held_groups = order[: min(len(distinct) - 1, max(1, int(round(len(distinct) * fraction))))]
    held = np.isin(groups, held_groups)

    train_examples, validation_examples = np.flatnonzero(~held), np.flatnonzero(held)
    return Split(
        rows_of(memory, train_examples), rows_of(memory, validation_examples), train_examples, validation_examples
    )


def channel_scale(memory: Memory, rows: np.ndarray, seed: int) -> torch.Tensor:
    sample = rows if len(rows) <= STATISTICS_ROWS else np.random.default_rng(seed).choice(rows, STATISTICS_ROWS, False)
    keys, _ = memory.batch(sample)
    return keys.std(0).clamp(min=MIN_SCALE) if len(keys) > 1 else torch.ones(keys.shape[1])


def _run_phase(
    name: str,
    parameters: list[torch.nn.Parameter],
    modules: list[torch.nn.Module],
    loss_of: Loss,
    memory: Memory,
    train_rows: np.ndarray,
    validation_rows: np.ndarray,
    config: PemaConfig,
    show_progress: bool,
    key_noise: torch.Tensor | None = None,
) -> PhaseReport:
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    generator = np.random.default_rng(config.seed)
    report = PhaseReport()
    best_state = [copy.deepcopy(m.state_dict()) for m in modules]
    best = float("inf")
    batches = max(1, -(-len(train_rows) // config.batch_size))
    with tqdm(total=config.max_epochs * batches, desc=name, unit="batch", disable=not show_progress) as bar:
        for epoch in range(config.max_epochs):
            for module in modules:
                module.train()
            shuffled = generator.permutation(train_rows)
            total = 0.0
            for first in range(0, len(shuffled), config.batch_size):
                keys, values = memory.batch(shuffled[first : first + config.batch_size])
                if key_noise is not None:
                    keys = keys + torch.randn_like(keys) @ key_noise.T
                loss = chunked_mean(loss_of, keys, values)  # a chunk of rows' logits at a time
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(keys)
                bar.update(1)
            report.train_loss.append(total / len(shuffled))
            report.validation_loss.append(evaluate_loss(modules, loss_of, memory, validation_rows, config.batch_size))
            bar.set_postfix(train=f"{report.train_loss[-1]:.4f}", validation=f"{report.validation_loss[-1]:.4f}")
            report.epochs = epoch + 1
            if report.validation_loss[-1] < best:
                best, report.best_epoch = report.validation_loss[-1], epoch + 1
                best_state = [copy.deepcopy(m.state_dict()) for m in modules]
            elif epoch + 1 - report.best_epoch >= config.patience:
                bar.total = bar.n
                break
    for module, state in zip(modules, best_state, strict=True):
        module.load_state_dict(state)
        module.eval()
    return report


@torch.no_grad()
def evaluate_loss(
    modules: list[torch.nn.Module], loss_of: Loss, memory: Memory, rows: np.ndarray, batch_size: int
) -> float:
    for module in modules:
        module.eval()
    total = 0.0
    for first in range(0, len(rows), batch_size):
        keys, values = memory.batch(rows[first : first + batch_size])
        total += float(chunked_mean(loss_of, keys, values)) * len(keys)
    return total / len(rows)


def gated_log_probs(adapter: PemaAdapter, head: Head, states: torch.Tensor) -> torch.Tensor:
    """The gate's mixture of PEMA's and the frozen model's next-token log-probs at f(x) = `states`."""
    if adapter.gate is None:
        raise ValueError("this adapter has no gate (trained with gate_width 0)")
    lm = torch.log_softmax(head.logits(states), dim=-1)
    hidden = adapter.predict_hidden(states)
    pema = torch.log_softmax(head.logits(hidden), dim=-1)
    return mix(pema, lm, adapter.gate(states, hidden, head, lm, pema))


def _fit_length(adapter: PemaAdapter, memory: Memory, split: Split) -> tuple[float, float]:
    """Fits the length predictor on the training prompts; returns (held-out MAE in tokens, chosen ridge)."""
    assert adapter.length is not None
    starts, counts, _ = memory.examples()

    def prompts(examples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        keys, _ = memory.batch(starts[examples])  # sorted rows: starts are increasing, so examples stay aligned
        return keys, torch.from_numpy(counts[examples])

    train_x, train_y = prompts(split.train_examples)
    held_x, held_y = prompts(split.validation_examples)
    best: tuple[float, float] | None = None
    for ridge in LENGTH_RIDGES:
        adapter.length.fit(train_x, train_y, ridge)
        mae = float((adapter.length(held_x) - held_y).abs().float().mean())
        if best is None or mae < best[0]:
            best = (mae, ridge)
    adapter.length.fit(train_x, train_y, best[1])
    return best


def train_pema(
    memory: Memory, head: Head, config: PemaConfig, show_progress: bool = True, key_noise: torch.Tensor | None = None
) -> tuple[PemaAdapter, PemaTrainReport]:
    """`key_noise`: F [d, d]; each training key gets F·z added (module docstring). None: the keys as they are."""
    config.check()
    if head.weight.shape[1] != memory.hidden_size:
        raise ValueError(f"the head expects hidden size {head.weight.shape[1]}, the memory has {memory.hidden_size}")
    d = memory.hidden_size
    if key_noise is not None and tuple(key_noise.shape) != (d, d):
        raise ValueError(f"key noise must be a [{d}, {d}] factor, got {list(key_noise.shape)}")
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    split = split_examples(memory, config.validation_fraction, config.seed)
    scale = channel_scale(memory, split.train_rows, config.seed)
    r = config.rank
    adapter = PemaAdapter(d, r, config.dropout, config.alpha, config.gate_width, config.length_predictor)
    encoder = PemaAdapter(d, r, config.dropout, config.alpha)  # phase 1's A_rct; only its A and B_rct train

    def reconstruction_error(rebuilt: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(rebuilt / scale, keys / scale)

    def reconstruction(keys: torch.Tensor, _values: torch.Tensor) -> torch.Tensor:
        return reconstruction_error(encoder.reconstruct(keys), keys)

    phase1 = _run_phase(
        "PEMA phase 1 (reconstruction)",
        [encoder.A.weight, encoder.B_rct.weight],
        [encoder],
        reconstruction,
        memory,
        split.train_rows,
        split.validation_rows,
        config,
        show_progress,
        key_noise,
    )
    adapter.B_rct.load_state_dict(encoder.B_rct.state_dict())
    adapter.B_rct.weight.requires_grad_(False)

    def joint(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        latent = adapter.latent(keys)
        rebuilt = reconstruction_error(adapter.B_rct(latent), keys)
        predicted = F.cross_entropy(head.logits(adapter.B_pd(latent)), values)
        return config.kappa * rebuilt + (1.0 - config.kappa) * predicted

    phase2 = _run_phase(
        "PEMA phase 2 (prediction)",
        [adapter.A.weight, adapter.B_pd.weight],
        [adapter],
        joint,
        memory,
        split.train_rows,
        split.validation_rows,
        config,
        show_progress,
        key_noise,
    )

    def prediction(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head.logits(adapter.predict_hidden(keys)), values)

    def model_prediction(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head.logits(keys), values)

    ce = evaluate_loss([adapter], prediction, memory, split.validation_rows, config.batch_size)
    model_ce = evaluate_loss([], model_prediction, memory, split.validation_rows, config.batch_size)
    gate_report = _train_gate(adapter, head, memory, split, config, show_progress, key_noise) if adapter.gate else None
    length = _fit_length(adapter, memory, split) if adapter.length is not None else (None, None)
    adapter.eval()
    report = PemaTrainReport(
        len(split.train_rows),
        len(split.validation_rows),
        len(split.validation_examples),
        phase1,
        phase2,
        ce,
        model_ce,
        gate_report,
        length[0],
        length[1],
        time.perf_counter() - started,
    )
    return adapter, report


def _train_gate(
    adapter: PemaAdapter,
    head: Head,
    memory: Memory,
    split: Split,
    config: PemaConfig,
    show_progress: bool,
    key_noise: torch.Tensor | None,
) -> PhaseReport:
    """The gate learns on the held-out examples (half to fit, half to stop on), PEMA and the model frozen."""
    assert adapter.gate is not None
    for parameter in [adapter.A.weight, adapter.B_pd.weight]:
        parameter.requires_grad_(False)
    order = np.random.default_rng(config.seed + 1).permutation(split.validation_examples)
    half = max(1, len(order) // 2)
    fit_examples, stop_examples = order[:half], order[half:] if len(order) > 1 else order

    def mixture_nll(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lm = torch.log_softmax(head.logits(keys), dim=-1)
            hidden = adapter.predict_hidden(keys)
            pema = torch.log_softmax(head.logits(hidden), dim=-1)
        weight = adapter.gate(keys, hidden, head, lm, pema)
        return F.nll_loss(mix(pema, lm, weight), values)

    adapter.eval()  # PEMA's dropout stays off: the gate must learn the adapter as it will run
    return _run_phase(
        "PEMA gate",
        list(adapter.gate.parameters()),
        [adapter.gate],
        mixture_nll,
        memory,
        rows_of(memory, fit_examples),
        rows_of(memory, stop_examples),
        config,
        show_progress,
        key_noise,
    )
