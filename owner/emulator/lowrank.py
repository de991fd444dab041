"""Low-rank emulator: project every middle linear layer's output onto its dominant subspace on public text.

For a layer y = Wx + b, collect the covariance of y over calibration windows and keep its top-r eigenvectors V. The
covariance leaves out attention sinks, BOS and padding (`statistics.counted_tokens`): the sink tokens' massive
outputs would otherwise spend the rank on the few directions they use. The
mean output μ is added to the basis (orthonormalised against V), giving the projector P = QQᵀ with Q = [V, u]. The
layer becomes y' = P(Wx + b): P μ = μ, so the mean survives even in bias-free layers (Llama), and only the
centred part outside the top-r directions is lost. The bundle stores PW and Pb dense so plain `transformers` loads
it; `effective_parameters` counts what the factored form Q·(QᵀW) would hold.

The rank of each layer meets a size budget: the middle keeps the fraction N/M of its parameters that the uniform
drop `l-N-r` would (option `fraction` overrides it), or, with `tolerance`, the smallest rank whose dropped
variance is at most that share of the total.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ...common.architectures import blocks, depth, is_conv1d
from .bundle import materialize
from .interface import BuildRequest, Built, positive_int
from .layout import Layout
from .public_text import load_chunks
from .statistics import content_tokens, counted_tokens


def unit_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise ValueError("must be between 0 and 1")
    return value


OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "fraction": unit_fraction,
    "tolerance": unit_fraction,
    "samples": positive_int,
    "data": Path,
}
CALIBRATION_SEQ_LEN = 128
DEFAULT_SAMPLES = 32
FORWARD_BATCH = 4


class OutputStatistics:
    """Running sum and second moment of a layer's outputs, in float64."""

    def __init__(self, width: int):
        self.count = 0
        self.total = torch.zeros(width, dtype=torch.float64)
        self.outer = torch.zeros(width, width, dtype=torch.float64)

    def add(self, outputs: torch.Tensor, mask: torch.Tensor) -> None:
        """Adds the outputs [batch, seq, width] of the tokens that `mask` [batch, seq] counts."""
        flat = content_tokens(outputs.detach(), mask).double()
        self.count += flat.shape[0]
        self.total += flat.sum(dim=0)
        self.outer += flat.T @ flat

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, self.outer / self.count - torch.outer(mean, mean)


def middle_linears(model: PreTrainedModel, layout: Layout) -> dict[str, torch.nn.Module]:
    """Every linear (or GPT-2 Conv1D) layer of the middle blocks, by its name in the model."""
    stack = blocks(model)
    total = depth(model.config)
    found: dict[str, torch.nn.Module] = {}
    for index in range(layout.bottom, total - layout.top):
        for name, module in stack[index].named_modules():
            if isinstance(module, torch.nn.Linear) or is_conv1d(module):
                found[f"{index}.{name}"] = module
    return found


def weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    """The weight as [out, in]; Conv1D stores it transposed."""
    return module.weight.T if is_conv1d(module) else module.weight


@torch.no_grad()
def collect_statistics(
    model: PreTrainedModel, layers: dict[str, torch.nn.Module], chunks: torch.Tensor
) -> dict[str, OutputStatistics]:
    """Every layer's output statistics over the windows' counted tokens (no attention sinks, BOS or padding)."""
    stats = {name: OutputStatistics(weight_out_in(m).shape[0]) for name, m in layers.items()}
    batch_outputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: batch_outputs.__setitem__(name, out))
        for name, module in layers.items()
    ]
    try:
        for window in chunks.split(FORWARD_BATCH):
            states = model.base_model(input_ids=window, output_hidden_states=True).hidden_states
            mask = counted_tokens(window, states, bos_token_id=model.config.bos_token_id)
            for name, outputs in batch_outputs.items():
                stats[name].add(outputs, mask)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def uniform_fraction(layout: Layout, total_depth: int) -> float:
    """The share N/M of the middle's parameters that the uniform drop `l-N-r` keeps: the default budget."""
    return layout.middle / (total_depth - layout.bottom - layout.top)


