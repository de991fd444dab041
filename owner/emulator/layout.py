"""Emulator layouts `l-N-r`: the bottom l and top r blocks are the adapter, N blocks stand in for the middle."""

from __future__ import annotations

import re
from dataclasses import dataclass


class LayoutError(ValueError):
    """A layout or emulator spec that does not fit the model."""


@dataclass(frozen=True)
class Layout:
    bottom: int
    middle: int
    top: int

    @classmethod
    def parse(cls, text: str) -> Layout:
        match = re.fullmatch(r"(\d+)-(\d+)-(\d+)", text.strip())
        if not match:
            raise LayoutError(f"layout {text!r} is not of the form L-N-R, e.g. 2-8-2")
        return cls(*(int(g) for g in match.groups()))

    def __str__(self) -> str:
        return f"{self.bottom}-{self.middle}-{self.top}"

    def check(self, depth: int) -> None:
        if self.bottom + self.top == 0:
            raise LayoutError(f"layout {self} has no adapter blocks")
        middle_blocks = depth - self.bottom - self.top
        if middle_blocks < 1:
            raise LayoutError(f"layout {self} leaves no middle blocks in a model of depth {depth}")
        if not 1 <= self.middle <= middle_blocks:
            raise LayoutError(
                f"layout {self}: N must be between 1 and the {middle_blocks} middle blocks of a depth-{depth} model"
            )

    def adapter_blocks(self, depth: int) -> list[int]:
        """Full-model indices of the trainable adapter blocks."""
        return list(range(self.bottom)) + list(range(depth - self.top, depth))

    def compose(self, depth: int, middle: list[int]) -> list[int]:
        """The block map: emulator block i is full-model block map[i]."""
        return list(range(self.bottom)) + middle + list(range(depth - self.top, depth))
