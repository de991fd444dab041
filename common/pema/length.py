"""The planned length L of Gradual Unrolling, predicted from the prompt instead of read off the reference.

A ridge regression from f(prompt) (the state PEMA sees at the first generation step) to log(completion tokens),
fitted on the memory: the first row of every example is exactly that state, and the example's row count is its
completion's length (end-of-text included). Predicting log length keeps long outliers from dominating.
"""

from __future__ import annotations

import torch

MIN_STD = 1e-6  # channels that never vary are left unscaled


class LengthPredictor(torch.nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        self.register_buffer("weight", torch.zeros(hidden_size))
        self.register_buffer("bias", torch.zeros(1))

    @torch.no_grad()
    def fit(self, states: torch.Tensor, lengths: torch.Tensor, ridge: float) -> None:
        """Closed-form ridge on standardised states; float64 so that the normal equations stay accurate."""
        x = states.double()
        mean = x.mean(0)
        scale = x.std(0).clamp(min=MIN_STD) if len(x) > 1 else torch.ones_like(mean)
        z = (x - mean) / scale
        target = torch.log(lengths.double().clamp(min=1))
        offset = target.mean()
        gram = z.T @ z + ridge * len(z) * torch.eye(z.shape[1], dtype=torch.float64)
        weight = torch.linalg.solve(gram, z.T @ (target - offset))
        self.mean.copy_(mean.float())
        self.scale.copy_(scale.float())
        self.weight.copy_(weight.float())
        self.bias.copy_(offset.float().reshape(1))

    @torch.no_grad()
    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """[B] predicted completion lengths in tokens, at least 1."""
        log_length = ((states.float() - self.mean) / self.scale) @ self.weight + self.bias
        return log_length.exp().round().clamp(min=1).long()
