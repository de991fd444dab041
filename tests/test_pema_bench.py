"""The PEMA benchmark end to end on a tiny model (every row, both tasks, CIs, targets, files, resuming), and the
corpus-score bootstrap it reports with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from offsite.common import confidence

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import pema  # noqa: E402


def test_smoke_run_fills_every_row_with_cis_and_resumes_from_its_cells() -> None:
    report = pema.main(["--smoke"])
    rows = {(r["task"], r["row"]): r for r in report["runs"]}
    for task in ("e2e", "multi30k_en_de"):
        for row in pema.ROWS:
            record = rows[(task, row)]
            assert record["ci_low"] <= record["bleu"] <= record["ci_high"], record
            assert record["chrf_ci_low"] <= record["chrf"] <= record["chrf_ci_high"], record
            assert 0.0 <= record["hit_limit_fraction"] <= 1.0
            assert record["n"] == 6
        assert rows[(task, "pema_gate")]["seeds"] == [0, 1]
        assert rows[(task, "zero_shot")]["seeds"] == [0] and rows[(task, "hybrid_no_bridge")]["seeds"] == [0]
        assert report["selections"][task]["rank"]["rank"] in (4, 8)  # chosen on held-out examples
    wanted = {
        "gate ≥ the better of constant λ and GU",
        "hybrid gain ≥ 80% of remote PEMA's (GU)",
        "hybrid gain ≥ 80% of remote PEMA's (constant λ)",
        "hybrid gain ≥ 80% of remote PEMA's (key noise, GU)",
    }
    assert wanted <= {t["target"] for t in report["targets"]}
    card = report["meta"]["bridge"]["card"]
    assert card["nmse_after"] < card["nmse_before"], "the owner's bridge brings the emulator's states closer"
    out = Path(report["out"])
    assert out.with_suffix(".png").is_file() and out.with_suffix(".md").is_file()
    assert json.loads(out.with_suffix(".json").read_text())["runs"] == report["runs"]
    noisy = json.loads(next((Path(report["out"]).parent / "cells").glob("e2e-hybrid_key_noise-*.json")).read_text())
    assert noisy["key_noise"] == pema.HYBRID_KEY_NOISE  # trained on noisy keys, and the cell says how noisy
    # another emulator's cell of the same seed belongs to that emulator's report, not to this one
    cells = Path(report["out"]).parent / "cells"
    # the plug-in and the proxy row serve one adapter, trained once; the every-block one is its own
    seconds = {
        (cell["row"], cell["seed"]): cell["train_seconds"]
        for cell in map(json.loads, (f.read_text() for f in cells.glob("e2e-lora_emulator_*.json")))
    }
    assert seconds[("lora_emulator_proxy", 0)] == seconds[("lora_emulator_plug_in", 0)] is not None
    assert seconds[("lora_emulator_every_proxy", 0)] != seconds[("lora_emulator_plug_in", 0)]
    hybrid = json.loads(next(cells.glob("e2e-hybrid-*.json")).read_text())
    (cells / "e2e-hybrid-another-emulator.json").write_text(json.dumps({**hybrid, "emulator_id": "distill-9-9-9"}))
    # --report rebuilds the same figures from the cells alone, without a model
    sizes = ["--train", "24", "--test", "6", "--max-new-tokens", "8"]
    again = pema.main(["--report", "--cells", str(cells), "--out", str(out), "--emulator", "uniform:1-2-1", *sizes])
    assert again["runs"] == report["runs"]
    elsewhere = ["--out", str(out) + "-other", "--emulator", "distill:9-9-9"]
    other = pema.main(["--report", "--cells", str(cells), *elsewhere, *sizes])
    assert {r["row"] for r in other["runs"] if r["task"] == "e2e" and r["row"].startswith("hybrid")} == {"hybrid"}


def test_corpus_bootstrap_separates_a_better_system_and_not_a_copy() -> None:
    from sacrebleu.metrics import BLEU

    references = [[f"the cat number {i} sat on the mat"] for i in range(40)]
    good = [r[0] for r in references]
    bad = [f"a dog {i} ran" for i in range(40)]

    def stats(outputs: list[str]) -> np.ndarray:
        return pema.sentence_statistics("bleu", outputs, references)[None]

    def score(summed: np.ndarray) -> float:
        return float(BLEU()._compute_score_from_stats(list(summed)).score)

    estimate = confidence.statistic_estimate(stats(good), score)
    assert estimate.mean == pytest.approx(100.0) and estimate.ci_low == pytest.approx(100.0)
    better = confidence.statistic_compare(stats(good), stats(bad), score)
    assert better.difference.ci_low > 50 and better.p_value < 0.01
    same = confidence.statistic_compare(stats(bad), stats(bad), score)
    assert same.difference.mean == 0 and same.p_value == 1.0


def test_reading_lambda_probe_mixes_pema_on_the_emulator_with_the_full_models_lm() -> None:
    import pema_key_noise

    report = pema_key_noise.main(["--smoke", "--scales", "", "--seeds", "0", "--reading-lambdas", "0,0.9"])
    for probe in report["reading"]:
        # λ 0 is the frozen model alone, whichever adapter and states PEMA reads
        assert probe["reading"]["0"] == probe["hybrid_on_full"]["0"] == probe["remote"]["0"] == probe["frozen"]
        assert probe["reading"]["0.9"] != probe["hybrid_on_full"]["0.9"]  # PEMA reads other states in each
    assert set(report["reading_lambda"].values()) <= {0.0, 0.9}
