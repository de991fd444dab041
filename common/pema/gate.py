"""A learned, query-aware mixing gate in the spirit of IMSM (2412.17383): per token, g(x) ∈ (0, 1) weighs PEMA's
distribution against the frozen model's, P = g·P_PEMA + (1−g)·P_LM, in place of a fixed λ or the GU schedule.

The gate reads the frozen model's normalised final state, PEMA's normalised predicted state, and the entropy and
top log-probability of both distributions (how sure each side is). It is trained after PEMA, with PEMA frozen, on
memory rows PEMA did not train on (its own training rows would make it look more reliable than it is).
"""

from __future__ import annotations

import torch

from .head import Head

CONFIDENCE_FEATURES = 4  # entropy and top log-probability of each distribution


def confidence(log_probs: torch.Tensor) -> torch.Tensor:
    """[B, 2]: the entropy and the top log-probability of each row's distribution."""
    entropy = -(log_probs.exp() * log_probs).nan_to_num(0.0).sum(-1)
    return torch.stack([entropy, log_probs.max(-1).values], dim=-1)


class MixingGate(torch.nn.Module):
    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 * hidden_size + CONFIDENCE_FEATURES, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, 1),
        )

    def forward(
        self,
        state: torch.Tensor,
        pema_hidden: torch.Tensor,
        head: Head,
        lm_log_probs: torch.Tensor,
        pema_log_probs: torch.Tensor,
    ) -> torch.Tensor:
        """[B] weights of PEMA's distribution."""
        features = torch.cat(
            [
                head.normalize(state),
                head.normalize(pema_hidden),
                confidence(lm_log_probs),
                confidence(pema_log_probs),
            ],
            dim=-1,
        )
        return torch.sigmoid(self.net(features)).squeeze(-1)
