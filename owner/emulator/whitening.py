"""The gap-exit error measured in the full model's principal directions, each scaled to unit variance.

NMSE weighs each direction of the exit state by its variance, so a few large directions decide it. The top adapter
block reads the smaller ones too: on TREC's held-out rows, how well six emulators matched the full model on
directions 17–64 ranked their plug-in gains, and their NMSE did not (bench/results/transfer_fidelity.md). The
whitened error projects teacher − student onto the full model's `directions` largest principal directions at the
exit and divides each coordinate by that direction's standard deviation, so every one of them counts alike; the
plain NMSE still covers the rest. Statistics and the error count only the tokens `statistics.counted_tokens` counts:
a sink's state (norm 35–175× the median) would otherwise be the largest direction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .statistics import counted_tokens

WHITENED_DIRECTIONS = 64  # the band whose fidelity ranked plug-in gains (directions 17–64) and those above it


def principal_directions(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions [k, width], variances [k]) of `states` [tokens, width], largest variance first."""
    centred = states.double() - states.double().mean(dim=0)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    return directions, singular.pow(2) / max(1, len(states) - 1)


@dataclass(frozen=True)
class ExitWhitening:
    """Maps an exit-state error to unit-variance coordinates along the teacher's largest principal directions."""

    projection: torch.Tensor  # [width, directions]: each principal direction divided by its standard deviation

    @classmethod
    def fit(cls, states: torch.Tensor, directions: int = WHITENED_DIRECTIONS) -> ExitWhitening:
        """From the teacher's exit states of counted tokens, [tokens, width]."""
        directions = min(directions, states.shape[1])
        if len(states) <= directions:
            raise ValueError(
                f"whitening {directions} directions needs more than {directions} tokens, got {len(states)}"
            )
        basis, variances = principal_directions(states)
        scaled = basis[:directions] / variances[:directions].sqrt().clamp_min(1e-12).unsqueeze(1)
        return cls(scaled.T.to(states.dtype).contiguous())

    def error(self, teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared whitened coordinate of teacher − student over the `mask`ed tokens ([batch, seq] bool)."""
        difference = (teacher - student)[mask]
        return (difference @ self.projection.to(difference)).pow(2).mean()  # its device and dtype


def fit_exit_whitenings(
    teacher: torch.nn.Module, windows: torch.Tensor, exits: list[int], batch_size: int
) -> list[ExitWhitening]:
    """One whitening per gap exit (a `hidden_states` index of the teacher), from the teacher's states on `windows`."""
    states: list[list[torch.Tensor]] = [[] for _ in exits]
    with torch.no_grad():
        for batch in windows.split(batch_size):
            hidden = teacher(input_ids=batch, output_hidden_states=True).hidden_states
            mask = counted_tokens(batch, hidden)
            for collected, index in zip(states, exits, strict=True):
                collected.append(hidden[index][mask].float())
    return [ExitWhitening.fit(torch.cat(collected)) for collected in states]
