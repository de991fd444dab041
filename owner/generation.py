"""Token-by-token generation with a KV cache, yielding each step's token and newly decoded text."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import PreTrainedTokenizerBase

from ..common.examples import encode


@torch.inference_mode()
def generate_stream(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> Iterator[tuple[int, str]]:
    generator = torch.Generator().manual_seed(seed)
    ids = encode(tokenizer, prompt, special=True)
    inputs = torch.tensor([ids])
    past = None
    produced: list[int] = []
    emitted = ""
    for _ in range(max_new_tokens):
        out = model(input_ids=inputs, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1].float()
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator))
        else:
            token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            return
        produced.append(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        # Hold back text that ends in a partial UTF-8 character until the next token completes it.
        if not text.endswith("\ufffd"):
            yield token, text[len(emitted) :]
            emitted = text
        inputs = torch.tensor([[token]])
