"""GradOT-style emulator: the budget holds, the gradient score keeps the channels that matter, the bundle loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYOUT
from tiny_models import CORPUS, DEPTH
from transformers import AutoModelForCausalLM, PreTrainedModel

from offsite.common.architectures import blocks
from offsite.common.model_loading import fingerprint, load_model
from offsite.common.signing import load_or_create_private_key
from offsite.owner.emulator import EmulatorSpec, build_emulator
from offsite.owner.emulator.bundle import materialize
from offsite.owner.emulator.gradot import (
    block_mlp,
    calibrate,
    compress,
    kept_channels,
    prune_channels,
)
from offsite.owner.emulator.layout import Layout
from offsite.owner.emulator.public_text import load_chunks

MIDDLE = range(1, DEPTH - 1)  # TINY_LAYOUT's middle blocks
PRUNED_FRACTION = 0.25
RANDOM_DRAWS = 5
# Pruning by the Taylor score must leave at most this share of the logits error that the best random draw leaves
# (measured: about 0.73 on the tiny Llama).
NMSE_MARGIN = 0.85


@pytest.fixture()
def tiny_llama(tiny_model_dir, tmp_path: Path):
    loaded = load_model(str(tiny_model_dir("llama")))
    text = tmp_path / "public.txt"
    text.write_text(" ".join(CORPUS * 60))
    chunks = load_chunks(loaded.tokenizer, text, 32, 0.0, max_chunks=16).train
    return loaded, chunks


def _channel_scores(full: PreTrainedModel, chunks: torch.Tensor) -> dict[int, torch.Tensor]:
    emulator = materialize(full, list(range(DEPTH)))
    mlps = {index: block_mlp(blocks(emulator)[index]) for index in MIDDLE}
    return calibrate(emulator, mlps, {}, chunks).channel_scores


def _pruned(full: PreTrainedModel, keep: dict[int, torch.Tensor]) -> PreTrainedModel:
    emulator = materialize(full, list(range(DEPTH)))
    for index, channels in keep.items():
        prune_channels(block_mlp(blocks(emulator)[index]), channels)
    return emulator


@torch.no_grad()
def _loss_and_nmse(model: PreTrainedModel, reference, chunks: torch.Tensor) -> tuple[float, float]:
    out = model(input_ids=chunks, labels=chunks)
    nmse = ((out.logits - reference.logits) ** 2).mean() / (reference.logits**2).mean()
    return float(out.loss - reference.loss), float(nmse)


def test_statistics_leave_out_the_sink_position(tiny_llama) -> None:
    loaded, chunks = tiny_llama
    emulator = materialize(loaded.model, list(range(DEPTH)))
    attention = {"q": blocks(emulator)[1].self_attn.q_proj}
    stats = calibrate(emulator, {}, attention, chunks).attention["q"]
    assert stats.count == chunks.shape[0] * (chunks.shape[1] - 1)  # every token but position 0


def test_the_gradient_score_prunes_better_than_random_channels(tiny_llama) -> None:
    loaded, chunks = tiny_llama
    with torch.no_grad():
        reference = loaded.model(input_ids=chunks, labels=chunks)
    keep = kept_channels(block_mlp(blocks(loaded.model)[1]).channels, PRUNED_FRACTION)
    scores = _channel_scores(loaded.model, chunks)
    by_score = _pruned(loaded.model, {i: torch.topk(scores[i], keep).indices for i in MIDDLE})
    scored_loss, scored_nmse = _loss_and_nmse(by_score, reference, chunks)
    generator = torch.Generator().manual_seed(0)
    random_losses, random_nmses = [], []
    for _ in range(RANDOM_DRAWS):
        channels = {i: torch.randperm(len(scores[i]), generator=generator)[:keep] for i in MIDDLE}
        loss, nmse = _loss_and_nmse(_pruned(loaded.model, channels), reference, chunks)
        random_losses.append(loss)
        random_nmses.append(nmse)
    assert scored_nmse < NMSE_MARGIN * min(random_nmses), (scored_nmse, random_nmses)
    assert scored_loss < min(random_losses), (scored_loss, random_losses)


def test_the_score_finds_channels_that_were_made_to_matter(tiny_llama) -> None:
    loaded, chunks = tiny_llama
    full = materialize(loaded.model, list(range(DEPTH)))
    generator = torch.Generator().manual_seed(1)
    loud = {}
    with torch.no_grad():
        for index in MIDDLE:
            mlp = block_mlp(blocks(full)[index])
            loud[index] = torch.randperm(mlp.channels, generator=generator)[:8]
            mlp.output.weight[:, loud[index]] *= 10.0  # these channels now carry most of the MLP's output
    scores = _channel_scores(full, chunks)
    for index in MIDDLE:
        kept = set(torch.topk(scores[index], 16).indices.tolist())
        assert set(loud[index].tolist()) <= kept, index


def test_compress_meets_the_budget_and_is_deterministic(tiny_llama) -> None:
    loaded, chunks = tiny_llama
    layout = Layout.parse(TINY_LAYOUT)
    first = materialize(loaded.model, list(range(DEPTH)))
    summary = compress(first, layout, chunks, PRUNED_FRACTION)
    share = summary["middle_effective_parameters"] / summary["middle_dense_parameters"]
    assert abs(share - PRUNED_FRACTION) < 0.05, share
    assert set(summary["mlp_channels"].values()) == {16}
    for index in MIDDLE:  # the pruned channels are gone from the weights, not only silenced
        mlp = block_mlp(blocks(first)[index])
        assert int((mlp.output.weight.abs().sum(0) > 0).sum()) == 16
        assert int((mlp.inputs[0].weight.abs().sum(1) > 0).sum()) == 16
    second = materialize(loaded.model, list(range(DEPTH)))
    assert compress(second, layout, chunks, PRUNED_FRACTION) == summary
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_gradot_bundle_loads_and_leaves_the_adapter_blocks_alone(family: str, tiny_model_dir, tmp_path: Path):
    loaded = load_model(str(tiny_model_dir(family)))
    text = tmp_path / "public.txt"
    text.write_text("a small town sits at the foot of the green hills. " * 80)
    key = load_or_create_private_key(tmp_path / "key.pem")
    spec = EmulatorSpec.parse(f"gradot:{TINY_LAYOUT},samples=4,data={text}")
    manifest = build_emulator(
        loaded.model, loaded.tokenizer, spec, tmp_path / "emu", key, fingerprint(loaded.model), "t", show_progress=False
    )
    assert manifest["block_map"] == list(range(DEPTH))
    assert manifest["adapter_blocks"] == {"emulator": [0, DEPTH - 1], "full": [0, DEPTH - 1]}
    params = manifest["params"]
    layout = Layout.parse(TINY_LAYOUT)
    share = params["middle_effective_parameters"] / params["middle_dense_parameters"]
    assert abs(share - layout.middle / len(MIDDLE)) < 0.1, share
    emulator = AutoModelForCausalLM.from_pretrained(tmp_path / "emu")
    assert emulator.config.num_hidden_layers == DEPTH
    for index in range(DEPTH):
        ours, theirs = blocks(emulator)[index].state_dict(), blocks(loaded.model)[index].state_dict()
        same = all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert same == (index in (0, DEPTH - 1)), index
