"""bench/distill_throughput.py --smoke (issue 14, item 3): distillation timed against the plain step, side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import distill_throughput  # noqa: E402


def test_smoke_times_every_mode_against_the_plain_step_and_measures_the_bf16_targets(tmp_path: Path) -> None:
    out = tmp_path / "distill_throughput"
    report = distill_throughput.main(["--smoke", "--out", str(out)])
    [layout] = report["layouts"]
    assert set(layout["modes"]) == set(distill_throughput.MODES)
    for mode, row in layout["modes"].items():
        assert len(row["rounds"]) == 2 and row["tokens_per_s"] > 0
        assert (row["teacher_share"] == 0) == (mode == "plain") and row["teacher_share"] < 1
    assert layout["modes"]["plain"]["ratio_to_plain"] == 1.0
    assert 0 < layout["bf16_target_nmse"]["max"] < 1e-3
    assert [t["mode"] for t in report["targets"]] == ["distill_fp32", "distill_bf16"]
    assert json.loads(out.with_suffix(".json").read_text())["layouts"][0]["layout"] == "1-2-1"
    assert "× plain" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
