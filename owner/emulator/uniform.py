"""Offsite-Tuning's uniform layer drop: keep N evenly spaced blocks of the middle."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from transformers import PreTrainedModel

from ...common.architectures import depth
from .bundle import materialize
from .interface import BuildRequest, Built
from .layout import Layout

OPTIONS: Mapping[str, Callable[[str], Any]] = {}


def spaced_indices(count: int, keep: int) -> list[int]:
    """round(i·(count−1)/(keep−1)) for i in 0..keep−1, rounding halves up; the middle one when keep is 1."""
    if keep == 1:
        return [(count - 1) // 2]
    return [math.floor(i * (count - 1) / (keep - 1) + 0.5) for i in range(keep)]


def select_blocks(model: PreTrainedModel, layout: Layout) -> list[int]:
    total = depth(model.config)
    layout.check(total)
    middle = [layout.bottom + i for i in spaced_indices(total - layout.bottom - layout.top, layout.middle)]
    return layout.compose(total, middle)


def build(request: BuildRequest) -> Built:
    block_map = select_blocks(request.full, request.layout)
    return Built(materialize(request.full, block_map), block_map)
