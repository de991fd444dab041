"""Low-rank emulator: the projection keeps the mean, its error falls as the rank grows, and the bundle loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYOUT
from transformers import AutoModelForCausalLM

from offsite.common.architectures import blocks
from offsite.common.model_loading import fingerprint, load_model
from offsite.common.signing import load_or_create_private_key
from offsite.owner.emulator import EmulatorSpec, build_emulator
from offsite.owner.emulator.bundle import materialize
from offsite.owner.emulator.layout import Layout
from offsite.owner.emulator.lowrank import (
    OutputStatistics,
    budget_rank,
    compress,
    project_layer,
    projector,
    tolerance_rank,
)
from offsite.owner.emulator.public_text import load_chunks


def _layer_and_inputs() -> tuple[torch.nn.Linear, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(24, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 24, generator=generator))
    scales = torch.logspace(0, -2, 24)  # a decaying spectrum, like real activations
    inputs = torch.randn(2000, 24, generator=generator) * scales + 0.5
    return layer, inputs


def _relative_error(rank: int) -> float:
    layer, inputs = _layer_and_inputs()
    with torch.no_grad():
        reference = layer(inputs)
        stats = OutputStatistics(16)
        stats.add(reference, torch.ones(reference.shape[0], dtype=torch.bool))
        project_layer(layer, projector(*stats.mean_and_covariance(), rank).float())
        return float((layer(inputs) - reference).norm() / reference.norm())


def test_reconstruction_error_falls_as_the_rank_grows() -> None:
    errors = [_relative_error(rank) for rank in (1, 2, 4, 8, 16)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-5  # full rank reproduces the layer


def test_the_projection_keeps_the_mean_of_a_bias_free_layer() -> None:
    layer, inputs = _layer_and_inputs()
    with torch.no_grad():
        reference = layer(inputs)
        stats = OutputStatistics(16)
        stats.add(reference, torch.ones(reference.shape[0], dtype=torch.bool))
        project_layer(layer, projector(*stats.mean_and_covariance(), 1).float())
        torch.testing.assert_close(layer(inputs).mean(0), reference.mean(0), rtol=1e-4, atol=1e-4)


def test_rank_rules() -> None:
    assert budget_rank(576, 576, 8 / 26) == 88
    assert budget_rank(16, 16, 0.01) == 1
    eigenvalues = torch.tensor([8.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    assert tolerance_rank(eigenvalues, 0.2) == 1
    assert tolerance_rank(eigenvalues, 0.05) == 3


def test_model_error_falls_as_the_budget_grows(tiny_model_dir, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    text = tmp_path / "public.txt"
    text.write_text("the river runs past the old mill and into the sea. " * 80)
    chunks = load_chunks(loaded.tokenizer, text, 32, 0.0).train
    layout = Layout.parse(TINY_LAYOUT)
    with torch.no_grad():
        reference = loaded.model(input_ids=chunks).logits
    errors = []
    for fraction in (0.1, 0.4, 0.9):
        emulator = materialize(loaded.model, list(range(6)))
        compress(emulator, layout, chunks, fraction, None)
        with torch.no_grad():
            errors.append(float((emulator(input_ids=chunks).logits - reference).norm() / reference.norm()))
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lowrank_bundle_loads_and_leaves_the_adapter_blocks_alone(family: str, tiny_model_dir, tmp_path: Path):
    loaded = load_model(str(tiny_model_dir(family)))
    text = tmp_path / "public.txt"
    text.write_text("a small town sits at the foot of the green hills. " * 80)
    key = load_or_create_private_key(tmp_path / "key.pem")
    spec = EmulatorSpec.parse(f"lowrank:{TINY_LAYOUT},samples=4,data={text}")
    manifest = build_emulator(
        loaded.model, loaded.tokenizer, spec, tmp_path / "emu", key, fingerprint(loaded.model), "t", show_progress=False
    )
    assert manifest["block_map"] == list(range(6))
    assert manifest["adapter_blocks"] == {"emulator": [0, 5], "full": [0, 5]}
    params = manifest["params"]
    assert params["middle_effective_parameters"] < params["middle_dense_parameters"]
    emulator = AutoModelForCausalLM.from_pretrained(tmp_path / "emu")
    for index in range(6):
        ours, theirs = blocks(emulator)[index].state_dict(), blocks(loaded.model)[index].state_dict()
        same = all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert same == (index in (0, 5)), index
