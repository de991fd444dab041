"""Offsite-Tuning's uniform layer drop: keep N evenly spaced blocks of the middle (of each gap, with `place=`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from ...common.architectures import depth
from .bundle import materialize
from .interface import BuildRequest, Built
from .layout import Layout
from .placement import ENDS, Placement, allot, gaps, parse_placement, place

OPTIONS: Mapping[str, Callable[[str], Any]] = {"place": parse_placement, "data": Path}


def spaced_indices(count: int, keep: int) -> list[int]:
    """round(i·(count−1)/(keep−1)) for i in 0..keep−1, rounding halves up; the middle one when keep is 1."""
    if keep == 1:
        return [(count - 1) // 2]
    return [math.floor(i * (count - 1) / (keep - 1) + 0.5) for i in range(keep)]


def compose(placement: Placement, total_depth: int, keep: int) -> list[int]:
    """The block map: the adapter blocks, and `keep` evenly spaced blocks of the gaps between them."""
    runs = gaps(placement.adapters, total_depth)
    shares = allot([len(run) for run in runs], keep)
    kept = [run[i] for run, share in zip(runs, shares, strict=True) if share for i in spaced_indices(len(run), share)]
    return sorted(placement.adapters + kept)


def select_blocks(model: PreTrainedModel, layout: Layout) -> list[int]:
    """The block map of the plain layout, adapters at the ends."""
    total = depth(model.config)
    layout.check(total)
    return compose(Placement(ENDS, layout.adapter_blocks(total)), total, layout.middle)


def build(request: BuildRequest) -> Built:
    method = request.options.get("place", ENDS)
    placement = place(method, request.full, request.tokenizer, request.layout, request.options.get("data"))
    block_map = compose(placement, depth(request.full.config), request.layout.middle)
    params = placement.as_params() if method != ENDS else {}
    return Built(materialize(request.full, block_map), block_map, params, placement.adapters)
