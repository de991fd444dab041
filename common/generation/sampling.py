"""How tokens are chosen: greedy, or sampled with temperature and top-p from one random stream per row.

Each row draws from its own CPU `torch.Generator` seeded with `seed`, one uniform number per step, and picks by
inverse CDF over the (nucleus-filtered) distribution. A row's text thus depends on its prompt, its log-probs and
the seed alone: the same on the owner's side and the data owner's, alone or in a batch, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..contract import MAX_NEW_TOKENS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # with temperature > 0: sample from the fewest tokens holding this much probability
    seed: int = 0
    stop: tuple[str, ...] = ()  # a row ends before the first of these in its text
    distinct_rows: bool = False  # row r draws from seed + r: a batch of one prompt gives different texts

    def check(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be in 0..{MAX_TEMPERATURE:g}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(self.stop)} stop strings; at most {MAX_STOP_STRINGS}")
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"each stop string must have 1..{MAX_STOP_CHARS} characters")

    def generators(self, rows: int) -> list[torch.Generator]:
        """One random stream per row, seeded alike (or seed + row with `distinct_rows`): a row's draws never
        depend on the other rows' tokens."""
        return [torch.Generator().manual_seed(self.seed + (row if self.distinct_rows else 0)) for row in range(rows)]


def choose(log_probs: torch.Tensor, sampling: SamplingConfig, generators: Sequence[torch.Generator]) -> list[int]:
    """The next token of each row of `log_probs` [B, V]; `generators[b]` is row b's random stream."""
    if sampling.temperature == 0:
        return [int(t) for t in log_probs.argmax(dim=-1)]
    probs = torch.softmax(log_probs.detach().float().cpu() / sampling.temperature, dim=-1)
    # Stable: equal probabilities keep vocabulary order, so a tiny top_p picks exactly the argmax.
    ordered, order = probs.sort(dim=-1, descending=True, stable=True)
    cumulative = ordered.cumsum(dim=-1)
    if sampling.top_p < 1:
        ordered = ordered.masked_fill(cumulative - ordered >= sampling.top_p, 0.0)  # the first always stays
        cumulative = ordered.cumsum(dim=-1)
    tokens = []
    for row, generator in enumerate(generators):
        draw = torch.rand((), generator=generator) * cumulative[row, -1]
        # Rounding can put the draw at the total: it then takes the last token with any probability.
        last = int(torch.count_nonzero(ordered[row])) - 1
        index = min(int(torch.searchsorted(cumulative[row], draw, right=True)), last)
        tokens.append(int(order[row, index]))
    return tokens
