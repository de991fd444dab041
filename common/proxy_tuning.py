"""Proxy-tuning (Liu et al., 2024, arXiv 2401.08565) as a way to deliver an offsite adapter: instead of plugging the
adapter into the full model, steer the full model's next-token logits by what the adapter changed on the emulator,
z = z_full + α·(z_emulator+adapter − z_emulator).

The adapter then runs where it was trained, on the emulator, so it never meets the full model's middle blocks, whose
states its top blocks did not learn on; the full model contributes what the emulator lacks. All three models are
the owner's to run (it built the emulator and receives the adapter). `common/scoring.py` scores with it like with any
causal model.
"""

from __future__ import annotations

import torch

PROXY_ALPHA = 1.0  # the paper's; not tuned here


class ProxyTuned(torch.nn.Module):
    """The full model (`base`) steered by the tuned emulator (`expert`) against the untuned one (`anti_expert`)."""

    def __init__(
        self,
        base: torch.nn.Module,
        expert: torch.nn.Module,
        anti_expert: torch.nn.Module,
        alpha: float = PROXY_ALPHA,
    ):
        super().__init__()
        self.base, self.expert, self.anti_expert, self.alpha = base, expert, anti_expert, alpha

    @property
    def members(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        return self.base, self.expert, self.anti_expert

    def combine(self, base: torch.Tensor, expert: torch.Tensor, anti_expert: torch.Tensor) -> torch.Tensor:
        """Each member's logits at the same positions, [K, vocab]: the steered logits, on the base's device."""
        return base + self.alpha * (expert.to(base.device) - anti_expert.to(base.device))
