"""bench/efficiency.py --smoke (issue 14, item 1): every row measured in its own process, in alternating order, with
the ratios, the PEMA total and the targets computed from the measured figures; --report rebuilds them from the cells."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import efficiency  # noqa: E402


def test_smoke_measures_every_row_and_derives_ratios_and_targets(tmp_path: Path) -> None:
    out = tmp_path / "efficiency"
    report = efficiency.main(["--smoke", "--out", str(out)])
    for suffix in (".json", ".md", ".png"):
        assert out.with_suffix(suffix).is_file()
    written = json.loads(out.with_suffix(".json").read_text())
    runs = {run["row"]: run for run in written["runs"]}
    assert list(runs) == list(efficiency.ROWS)

    for position, row in enumerate(efficiency.ROWS):
        run = runs[row]
        assert run["tokens_per_s"] > 0 and run["peak_mib"] > 0 and run["seconds"] > 0
        assert run["peak_rss_above_start_mib"] > 0
        if run["device"] == "cpu":
            assert run["peak_rss_above_start_mib"] < run["peak_mib"]  # the imported process is not counted
        repeats = run["repeats"]
        # alternating order: forwards in the first round, backwards in the second
        assert [(r["repeat"], r["position"]) for r in repeats] == [(0, position), (1, len(runs) - 1 - position)]
        for repeat in repeats:
            assert repeat["tokens_per_s"] == pytest.approx(repeat["tokens"] / repeat["seconds"], rel=1e-6)
        for key in ("tokens_per_s", "peak_mib", "seconds"):
            assert run[key] == pytest.approx(statistics.median(r[key] for r in repeats), abs=1e-3)

    # every training row is timed over the same batches; the memory build represents the same examples once
    timed = {runs[row]["tokens"] for row in efficiency.TRAINING_ROWS}
    assert len(timed) == 1 and written["timed_tokens"] in timed
    assert runs["pema_memory_build"]["memory_rows"] == runs["pema_train"]["memory_rows"] > 0
    assert runs["full_ft"]["trainable_parameters"] > runs["lora_full"]["trainable_parameters"]
    assert runs["emulator_lora"]["trainable_parameters"] > runs["emulator_top_only"]["trainable_parameters"]

    # the work model: 3 passes a block for full tuning, 2 for LoRA everywhere; the emulator's top-only LoRA runs
    # the backward through its top block only (uniform:1-2-1 has 4 blocks, the adapters in blocks 0 and 3)
    full_depth = runs["full_ft"]["block_passes"]["forward"]
    assert runs["full_ft"]["block_passes"]["total"] == 3 * full_depth
    assert runs["lora_full"]["block_passes"]["total"] == 2 * full_depth
    assert runs["emulator_lora"]["block_passes"] == {
        "forward": 4,
        "backward_input": 4,
        "backward_weight": 0,
        "total": 8,
    }
    assert runs["emulator_full_block"]["block_passes"]["total"] == 4 + 4 + 2
    assert runs["emulator_top_only"]["block_passes"]["total"] == 4 + 1
    bound = runs["emulator_top_only"]["vs_full_ft"]["block_pass_bound"]
    assert bound == pytest.approx(3 * full_depth / 5, abs=1e-3)
    assert "| `emulator_top_only` | 4 | 1 | 0 | 5 |" in out.with_suffix(".md").read_text()

    for run in runs.values():
        for reference in efficiency.REFERENCES:
            base = runs[reference]
            versus = run[f"vs_{reference}"]
            assert versus["tokens_per_s"] == pytest.approx(run["tokens_per_s"] / base["tokens_per_s"], abs=1e-3)
            assert versus["peak_mib"] == pytest.approx(base["peak_mib"] / run["peak_mib"], abs=1e-3)
        assert run["vs_full_ft"]["tokens_per_s"] * runs["full_ft"]["tokens_per_s"] == pytest.approx(
            run["vs_lora_full"]["tokens_per_s"] * runs["lora_full"]["tokens_per_s"], rel=1e-3
        )

    total = written["pema_total"]
    assert total["seconds"] == pytest.approx(runs["pema_memory_build"]["seconds"] + runs["pema_train"]["seconds"])
    assert total["over_lora_full"] == pytest.approx(total["seconds"] / runs["lora_full"]["seconds"], abs=1e-3)
    targets = {(t["target"], t["measure"]): t for t in written["targets"]}
    speed = targets[("emulator_lora: ≥ 6.5× full fine-tuning's tokens/s", "tokens/s")]
    assert speed["value"] == runs["emulator_lora"]["vs_full_ft"]["tokens_per_s"]
    assert speed["met"] == (speed["value"] >= efficiency.SPEED_TARGET)
    pema_memory = targets[("pema_train: peak memory ≤ 0.1 × lora_full's", "process peak")]
    assert pema_memory["value"] == pytest.approx(runs["pema_train"]["peak_mib"] / runs["lora_full"]["peak_mib"], 1e-3)
    pema_time = targets[("PEMA memory build + training below lora_full's wall time", "seconds, over lora_full's")]
    assert pema_time["met"] == (total["over_lora_full"] < 1)
    assert len(written["targets"]) == 9

    markdown = out.with_suffix(".md").read_text()
    assert "| `emulator_top_only`" in markdown and "torch threads" in markdown

    # --report rebuilds the same figures from the cells alone, without running a row
    again = efficiency.main(["--smoke", "--report", "--out", str(out)])
    assert again["runs"] == report["runs"] == written["runs"]
