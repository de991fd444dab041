"""The token loop: every generation path (plugged model, PEMA on the owner's side, PEMA on the data owner's side)
runs `decode` with its own stepper and policy.

Each step the stepper gives f(x) and log P_LM for the rows still running, the policy turns them into the log-probs
to sample from, and each row takes one token. A row ends on end-of-text ("eos"), when its text contains a stop
string ("stop"; the text is cut before it, wherever the token boundaries fall) or after `max_new_tokens` ("length").
Text is handed out as it settles: text ending in a partial UTF-8 character, or in what may be the start of a stop
string, waits for the next token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .sampling import SamplingConfig, choose
from .steppers import Stepper

EOS, STOP, LENGTH = "eos", "stop", "length"
PARTIAL_CHARACTER = "\ufffd"  # what decoding shows for the first bytes of a character split across tokens

# (step index, the running rows' indices in the batch, their f(x) [B, d] and log P_LM [B, V]) -> the log-probs
# [B, V] the next tokens are drawn from; the indices let a policy keep per-row state (PEMA's planned lengths)
Policy = Callable[[int, Sequence[int], torch.Tensor, torch.Tensor], torch.Tensor]


def model_policy(step: int, rows: Sequence[int], states: torch.Tensor, lm_log_probs: torch.Tensor) -> torch.Tensor:
    """The model as it is: its own next-token distribution."""
    return lm_log_probs


@dataclass(frozen=True)
class Piece:
    """What one step gave one row."""

    row: int
    token: int | None  # None on the step that ended the row on end-of-text (the token is not kept)
    text: str  # text newly settled by this step ('' while it waits)
    finish: str | None = None  # on the row's last piece: EOS, STOP or LENGTH


@dataclass(frozen=True)
class Completion:
    tokens: list[int]  # end-of-text excluded; a stop string's tokens included
    text: str  # cut before the stop string
    finish: str


class _Row:
    def __init__(self, index: int, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]):
        self.index, self.tokenizer, self.stop = index, tokenizer, stop
        self.tokens: list[int] = []
        self.emitted = ""
        self.finish: str | None = None

    def take(self, token: int, eos_id: int | None, last_step: bool) -> Piece:
        if token == eos_id:
            self.finish = EOS
            return self._piece(None, self._text())
        self.tokens.append(token)
        text = self._text()
        cuts = [at for at in (text.find(s) for s in self.stop) if at >= 0]
        if cuts:
            text, self.finish = text[: min(cuts)], STOP
        elif last_step:
            self.finish = LENGTH
        return self._piece(token, text if self.finish else self._settled(text))

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _settled(self, text: str) -> str:
        """`text` less what may still change: a partial character, or a tail that a stop string may start with."""
        text = text.rstrip(PARTIAL_CHARACTER)
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - held]

    def _piece(self, token: int | None, settled: str) -> Piece:
        if self.finish:
            settled = settled.rstrip(PARTIAL_CHARACTER)  # no later token will complete it
        new, self.emitted = settled[len(self.emitted) :], settled
        return Piece(self.index, token, new, self.finish)


@torch.inference_mode()
def decode(
    stepper: Stepper,
    prompts_ids: Sequence[Sequence[int]],
    policy: Policy,
    sampling: SamplingConfig,
    eos_id: int | None,
    tokenizer: PreTrainedTokenizerBase,
) -> Iterator[list[Piece]]:
    """Per step, one piece for each row that was still running (rows share the step index the policy sees)."""
    sampling.check()
    rows = [_Row(i, tokenizer, sampling.stop) for i in range(len(prompts_ids))]
    generators = sampling.generators(len(rows))
    running = list(range(len(rows)))
    states, lm_log_probs = stepper.start(prompts_ids)
    for step in range(sampling.max_new_tokens):
        log_probs = policy(step, running, states, lm_log_probs)
        tokens = choose(log_probs, sampling, [generators[r] for r in running])
        last_step = step == sampling.max_new_tokens - 1
        yield [rows[r].take(t, eos_id, last_step) for r, t in zip(running, tokens, strict=True)]
        running = [r for r in running if rows[r].finish is None]
        if not running:
            return
        states, lm_log_probs = stepper.advance(running, [rows[r].tokens[-1] for r in running])


def complete(
    stepper: Stepper,
    prompts_ids: Sequence[Sequence[int]],
    policy: Policy,
    sampling: SamplingConfig,
    eos_id: int | None,
    tokenizer: PreTrainedTokenizerBase,
) -> list[Completion]:
    """`decode` run to the end: each row's tokens, text and finish reason."""
    tokens: list[list[int]] = [[] for _ in prompts_ids]
    texts: list[list[str]] = [[] for _ in prompts_ids]
    finish = ["" for _ in prompts_ids]  # every row's last piece names its reason
    for pieces in decode(stepper, prompts_ids, policy, sampling, eos_id, tokenizer):
        for piece in pieces:
            if piece.token is not None:
                tokens[piece.row].append(piece.token)
            texts[piece.row].append(piece.text)
            if piece.finish:
                finish[piece.row] = piece.finish
    return [Completion(t, "".join(x), f) for t, x, f in zip(tokens, texts, finish, strict=True)]


def stream(
    stepper: Stepper,
    prompt_ids: Sequence[int],
    policy: Policy,
    sampling: SamplingConfig,
    eos_id: int | None,
    tokenizer: PreTrainedTokenizerBase,
) -> Iterator[Piece]:
    """One prompt, one piece per step (what the Generate stream sends); the last piece carries the finish reason."""
    for pieces in decode(stepper, [prompt_ids], policy, sampling, eos_id, tokenizer):
        yield from pieces
