"""PEMA's two training phases on a memory, each stopped early on its validation loss.

Phase 1: an autoencoder `A_rct`, `B_rct` learns MSE(B_rct(A_rct x), x) — `B_rct` learns to rebuild a context
representation from r numbers. Phase 2: a new `A` and `B_pd`, with `B_rct` frozen, learn
`κ·MSE(B_rct(A x), x) + (1−κ)·CE(W_hd · norm(B_pd(A x)), y)`: `A` must keep what rebuilds the context while `B_pd`
turns it into the next token of the data owner's task.
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

from .adapter import PemaAdapter
from .config import PemaConfig
from .head import Head
from .memory import Memory


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
    phase1: PhaseReport
    phase2: PhaseReport
    phase2_validation_ce: float
    seconds: float


def split_rows(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    held = max(1, int(round(count * fraction)))
    if held >= count:
        raise ValueError(f"a memory of {count} rows is too small to hold out a validation split")
    return order[held:], order[:held]


def _run_phase(
    name: str,
    parameters: list[torch.nn.Parameter],
    modules: list[torch.nn.Module],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    memory: Memory,
    train_rows: np.ndarray,
    validation_rows: np.ndarray,
    config: PemaConfig,
    show_progress: bool,
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
                loss = loss_of(keys, values)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss) * len(keys)
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
    modules: list[torch.nn.Module],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    memory: Memory,
    rows: np.ndarray,
    batch_size: int,
) -> float:
    for module in modules:
        module.eval()
    total = 0.0
    for first in range(0, len(rows), batch_size):
        keys, values = memory.batch(rows[first : first + batch_size])
        total += float(loss_of(keys, values)) * len(keys)
    return total / len(rows)


def train_pema(
    memory: Memory, head: Head, config: PemaConfig, show_progress: bool = True
) -> tuple[PemaAdapter, PemaTrainReport]:
    config.check()
    if head.weight.shape[1] != memory.hidden_size:
        raise ValueError(f"the head expects hidden size {head.weight.shape[1]}, the memory has {memory.hidden_size}")
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    train_rows, validation_rows = split_rows(len(memory), config.validation_fraction, config.seed)
    adapter = PemaAdapter(memory.hidden_size, config.rank, config.dropout)
    encoder = torch.nn.Sequential(torch.nn.Linear(memory.hidden_size, config.rank, bias=False), adapter.dropout)

    def reconstruction(keys: torch.Tensor, _values: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(adapter.B_rct(encoder(keys)), keys)

    phase1 = _run_phase(
        "PEMA phase 1 (reconstruction)",
        [*encoder.parameters(), *adapter.B_rct.parameters()],
        [encoder, adapter],
        reconstruction,
        memory,
        train_rows,
        validation_rows,
        config,
        show_progress,
    )
    adapter.B_rct.weight.requires_grad_(False)

    def joint(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        latent = adapter.dropout(adapter.A(keys))
        rebuilt = F.mse_loss(adapter.B_rct(latent), keys)
        predicted = F.cross_entropy(head.logits(adapter.B_pd(latent)), values)
        return config.kappa * rebuilt + (1.0 - config.kappa) * predicted

    phase2 = _run_phase(
        "PEMA phase 2 (prediction)",
        [*adapter.A.parameters(), *adapter.B_pd.parameters()],
        [adapter],
        joint,
        memory,
        train_rows,
        validation_rows,
        config,
        show_progress,
    )

    def prediction(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head.logits(adapter.predict_hidden(keys)), values)

    ce = evaluate_loss([adapter], prediction, memory, validation_rows, config.batch_size)
    report = PemaTrainReport(len(train_rows), len(validation_rows), phase1, phase2, ce, time.perf_counter() - started)
    return adapter, report
