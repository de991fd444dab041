"""The privacy benchmark (issue 16): its AUC, the tenant's top-k distillation loss, its cache, and the smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offsite.common.confidence import Estimate

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import privacy  # noqa: E402
from cells import Cells  # noqa: E402

EPSILONS = {None, 8.0, 3.0, 1.0}  # the default --epsilons, no DP first


def test_roc_auc_on_synthetic_scores() -> None:
    low, high = np.arange(10.0), np.arange(10.0) + 100
    assert privacy.roc_auc(high, low) == 1.0  # every member above every non-member
    assert privacy.roc_auc(low, high) == 0.0  # reversed
    assert privacy.roc_auc(low, low) == 0.5  # identical scores: ties count half
    # pairs (member, non-member): 1>0, 1<2, 2>0, 2=2 (half), 3>0, 3>2 -> 4.5 of 6
    assert privacy.roc_auc(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="at least one"):
        privacy.roc_auc(np.array([]), low)


def test_auc_estimate_brackets_the_mean_and_separates_from_chance() -> None:
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(1.0, 1.0, size=(3, 200)), rng.normal(0.0, 1.0, size=(3, 200))
    estimate = privacy.auc_estimate(members, nonmembers)
    assert isinstance(estimate, Estimate)
    # two unit normals a standard deviation apart: AUC = Φ(1/√2) ≈ 0.760
    assert estimate.ci_low < estimate.mean < estimate.ci_high and abs(estimate.mean - 0.760) < 0.04
    assert estimate.ci_low > 0.5
    same = privacy.auc_estimate(nonmembers, rng.normal(0.0, 1.0, size=(3, 200)))
    assert same.ci_low < 0.5 < same.ci_high


def test_top_k_kl_is_zero_at_the_teacher_and_positive_elsewhere() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50)
    values, ids = torch.log_softmax(logits, dim=-1).topk(4, dim=-1)
    assert privacy.top_k_kl(values, ids, logits).abs() < 1e-5
    assert privacy.top_k_kl(values, ids, torch.randn(2, 5, 50)) > 0.1


def test_a_selector_matching_two_cells_is_refused(tmp_path: Path) -> None:
    cells = Cells(tmp_path)
    selector = {"task": "extraction", "row": "tokens_0", "bench": privacy.BENCH, "tokens": 0}
    assert privacy.find(cells, selector) is None
    cells.put({**selector, "model": "a"}, {"privacy_gap": 1.0})
    assert privacy.find(cells, selector)["privacy_gap"] == 1.0
    cells.put({**selector, "model": "b"}, {"privacy_gap": 2.0})  # another build of the model
    with pytest.raises(ValueError, match="stale"):
        privacy.find(cells, selector)


def test_smoke_run_writes_every_setting_and_budget() -> None:
    result = privacy.main(["--smoke"])
    out = Path(result["out"])
    for suffix in (".json", ".md", ".png"):
        assert out.with_suffix(suffix).is_file()
    written = json.loads(out.with_suffix(".json").read_text())

    dp = written["dp"]
    assert {row["epsilon"] for row in dp} == EPSILONS and dp[0]["epsilon"] is None and dp[0]["default"]
    for row in dp:
        assert set(row["seeds"]) == {0, 1}
        for key in ("mia_auc", "mia_auc_loss"):
            low, high = row[f"{key}_ci"]
            assert 0.0 <= low <= row[key] <= high <= 1.0
        low, high = row["accuracy_ci"]
        assert 0.0 <= low <= row["accuracy"] <= high <= 1.0
        if row["epsilon"] is not None:
            assert all(0 < spent <= row["epsilon"] * (1 + 1e-6) for spent in row["epsilon_spent"])
            cost = row["accuracy_cost"]
            assert cost["difference_ci_low"] <= cost["difference_mean"] <= cost["difference_ci_high"]
    assert 0.0 <= written["dp_reference"]["mia_auc_loss"] <= 1.0

    extraction = written["extraction"]
    tokens = [row["tokens"] for row in extraction]
    assert tokens[0] == 0 and tokens == sorted(set(tokens)) and len(tokens) == 3
    for row in extraction:
        assert row["tokens_spent"] >= row["tokens"] and np.isfinite(row["privacy_gap"])
        assert row["privacy_gap"] == pytest.approx(row["perplexity_ratio"] - 1, abs=1e-3)

    markdown = out.with_suffix(".md").read_text()
    assert "none (default)" in markdown and "| 2,048 |" in markdown
