"""`f(c)`: the last transformer block's output before the final norm, at every position, from a local model.

The owner computes it with the full model (for `Represent` and for PEMA generation); the data owner computes it with
the emulator for the hybrid, where nothing leaves its machine. Teacher forcing: the contexts of an example are its
prompt followed by each prefix of its gold completion, and each context's value is the next gold token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import blocks
from ..examples import Example, encode
from .memory import Memory, MemoryWriter


class Representer(Protocol):
    hidden_size: int

    def represent(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """[len(seq), hidden] final-layer states (before the final norm) for each sequence."""
        ...


class LocalRepresenter:
    def __init__(self, model: PreTrainedModel):
        self.model = model.eval()
        self.hidden_size = int(model.config.hidden_size)

    @torch.no_grad()
    def forward(self, sequences: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Pre-norm states and next-token logits of each sequence, one padded batch."""
        captured: list[torch.Tensor] = []
        handle = blocks(self.model)[-1].register_forward_hook(
            lambda _m, _a, output: captured.append(output[0] if isinstance(output, tuple) else output)
        )
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, sequence in enumerate(sequences):  # right padding keeps positions 0..len-1 as they are alone
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        try:
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
        states = captured[-1]
        return (
            [states[row, : len(s)].float() for row, s in enumerate(sequences)],
            [logits[row, : len(s)].float() for row, s in enumerate(sequences)],
        )

    def represent(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return self.forward(sequences)[0]


@dataclass(frozen=True)
class Contexts:
    ids: list[int]  # prompt + completion
    start: int  # index of the first target token; contexts end at start−1 .. len−2

    @property
    def targets(self) -> list[int]:
        return self.ids[self.start :]


def teacher_forcing(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int, end_of_text: bool = True
) -> list[Contexts]:
    """Prompt + gold completion (+ end-of-text, so PEMA learns to stop), truncated to `max_length` tokens."""
    contexts = []
    for example in examples:
        prompt = encode(tokenizer, example.prompt or "", special=True)
        completion = encode(tokenizer, example.completion or example.text, special=False)
        if end_of_text and tokenizer.eos_token_id is not None:
            completion = [*completion, tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_length]
        start = max(1, len(prompt))  # the first token has no context
        if start < len(ids):
            contexts.append(Contexts(ids, start))
    return contexts


def build_memory(
    representer: Representer,
    contexts: Sequence[Contexts],
    out: Any,
    dtype: str,
    info: dict[str, Any],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> Memory:
    """One memory row per target token: key f(context), value the gold next token."""
    writer = MemoryWriter(out, sum(len(c.targets) for c in contexts), representer.hidden_size, dtype, info)
    for first in range(0, len(contexts), batch_size):
        batch = contexts[first : first + batch_size]
        states = representer.represent([c.ids[:-1] for c in batch])  # the last token is never a context
        for context, state in zip(batch, states, strict=True):
            writer.add(state[context.start - 1 :], torch.tensor(context.targets))
        if progress is not None:
            progress(len(batch))
    return writer.close()
