"""Readers for the real data sets in ../shared/datasets, as offsite JSONL examples (bench and tests only)."""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SST2_PROMPT = "Review: {sentence}\nSentiment:"
SST2_CHOICES = (" negative", " positive")


def sst2(split: str, limit: int | None = None, seed: int = 0, min_words: int = 0) -> list[dict]:
    """SST-2 as {prompt, completion, choices}; `train` is shuffled with `seed`, `dev` keeps its order."""
    with (SHARED / "sst2" / f"{split}.tsv").open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    records = [
        {
            "prompt": SST2_PROMPT.format(sentence=text.strip()),
            "completion": SST2_CHOICES[int(label)],
            "choices": list(SST2_CHOICES),
        }
        for label, text in rows
        if len(text.split()) >= min_words
    ]
    if split == "train":
        random.Random(seed).shuffle(records)
    return records[:limit] if limit else records


TRANSLATION_PROMPT = "Translate English to German.\nEnglish: {en}\nGerman:"
E2E_PROMPT = "Describe the restaurant in one sentence.\nFacts: {mr}\nDescription:"


def multi30k(split: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(English, German) pairs of `train`, `val` or `test_2016_flickr`, in file order."""
    folder = SHARED / "multi30k"
    with (
        gzip.open(folder / f"{split}.en.gz", "rt", encoding="utf-8") as en,
        gzip.open(folder / f"{split}.de.gz", "rt", encoding="utf-8") as de,
    ):
        pairs = [(a.strip(), b.strip()) for a, b in zip(en, de, strict=True)]
    return pairs[:limit] if limit else pairs


def e2e(split: str, limit: int | None = None) -> list[tuple[str, list[str]]]:
    """(meaning representation, references) of `devset` or `testset_w_refs`, grouped by input in file order."""
    grouped: dict[str, list[str]] = {}
    with (SHARED / "e2e_nlg" / f"{split}.csv").open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            grouped.setdefault(row["mr"], []).append(row["ref"])
    items = list(grouped.items())
    return items[:limit] if limit else items


def write_jsonl(records: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write SST-2 JSONL files from ../shared/datasets.")
    parser.add_argument("--split", choices=["train", "dev"], required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--min-words", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    write_jsonl(sst2(args.split, args.limit, min_words=args.min_words), Path(args.out))


if __name__ == "__main__":
    main()
