"""Which full-model blocks become the trainable adapter, and how the remaining blocks are split into gaps.

Offsite-Tuning puts the adapter at the ends: the bottom l and top r blocks of an `l-N-r` layout. With `place=` the
owner instead measures each block's importance on its public text and makes the l+r most important blocks the
adapter, wherever they are:

- `gradnorm`: the norm of the LM-loss gradient with respect to the block's parameters, the layer importance that IST
  (Yao et al. 2024) samples trainable layers by.
- `cka`: 1 − linear CKA between the block's input and output states, i.e. how much the block changes the
  representation.

Both leave out attention sinks, BOS and padding (`statistics.counted_tokens`): CKA over the sink tokens' massive
states says nothing about the rest.

The blocks that are not adapter fall into gaps (runs of consecutive blocks). The builder keeps N blocks of them in
all, shared between the gaps in proportion to their length. With `ends` there is one gap and this is the plain layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...common.architectures import blocks, depth
from .crash import linear_cka
from .layout import Layout, LayoutError
from .public_text import load_chunks
from .statistics import content_labels, content_tokens, counted_tokens

ENDS = "ends"
IMPORTANCE_MEASURES = ("gradnorm", "cka")
PLACEMENTS = (ENDS, *IMPORTANCE_MEASURES)
CALIBRATION_SEQ_LEN = 128
CALIBRATION_WINDOWS = 16  # the ranking of SmolLM2's blocks is the same at 16 and 32 windows
BATCH_SIZE = 4


@dataclass(frozen=True)
class Placement:
    method: str
    adapters: list[int]  # full-model indices of the adapter blocks, ascending
    importance: list[float] | None = None  # per full-model block, when measured

    def as_params(self) -> dict[str, object]:
        params: dict[str, object] = {"placement": self.method, "adapter_blocks": self.adapters}
        if self.importance is not None:
            params["importance"] = [round(value, 6) for value in self.importance]
        return params


def gaps(adapters: list[int], total_depth: int) -> list[list[int]]:
    """Maximal runs of consecutive non-adapter blocks, bottom to top."""
    runs: list[list[int]] = []
    for index in range(total_depth):
        if index in adapters:
            continue
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def parse_placement(text: str) -> str:
    if text not in PLACEMENTS:
        raise ValueError(f"must be one of {', '.join(PLACEMENTS)}")
    return text


def gradient_importance(full: PreTrainedModel, chunks: torch.Tensor) -> list[float]:
    """‖∂ LM loss / ∂ θ_block‖ per block, the loss summed over the windows.

    The loss leaves out the predictions made at attention sinks and BOS (`statistics.counted_tokens`), as every
    other representation statistic does. On SmolLM2 that moves the norms by under 10% and leaves the 4, 6 and 8
    most important blocks as they were.
    """
    was_training = full.training
    full.eval()
    layers = blocks(full)
    previous = [p.requires_grad for p in full.parameters()]
    for parameter in full.parameters():
        parameter.requires_grad_(False)
    for parameter in layers.parameters():
        parameter.requires_grad_(True)
    full.zero_grad(set_to_none=True)
    for batch in chunks.split(BATCH_SIZE):
        out = full(input_ids=batch, output_hidden_states=True)
        labels = content_labels(batch, counted_tokens(batch, out.hidden_states, bos_token_id=full.config.bos_token_id))
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
    norms = []
    for layer in layers:
        squares = [p.grad.double().pow(2).sum() for p in layer.parameters() if p.grad is not None]
        norms.append(float(torch.stack(squares).sum().sqrt()) if squares else 0.0)
    full.zero_grad(set_to_none=True)
    for parameter, flag in zip(full.parameters(), previous, strict=True):
        parameter.requires_grad_(flag)
    full.train(was_training)
    return norms


@torch.no_grad()
def cka_importance(full: PreTrainedModel, chunks: torch.Tensor) -> list[float]:
    """1 − CKA(block input, block output) per block, over the windows' counted tokens (no sinks, no BOS)."""
    total = depth(full.config)
    inputs: list[list[torch.Tensor]] = [[] for _ in range(total)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(total)]
    batch_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(index: int):  # type: ignore[no-untyped-def]
        def hook(_module, args, kwargs, output):  # type: ignore[no-untyped-def]
            state = args[0] if args else kwargs["hidden_states"]
            batch_states[index] = (state, output[0] if isinstance(output, tuple) else output)

        return hook

    # Hooks, not hidden_states: the model's last hidden state has the final norm applied.
    handles = [layer.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(blocks(full))]
    try:
        for batch in chunks.split(BATCH_SIZE):
            states = full.base_model(input_ids=batch, output_hidden_states=True).hidden_states
            mask = counted_tokens(batch, states, bos_token_id=full.config.bos_token_id)
            for index, (entering, leaving) in batch_states.items():
                inputs[index].append(content_tokens(entering, mask))
                outputs[index].append(content_tokens(leaving, mask))
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - linear_cka(torch.cat(inputs[i]), torch.cat(outputs[i])) for i in range(total)]


def most_important(importance: list[float], count: int) -> list[int]:
    """Indices of the `count` largest values, ascending; ties go to the lower block."""
    ranked = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    return sorted(ranked[:count])


def place(
    method: str, full: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layout: Layout, data: Path | None
) -> Placement:
    total = depth(full.config)
    layout.check(total)
    if method == ENDS:
        return Placement(ENDS, layout.adapter_blocks(total))
    text = load_chunks(tokenizer, data, CALIBRATION_SEQ_LEN, 0.0, max_chunks=CALIBRATION_WINDOWS)
    measure = gradient_importance if method == "gradnorm" else cka_importance
    importance = measure(full, text.train)
    return Placement(method, most_important(importance, layout.bottom + layout.top), importance)


def allot(gap_sizes: list[int], keep: int) -> list[int]:
    """Shares `keep` blocks between gaps in proportion to their sizes (largest remainder, ties to the lower gap)."""
    if not 1 <= keep <= sum(gap_sizes):
        raise LayoutError(f"cannot keep {keep} of {sum(gap_sizes)} non-adapter blocks")
    total = sum(gap_sizes)
    exact = [size * keep / total for size in gap_sizes]
    shares = [int(value) for value in exact]
    by_remainder = sorted(range(len(gap_sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for index in by_remainder[: keep - sum(shares)]:
        shares[index] += 1
    return shares
