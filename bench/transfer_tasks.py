"""The transfer suite's tasks: readers for the labelled sets in ../shared/datasets, fixed splits, prompt formats.

Every task yields `Item`s (a query, an answer cue, the choices and the gold index). A set with one labelled split is
shuffled once with `SPLIT_SEED` and cut into test / held-out / train; a set with its own train and test splits
keeps them, and its held-out rows come from the end of the shuffled train split. Held-out rows are never trained on
and never tested on: hyperparameters and the prompt format are chosen on them.

Two prompt formats, chosen per task on held-out rows:
- `plain`: "{query}\\n{cue}" followed by " {choice}";
- `chat`: the tokenizer's chat template with "{query}\\n{cue}" as the user turn and "{choice}" as the reply.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from offsite.common.examples import Example

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SPLIT_SEED = 1234
HELDOUT_ROWS = 200
SINGLE_SPLIT_TEST_ROWS = 500  # test rows cut from a set that has only one labelled split
FORMATS = ("plain", "chat")


@dataclass(frozen=True)
class Item:
    query: str
    cue: str  # the words that ask for the answer, e.g. "Sentiment:"
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class TaskData:
    name: str
    train: list[Item]  # shuffled; a run takes its first rows
    heldout: list[Item]
    test: list[Item]
    split: str  # how the rows were split, recorded with the results
    multi_token: bool  # choices of several tokens: acc_norm is the headline metric, as lm-eval reports it

    @property
    def metric(self) -> str:
        return "acc_norm" if self.multi_token else "acc"

    def digest(self) -> str:
        """Identifies the exact rows, so cached results are reused only for the same split."""
        text = json.dumps([[i.query, i.choices, i.gold] for i in self.train + self.heldout + self.test])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shuffled(items: list[Item]) -> list[Item]:
    items = list(items)
    random.Random(SPLIT_SEED).shuffle(items)
    return items


def _from_one_split(name: str, items: list[Item], source: str, multi_token: bool) -> TaskData:
    rows = _shuffled(items)
    test, heldout = rows[:SINGLE_SPLIT_TEST_ROWS], rows[SINGLE_SPLIT_TEST_ROWS : SINGLE_SPLIT_TEST_ROWS + HELDOUT_ROWS]
    train = rows[SINGLE_SPLIT_TEST_ROWS + HELDOUT_ROWS :]
    split = (
        f"{source}: one labelled split of {len(rows)} rows, shuffled with seed {SPLIT_SEED}; "
        f"test = first {len(test)}, held-out = next {len(heldout)}, train = the other {len(train)}"
    )
    return TaskData(name, train, heldout, test, split, multi_token)


def _normalised(query: str) -> str:
    return " ".join(query.lower().split())


def _from_two_splits(name: str, train: list[Item], test: list[Item], source: str, multi_token: bool) -> TaskData:
    # Official splits can repeat a test question in train (TREC: 11 of its 500): such rows are never trained on.
    in_test = {_normalised(item.query) for item in test}
    rows = [item for item in _shuffled(train) if _normalised(item.query) not in in_test]
    dropped = len(train) - len(rows)
    heldout, train = rows[-HELDOUT_ROWS:], rows[:-HELDOUT_ROWS]
    split = (
        f"{source}: train shuffled with seed {SPLIT_SEED}, less {dropped} rows whose text is also a test row, "
        f"its last {len(heldout)} rows held out ({len(train)} left to train on); test = the official {len(test)} rows"
    )
    return TaskData(name, train, heldout, test, split, multi_token)


def _tsv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8-sig") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def sst2() -> TaskData:
    def items(split: str) -> list[Item]:
        choices = ("negative", "positive")
        rows = _tsv(SHARED / "sst2" / f"{split}.tsv")[1:]
        return [Item(f"Review: {text.strip()}", "Sentiment:", choices, int(label)) for label, text in rows]

    return _from_two_splits("sst2", items("train"), items("dev"), "SST-2 train.tsv / dev.tsv", False)


def ag_news() -> TaskData:
    choices = ("World", "Sports", "Business", "Science")
    with (SHARED / "ag_news" / "test.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    items = [
        Item(f"Title: {title.strip()}\nArticle: {body.replace(chr(92), ' ').strip()}", "Topic:", choices, int(c) - 1)
        for c, title, body in rows
    ]
    return _from_one_split("ag_news", items, "AG News test.csv (train.csv is not in ../shared)", False)


TREC_CLASSES = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
}


def trec() -> TaskData:
    choices = tuple(TREC_CLASSES.values())
    order = list(TREC_CLASSES)

    def items(name: str) -> list[Item]:
        out = []
        for line in (SHARED / "trec" / name).read_bytes().decode("latin-1").splitlines():
            label, _, question = line.partition(" ")
            out.append(Item(f"Question: {question.strip()}", "Answer type:", choices, order.index(label.split(":")[0])))
        return out

    return _from_two_splits("trec", items("train_5500.label"), items("TREC_10.label"), "TREC coarse labels", False)


def _llmfoundry(name: str, file: str, multi_token: bool, cue: str = "Answer:") -> TaskData:
    rows = _jsonl(SHARED / "mc_llmfoundry" / file)
    items = [Item(r["query"].strip(), cue, tuple(c.strip() for c in r["choices"]), int(r["gold"])) for r in rows]
    return _from_one_split(name, items, f"llm-foundry {file}", multi_token)


def arc_easy() -> TaskData:
    return _llmfoundry("arc_easy", "arc_easy.jsonl", True)


def arc_challenge() -> TaskData:
    return _llmfoundry("arc_challenge", "arc_challenge.jsonl", True)


def boolq() -> TaskData:
    return _llmfoundry("boolq", "boolq.jsonl", False)


def openbookqa() -> TaskData:
    def items(split: str) -> list[Item]:
        out = []
        for row in _jsonl(SHARED / "openbookqa" / f"{split}.jsonl"):
            labels = [c["label"] for c in row["question"]["choices"]]
            texts = tuple(c["text"].strip() for c in row["question"]["choices"])
            out.append(
                Item(f"Question: {row['question']['stem'].strip()}", "Answer:", texts, labels.index(row["answerKey"]))
            )
        return out

    return _from_two_splits("openbookqa", items("train"), items("test"), "OpenBookQA train / test", True)


def mrpc() -> TaskData:
    folder = SHARED / "glue_mrpc"
    dev_ids = {tuple(row) for row in _tsv(folder / "dev_ids.tsv")}
    question = "Question: Do both sentences mean the same thing?"

    def items(name: str, drop: set[tuple[str, ...]]) -> list[Item]:
        rows = _tsv(folder / name)[1:]
        return [
            Item(f"Sentence 1: {a}\nSentence 2: {b}\n{question}", "Answer:", ("no", "yes"), int(label))
            for label, id1, id2, a, b in rows
            if (id1, id2) not in drop
        ]

    train = items("msr_paraphrase_train.txt", dev_ids)
    test = items("msr_paraphrase_test.txt", set())
    return _from_two_splits("mrpc", train, test, "MRPC: GLUE train (MSR train minus dev ids) / MSR test", False)


def rte() -> TaskData:
    def items(split: str) -> list[Item]:
        rows = _tsv(SHARED / "glue_rte" / f"{split}.tsv")[1:]
        question = "Question: Does the first sentence imply the second?"
        return [
            Item(f"Sentence 1: {a}\nSentence 2: {b}\n{question}", "Answer:", ("yes", "no"), int(label != "entailment"))
            for _, a, b, label in rows
        ]

    return _from_two_splits("rte", items("train"), items("dev"), "RTE train / dev (GLUE test has no labels)", False)


def hellaswag() -> TaskData:
    lines = bz2.open(SHARED / "hellaswag_val_llamacpp" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8")
    rows = [line.rstrip("\n") for line in lines]
    items = [
        Item(rows[i].strip(), "", tuple(e.strip() for e in rows[i + 2 : i + 6]), int(rows[i + 1]))
        for i in range(0, len(rows) - 5, 6)
    ]
    return _from_one_split("hellaswag", items, "HellaSwag validation (llama.cpp text format)", True)


def sst2_sample() -> TaskData:
    """The SST-2 rows shipped in client/data: needs nothing from ../shared, so the smoke run works anywhere."""
    folder = Path(__file__).resolve().parents[1] / "client" / "data"

    def items(name: str) -> list[Item]:
        out = []
        for row in _jsonl(folder / name):
            query, _, cue = row["prompt"].rpartition("\n")
            choices = tuple(c.strip() for c in row["choices"])
            out.append(Item(query, cue, choices, row["choices"].index(row["completion"])))
        return out

    return _from_two_splits(
        "sst2_sample", items("sst2_train.jsonl"), items("sst2_dev.jsonl"), "client/data SST-2 sample", False
    )


TASKS: dict[str, Callable[[], TaskData]] = {
    "sst2": sst2,
    "ag_news": ag_news,
    "trec": trec,
    "arc_easy": arc_easy,
    "openbookqa": openbookqa,
    "mrpc": mrpc,
    "boolq": boolq,
    "rte": rte,
    "arc_challenge": arc_challenge,
    "hellaswag": hellaswag,
    "sst2_sample": sst2_sample,
}
DEFAULT_TASKS = ("sst2", "ag_news", "trec", "arc_easy", "openbookqa", "mrpc")


def to_example(item: Item, prompt_format: str, chat_template: Callable[[str], str] | None) -> Example:
    """One item as an offsite JSONL example in the chosen format; the gold choice is the completion."""
    question = f"{item.query}\n{item.cue}" if item.cue else item.query
    if prompt_format == "chat":
        if chat_template is None:
            raise ValueError("the chat format needs a tokenizer with a chat template")
        choices = item.choices
        prompt = chat_template(question)
    elif prompt_format == "plain":
        choices = tuple(f" {c}" for c in item.choices)
        prompt = question
    else:
        raise ValueError(f"unknown prompt format {prompt_format!r}; choose one of {', '.join(FORMATS)}")
    return Example(prompt=prompt, completion=choices[item.gold], choices=choices)
