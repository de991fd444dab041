"""Differential privacy for the data owner (issue 16, finding 11): `offsite train --dp-epsilon` runs DP-SGD with
Opacus on the emulator's LoRA, the manifest records the ε spent, and the pushed manifest carries no example count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import cli, sentiment_examples, write_jsonl
from opacus.optimizers import DPOptimizer
from safetensors.torch import load_file

from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig

COUNT_KEYS = {"examples", "steps", "limit", "sample_rate"}


@pytest.fixture
def emulator(tiny_emulator: Path) -> Path:
    return tiny_emulator


def _manifest(adapter: Path) -> dict[str, Any]:
    return json.loads((adapter / "offsite.json").read_text())


def _keys(tree: Any) -> set[str]:
    if isinstance(tree, dict):
        return set(tree) | {k for v in tree.values() for k in _keys(v)}
    return set()


def test_dp_training_spends_at_most_the_target_epsilon_and_the_manifest_says_so(emulator: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2, dp_epsilon=3.0, dp_delta=1e-5)
    result = train_adapter(emulator, sentiment_examples(32), config, tmp_path / "adapter", show_progress=False)
    manifest = _manifest(tmp_path / "adapter")
    privacy = manifest["privacy"]
    assert 0 < privacy["epsilon"] <= 3.0 and privacy["target_epsilon"] == 3.0 and privacy["delta"] == 1e-5
    assert privacy["noise_multiplier"] > 0.5 and privacy["max_grad_norm"] == 1.0 and privacy["accountant"] == "rdp"
    assert result.privacy is not None and result.privacy["epsilon"] == privacy["epsilon"]
    # what would give the example count away is not in what the owner receives
    assert not COUNT_KEYS & _keys(manifest) and "batch_size" not in manifest["training"]
    assert "epochs" not in manifest["training"]
    # it learned something: LoRA's B matrices start at zero
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


def test_each_examples_gradient_is_clipped_before_the_noise(
    emulator: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = 0.01
    seen: list[tuple[int, float, float]] = []  # per step: examples, largest raw per-example norm, clipped sum's norm
    clip = DPOptimizer.clip_and_accumulate

    def spy(self: DPOptimizer) -> None:
        samples = [p.grad_sample for p in self.params]
        raw = torch.stack([g.flatten(1).norm(dim=1) for g in samples], dim=1).norm(dim=1)
        clip(self)
        summed = torch.cat([p.summed_grad.reshape(-1) for p in self.params]).norm()
        seen.append((len(raw), float(raw.max()) if len(raw) else 0.0, float(summed)))

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    config = TrainConfig(epochs=1, batch_size=4, dp_epsilon=8.0, dp_max_grad_norm=bound)
    train_adapter(emulator, sentiment_examples(16), config, tmp_path / "adapter", show_progress=False)
    assert len(seen) == 4
    assert any(raw > 10 * bound for _, raw, _ in seen), "the bound never bit: the test would prove nothing"
    for examples, _, summed in seen:
        assert summed <= examples * bound * (1 + 1e-4)


def test_empty_poisson_batches_still_step_and_are_accounted(emulator: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=4, batch_size=1, dp_epsilon=2.0, record_examples=True)
    result = train_adapter(emulator, sentiment_examples(3), config, tmp_path / "adapter", show_progress=False)
    privacy = _manifest(tmp_path / "adapter")["privacy"]
    assert privacy["steps"] == result.steps == 12 and privacy["sample_rate"] == pytest.approx(1 / 3)
    assert privacy["epsilon"] <= 2.0  # all 12 steps, empty ones included, within the plan


def test_dp_is_refused_for_full_tuning_and_bad_parameters(emulator: Path, tmp_path: Path) -> None:
    examples = sentiment_examples(8)
    for config, message in (
        (TrainConfig(method="full", dp_epsilon=1.0), "--method lora only"),
        (TrainConfig(dp_epsilon=1.0, dp_delta=1.5), "--dp-delta"),
        (TrainConfig(dp_epsilon=-1.0), "--dp-epsilon"),
    ):
        with pytest.raises(ValueError, match=message):
            train_adapter(emulator, examples, config, tmp_path / "adapter", show_progress=False)
        assert not (tmp_path / "adapter").exists()


def test_the_cli_withholds_the_example_count_unless_asked_and_trains_with_dp(emulator: Path, tmp_path: Path) -> None:
    data = write_jsonl(sentiment_examples(12), tmp_path / "train.jsonl")
    base = ["train", "--emulator", str(emulator), "--data", str(data), "--epochs", "1", "--batch-size", "4"]
    _, plain, _ = cli(*base, "--out", str(tmp_path / "plain"))
    assert plain["examples"] == 12 and plain["privacy"] is None  # the local result may say it; the manifest not
    manifest = _manifest(tmp_path / "plain")
    assert not COUNT_KEYS & _keys(manifest) and "privacy" not in manifest
    assert manifest["training"]["batch_size"] == 4  # without DP the batch size alone gives no count away

    _, counted, _ = cli(*base, "--limit", "10", "--record-examples", "--out", str(tmp_path / "counted"))
    training = _manifest(tmp_path / "counted")["training"]
    assert training["examples"] == 10 and training["steps"] == counted["steps"] == 3 and training["limit"] == 10

    dp = ["--dp-epsilon", "5", "--dp-delta", "1e-6", "--dp-max-grad-norm", "0.5"]
    _, private, _ = cli(*base, *dp, "--out", str(tmp_path / "private"))
    privacy = _manifest(tmp_path / "private")["privacy"]
    assert privacy["epsilon"] <= 5 and privacy["delta"] == 1e-6 and privacy["max_grad_norm"] == 0.5
    assert private["privacy"]["noise_multiplier"] == privacy["noise_multiplier"] > 0
    code, refused, _ = cli(*base, "--method", "full", *dp, "--out", str(tmp_path / "full"), check=False)
    assert code != 0 and "lora only" in refused["error"] and not (tmp_path / "full").exists()
