"""The transfer recipe's pieces (answer-only loss, BOS kept, acc_norm), its statistics, and the smoke benchmark."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_model, tokenizer
from transformers import AutoModelForCausalLM

from offsite.common import confidence
from offsite.common.examples import IGNORE, Example, keep_end, tokenize_for_training
from offsite.common.proxy_tuning import ProxyTuned
from offsite.common.scoring import ExampleScore, evaluate, score_examples

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import transfer  # noqa: E402


class BosTokenizer:
    """Wraps the tiny tokenizer so that it puts a BOS before every text, as Llama-2's does."""

    def __init__(self) -> None:
        self.inner = tokenizer()
        self.eos_token_id = self.inner.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([self.inner.bos_token_id] if add_special_tokens else []) + list(ids)}


def test_loss_only_on_the_answer_and_its_eos() -> None:
    tok = tokenizer()
    example = Example(prompt="Review: a waste of time\nSentiment:", completion=" negative")
    [tokenized] = tokenize_for_training(tok, [example], max_length=64)
    answer = tok(" negative", add_special_tokens=False)["input_ids"]
    labelled = [label for label in tokenized.labels if label != IGNORE]
    assert labelled == answer + [tok.eos_token_id]
    prompt_length = len(tokenized.input_ids) - len(labelled)
    assert tokenized.labels[:prompt_length] == [IGNORE] * prompt_length
    assert tokenized.input_ids[prompt_length:] == labelled


