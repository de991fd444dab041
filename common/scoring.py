"""Log-likelihood scoring shared by training and evaluation, on either side of the wire.

The LM head is applied only where a loss or a choice is scored: with a 49k vocabulary the head costs
more than a block, so skipping it on prompt positions is most of the speed of evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .chunked_loss import chunked_rows
from .examples import IGNORE, Example, TokenizedExample, encode, keep_end, leading_special_count
from .memory import PeakRss
from .model_loading import ensure_pad_token, input_device
from .proxy_tuning import ProxyTuned

ProgressCallback = Callable[[int, int], None]
Returned = TypeVar("Returned")


def causal_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _hidden_at(
    model: PreTrainedModel | PeftModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.nn.Module]:
    """The final hidden states at positions (rows[k], cols[k]) of a right-padded batch, [K, hidden], and the head."""
    causal = causal_model(model)
    device = input_device(causal)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    hidden = causal.base_model(**inputs, use_cache=False)[0]
    return hidden[rows.to(hidden.device), cols.to(hidden.device)], causal.get_output_embeddings()


def logits_at(
    model: PreTrainedModel | PeftModel | ProxyTuned,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Logits at positions (rows[k], cols[k]) of a right-padded batch, shape [K, vocab]."""
    if isinstance(model, ProxyTuned):
        return model.combine(*(logits_at(m, input_ids, attention_mask, rows, cols) for m in model.members))
    hidden, head = _hidden_at(model, input_ids, attention_mask, rows, cols)
    return head(hidden).float()


