"""The whitened gap-exit error: unit-variance coordinates along the teacher's largest principal directions."""

from __future__ import annotations

import pytest
import torch

from offsite.owner.emulator.distill import nmse
from offsite.owner.emulator.whitening import ExitWhitening, principal_directions

WIDTH = 16
SCALES = torch.logspace(2, -1, WIDTH)  # variances from 10⁴ down to 10⁻²: a few directions dominate, as at an exit


def _states(tokens: int = 4000) -> torch.Tensor:
    torch.manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH))
    return (torch.randn(tokens, WIDTH) * SCALES) @ rotation.T + 5.0


def test_principal_directions_come_largest_first_with_their_variances() -> None:
    states = _states()
    directions, variances = principal_directions(states)
    assert torch.all(variances[:-1] >= variances[1:])
    assert variances[0] == pytest.approx(SCALES[0].item() ** 2, rel=0.1)
    assert torch.allclose(directions @ directions.T, torch.eye(WIDTH, dtype=directions.dtype), atol=1e-6)


def test_whitened_coordinates_have_unit_variance() -> None:
    states = _states()
    whitening = ExitWhitening.fit(states, directions=8)
    coordinates = (states - states.mean(0)) @ whitening.projection
    assert coordinates.shape == (len(states), 8)
    assert torch.allclose(coordinates.var(0), torch.ones(8), atol=1e-3)


def test_every_whitened_direction_counts_alike_where_nmse_sees_only_the_largest() -> None:
    states = _states()
    directions, variances = principal_directions(states)
    whitening = ExitWhitening.fit(states, directions=8)
    teacher = states[:500].unsqueeze(0)
    mask = torch.ones(teacher.shape[:2], dtype=torch.bool)
    assert float(whitening.error(teacher, teacher, mask)) == 0.0
    # The same relative error (a tenth of the direction's spread) along the largest and the eighth direction:
    errors = {}
    for index in (0, 7):
        shift = (0.1 * variances[index].sqrt() * directions[index]).float()
        errors[index] = (float(whitening.error(teacher, teacher + shift, mask)), float(nmse(teacher, teacher + shift)))
    assert errors[0][0] == pytest.approx(errors[7][0], rel=1e-3)  # whitened: both count alike
    assert errors[0][1] > 100 * errors[7][1]  # NMSE: the eighth direction's error hardly registers


def test_the_mask_decides_which_tokens_count() -> None:
    states = _states()
    whitening = ExitWhitening.fit(states, directions=4)
    teacher = states[:10].unsqueeze(0)
    student = teacher.clone()
    student[0, 0] += 1e6  # a wrong state at an uncounted position (a sink) is not the whitened error's business
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 0] = False
    assert float(whitening.error(teacher, student, mask)) == 0.0


def test_too_few_tokens_to_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="needs more than"):
        ExitWhitening.fit(_states(tokens=8), directions=8)
