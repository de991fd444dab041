"""Gradual Unrolling: P = λ·P_PEMA + (1−λ)·P_LM, mixed in log space.

λ starts at λ_max and falls by λ_max/L per generated token; the mixture uses λ². The released PEMA code takes L
from the gold reference length at test time, which leaks the answer; here L is `max_new_tokens` (or a length the
caller predicts from the prompt). The constant mode uses λ_max at every step, for ablation.
"""

from __future__ import annotations

import math

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
    current = max(0.0, lambda_max - step * lambda_max / length)
    return current * current


def mix(pema_log_probs: torch.Tensor, lm_log_probs: torch.Tensor, weight: float) -> torch.Tensor:
    """log(λ·exp(pema) + (1−λ)·exp(lm)), exact at λ = 0 and λ = 1."""
    if weight <= 0.0:
        return lm_log_probs
    if weight >= 1.0:
        return pema_log_probs
    stacked = torch.stack([pema_log_probs + math.log(weight), lm_log_probs + math.log1p(-weight)])
    return torch.logsumexp(stacked, dim=0)
