"""PEMA at generation: each step mixes the adapter's next-token distribution with the model's,
P = λ·P_PEMA + (1−λ)·P_LM, as a policy of the token loop. λ is λ_max (constant), the Gradual Unrolling schedule
over a planned length L, or the adapter's learned gate, per token.

L of each row is the caller's (a length the data owner plans), else the adapter's length predictor applied to the
row's f(prompt) at the first step, else `max_new_tokens`; never the reference's.

The owner applies it to the full model's own states; the data owner to the states `Represent` sends. Both run the
same loop (common/generation), so the same adapter, prompt and seed give the same text on either side.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..generation.loop import Policy
from .adapter import PemaAdapter
from .config import CONSTANT, GATE, GRADUAL, PemaConfig
from .head import Head
from .training import gated_log_probs
from .unrolling import mix, unrolling_lambdas


def pema_policy(
    adapter: PemaAdapter,
    head: Head,
    config: PemaConfig,
    max_new_tokens: int,
    planned_lengths: Sequence[int] | None = None,
) -> Policy:
    """`planned_lengths`: L of each row of the batch, or None to predict it (see the module's docstring)."""
    adapter.eval()
    if config.schedule == GATE and adapter.gate is None:
        raise ValueError("schedule 'gate' needs an adapter trained with a gate (gate_width > 0)")
    lengths: torch.Tensor | None = None if planned_lengths is None else torch.tensor(list(planned_lengths))

    def policy(step: int, rows: Sequence[int], states: torch.Tensor, lm_log_probs: torch.Tensor) -> torch.Tensor:
        nonlocal lengths
        if config.schedule == GATE:
            return gated_log_probs(adapter, head, states.float())
        pema = adapter.log_probs(states, head)
        if config.schedule == CONSTANT:
            return mix(pema, lm_log_probs.float(), config.lambda_max)
        if config.schedule != GRADUAL:
            raise ValueError(f"unknown schedule {config.schedule!r}")
        if lengths is None:  # the first step: every row is running and `states` is f(prompt)
            if adapter.length is not None:
                lengths = adapter.length(states).clamp(max=max_new_tokens)
            else:
                lengths = torch.full((len(rows),), max_new_tokens)
        weights = unrolling_lambdas(step, lengths[list(rows)], config.lambda_max)
        return mix(pema, lm_log_probs.float(), weights)

    return policy
