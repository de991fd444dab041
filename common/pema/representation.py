"""`f(c)`: the last transformer block's output before the final norm, at every position, from a local model.

The owner computes it with the full model (for `Represent` and for PEMA generation); the data owner computes it with
the emulator for the hybrid, where nothing leaves its machine. The value of every context is the next gold token;
the contexts themselves are either
- teacher forcing (the default): the prompt followed by each prefix of the gold completion; or
- own generation (PEMA's option): the prompt followed by each prefix of the model's own greedy continuation, so that
  the memory sees the states the model will be in when it generates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..architectures import blocks
from ..examples import Example, encode
from ..model_loading import input_device
from .memory import Memory, MemoryWriter

TEACHER_FORCING, OWN_GENERATION = "teacher-forcing", "own-generation"
CONTEXT_KINDS = (TEACHER_FORCING, OWN_GENERATION)


class Representer(Protocol):
    hidden_size: int

    def represent(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """[len(seq), hidden] final-layer states (before the final norm) for each sequence."""

    def next_tokens(self, sequences: Sequence[Sequence[int]]) -> list[int]:
        """The model's greedy next token after each sequence."""


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
            device = input_device(self.model)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        finally:
            handle.remove()
        states = captured[-1]
        return (
            [states[row, : len(s)].float() for row, s in enumerate(sequences)],
            [logits[row, : len(s)].float() for row, s in enumerate(sequences)],
        )

    def represent(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return self.forward(sequences)[0]

    def next_tokens(self, sequences: Sequence[Sequence[int]]) -> list[int]:
        return [int(logits[-1].argmax()) for logits in self.forward(sequences)[1]]


@dataclass(frozen=True)
class Contexts:
    """One example's contexts: the prefixes of `inputs` ending at positions start−1 … len−1, one per target."""

    inputs: list[int]
    start: int  # the prompt's length: the first context is the whole prompt
    targets: list[int]  # the gold next token of each context

    def __post_init__(self) -> None:
        if len(self.inputs) - self.start + 1 != len(self.targets):
            raise ValueError("an example needs exactly one target per context")


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
            contexts.append(Contexts(ids[:-1], start, ids[start:]))  # the last token is never a context
    return contexts


def own_generation(
    representer: Representer,
    gold: Sequence[Contexts],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[Contexts]:
    """The same targets as `gold` (teacher forcing), but each context continues the prompt with the model's own
    greedy tokens instead of the gold ones: as many as the gold completion needs, one step per token."""
    contexts = []
    for first in range(0, len(gold), batch_size):
        batch = gold[first : first + batch_size]
        inputs = [list(c.inputs[: c.start]) for c in batch]
        while True:
            growing = [i for i, c in enumerate(batch) if len(inputs[i]) < len(c.inputs)]
            if not growing:
                break
            for i, token in zip(growing, representer.next_tokens([inputs[i] for i in growing]), strict=True):
                inputs[i].append(token)
        contexts += [Contexts(ids, c.start, c.targets) for ids, c in zip(inputs, batch, strict=True)]
        if progress is not None:
            progress(len(batch))
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
    groups: dict[tuple[int, ...], int] = {}  # examples that share a prompt share a group
    for first in range(0, len(contexts), batch_size):
        batch = contexts[first : first + batch_size]
        states = representer.represent([c.inputs for c in batch])
        for context, state in zip(batch, states, strict=True):
            group = groups.setdefault(tuple(context.inputs[: context.start]), len(groups))
            writer.add(state[context.start - 1 :], torch.tensor(context.targets), group)
        if progress is not None:
            progress(len(batch))
    return writer.close()
