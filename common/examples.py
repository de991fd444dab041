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


def tokenize_for_training(
    tokenizer: PreTrainedTokenizerBase, examples: Iterable[Example], max_length: int
) -> list[TokenizedExample]:
    """Loss on the completion only (prompt/completion) or on every token but the first (text)."""
    out = []
    for example in examples:
        if example.text:
            ids = encode(tokenizer, example.text, special=True)[:max_length]
            out.append(TokenizedExample(ids, [IGNORE] + ids[1:]))
            continue
        if not example.completion:
            raise DataError('training needs a "completion" (or "text") in every example')
        completion = example.completion
        prompt_ids = encode(tokenizer, example.prompt, special=True)
        completion_ids = encode(tokenizer, completion, special=False)[: max_length - 1]
        # Keep the end of a long prompt: the tokens nearest the completion matter most.
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(completion_ids) - max_length) :]
        out.append(TokenizedExample(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids))
    return out
