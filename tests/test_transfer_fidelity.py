"""The transfer diagnostics' hooks on the gap exit: the fidelity blend (α = 1 makes the emulator's top adapter block
read the full model's state) and the exit-error noise (training forwards only, never the sink)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_LAYOUT
from transformers import AutoModelForCausalLM

from offsite.common.model_loading import fingerprint, load_model
from offsite.common.signing import load_or_create_private_key
from offsite.owner.emulator import EmulatorSpec, build_emulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import transfer_exit_noise  # noqa: E402
import transfer_fidelity  # noqa: E402


@pytest.fixture(scope="module")
def tiny_emulator(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, dict[str, Any]]:
    """The tiny full model, and a uniform emulator of it: (loaded model, bundle directory, manifest)."""
    loaded = load_model(str(tiny_model_dir("llama")))
    work = tmp_path_factory.mktemp("fidelity")
    key = load_or_create_private_key(work / "key.pem")
    spec = EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}")
    out = work / "emulator"
    manifest = build_emulator(loaded.model, loaded.tokenizer, spec, out, key, fingerprint(loaded.model), "tiny", False)
    return loaded, out, manifest


def test_blending_the_gap_exit_fully_turns_the_emulator_into_the_full_model(tiny_emulator) -> None:
    loaded, out, manifest = tiny_emulator
    ids = torch.tensor([[5, 9, 17, 3, 40, 8], [7, 7, 21, 30, 2, 11]])
    with torch.no_grad():
        full = loaded.model(input_ids=ids).logits
        logits = {}
        for alpha in (0.0, 0.5, 1.0):
            emulator = AutoModelForCausalLM.from_pretrained(out).eval()
            transfer_fidelity.blend_gap_exit(emulator, loaded.model, manifest, alpha)
            logits[alpha] = emulator(input_ids=ids).logits
    assert torch.allclose(logits[1.0], full, atol=1e-4)  # the top blocks are the full model's own
    distance = {alpha: (logits[alpha] - full).pow(2).mean().item() for alpha in logits}
    assert distance[0.0] > distance[0.5] > distance[1.0]


def test_band_fidelity_is_one_for_a_perfect_student_and_near_zero_for_an_unrelated_one() -> None:
    torch.manual_seed(0)
    width = 300  # every band of BANDS has directions
    teacher = torch.randn(2000, width) * torch.logspace(1, -1, width)
    perfect = transfer_fidelity.band_fidelity(teacher, teacher.clone())
    unrelated = transfer_fidelity.band_fidelity(teacher, torch.randn(2000, width) * torch.logspace(1, -1, width))
    assert [b["directions"] for b in perfect] == ["1-4", "5-16", "17-64", "65-128", "129-256", "257-300"]
    assert all(b["correlation"] > 0.999 and b["error_ratio"] < 1e-6 for b in perfect)
    assert all(abs(b["correlation"]) < 0.1 and b["error_ratio"] > 1.5 for b in unrelated)


def test_exit_noise_perturbs_training_forwards_only_and_never_the_sink(tiny_emulator) -> None:
    _, out, manifest = tiny_emulator
    ids = torch.tensor([[5, 9, 17, 3, 40, 8]])
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    noisy = AutoModelForCausalLM.from_pretrained(out).eval()
    width = noisy.config.hidden_size
    transfer_exit_noise.noisy_exit(noisy, manifest, torch.eye(width))
    with torch.no_grad():
        reference = plain(input_ids=ids).logits
        torch.testing.assert_close(noisy(input_ids=ids).logits, reference)  # scoring: no noise
        noisy.train()
        perturbed = noisy(input_ids=ids).logits
    torch.testing.assert_close(perturbed[:, 0], reference[:, 0])  # the sink's state is left alone
    assert (perturbed[:, 1:] - reference[:, 1:]).abs().max() > 1e-3
