"""The owner's report card for an emulator: how big it is and how much worse than the full model it predicts text.

Two held-out texts: the tail of the builder's public text (WikiText-2 valid unless `data=` says otherwise), and the
last windows of the held-out Project Gutenberg novel, which no builder trains or calibrates on and whose first
windows alone choose the distillation checkpoint. The perplexity ratio (emulator / full) on the first is the privacy
side of the bargain: near 1, the emulator is the model. An emulator that ships a bridge (`bridge=1`) also carries
the bridge's figures (owner/emulator/bridge.py): how much closer it brings the emulator's final states to the full
model's, and how well the owner's head then predicts from them, which the release gate weighs too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .public_text import GUTENBERG_HELDOUT_TEXT, read_public_text, token_chunks, window_perplexity

if TYPE_CHECKING:  # bridge.py measures on this module's windows, so it imports this one
    from .bridge import BridgeCard

REPORT_SEQ_LEN = 128
REPORT_WINDOWS = 32
# Only the tail of the public text is read: the held-out end that distillation never trains on.
REPORT_TAIL_CHARS = 200_000


class ReleaseRefused(ValueError):
    """An emulator too close to the full model to be given away."""


@dataclass(frozen=True)
class ReportCard:
    parameters: int
    perplexity: float  # the emulator's, on the held-out public text
    full_perplexity: float
    perplexity_ratio: float
    windows: int
    text_sha256: str
    gutenberg_perplexity: float  # the emulator's, on the last windows of the held-out novel
    full_gutenberg_perplexity: float
    gutenberg_sha256: str
    bridge: BridgeCard | None = None  # only for a bundle that ships a bridge

    def as_dict(self) -> dict[str, Any]:
        card = asdict(self)
        if self.bridge is None:
            del card["bridge"]  # a bundle without a bridge keeps the card it always had
        return card


def heldout_windows(tokenizer: PreTrainedTokenizerBase, path: Path | None) -> tuple[torch.Tensor, str]:
    """The last REPORT_WINDOWS windows of the text at `path` (default WikiText-2 valid), and its sha256."""
    text, sha256 = read_public_text(path)
    windows = token_chunks(tokenizer, text[-REPORT_TAIL_CHARS:], REPORT_SEQ_LEN)
    return windows[-REPORT_WINDOWS:], sha256


def measure(
    full: PreTrainedModel, emulator: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path | None = None
) -> ReportCard:
    windows, sha256 = heldout_windows(tokenizer, path)
    emulator_ppl = window_perplexity(emulator, windows)
    full_ppl = window_perplexity(full, windows)
    novel, novel_sha256 = heldout_windows(tokenizer, GUTENBERG_HELDOUT_TEXT)
    return ReportCard(
        parameters=sum(p.numel() for p in emulator.parameters()),
        perplexity=round(emulator_ppl, 4),
        full_perplexity=round(full_ppl, 4),
        perplexity_ratio=round(emulator_ppl / full_ppl, 4),
        windows=len(windows),
        text_sha256=sha256,
        gutenberg_perplexity=round(window_perplexity(emulator, novel), 4),
        full_gutenberg_perplexity=round(window_perplexity(full, novel), 4),
        gutenberg_sha256=novel_sha256,
    )


def check_release(emulator_id: str, card: dict[str, Any], margin: float | None) -> None:
    """Refuses an emulator whose perplexity, or its bridge's through the owner's head, is within `margin` (relative)
    of the full model's."""
    if margin is None:
        return
    if card["perplexity"] < card["full_perplexity"] * (1.0 + margin):
        raise ReleaseRefused(
            f"emulator {emulator_id} is too close to the full model to release: perplexity {card['perplexity']:.2f} "
            f"vs full {card['full_perplexity']:.2f} (ratio {card['perplexity_ratio']:.3f}, "
            f"the release margin needs at least {1.0 + margin:.3f})"
        )
    bridge = card.get("bridge")
    if bridge is not None and bridge["perplexity_bridged"] < bridge["perplexity_full"] * (1.0 + margin):
        raise ReleaseRefused(
            f"emulator {emulator_id}'s bridge brings it too close to the full model to release: the head on its "
            f"bridged states has perplexity {bridge['perplexity_bridged']:.2f} vs full {bridge['perplexity_full']:.2f} "
            f"(the release margin needs at least {1.0 + margin:.3f} times the full model's); build it without bridge=1"
        )
