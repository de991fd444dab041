"""What every emulator builder receives and returns; one module per method implements it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .layout import Layout, LayoutError


@dataclass(frozen=True)
class BuildRequest:
    full: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: Layout
    options: Mapping[str, Any]  # already parsed by the builder's OPTIONS
    work_dir: Path  # survives a restart, so long builds can resume
    show_progress: bool = True


@dataclass
class Built:
    model: PreTrainedModel
    block_map: list[int]  # emulator block i was made from full-model block block_map[i]
    params: dict[str, Any] = field(default_factory=dict)  # method facts recorded in the manifest
    adapters: list[int] | None = None  # full-model indices of the adapter blocks; None: the layout's ends


class Builder(Protocol):
    OPTIONS: Mapping[str, Callable[[str], Any]]

    def build(self, request: BuildRequest) -> Built: ...


def parse_options(method: str, allowed: Mapping[str, Callable[[str], Any]], raw: Mapping[str, str]) -> dict[str, Any]:
    """Converts `key=value` options with the builder's own parsers; unknown keys and bad values say so."""
    parsed: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise LayoutError(f"emulator method {method!r} has no option {key!r}; its options: {known}")
        try:
            parsed[key] = allowed[key](value)
        except ValueError as error:
            raise LayoutError(f"emulator option {key}={value!r}: {error}") from None
    return parsed


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")
