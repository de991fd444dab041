"""The owner's public text: what distillation and calibration run on, never the data owner's data."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# WikiText-2 validation split (CC BY-SA 3.0), shipped so that building needs no network; see data/README.md.
DEFAULT_PUBLIC_TEXT = Path(__file__).resolve().parent.parent / "data" / "wikitext2_valid.txt"
MIN_CHUNKS = 2


class PublicTextError(ValueError):
    """Public text that is missing or too short to train or calibrate on."""


@dataclass(frozen=True)
class TextChunks:
    """Fixed-length token windows of one text, split into a training part and a held-out tail."""

    train: torch.Tensor  # [n, seq_len] int64
    heldout: torch.Tensor
    sha256: str


def read_public_text(path: Path | None) -> tuple[str, str]:
    """Returns the text and its sha256; the default is the shipped WikiText-2 sample."""
    source = path or DEFAULT_PUBLIC_TEXT
    try:
        raw = source.read_bytes()
    except OSError as error:
        raise PublicTextError(f"cannot read public text {source}: {error.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PublicTextError(f"public text {source} is not UTF-8 (byte {error.start})") from None
    return text, hashlib.sha256(raw).hexdigest()


def token_chunks(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, max_chunks: int | None = None
) -> torch.Tensor:
    """Cuts the tokenized text into non-overlapping windows of `seq_len` tokens (the ragged tail is dropped)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    count = len(ids) // seq_len
    if max_chunks is not None:
        count = min(count, max_chunks)
    if count < MIN_CHUNKS:
        raise PublicTextError(
            f"public text has {len(ids)} tokens; at least {MIN_CHUNKS * seq_len} are needed for windows of {seq_len}"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def load_chunks(
    tokenizer: PreTrainedTokenizerBase,
    path: Path | None,
    seq_len: int,
    heldout_fraction: float,
    max_chunks: int | None = None,
) -> TextChunks:
    """Windows of the public text; the last `heldout_fraction` of them (at least one, unless 0) is held out."""
    text, sha256 = read_public_text(path)
    chunks = token_chunks(tokenizer, text, seq_len, max_chunks)
    heldout = max(1, round(len(chunks) * heldout_fraction)) if heldout_fraction > 0 else 0
    cut = len(chunks) - heldout
    return TextChunks(train=chunks[:cut], heldout=chunks[cut:], sha256=sha256)


@torch.no_grad()
def window_perplexity(model: PreTrainedModel, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """exp of the mean next-token loss over the windows (every window has the same length)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start : start + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    model.train(was_training)
    return math.exp(total / len(chunks))
