"""SmolLM2-135M (the embedded default) through the whole demo. Slow: run with `pytest -m slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from offsite.common.model_loading import load_model
from offsite.owner.adapters.plugin import plug

pytestmark = pytest.mark.slow


def test_demo_on_smollm2(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "offsite.client",
            "demo",
            "--train-limit",
            "200",
            "--eval-limit",
            "100",
            # the code path of the default emulator at a quarter of its distillation budget: minutes, not half an hour
            "--emulator",
            "distill:3-14-3,tokens=98304",
            "--workdir",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    full, emulator, emulator_adapter, plugged = result["rows"]
    assert [r["examples"] for r in result["rows"]] == [100] * 4
    assert full["accuracy"] > 0.65, "SmolLM2-Instruct zero-shot on SST-2 is about 0.75-0.80"
    assert emulator["accuracy"] < full["accuracy"], "the emulator must be weaker than the full model"
    assert emulator_adapter["loss"] < emulator["loss"], "training on the emulator lowered its loss"
    assert plugged["loss"] < full["loss"], "the plugged adapter lowered the full model's loss"
    assert result["adapter_bytes"] < 8 * 1024 * 1024, "only LoRA weights were pushed"

    # The adapter the owner plugged in loads onto the full model with PEFT alone, with the same logits.
    store_models = tmp_path / "owner-store" / "models"
    full_model = load_model(str(next(store_models.iterdir())))
    ids = torch.tensor([full_model.tokenizer("Review: a gem of a film\nSentiment:")["input_ids"]])
    with torch.no_grad():
        ours = plug(full_model.model, tmp_path / "adapter", "lora")(input_ids=ids).logits
        peft_only = PeftModel.from_pretrained(full_model.model, str(tmp_path / "adapter"))(input_ids=ids).logits
    assert torch.allclose(ours, peft_only, atol=1e-5)