def completion_token_nll(
    model: PreTrainedModel | PeftModel, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The NLL of each labelled token, [K], and the batch row each one belongs to; the head's logits are taken a
    chunk of tokens at a time (common/chunked_loss.py)."""
    targets = batch["labels"][:, 1:]
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    hidden, head = _hidden_at(model, batch["input_ids"], batch["attention_mask"], rows, cols)

    def nll(states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(states).float(), labels, reduction="none")

    return chunked_rows(nll, hidden, targets[rows, cols].to(hidden.device)), rows


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    value = pad_id if fill is None else fill
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids = pad_batch([b.input_ids for b in batch], pad_id)
    attention_mask = pad_batch([[1] * len(b.input_ids) for b in batch], pad_id, fill=0)
    labels = pad_batch([b.labels for b in batch], pad_id, fill=IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def completion_nll(model: PreTrainedModel | PeftModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the labelled tokens, and how many there were."""
    nll, rows = completion_token_nll(model, batch)
    return nll.sum(), int(rows.numel())


@dataclass(frozen=True)
class Progress:
    """Sequences scored so far, of all: what a step of scoring yields after each batch."""

    done: int
    total: int


@dataclass
class _Query:
    """Score `candidates[k]` (token ids) as the token after position `positions[k]` of `ids`."""

    ids: list[int]
    positions: list[int]
    candidates: list[list[int]]


@dataclass
class EvaluationReport:
    examples: int
    tokens: int
    loss: float
    perplexity: float
    accuracy: float  # NaN when no example carries choices
    scored_choices: int
    seconds: float
    # lm-eval's acc_norm: each choice's log-likelihood divided by its length in characters
    accuracy_norm: float = float("nan")
    peak_rss_bytes: int = 0  # the process's most resident memory during this evaluation
    # per example with choices, in order: two systems scored on the same examples compare paired
    correct: list[bool] = field(default_factory=list)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class ExampleScore:
    """One example's scores: summed log-likelihood, token and character count of each continuation."""

    logprobs: tuple[float, ...]
    tokens: tuple[int, ...]
    chars: tuple[int, ...]
    gold: int | None  # index of the completion among the continuations; None for text and choice-only rows
    has_choices: bool

    @property
    def predicted(self) -> int:
        return max(range(len(self.logprobs)), key=self.logprobs.__getitem__)

    @property
    def predicted_norm(self) -> int:
        return max(range(len(self.logprobs)), key=lambda i: self.logprobs[i] / max(self.chars[i], 1))

    @property
    def correct(self) -> bool:
        return self.gold is not None and self.predicted == self.gold

    @property
    def correct_norm(self) -> bool:
        return self.gold is not None and self.predicted_norm == self.gold


def _continuations(example: Example) -> list[str]:
    return list(example.choices) if example.choices else [example.completion]


def _queries_for(example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int, lead: int) -> list[_Query]:
    if example.text:
        ids = encode(tokenizer, example.text, special=True)[:max_length]
        return [_Query(ids, list(range(len(ids) - 1)), [[t] for t in ids[1:]])]
    prompt = encode(tokenizer, example.prompt, special=True)
    options = [encode(tokenizer, c, special=False)[: max_length - 1 - lead] for c in _continuations(example)]
    if all(len(o) == 1 for o in options):
        # Every continuation is one token: one forward over the prompt scores them all.
        prompt = keep_end(prompt, max_length, lead)
        return [_Query(prompt, [len(prompt) - 1], [[o[0] for o in options]])]
    queries = []
    for option in options:
        kept = keep_end(prompt, max_length - len(option), lead)
        queries.append(
            _Query(kept + option, list(range(len(kept) - 1, len(kept) + len(option) - 1)), [[t] for t in option])
        )
    return queries


@torch.inference_mode()
def _run_queries(
    model: PreTrainedModel | PeftModel | ProxyTuned, queries: list[_Query], pad_id: int, batch_size: int
) -> Generator[Progress, None, list[list[list[float]]]]:
    """Log-probabilities [query][position][candidate]; yields after each batch, so a caller can pause between them."""
    results: list[list[list[float]]] = [[] for _ in queries]
    order = sorted(range(len(queries)), key=lambda i: len(queries[i].ids))  # less padding
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids = pad_batch([queries[i].ids for i in chunk], pad_id)
        attention_mask = pad_batch([[1] * len(queries[i].ids) for i in chunk], pad_id, fill=0)
        rows = torch.tensor([r for r, i in enumerate(chunk) for _ in queries[i].positions], dtype=torch.long)
        cols = torch.tensor([p for i in chunk for p in queries[i].positions], dtype=torch.long)
        logprobs = torch.log_softmax(logits_at(model, input_ids, attention_mask, rows, cols), dim=-1)
        k = 0
        for i in chunk:
            for candidates in queries[i].candidates:
                results[i].append(logprobs[k, candidates].tolist())
                k += 1
        yield Progress(min(start + batch_size, len(order)), len(order))
    return results


def _drive(steps: Generator[Progress, None, Returned], progress: ProgressCallback | None) -> Returned:
    """Runs the steps to their end, telling `progress` after each."""
    while True:
        try:
            step = next(steps)
        except StopIteration as finished:
            return finished.value
        if progress is not None:
            progress(step.done, step.total)


def _score_steps(
    model: PreTrainedModel | PeftModel | ProxyTuned,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
    max_length: int,
) -> Generator[Progress, None, list[ExampleScore]]:
    pad_id = ensure_pad_token(tokenizer)
    lead = leading_special_count(tokenizer)
    per_example = [_queries_for(e, tokenizer, max_length, lead) for e in examples]
    flat = [q for qs in per_example for q in qs]
    scored = yield from _run_queries(model.eval(), flat, pad_id, batch_size)

    out, k = [], 0
    for example, queries in zip(examples, per_example, strict=True):
        outputs = scored[k : k + len(queries)]
        k += len(queries)
        if example.text:
            rows = outputs[0]
            out.append(ExampleScore((sum(row[0] for row in rows),), (len(rows),), (len(example.text),), None, False))
            continue
        if len(queries) == 1 and len(queries[0].positions) == 1:
            option_logprobs = list(outputs[0][0])
            option_lengths = [1] * len(option_logprobs)
        else:
            option_logprobs = [sum(row[0] for row in output) for output in outputs]
            option_lengths = [len(output) for output in outputs]
        options = _continuations(example)
        gold = options.index(example.completion) if example.completion else None
        out.append(
            ExampleScore(
                tuple(option_logprobs),
                tuple(option_lengths),
                tuple(len(o) for o in options),
                gold,
                bool(example.choices),
            )
        )
    return out


def score_examples(
    model: PreTrainedModel | PeftModel | ProxyTuned,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 256,
    progress: ProgressCallback | None = None,
) -> list[ExampleScore]:
    """Per-example log-likelihoods: of each text token, or of each continuation (the choices, or the completion)."""
    return _drive(_score_steps(model, tokenizer, examples, batch_size, max_length), progress)


def evaluation_steps(
    model: PreTrainedModel | PeftModel | ProxyTuned,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 256,
) -> Iterator[Progress | EvaluationReport]:
    """`evaluate` one batch per step: Progress after each batch, then the report (a scheduler runs it in turns)."""
    started = time.perf_counter()
    with PeakRss() as rss:
        scores = yield from _score_steps(model, tokenizer, examples, batch_size, max_length)
    yield _report(scores, len(examples), time.perf_counter() - started, rss.peak)


def evaluate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 256,
    progress: ProgressCallback | None = None,
) -> EvaluationReport:
    """Loss and perplexity over completions / texts; accuracy (and acc_norm) over examples with choices."""
    started = time.perf_counter()
    with PeakRss() as rss:
        scores = score_examples(model, tokenizer, examples, batch_size, max_length, progress)
    return _report(scores, len(examples), time.perf_counter() - started, rss.peak)


def _report(scores: list[ExampleScore], examples: int, seconds: float, peak_rss_bytes: int) -> EvaluationReport:
    nll, tokens, correct_norm = 0.0, 0, 0
    outcomes: list[bool] = []
    for score in scores:
        target = 0 if score.gold is None and not score.has_choices else score.gold
        if target is None:
            continue
        nll -= score.logprobs[target]
        tokens += score.tokens[target]
        if score.has_choices:
            outcomes.append(score.correct)
            correct_norm += int(score.correct_norm)
    loss = nll / tokens if tokens else float("nan")
    return EvaluationReport(
        examples=examples,
        tokens=tokens,
        loss=loss,
        perplexity=math.exp(loss) if tokens and loss < 700 else float("nan"),
        accuracy=sum(outcomes) / len(outcomes) if outcomes else float("nan"),
        scored_choices=len(outcomes),
        seconds=seconds,
        accuracy_norm=correct_norm / len(outcomes) if outcomes else float("nan"),
        peak_rss_bytes=peak_rss_bytes,
        correct=outcomes,
    )
