"""PEMA generation on the data owner's side: each step asks `Represent` for f(x) and P_LM; the adapter stays here."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..common.examples import encode
from ..common.pema.bundle import load_pema
from ..common.pema.generation import decoded_increments, generate_pema
from .connection import Remote
from .representations import RemoteRepresenter
from .training.pema import load_head


def generate_remote_pema(
    remote: Remote,
    adapter_dir: Path,
    head_dir: Path,
    prompt: str,
    max_new_tokens: int,
    planned_length: int | None = None,
    owner_key: str | None = None,
) -> Iterator[tuple[int, str]]:
    """(token id, newly decoded text) per step, greedy with the adapter's λ schedule."""
    adapter, config = load_pema(adapter_dir)
    head, _ = load_head(head_dir, owner_key)
    tokenizer = AutoTokenizer.from_pretrained(head_dir)
    representer = RemoteRepresenter(remote, adapter.A.weight.shape[1])

    def step(ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The owner's head, pulled and verified, gives P_LM from f(x): no log-probs need cross the wire.
        state = representer.last(ids)
        return state, torch.log_softmax(head.logits(state).float(), dim=-1)

    prompt_ids = encode(tokenizer, prompt, special=True)
    tokens = generate_pema(
        step, adapter, head, config, prompt_ids, max_new_tokens, tokenizer.eos_token_id, planned_length
    )
    return decoded_increments(tokenizer, tokens)
