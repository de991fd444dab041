"""What the token loop asks at each step: f(x) (the last block's output before the final norm, at the last
position) and log P_LM (the model's next-token log-probs) for each row still running.

`LocalStepper` runs a local Hugging Face causal model: the batch is left-padded so that every row's last position
is the same column, one KV cache carries it from step to step, and a forward hook on the last block takes f(x).
The data owner's remote stepper (client/pema_generation.py) asks `Represent` instead. `ReadingStepper` pairs two:
log P_LM from one, the states PEMA reads from the other (hybrid PEMA reads the emulator it learned on).
`ProxyStepper` runs a proxy-tuned model: one `LocalStepper` per member, their distributions combined.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from ..architectures import blocks
from ..model_loading import input_device
from ..proxy_tuning import ProxyTuned
from ..scoring import causal_model

StepResult = tuple[torch.Tensor, torch.Tensor]  # f(x) [n, d] and log P_LM [n, V], float32
PAD_ID = 0  # any id will do: padded positions are masked


class Stepper(Protocol):
    def start(self, prompts: Sequence[Sequence[int]]) -> StepResult:
        """f(x) and log P_LM after each prompt (each needs at least one token)."""

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> StepResult:
        """Appends tokens[k] to row rows[k]; f(x) and log P_LM of those rows, in that order. A row left out has
        ended: it is never named again."""


class LocalStepper:
    def __init__(self, model: PreTrainedModel | PeftModel):
        # LoRA layers sit inside the base model's modules: calling the base model applies them.
        self.model = causal_model(model).eval()
        self.last_block = blocks(self.model)[-1]
        self.device = input_device(self.model)
        parameters = inspect.signature(self.model.forward).parameters
        # Bloom's ALiBi takes positions from the attention mask and has no position_ids.
        self.takes_positions = "position_ids" in parameters
        # Transformers 5 renamed past_key_values to cache; either way the output holds it under the same name.
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.rows = 0
        self.mask = self.positions = torch.zeros(0, 0, dtype=torch.long)
        self.past: Any = None

    def start(self, prompts: Sequence[Sequence[int]]) -> StepResult:
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(map(len, prompts))
        ids = torch.tensor([[PAD_ID] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        # Left padding: a row's first real token is position 0, as it would be alone.
        self.positions = (self.mask.cumsum(dim=-1) - 1).clamp(min=0)
        self.rows, self.past = len(prompts), None
        return self._forward(ids, range(self.rows))

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> StepResult:
        # Rows that ended still ride along in the cache (cheaper than reshaping it); what they get is never read.
        ids = torch.full((self.rows, 1), PAD_ID, dtype=torch.long)
        ids[list(rows), 0] = torch.tensor(list(tokens), dtype=torch.long)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
        self.positions = self.positions[:, -1:] + 1
        return self._forward(ids.to(self.device), rows)

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, rows: Sequence[int]) -> StepResult:
        captured: list[torch.Tensor] = []
        handle = self.last_block.register_forward_hook(
            lambda _m, _a, output: captured.append((output[0] if isinstance(output, tuple) else output)[:, -1])
        )
        extra = {self.cache_name: self.past}
        if self.takes_positions:
            extra["position_ids"] = self.positions[:, -ids.shape[1] :]
        try:
            # logits_to_keep=1: only the last position's logits, never [B, prompt, V] for a long prompt.
            out = self.model(input_ids=ids, attention_mask=self.mask, use_cache=True, logits_to_keep=1, **extra)
        finally:
            handle.remove()
        self.past = out[self.cache_name]
        selected = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        states = captured[-1][selected].float()
        return states, torch.log_softmax(out.logits[selected, -1].float(), dim=-1)


class ReadingStepper:
    """log P_LM from `lm` (the full model), f(x) from `reader` (through `transform`, for instance the owner's bridge).

    Hybrid PEMA learns on the emulator's states; read from the full model instead, its keys shift and its output
    degrades (below zero-shot on Multi30k). Reading the emulator at generation too keeps the keys it learned on, while
    the distribution it is mixed with stays the full model's. Both steppers see every token.
    """

    def __init__(self, lm: Stepper, reader: Stepper, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.lm, self.reader, self.transform = lm, reader, transform

    def start(self, prompts: Sequence[Sequence[int]]) -> StepResult:
        return self._pair(self.lm.start(prompts), self.reader.start(prompts))

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> StepResult:
        return self._pair(self.lm.advance(rows, tokens), self.reader.advance(rows, tokens))

    def _pair(self, from_lm: StepResult, from_reader: StepResult) -> StepResult:
        states = from_reader[0] if self.transform is None else self.transform(from_reader[0])
        return states.float(), from_lm[1]


class ProxyStepper:
    """log P_LM of a proxy-tuned model: each member steps on its own `LocalStepper` and KV cache, and the members'
    log-probs are combined as `ProxyTuned.combine` combines logits; f(x) is the base model's."""

    def __init__(self, model: ProxyTuned):
        self.model = model
        self.members = [LocalStepper(member) for member in model.members]

    def start(self, prompts: Sequence[Sequence[int]]) -> StepResult:
        return self._combine([member.start(prompts) for member in self.members])

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> StepResult:
        return self._combine([member.advance(rows, tokens) for member in self.members])

    def _combine(self, results: list[StepResult]) -> StepResult:
        states = results[0][0]
        # log-probs are logits less a per-row constant, which the softmax drops: the same as combining logits
        steered = self.model.combine(*(log_probs for _, log_probs in results))
        return states, torch.log_softmax(steered, dim=-1)


def stepper_for(model: PreTrainedModel | PeftModel | ProxyTuned) -> LocalStepper | ProxyStepper:
    """The stepper that generates with `model`: a proxy-tuned model steps each member on its own cache."""
    return ProxyStepper(model) if isinstance(model, ProxyTuned) else LocalStepper(model)
