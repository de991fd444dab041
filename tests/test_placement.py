"""Importance-aware adapter placement: measured importance picks the adapter blocks, and every later step honours it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import DEPTH
from transformers import AutoModelForCausalLM

from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common.architectures import blocks
from offsite.common.emulator_loading import plug_into_emulator
from offsite.common.examples import Example
from offsite.common.model_loading import fingerprint, load_model
from offsite.common.signing import load_or_create_private_key
from offsite.owner.adapters.plugin import plug
from offsite.owner.adapters.validation import validate_adapter
from offsite.owner.emulator import EmulatorSpec, build_emulator
from offsite.owner.emulator.distill import gap_exits, middle_parameters
from offsite.owner.emulator.layout import Layout, LayoutError
from offsite.owner.emulator.placement import (
    Placement,
    allot,
    cka_importance,
    gaps,
    gradient_importance,
    most_important,
)
from offsite.owner.emulator.uniform import compose, select_blocks

PLANTED = 3  # the one block that is not an identity map


def test_gaps_and_allotment_arithmetic() -> None:
    assert gaps([0, 1, 28, 29], 30) == [list(range(2, 28))]
    assert gaps([0, 11, 19, 29], 30) == [list(range(1, 11)), list(range(12, 19)), list(range(20, 29))]
    assert gaps([2, 3], 5) == [[0, 1], [4]]
    assert allot([26], 8) == [8]
    assert allot([10, 7, 9], 8) == [3, 2, 3]  # exact shares 3.08, 2.15, 2.77
    assert allot([1, 1, 1], 2) == [1, 1, 0]  # equal remainders go to the lower gap
    assert sum(allot([5, 3, 1, 9], 7)) == 7
    with pytest.raises(LayoutError, match="cannot keep 4 of 3"):
        allot([1, 2], 4)
    assert most_important([0.1, 0.9, 0.3, 0.9, 0.0], 3) == [1, 2, 3]


def test_ends_placement_is_the_plain_layout() -> None:
    ends = Placement("ends", [0, 1, 28, 29])
    assert compose(ends, 30, 8) == [0, 1, 2, 6, 9, 13, 16, 20, 23, 27, 28, 29]
    assert compose(Placement("gradnorm", [0, 11, 19, 29]), 30, 8) == [0, 1, 6, 10, 11, 12, 18, 19, 20, 24, 28, 29]


def test_gap_exits_and_trainable_blocks_follow_the_placement(tiny_model_dir) -> None:
    model = load_model(str(tiny_model_dir("llama"))).model
    assert gap_exits([0, 2, 5], [0, 5], DEPTH) == [(5, 2)]  # the state entering block 5 / emulator block 2
    assert gap_exits([0, 1, 3, 4], [1, 3], DEPTH) == [(1, 1), (3, 2), (6, 4)]
    assert select_blocks(model, Layout.parse("1-2-1")) == [0, 1, 4, 5]
    names = middle_parameters(model, [0, 1, 3, 4, 5, 2], [0, 3])
    assert {name.split(".")[2] for name in names} == {"1", "3", "4", "5"}  # positions whose block is not 0 or 3


def _planted_model(tiny_model_dir):
    """A tiny Llama whose blocks are exact identities (zero output projections) except block PLANTED."""
    loaded = load_model(str(tiny_model_dir("llama")))
    with torch.no_grad():
        for index, block in enumerate(blocks(loaded.model)):
            if index != PLANTED:
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
    return loaded


def test_cka_importance_finds_the_one_block_that_changes_the_state(tiny_model_dir) -> None:
    full = _planted_model(tiny_model_dir).model
    chunks = torch.randint(0, full.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    importance = cka_importance(full, chunks)
    assert len(importance) == DEPTH
    assert importance[PLANTED] > 1e-3
    assert all(abs(value) < 1e-9 for i, value in enumerate(importance) if i != PLANTED), importance
    assert most_important(importance, 1) == [PLANTED]


def test_gradient_importance_measures_every_block_and_leaves_the_model_as_it_was(tiny_model_dir) -> None:
    full = load_model(str(tiny_model_dir("llama"))).model
    for parameter in full.parameters():
        parameter.requires_grad_(False)
    chunks = torch.randint(0, full.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    importance = gradient_importance(full, chunks)
    assert len(importance) == DEPTH and all(value > 0 for value in importance)
    assert not any(p.requires_grad for p in full.parameters())
    assert all(p.grad is None for p in full.parameters())
    with torch.no_grad():  # amplifying a block's output amplifies the gradient on its inner weights
        for weight in (blocks(full)[2].self_attn.o_proj.weight, blocks(full)[2].mlp.down_proj.weight):
            weight.mul_(10.0)
    assert gradient_importance(full, chunks)[2] > importance[2]


def test_placement_is_recorded_trained_validated_and_plugged(tiny_model_dir, tmp_path: Path) -> None:
    loaded = _planted_model(tiny_model_dir)
    text = tmp_path / "public.txt"
    text.write_text("the river runs past the old mill and into the sea. " * 200)
    key = load_or_create_private_key(tmp_path / "key.pem")
    spec = EmulatorSpec.parse(f"uniform:1-1-1,place=cka,data={text}")
    out = tmp_path / "emulator"
    manifest = build_emulator(
        loaded.model, loaded.tokenizer, spec, out, key, fingerprint(loaded.model), "tiny", show_progress=False
    )
    adapters = manifest["adapter_blocks"]["full"]
    assert PLANTED in adapters and len(adapters) == 2
    assert manifest["params"]["placement"] == "cka" and len(manifest["params"]["importance"]) == DEPTH
    assert set(adapters) <= set(manifest["block_map"]) and len(manifest["block_map"]) == 3
    assert [manifest["block_map"][i] for i in manifest["adapter_blocks"]["emulator"]] == adapters
    emulator = AutoModelForCausalLM.from_pretrained(out)

    examples = [Example(prompt=f"review {i}:", completion=" good" if i % 2 else " bad") for i in range(16)]
    adapter = tmp_path / "adapter"
    train_adapter(
        out, examples, TrainConfig(epochs=1.0, batch_size=4, train_blocks="all"), adapter, show_progress=False
    )
    validated = validate_adapter(adapter, loaded.model, manifest, fingerprint(loaded.model))
    [lora_check] = [check for check in validated.checks if check.name == "lora_config"]
    assert lora_check.detail.endswith(f"blocks {adapters}")

    # Every dropped block is an identity, so plug-in and emulator + adapter agree only if the LoRA sits on the
    # same blocks in both.
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        full_logits = plug(loaded.model, adapter, "lora")(input_ids=ids).logits
        emulator_logits = plug_into_emulator(emulator, manifest, adapter)(input_ids=ids).logits
        untrained = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(full_logits, emulator_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full_logits, untrained, atol=1e-4), "the adapter changed nothing"


def test_placement_is_an_option_of_uniform_and_distill_only() -> None:
    assert EmulatorSpec.parse("distill:2-8-2,place=gradnorm").parsed_options()["place"] == "gradnorm"
    with pytest.raises(LayoutError, match="place=.*must be one of ends, gradnorm, cka"):
        EmulatorSpec.parse("uniform:2-8-2,place=random")
    with pytest.raises(LayoutError, match="has no option 'place'"):
        EmulatorSpec.parse("crash:2-8-2,place=cka")
