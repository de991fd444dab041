"""Greedy generation with a PEMA adapter: each step mixes PEMA's next-token distribution with the model's.

`step(ids)` returns f(x) and log P_LM at the last position. The owner computes them in process; the data owner asks
`Represent` for them, so the adapter never leaves its machine. Both run this same loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .adapter import PemaAdapter
from .config import PemaConfig
from .head import Head
from .unrolling import mix, unrolling_lambda

StepFunction = Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def generate_pema(
    step: StepFunction,
    adapter: PemaAdapter,
    head: Head,
    config: PemaConfig,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_id: int | None,
    planned_length: int | None = None,
) -> Iterator[int]:
    """Yields token ids until `max_new_tokens` or end-of-text; L of Gradual Unrolling is `planned_length` or
    `max_new_tokens`, never the reference's length."""
    adapter.eval()
    ids = list(prompt_ids)
    length = planned_length or max_new_tokens
    for position in range(max_new_tokens):
        state, lm_log_probs = step(ids)
        weight = unrolling_lambda(position, length, config.lambda_max, config.schedule)
        token = int(mix(adapter.log_probs(state, head), lm_log_probs.float(), weight).argmax())
        yield token
        if token == eos_id:
            return
        ids.append(token)


def decoded_increments(tokenizer: PreTrainedTokenizerBase, tokens: Iterable[int]) -> Iterator[tuple[int, str]]:
    """(token, newly decoded text) until end-of-text; text ending in a partial UTF-8 character waits for the next."""
    produced: list[int] = []
    emitted = ""
    for token in tokens:
        if token == tokenizer.eos_token_id:
            return
        produced.append(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            yield token, text[len(emitted) :]
            emitted = text