def budget_rank(out_features: int, in_features: int, fraction: float) -> int:
    """The rank whose factored form Q (out×r) · QᵀW (r×in) holds `fraction` of the dense weight."""
    return max(1, min(out_features, int(fraction * out_features * in_features / (out_features + in_features))))


def factored_parameters(out_features: int, in_features: int, rank: int) -> int:
    """What Q (out×(r+1), the mean direction included) · QᵀW ((r+1)×in) holds, never more than the dense weight."""
    return min(out_features * in_features, (rank + 1) * (out_features + in_features))


def tolerance_rank(eigenvalues: torch.Tensor, tolerance: float) -> int:
    """The smallest rank whose dropped variance is at most `tolerance` of the total (eigenvalues descending)."""
    kept = torch.cumsum(eigenvalues.clamp_min(0), 0) / eigenvalues.clamp_min(0).sum().clamp_min(1e-30)
    return int(torch.searchsorted(kept, torch.tensor(1.0 - tolerance, dtype=kept.dtype)).item()) + 1


def projector(mean: torch.Tensor, covariance: torch.Tensor, rank: int) -> torch.Tensor:
    """P = QQᵀ for Q = orthonormal [top-`rank` eigenvectors of the covariance, the mean direction]."""
    _, vectors = torch.linalg.eigh(covariance)
    top = vectors[:, -rank:]  # eigh sorts ascending
    residual = mean - top @ (top.T @ mean)
    if residual.norm() > 1e-8 * max(1.0, float(mean.norm())) and rank < covariance.shape[0]:
        top = torch.cat([top, (residual / residual.norm())[:, None]], dim=1)
    return top @ top.T


@torch.no_grad()
def project_layer(module: torch.nn.Module, p: torch.Tensor) -> None:
    """Replaces W by PW and b by Pb in place, whatever the layer's storage order."""
    p = p.to(module.weight.dtype)
    if is_conv1d(module):
        module.weight.copy_(module.weight @ p)  # y = xW: project the output columns
    else:
        module.weight.copy_(p @ module.weight)
    if getattr(module, "bias", None) is not None:
        module.bias.copy_(p @ module.bias)


def compress(
    model: PreTrainedModel, layout: Layout, chunks: torch.Tensor, fraction: float | None, tolerance: float | None
) -> dict[str, Any]:
    """Projects the middle linears of `model` in place; returns the ranks and parameter counts it chose."""
    layers = middle_linears(model, layout)
    stats = collect_statistics(model, layers, chunks)
    ranks: dict[str, int] = {}
    dense = effective = 0
    for name, module in layers.items():
        out_features, in_features = weight_out_in(module).shape
        mean, covariance = stats[name].mean_and_covariance()
        if tolerance is not None:
            rank = tolerance_rank(torch.linalg.eigvalsh(covariance).flip(0), tolerance)
        else:
            rank = budget_rank(out_features, in_features, fraction or 1.0)
        project_layer(module, projector(mean, covariance, rank))
        ranks[name] = rank
        dense += out_features * in_features
        effective += factored_parameters(out_features, in_features, rank)
    return {"ranks": ranks, "middle_dense_parameters": dense, "middle_effective_parameters": effective}


def build(request: BuildRequest) -> Built:
    layout, total = request.layout, depth(request.full.config)
    layout.check(total)
    samples = request.options.get("samples", DEFAULT_SAMPLES)
    text = load_chunks(request.tokenizer, request.options.get("data"), CALIBRATION_SEQ_LEN, 0.0, max_chunks=samples)
    block_map = list(range(total))  # every block stays; the middle ones lose rank instead
    emulator = materialize(request.full, block_map)
    tolerance = request.options.get("tolerance")
    fraction = request.options.get("fraction", uniform_fraction(layout, total))
    summary = compress(emulator, layout, text.train, None if tolerance else fraction, tolerance)
    params = {
        "fraction": None if tolerance else fraction,
        "tolerance": tolerance,
        "calibration_windows": len(text.train),
        "public_text_sha256": text.sha256,
        **summary,
    }
    return Built(emulator, block_map, params)
