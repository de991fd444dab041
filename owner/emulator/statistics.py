"""Which tokens a representation statistic counts: never an attention sink, a BOS token or padding.

Causal LMs park surplus attention on the first token of every sequence (the attention sink), and that token's hidden
state grows huge: in SmolLM2-135M its norm is about 23,000 against 130–665 at every other position. A few other
tokens become sinks too (in SmolLM2, about 1 in 2,000 of the public text's tokens, such as " \n" or " Captain",
reach the same norm). Any statistic that weighs tokens by their size (linear CKA, output covariances) is then a
statistic of those few tokens: token-level CKA between SmolLM2's blocks 12 and 27 is 0.9998 with them, 0.995
without position 0 alone, and 0.51 without every sink.

So a token counts when it is attended (not padding), is not the first attended position, is not BOS, and its hidden
state is not massive (norm above MASSIVE_FACTOR times the median token's, at any layer). Every emulator builder that
measures the full model's representations (CRaSh's CKA, `place=cka`, `place=gradnorm`, the low-rank covariances)
takes its tokens from `counted_tokens`, so the rule lives in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SINK_POSITIONS = 1  # the first attended position of each sequence is the sink
# Sinks in SmolLM2 sit 35 to 175 times above the median norm and ordinary tokens below 2 times; 10 splits them widely.
MASSIVE_FACTOR = 10.0


def content_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, bos_token_id: int | None = None
) -> torch.Tensor:
    """[batch, seq] bool, True where a token counts in a statistic.

    False for the first attended position of each row (the sink, wherever left padding puts it), for padding
    (`attention_mask` 0) and for every BOS token, which attracts the same outsized state.
    """
    attended = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    sink = attended & (attended.long().cumsum(dim=1) <= SINK_POSITIONS)
    keep = attended & ~sink
    if bos_token_id is not None:
        keep &= input_ids != bos_token_id
    return keep


def massive_tokens(hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: tokens whose state norm is above MASSIVE_FACTOR x the median over `mask`, at any layer."""
    massive = torch.zeros_like(mask)
    if not mask.any():
        return massive
    for states in hidden_states:
        norms = states.detach().float().norm(dim=-1)
        massive |= norms > MASSIVE_FACTOR * norms[mask].median()
    return massive


def counted_tokens(
    input_ids: torch.Tensor,
    hidden_states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """[batch, seq] bool, True where a token counts in a statistic: `content_mask` less the massive tokens.

    `hidden_states` are the model's states for this batch (`output_hidden_states=True`), each [batch, seq, width].
    """
    mask = content_mask(input_ids, attention_mask, bos_token_id)
    return mask & ~massive_tokens(hidden_states, mask)


def covariance_factor(rows: torch.Tensor) -> torch.Tensor:
    """R [width, width] with R·Rᵀ the covariance of `rows` [tokens, width] (float64 eigendecomposition)."""
    variances, directions = torch.linalg.eigh(torch.cov(rows.double().T))
    return (directions * variances.clamp_min(0).sqrt()).float()


def content_tokens(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The states [batch, seq, width] of the counted tokens only, as [tokens, width]."""
    return states[mask]


def mean_pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One vector per sequence: the mean of its counted tokens' states, [batch, width] (CRaSh's `mean` pooling)."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def content_labels(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LM labels that drop every prediction made *at* an uncounted position (-100, which the loss ignores).

    Hugging Face shifts labels: position t predicts label t + 1, so the prediction from the sink is label 1.
    """
    labels = input_ids.clone()
    labels[:, 1:][~mask[:, :-1]] = -100
    return labels
