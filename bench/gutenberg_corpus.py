"""Regenerates the owner's shipped distillation corpus, owner/data/gutenberg_{train,heldout}.txt, from the shared data.

Each novel of ../shared/datasets/gutenberg/ loses Project Gutenberg's header and licence (`strip_gutenberg`), its
hard-wrapped lines are joined into one line per paragraph, and one contiguous excerpt is kept: EXCERPT_CHARS from a
quarter of the way in, which skips title pages and tables of contents. Frankenstein is held out for perplexity; the
other ten novels are the training text. The output is deterministic, so re-running it reproduces the committed files.

    .venv/bin/python bench/gutenberg_corpus.py
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from offsite.owner.emulator.public_text import GUTENBERG_HELDOUT_TEXT, GUTENBERG_TEXT, strip_gutenberg

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "gutenberg"
HELDOUT_BOOK = "84-0.txt"  # Frankenstein
TRAIN_BOOKS = (
    "11-0.txt",  # Alice's Adventures in Wonderland
    "1342-0.txt",  # Pride and Prejudice
    "1400-0.txt",  # Great Expectations
    "158-0.txt",  # Emma
    "1661.txt",  # The Adventures of Sherlock Holmes
    "2701-0.txt",  # Moby Dick
    "345.txt",  # Dracula
    "74-0.txt",  # The Adventures of Tom Sawyer
    "76-0.txt",  # Adventures of Huckleberry Finn
    "98-0.txt",  # A Tale of Two Cities
)
EXCERPT_CHARS = 240_000  # 11 excerpts stay under 3 MB in the package
EXCERPT_START = 0.25


def reflow(text: str) -> str:
    """One line per paragraph: Gutenberg wraps lines at about 70 characters, which no other text does."""
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip())


def excerpt(text: str) -> str:
    """EXCERPT_CHARS of whole paragraphs, from the first paragraph that starts after EXCERPT_START of the text."""
    if len(text) <= EXCERPT_CHARS:
        return text
    begin = text.find("\n\n", min(int(len(text) * EXCERPT_START), len(text) - EXCERPT_CHARS)) + 2
    cut = text[begin : begin + EXCERPT_CHARS]
    return cut[: cut.rfind("\n\n")] if "\n\n" in cut else cut


def book(name: str) -> str:
    return excerpt(reflow(strip_gutenberg((SOURCE / name).read_text(encoding="utf-8"))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    GUTENBERG_TEXT.write_text("\n\n".join(book(name) for name in TRAIN_BOOKS) + "\n", encoding="utf-8")
    GUTENBERG_HELDOUT_TEXT.write_text(book(HELDOUT_BOOK) + "\n", encoding="utf-8")
    for path in (GUTENBERG_TEXT, GUTENBERG_HELDOUT_TEXT):
        print(f"{path}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
