"""Data-parallel training on accelerate: the same run in one process or under `accelerate launch --num_processes N`.

Each step draws one global batch (the same indices on every process, from the shared seed); process k takes every
N-th example of it. The loss each process back-propagates is its summed completion NLL over the global batch's
token count, times N, so that DDP's gradient mean equals the one-process gradient of the global batch: N processes
train the adapter one process would, up to float rounding. Run plainly, accelerate is one process on the best device.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from ...common.examples import TokenizedExample
from ...common.scoring import IGNORE, collate, completion_nll


class CompletionObjective(torch.nn.Module):
    """The completion-only summed NLL as a module: DDP syncs gradients only for calls through its own forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return completion_nll(self.model, batch)[0]


def completion_tokens(examples: list[TokenizedExample]) -> int:
    """How many tokens the loss covers (labels past the first position that are not ignored), as collate shifts."""
    return sum(sum(1 for label in example.labels[1:] if label != IGNORE) for example in examples)


def local_share(accelerator: Accelerator, chosen: list[int]) -> tuple[list[int], float]:
    """This process's examples of the global batch, and the weight of its loss (0 for a stand-in example).

    A process whose share is empty (a last batch smaller than N) still runs one example at weight 0, because every
    process must join DDP's gradient all-reduce.
    """
    share = chosen[accelerator.process_index :: accelerator.num_processes]
    return (share, 1.0) if share else (chosen[:1], 0.0)


def step_loss(
    accelerator: Accelerator,
    objective: torch.nn.Module,
    data: list[TokenizedExample],
    chosen: list[int],
    pad_id: int,
) -> tuple[torch.Tensor, float]:
    """This process's loss to back-propagate, and the global batch's mean token NLL (summed over processes)."""
    share, weight = local_share(accelerator, chosen)
    tokens = max(completion_tokens([data[i] for i in chosen]), 1)
    batch = {k: v.to(accelerator.device) for k, v in collate([data[i] for i in share], pad_id).items()}
    nll = objective(**batch) * weight
    total = accelerator.reduce(nll.detach(), reduction="sum")
    return nll * (accelerator.num_processes / tokens), total.item() / tokens
