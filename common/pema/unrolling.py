"""Gradual Unrolling: P = λ·P_PEMA + (1−λ)·P_LM, mixed in log space.

As the reference generation code does it: the first token takes λ_max; each later token t takes
(λ_max − t·λ_max/L)², where the decrement stops before λ would reach zero, so λ ends at (λ_max/L)², not at 0.
The reference takes L from the gold reference's length at test time, which leaks the answer; here L comes from
the adapter's length predictor (fitted on the prompts of the training memory), or is `max_new_tokens`.
The constant mode uses λ_max at every step, for ablation; the gate mode learns λ per token (gate.py).
"""

from __future__ import annotations

import torch

from .config import CONSTANT, GRADUAL


def unrolling_lambda(step: int, length: int, lambda_max: float, schedule: str = GRADUAL) -> float:
    """The weight of PEMA's distribution at generation step `step` (0-based) of a planned `length`."""
    if schedule == CONSTANT:
        return lambda_max
    if schedule != GRADUAL:
        raise ValueError(f"unknown schedule {schedule!r}")
    if length < 1:
        raise ValueError("the planned generation length must be at least 1")
    if step == 0:
        return lambda_max
    current = lambda_max * (1.0 - min(step, length - 1) / length)
    return current * current


def unrolling_lambdas(step: int, lengths: torch.Tensor, lambda_max: float) -> torch.Tensor:
    """`unrolling_lambda` for a batch of rows, each with its own planned length."""
    if step == 0:
        return torch.full(lengths.shape, lambda_max)
    lengths = lengths.clamp(min=1).float()
    current = lambda_max * (1.0 - torch.minimum(torch.full_like(lengths, step), lengths - 1) / lengths)
    return current * current


def mix(pema_log_probs: torch.Tensor, lm_log_probs: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """log(λ·exp(pema) + (1−λ)·exp(lm)); λ a number or one weight per row ([B] for [B, V] log-probs).

    Exact at λ = 0 and λ = 1 (log 0 = −inf drops that side)."""
    weight = torch.as_tensor(weight, dtype=pema_log_probs.dtype).clamp(0.0, 1.0)
    if weight.dim() > 0:
        weight = weight.unsqueeze(-1)
    return torch.logaddexp(pema_log_probs + torch.log(weight), lm_log_probs + torch.log1p(-weight))
