"""The report card the owner measures for each emulator, and the release gate that reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_LAYOUT

from offsite.common.model_loading import load_model
from offsite.owner.emulator import EmulatorSpec
from offsite.owner.emulator.bundle import materialize
from offsite.owner.emulator.report_card import ReleaseRefused, check_release, measure
from offsite.owner.service import OwnerService
from offsite.owner.store import Store


def test_the_full_model_scores_a_ratio_of_one_and_a_drop_scores_its_own(tiny_model_dir) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    itself = measure(loaded.model, materialize(loaded.model, list(range(6))), loaded.tokenizer)
    assert itself.perplexity_ratio == pytest.approx(1.0, abs=1e-3)
    dropped = measure(loaded.model, materialize(loaded.model, [0, 5]), loaded.tokenizer)
    assert dropped.parameters < itself.parameters
    assert dropped.perplexity != pytest.approx(itself.perplexity)
    assert dropped.windows == itself.windows > 0


def test_release_gate_refuses_an_emulator_within_the_margin() -> None:
    card = {"perplexity": 12.0, "full_perplexity": 10.0, "perplexity_ratio": 1.2}
    check_release("e", card, None)
    check_release("e", card, 0.1)
    with pytest.raises(ReleaseRefused, match=r"too close to the full model.*ratio 1\.200.*at least 1\.500"):
        check_release("e", card, 0.5)


def test_the_owner_refuses_to_serve_a_full_depth_emulator(tiny_model_dir, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    # lowrank with a 0.99 budget is all but the model itself: the gate must catch it.
    spec = EmulatorSpec.parse(f"lowrank:{TINY_LAYOUT},fraction=0.99")
    with pytest.raises(ReleaseRefused, match="too close"):
        OwnerService(loaded, Store(tmp_path / "store"), [spec], release_margin=0.05)