def test_bos_survives_left_truncation_in_training_and_scoring() -> None:
    tok = BosTokenizer()
    long_prompt = "the movie was great and the actors were wonderful " * 20
    example = Example(prompt=long_prompt, completion=" positive", choices=(" negative", " positive"))
    [tokenized] = tokenize_for_training(tok, [example], max_length=24)
    assert len(tokenized.input_ids) == 24
    assert tokenized.input_ids[0] == tok.inner.bos_token_id
    # the end of the prompt, nearest the answer, is what is kept after the BOS
    full = tok(long_prompt)["input_ids"]
    answer_and_eos = tok(" positive", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tokenized.input_ids[1 : 24 - len(answer_and_eos)] == full[len(full) - (23 - len(answer_and_eos)) :]


def test_keep_end_keeps_the_lead_and_the_tail() -> None:
    assert keep_end([1, 5, 6, 7, 8], room=3, lead=1) == [1, 7, 8]
    assert keep_end([5, 6, 7, 8], room=2, lead=0) == [7, 8]
    assert keep_end([1, 5], room=5, lead=1) == [1, 5]


def test_acc_norm_divides_by_the_choice_length() -> None:
    # the long choice has the higher total but the lower per-character log-likelihood
    score = ExampleScore(logprobs=(-4.0, -6.0), tokens=(2, 6), chars=(4, 30), gold=1, has_choices=True)
    assert score.predicted == 0 and not score.correct
    assert score.predicted_norm == 1 and score.correct_norm


def test_evaluate_reports_acc_norm(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", tmp_path / "m"))
    examples = [
        Example(prompt="Review: a dull film\nSentiment:", completion=" negative", choices=(" negative", " great fun")),
        Example(prompt="Review: a delight\nSentiment:", completion=" great fun", choices=(" negative", " great fun")),
    ]
    report = evaluate(model, tokenizer(), examples)
    assert report.scored_choices == 2
    assert 0.0 <= report.accuracy_norm <= 1.0 and 0.0 <= report.accuracy <= 1.0


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_examples() -> None:
    rng = np.random.default_rng(3)
    small = (rng.random((3, 100)) < 0.7).astype(int)
    large = (rng.random((3, 2000)) < 0.7).astype(int)
    a, b = confidence.estimate(small), confidence.estimate(large)
    assert a.ci_low <= a.mean <= a.ci_high
    assert (b.ci_high - b.ci_low) < (a.ci_high - a.ci_low) / 2


def test_paired_comparison_finds_a_real_difference_and_not_a_null_one() -> None:
    rng = np.random.default_rng(4)
    base = (rng.random((1, 500)) < 0.6).astype(int)
    better = base.copy()
    better[0, np.flatnonzero(base[0] == 0)[:60]] = 1  # 60 of 500 examples flip to correct
    assert confidence.compare(better, base).p_value < 0.01
    assert confidence.compare(better, base).difference.ci_low > 0
    same = confidence.compare(base, base)
    assert same.difference.mean == 0 and same.p_value == 1.0


def test_smoke_run_fills_every_row_and_reports_cis() -> None:
    report = transfer.main(["--smoke"])
    rows = {(r["emulator"], r["row"]) for r in report["runs"]}
    for row in transfer.ROWS:
        assert ("uniform:1-2-1", row) in rows
    assert ("uniform:1-1-1", "plug_in") in rows
    for record in report["runs"]:
        assert 0.0 <= record["ci_low"] <= record["mean"] <= record["ci_high"] <= 1.0
        assert record["n"] == 16
    plug_in = next(r for r in report["runs"] if r["emulator"] == "uniform:1-2-1" and r["row"] == "plug_in")
    assert plug_in["seeds"] == [0, 1]
    assert report["suite"]["tasks"] == ["sst2_sample"]
    assert {t["target"] for t in report["targets"]} >= {"plug-in ≥ zero-shot on every task"}
    assert Path(report["out"]).with_suffix(".png").is_file()
    uniform = report["per_emulator"]["uniform:1-2-1"]
    assert uniform["report_card"]["gutenberg_perplexity"] > 0  # the frontier's privacy axis
    assert uniform["plug_in_minus_zero_shot"]["ci_low"] <= uniform["plug_in_minus_zero_shot"]["mean"]
    assert Path(report["out"] + "_frontier.png").is_file()


@pytest.mark.parametrize("prompt_format", ["plain", "chat"])
def test_prompt_formats(prompt_format: str) -> None:
    from transfer_tasks import Item, to_example

    item = Item("Review: fine", "Sentiment:", ("negative", "positive"), 1)
    example = to_example(item, prompt_format, lambda q: f"<user>{q}</user><assistant>")
    assert example.completion in example.choices
    assert example.prompt.endswith("Sentiment:" if prompt_format == "plain" else "<assistant>")
    assert example.completion == (" positive" if prompt_format == "plain" else "positive")


def test_training_defaults_are_the_recipe_the_benchmark_chose() -> None:
    chosen = transfer.load_recipe()
    assert transfer.RECIPE_FILE.is_file(), "run: python bench/transfer.py --select"
    assert chosen == transfer.Recipe(), "set TrainConfig's defaults to bench/transfer_recipe.json's recipe"


def test_rows_of_the_same_adapters_are_resampled_together_by_seed() -> None:
    rng = np.random.default_rng(1)
    # three seeds that differ a lot; b is a with 40 of 400 examples turned wrong, seed by seed
    a = np.stack([(rng.random(400) < p).astype(float) for p in (0.5, 0.7, 0.9)])
    b = a.copy()
    b[:, np.flatnonzero(a.min(axis=0) == 1)[:40]] = 0
    paired = confidence.compare(a, b, same_seeds=True).difference
    independent = confidence.compare(a, b).difference
    assert paired.ci_high - paired.ci_low < 0.5 * (independent.ci_high - independent.ci_low)
    assert paired.ci_low > 0


def test_the_report_refuses_to_pool_cells_that_disagree(tmp_path: Path) -> None:
    cells = transfer.Cells(tmp_path)
    facts = {"task": "custom", "row": "zero_shot", "model": "m", "rows_digest": "d", "test_rows": 2, "format": "plain"}
    cells.put(facts, {"acc_bits": "10", "acc_norm_bits": "10", "acc": 0.5, "acc_norm": 0.5})
    cells.put({**facts, "format": "chat"}, {"acc_bits": "11", "acc_norm_bits": "11", "acc": 1.0, "acc_norm": 1.0})
    with pytest.raises(ValueError, match="disagree"):
        transfer.collect(cells, transfer.Recipe(), None)


def test_emulator_lists_keep_each_specs_own_options() -> None:
    specs = transfer.split_specs("uniform:2-8-2,distill:2-8-2,exit=30,tokens=98304,crash:2-8-2,share=true")
    assert specs == ["uniform:2-8-2", "distill:2-8-2,exit=30,tokens=98304", "crash:2-8-2,share=true"]


def test_an_emulator_is_compared_with_the_uniform_drop_of_its_own_layout(tmp_path: Path) -> None:
    cells = transfer.Cells(tmp_path)
    facts = {"task": "custom", "model": "m", "rows_digest": "d", "test_rows": 4, "format": "plain", "metric": "acc"}

    def put(row: str, bits: str, emulator: str | None = None) -> None:
        where = {"emulator": emulator} if emulator else {}
        cells.put({**facts, "row": row, **where}, {"acc_bits": bits, "acc_norm_bits": bits})

    put("zero_shot", "0000")
    for emulator, plug_in in (("uniform:2-8-2", "1000"), ("uniform:3-14-3", "1100"), ("distill:3-14-3", "1110")):
        put("plug_in", plug_in, emulator)
        put("emulator_adapter", "1000", emulator)
    report = transfer.build_report(cells, transfer.Recipe(), "uniform:2-8-2")
    versus = {v["emulator"]: v for v in report["versus_uniform"]}
    assert versus["distill:3-14-3"]["uniform"] == "uniform:3-14-3"
    assert versus["distill:3-14-3"]["mean"] == pytest.approx(0.25)


def test_proxy_tuning_steers_the_base_by_the_experts_difference(tmp_path: Path) -> None:
    models = [AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", tmp_path / str(s), seed=s)) for s in (0, 1)]
    base, expert = models
    examples = [
        Example(prompt=f"Review: film {i}\nSentiment:", completion=" positive", choices=(" negative", " positive"))
        for i in range(4)
    ]

    def scores(model: torch.nn.Module) -> list[float]:
        return [p for s in score_examples(model, tokenizer(), examples) for p in s.logprobs]

    # no difference between expert and anti-expert leaves the base; the base as anti-expert gives the expert
    assert scores(ProxyTuned(base, expert, expert)) == pytest.approx(scores(base), abs=1e-5)
    assert scores(ProxyTuned(base, expert, base)) == pytest.approx(scores(expert), abs=1e-5)
    assert scores(ProxyTuned(base, expert, base, alpha=0.5)) != pytest.approx(scores(expert), abs=1e-3)


def test_proxy_bench_scores_one_adapter_three_ways_with_paired_differences() -> None:
    import transfer_proxy

    [record] = transfer_proxy.main(["--smoke"])
    assert record["split"] == "heldout" and record["n"] > 0  # chosen on held-out rows, never the test split
    for row in transfer_proxy.ROWS:
        assert record[row]["ci_low"] <= record[row]["mean"] <= record[row]["ci_high"]
    for other in ("zero_shot", "emulator_adapter", "plug_in"):
        assert 0.0 <= record[f"proxy_minus_{other}"]["p_value"] <= 1.0

    [every] = transfer_proxy.main(["--smoke", "--train-blocks", "every"])  # an adapter that fits the emulator only
    assert every["train_blocks"] == "every" and "plug_in" not in every and "proxy_minus_plug_in" not in every
    assert every["n"] == record["n"] and 0.0 <= every["proxy_minus_emulator_adapter"]["p_value"] <= 1.0


def test_delivery_is_chosen_on_heldout_rows_and_measured_on_test_rows(tmp_path: Path) -> None:
    import transfer_delivery

    cells, recipe = transfer.Cells(tmp_path), transfer.asdict(transfer.Recipe())
    facts = {"model": "m", "rows_digest": "d", "test_rows": 4, "format": "plain", "metric": "acc"}
    emulator = "distill:3-14-3"

    def proxy(task: str, split: str, plug_in: str, delivered: str, seed: int = 0) -> None:
        where = {**facts, "task": task, "row": f"proxy_{split}", "emulator": emulator, "seed": seed}
        bits = {"zero_shot_bits": "0000", "emulator_adapter_bits": "1000", "plug_in_bits": plug_in}
        cells.put({**where, "alpha": 1.0, "recipe": recipe}, {**bits, "proxy_bits": delivered})

    def every(task: str, split: str, delivered: str, on_emulator: str = "1111") -> None:
        """The every-block adapter's cell: no plug-in row."""
        where = {**facts, "task": task, "row": f"proxy_{split}", "emulator": emulator, "seed": 0, "alpha": 1.0}
        bits = {"zero_shot_bits": "0000", "emulator_adapter_bits": on_emulator, "proxy_bits": delivered}
        cells.put({**where, "recipe": {**recipe, "train_blocks": "every"}}, bits)

    def put(task: str, row: str, bits: str, **where: Any) -> None:
        cells.put({**facts, "task": task, "row": row, **where}, {"acc_bits": bits, "acc_norm_bits": bits})

    proxy("wins", "heldout", plug_in="1000", delivered="1100")  # proxy better on held-out rows
    proxy("loses", "heldout", plug_in="1100", delivered="1100")  # a tie keeps the plug-in
    proxy("wins", "test", plug_in="0000", delivered="1110")
    proxy("loses", "test", plug_in="0000", delivered="1111")  # the plug-in was chosen: its test proxy is not used
    for task in ("wins", "loses"):
        put(task, "zero_shot", "0000")
        put(task, "ceiling", "1111", recipe=recipe, seed=0)
    put("loses", "plug_in", "1000", emulator=emulator, recipe=recipe, seed=0)
    put("loses", "emulator_adapter", "1100", emulator=emulator, recipe=recipe, seed=0)

    every("wins", "heldout", delivered="1100")  # ties the top-block proxy: the recipe's adapter is kept
    every("loses", "heldout", delivered="0100")  # below the plug-in
    report = transfer_delivery.build_report(cells, transfer.Recipe(), emulator)
    assert {t: c["delivery"] for t, c in report["choice"].items()} == {"wins": "proxy", "loses": "plug_in"}
    assert report["choice"]["loses"]["heldout_proxy_every_minus_plug_in"]["difference_mean"] == pytest.approx(-0.25)
    delivered = {t["task"]: t["delivered"]["mean"] for t in report["tasks"]}
    assert delivered == {"wins": pytest.approx(0.75), "loses": pytest.approx(0.25)}
    assert report["suite"]["delivered_minus_zero_shot"]["mean"] == pytest.approx(0.5)
    assert report["suite"]["gain_recovered"]["mean"] == pytest.approx(0.5)
    assert not report["missing"]
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met["delivered − zero-shot ≥ 0.7 × (ceiling − zero-shot)"] is False  # 0.5 of the gain
    assert met["delivered − (emulator + adapter) ≥ 3 points"] is True  # (+0.5 − 0.25) / 2
    assert met["delivered ≥ zero-shot on every task (in the mean)"] is True

    # An every-block adapter that wins on held-out rows is measured by its own test cell, against itself on the
    # emulator; until that cell exists the task is listed as missing, not filled from another delivery.
    every("wins", "heldout", delivered="1110")
    assert transfer_delivery.build_report(cells, transfer.Recipe(), emulator)["missing"] == ["wins"]
    every("wins", "test", delivered="1111", on_emulator="1100")
    report = transfer_delivery.build_report(cells, transfer.Recipe(), emulator)
    [wins] = [t for t in report["tasks"] if t["task"] == "wins"]
    assert wins["delivery"] == "proxy_every" and wins["delivered"]["mean"] == pytest.approx(1.0)
    assert wins["emulator_adapter"]["mean"] == pytest.approx(0.5) and not report["missing"]


def test_delivery_bench_fills_its_cells_and_reports_from_a_smoke_run() -> None:
    import transfer_delivery

    report = transfer_delivery.main(["--smoke"])
    assert set(report["choice"]) == {"sst2_sample"} and not report["missing"]
    [task] = report["tasks"]
    assert task["delivery"] in transfer_delivery.DELIVERIES and task["seeds"] == [0, 1]
    assert {"heldout_plug_in", "heldout_proxy", "heldout_proxy_every"} <= set(report["choice"]["sst2_sample"])
