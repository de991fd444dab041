"""CRaSh (Zhang et al. 2023): cluster the middle blocks by representation similarity, keep one per cluster, share it.

1. Run the full model on the owner's public text and keep every middle block's output hidden states.
2. Pool them as CRaSh's reference code does with its default `mean` pooling: one vector per window, the mean of
   its tokens' states.
3. Linear CKA between every pair of middle blocks, over those window vectors.
4. Adjacency-constrained clustering as in the reference (`layer_iter_cluster`, stacking mode): start from one
   cluster per block and merge the neighbouring pair whose facing blocks (the last of the left cluster, the first of
   the right) have the highest CKA, until N clusters remain. Each cluster is a run of consecutive blocks.
5. Keep the reference's representative of each cluster, `cluster[len(cluster) // 2]`.
6. With `share=true`, restore the original depth: every dropped block is replaced by its cluster's kept block. The
   bundle then stores the shared block once per use (plain `transformers` has no tied-layer format), so it is as
   large as the full model and costs as much compute, but holds only N distinct middle blocks; the manifest's
   `block_map` shows the repeats. Without sharing the emulator is N blocks deep, like the uniform drop.

Where this departs from the reference (TsinghuaC3I/CRaSh @ 305e80a, `utils/main.py`):

- Attention sinks (position 0 and the rare mid-text tokens with a massive state) and BOS tokens are left out of
  every window's mean (`statistics.counted_tokens`); the reference averages every non-padding token. In SmolLM2 a
  sink's state is 35 to 175 times the size of an ordinary token's, so one sink in a window sets that window's mean.
- The windows are the owner's public text (256 windows of 128 tokens by default), not the task's validation set
  (512 examples in the reference's scripts): the owner never sees the data owner's task.
- `pooling=tokens` is offered beside the reference's `mean`: every counted token is a point of the CKA (at most
  4,096, evenly subsampled) instead of one point per window.
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
from .statistics import content_tokens, counted_tokens, mean_pooled

MEAN_POOLING = "mean"  # the reference's default: one point per window
TOKEN_POOLING = "tokens"
POOLINGS = (MEAN_POOLING, TOKEN_POOLING)


def parse_pooling(text: str) -> str:
    if text not in POOLINGS:
        raise ValueError(f"must be one of {', '.join(POOLINGS)}")
    return text


OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "share": parse_bool,
    "data": Path,
    "samples": positive_int,
    "pooling": parse_pooling,
}
CALIBRATION_SEQ_LEN = 128
# Windows of public text. With mean pooling each window is one point of the CKA; the reference uses 512 examples,
# 256 keeps the forward pass to about a minute of SmolLM2 on 2 cores.
DEFAULT_SAMPLES = 256
MAX_TOKENS_PER_BLOCK = 4096
FORWARD_BATCH = 4


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment between two sets of n representations, [n, d1] and [n, d2].

    The caller picks the rows: take them through `statistics.counted_tokens` so that no attention sink is one.
    """
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
    """Merges the neighbouring pair of clusters whose facing blocks are most similar until `clusters` remain."""
    groups = [[i] for i in range(similarity.shape[0])]
    if not 1 <= clusters <= len(groups):
        raise ValueError(f"cannot make {clusters} clusters of {len(groups)} blocks")
    while len(groups) > clusters:
        linkage = [float(similarity[a[-1], b[0]]) for a, b in zip(groups, groups[1:], strict=False)]
        best = max(range(len(linkage)), key=linkage.__getitem__)  # ties go to the lower pair
        groups[best : best + 2] = [groups[best] + groups[best + 1]]
    return groups


def representative(cluster: list[int]) -> int:
    """The middle block of a run of consecutive blocks (the upper of two middles, as in the reference)."""
    return cluster[len(cluster) // 2]


def pooled(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """A block's points for the CKA from its states [batch, seq, hidden]: one per window (`mean`) or per token."""
    return mean_pooled(states, mask) if pooling == MEAN_POOLING else content_tokens(states, mask)


@torch.no_grad()
def middle_block_outputs(
    full: PreTrainedModel, chunks: torch.Tensor, layout: Layout, pooling: str = MEAN_POOLING
) -> list[torch.Tensor]:
    """Each middle block's output representations over the calibration windows, [points, hidden] per block.

    Attention sinks and BOS tokens never count (`statistics.counted_tokens`). `mean` gives one point per
    window; `tokens` one per counted token, evenly subsampled to at most MAX_TOKENS_PER_BLOCK.
    """
    total = depth(full.config)
    middle = range(layout.bottom, total - layout.top)
    collected: list[list[torch.Tensor]] = [[] for _ in middle]
    for window in chunks.split(FORWARD_BATCH):
        states = full.base_model(input_ids=window, output_hidden_states=True).hidden_states
        mask = counted_tokens(window, states, bos_token_id=full.config.bos_token_id)
        for slot, block in enumerate(middle):
            collected[slot].append(pooled(states[block + 1], mask, pooling))  # hidden_states[i + 1] leaves block i
    outputs = [torch.cat(parts) for parts in collected]
    step = max(1, outputs[0].shape[0] // MAX_TOKENS_PER_BLOCK)
    return [states[::step] for states in outputs]


def select_clusters(
    full: PreTrainedModel, chunks: torch.Tensor, layout: Layout, pooling: str = MEAN_POOLING
) -> list[list[int]]:
    """Clusters of full-model middle block indices, bottom to top."""
    layout.check(depth(full.config))
    similarity = cka_matrix(middle_block_outputs(full, chunks, layout, pooling))
    return [[layout.bottom + i for i in group] for group in cluster_adjacent(similarity, layout.middle)]


def build(request: BuildRequest) -> Built:
    layout, total = request.layout, depth(request.full.config)
    samples = request.options.get("samples", DEFAULT_SAMPLES)
    pooling = request.options.get("pooling", MEAN_POOLING)
    text = load_chunks(request.tokenizer, request.options.get("data"), CALIBRATION_SEQ_LEN, 0.0, max_chunks=samples)
    clusters = select_clusters(request.full, text.train, layout, pooling)
    kept = [representative(cluster) for cluster in clusters]
    share = request.options.get("share", False)
    middle = [representative(cluster) for cluster in clusters for _ in cluster] if share else kept
    block_map = layout.compose(total, middle)
    params = {
        "clusters": clusters,
        "kept": kept,
        "share": share,
        "pooling": pooling,
        "calibration_windows": len(text.train),
        "public_text_sha256": text.sha256,
    }
    return Built(materialize(request.full, block_map), block_map, params)
