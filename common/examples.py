"""The JSONL data format: {"prompt", "completion"[, "choices"]} or {"text"}, and its tokenization."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from .contract import MAX_EXAMPLE_CHARS

IGNORE = -100  # label of positions that carry no loss


class DataError(ValueError):
    """A data file or example that does not follow the JSONL format; the message names the line."""


@dataclass(frozen=True)
class Example:
    prompt: str = ""
    completion: str = ""
    choices: tuple[str, ...] = field(default_factory=tuple)
    text: str = ""

    def validate(self, where: str) -> None:
        if self.text and (self.prompt or self.completion or self.choices):
            raise DataError(f"{where}: give either text or prompt/completion, not both")
        if not self.text and not self.completion and not self.choices:
            raise DataError(f'{where}: needs "text", or "prompt" with "completion" or "choices"')
        if self.choices and self.completion and self.completion not in self.choices:
            raise DataError(f"{where}: completion {self.completion!r} is not one of its choices")
        if any(not choice for choice in self.choices):
            raise DataError(f"{where}: empty choice")
        size = len(self.prompt) + len(self.completion) + len(self.text) + sum(map(len, self.choices))
        if size > MAX_EXAMPLE_CHARS:
            raise DataError(f"{where}: {size} characters, more than the limit of {MAX_EXAMPLE_CHARS}")


def example_from_mapping(record: object, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    unknown = set(record) - {"prompt", "completion", "choices", "text"}
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for name in ("prompt", "completion", "text"):
        if not isinstance(record.get(name, ""), str):
            raise DataError(f'{where}: "{name}" must be a string')
    choices = record.get("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f'{where}: "choices" must be a list of strings')
    example = Example(record.get("prompt", ""), record.get("completion", ""), tuple(choices), record.get("text", ""))
    example.validate(where)
    return example


def read_jsonl(path: Path, limit: int | None = None) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not JSON ({error.msg})") from None
            examples.append(example_from_mapping(record, f"{path}:{number}"))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def encode(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def leading_special_count(tokenizer: PreTrainedTokenizerBase) -> int:
    """How many tokens (BOS, usually) the tokenizer puts before any text; 0 for tokenizers that add none."""
    return len(encode(tokenizer, "", special=True))


def keep_end(prompt_ids: list[int], room: int, lead: int) -> list[int]:
    """The last tokens of a prompt that fit in `room`, its first `lead` tokens (BOS) always kept.

    Long prompts lose their middle, not their start: a model never saw text without its BOS.
    """
    if len(prompt_ids) <= room:
        return prompt_ids
    lead = min(lead, room, len(prompt_ids))
    tail = room - lead
    return prompt_ids[:lead] + (prompt_ids[len(prompt_ids) - tail :] if tail else [])


def end_of_sequence(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize_for_training(
    tokenizer: PreTrainedTokenizerBase, examples: Iterable[Example], max_length: int, append_eos: bool = True
) -> list[TokenizedExample]:
    """Loss on the completion (and the EOS after it) only, or on every token but the first (text).

    The EOS teaches the adapter where an answer ends, so generation with it stops instead of rambling.
    """
    out = []
    lead = leading_special_count(tokenizer)
    eos = end_of_sequence(tokenizer) if append_eos else []
    for example in examples:
        if example.text:
            ids = encode(tokenizer, example.text, special=True)[:max_length]
            out.append(TokenizedExample(ids, [IGNORE] + ids[1:]))
            continue
        if not example.completion:
            raise DataError('training needs a "completion" (or "text") in every example')
        completion_ids = (encode(tokenizer, example.completion, special=False) + eos)[: max_length - 1 - lead]
        # Keep the end of a long prompt (the tokens nearest the completion matter most) and its BOS.
        prompt_ids = keep_end(encode(tokenizer, example.prompt, special=True), max_length - len(completion_ids), lead)
        out.append(TokenizedExample(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids))
    return out
