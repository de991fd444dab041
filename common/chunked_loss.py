"""Losses over the vocabulary computed a few rows at a time, so that the [rows, vocab] logits never exist whole.

With a 49,152-token vocabulary a row of float32 logits is 192 KiB: a PEMA batch of 256 rows holds 48 MiB of
logits, their log-softmax, and in the backward two gradients of the same size. Each chunk runs under activation
checkpointing, so the backward recomputes one chunk's logits at a time instead of keeping every chunk's. The
result equals the plain call up to float rounding (tests/test_chunked_loss.py); dropout inside a chunk draws the
same mask when recomputed (checkpoint restores the RNG state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

LOSS_CHUNK_ROWS = 32  # 6 MiB of float32 logits at a time over a 49k vocabulary


def _chunk(function: Callable[..., torch.Tensor], parts: list[torch.Tensor]) -> torch.Tensor:
    if torch.is_grad_enabled():
        return checkpoint(function, *parts, use_reentrant=False)
    return function(*parts)


def _slices(tensors: tuple[torch.Tensor, ...], chunk_rows: int) -> Iterator[list[torch.Tensor]]:
    for start in range(0, tensors[0].shape[0], chunk_rows):
        yield [t[start : start + chunk_rows] for t in tensors]


def chunked_rows(
    per_row: Callable[..., torch.Tensor], *tensors: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """`per_row(*tensors)`, for a function whose output has one entry per input row, `chunk_rows` rows at a time."""
    if tensors[0].shape[0] <= chunk_rows:
        return per_row(*tensors)
    return torch.cat([_chunk(per_row, parts) for parts in _slices(tensors, chunk_rows)])


def chunked_mean(
    mean_loss: Callable[..., torch.Tensor], *tensors: torch.Tensor, chunk_rows: int = LOSS_CHUNK_ROWS
) -> torch.Tensor:
    """`mean_loss(*tensors)`, for a loss that is a mean over rows, `chunk_rows` rows at a time."""
    rows = tensors[0].shape[0]
    if rows <= chunk_rows:
        return mean_loss(*tensors)
    weighted = [_chunk(mean_loss, parts) * parts[0].shape[0] for parts in _slices(tensors, chunk_rows)]
    return torch.stack(weighted).sum() / rows
