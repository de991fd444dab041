"""CRaSh (Zhang et al. 2023): cluster the middle blocks by representation similarity, keep one per cluster, share it.

1. Run the full model on the owner's public text and keep every block's output hidden states.
2. Linear CKA between every pair of middle blocks.
3. Adjacency-constrained agglomerative clustering (average linkage) down to N clusters: only neighbouring
   clusters merge, so each cluster is a run of consecutive blocks.
4. Keep the middle block of each cluster.
5. With `share=true`, restore the original depth: every dropped block is replaced by its cluster's kept block. The
   bundle then stores the shared block once per use (plain `transformers` has no tied-layer format), so it is as
   large as the full model and costs as much compute, but holds only N distinct middle blocks; the manifest's
   `block_map` shows the repeats. Without sharing the emulator is N blocks deep, like the uniform drop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ...common.architectures import depth
from .bundle import materialize
from .interface import BuildRequest, Built, parse_bool, positive_int
from .layout import Layout
from .public_text import load_chunks

OPTIONS: Mapping[str, Callable[[str], Any]] = {"share": parse_bool, "data": Path, "samples": positive_int}
CALIBRATION_SEQ_LEN = 128
DEFAULT_SAMPLES = 32  # windows of public text; CKA on 4k token states is stable to a few 1e-3
MAX_TOKENS_PER_BLOCK = 4096


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment between two sets of n representations, [n, d1] and [n, d2]."""
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-12))


def cka_matrix(representations: list[torch.Tensor]) -> torch.Tensor:
    count = len(representations)
    similarity = torch.eye(count, dtype=torch.float64)
    for i in range(count):
        for j in range(i + 1, count):
            similarity[i, j] = similarity[j, i] = linear_cka(representations[i], representations[j])
    return similarity


def cluster_adjacent(similarity: torch.Tensor, clusters: int) -> list[list[int]]:
    """Merges the most similar pair of neighbouring clusters (average linkage) until `clusters` remain."""
    groups = [[i] for i in range(similarity.shape[0])]
    if not 1 <= clusters <= len(groups):
        raise ValueError(f"cannot make {clusters} clusters of {len(groups)} blocks")
    while len(groups) > clusters:
        linkage = [float(similarity[a][:, b].mean()) for a, b in zip(groups, groups[1:], strict=False)]
        best = max(range(len(linkage)), key=linkage.__getitem__)
        groups[best : best + 2] = [groups[best] + groups[best + 1]]
    return groups


def representative(cluster: list[int]) -> int:
    """The middle block of a run of consecutive blocks (the lower of two middles)."""
    return cluster[(len(cluster) - 1) // 2]


@torch.no_grad()
def middle_block_outputs(full: PreTrainedModel, chunks: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Each middle block's output token states over the calibration windows, [tokens, hidden] per block."""
    total = depth(full.config)
    collected: list[list[torch.Tensor]] = [[] for _ in range(layout.bottom, total - layout.top)]
    for window in chunks.split(4):
        states = full.base_model(input_ids=window, output_hidden_states=True).hidden_states
        for slot, block in enumerate(range(layout.bottom, total - layout.top)):
            collected[slot].append(states[block + 1].flatten(0, 1))  # hidden_states[i + 1] leaves block i
    outputs = [torch.cat(parts) for parts in collected]
    step = max(1, outputs[0].shape[0] // MAX_TOKENS_PER_BLOCK)
    return [states[::step] for states in outputs]


def select_clusters(full: PreTrainedModel, chunks: torch.Tensor, layout: Layout) -> list[list[int]]:
    """Clusters of full-model middle block indices, bottom to top."""
    layout.check(depth(full.config))
    similarity = cka_matrix(middle_block_outputs(full, chunks, layout))
    return [[layout.bottom + i for i in group] for group in cluster_adjacent(similarity, layout.middle)]


def build(request: BuildRequest) -> Built:
    layout, total = request.layout, depth(request.full.config)
    samples = request.options.get("samples", DEFAULT_SAMPLES)
    text = load_chunks(request.tokenizer, request.options.get("data"), CALIBRATION_SEQ_LEN, 0.0, max_chunks=samples)
    clusters = select_clusters(request.full, text.train, layout)
    kept = [representative(cluster) for cluster in clusters]
    share = request.options.get("share", False)
    middle = [representative(cluster) for cluster in clusters for _ in cluster] if share else kept
    block_map = layout.compose(total, middle)
    params = {
        "clusters": clusters,
        "kept": kept,
        "share": share,
        "calibration_windows": len(text.train),
        "public_text_sha256": text.sha256,
    }
    return Built(materialize(request.full, block_map), block_map, params)
