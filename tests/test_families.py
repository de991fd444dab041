"""Every supported family: emulator bundle, local training (LoRA and full), owner validation, plug-in, PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYOUT, sentiment_examples
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import FAMILIES
from transformers import AutoModelForCausalLM

from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common.adapter_format import full_key_pattern, lora_key_pattern
from offsite.common.architectures import ARCHITECTURES, blocks, depth
from offsite.common.emulator_loading import load_emulator, plug_into_emulator
from offsite.common.model_loading import fingerprint, load_model
from offsite.common.scoring import evaluate
from offsite.common.signing import load_or_create_private_key
from offsite.owner.adapters.plugin import plug
from offsite.owner.adapters.validation import validate_adapter
from offsite.owner.emulator import EmulatorSpec, build_emulator

assert set(FAMILIES) == set(ARCHITECTURES)


@pytest.mark.parametrize("family", FAMILIES)
def test_emulator_training_and_plug_in(family: str, tiny_model_dir, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_model_dir(family)))
    full = loaded.model
    key = load_or_create_private_key(tmp_path / "key.pem")
    base = fingerprint(full)
    manifest = build_emulator(
        full, loaded.tokenizer, EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}"), tmp_path / "emulator", key, base, family
    )

    # The bundle is a plain transformers directory of reduced depth whose blocks are the mapped full blocks.
    emulator = AutoModelForCausalLM.from_pretrained(tmp_path / "emulator")
    assert depth(emulator.config) == 4 and manifest["block_map"] == [0, 1, 4, 5]
    assert manifest["adapter_blocks"] == {"emulator": [0, 3], "full": [0, 5]}
    for emulator_index, full_index in enumerate(manifest["block_map"]):
        ours = blocks(emulator)[emulator_index].state_dict()
        theirs = blocks(full)[full_index].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    examples = sentiment_examples(16)
    for method in ("lora", "full"):
        out = tmp_path / f"adapter-{method}"
        config = TrainConfig(
            method=method,
            epochs=2,
            batch_size=8,
            learning_rate=1e-2 if method == "lora" else 1e-3,
            train_blocks="top" if method == "full" else "all",
        )
        result = train_adapter(tmp_path / "emulator", examples, config, out, show_progress=False)
        assert result.steps == 4 and result.parameters > 0
        pattern = (full_key_pattern if method == "full" else lora_key_pattern)(ARCHITECTURES[family])
        trained_blocks = {int(pattern.match(k).group(1)) for k in load_file(out / "adapter_model.safetensors")}
        assert trained_blocks == ({5} if method == "full" else {0, 5})  # full trains the top block only

        checked = validate_adapter(out, full, manifest, base)
        assert checked.method == method

        plugged = plug(full, out, method)
        ids = torch.tensor([[5, 17, 33, 60, 7, 90]])
        with torch.no_grad():
            plugged_logits = plugged(input_ids=ids).logits
            base_logits = full(input_ids=ids).logits
        assert not torch.allclose(plugged_logits, base_logits), "the adapter changed nothing"

        # Training touched only the adapter blocks: plugging into the emulator reproduces the trained model.
        emulator_model, tokenizer, emulator_manifest = load_emulator(tmp_path / "emulator")
        on_emulator = plug_into_emulator(emulator_model, emulator_manifest, out)
        assert (
            evaluate(on_emulator, tokenizer, examples).loss
            < evaluate(AutoModelForCausalLM.from_pretrained(tmp_path / "emulator"), tokenizer, examples).loss
        )

        if method == "lora":
            # PEFT round trip: the adapter directory loads onto the full model by PEFT alone.
            reference = PeftModel.from_pretrained(load_model(str(tiny_model_dir(family))).model, str(out)).eval()
            with torch.no_grad():
                assert torch.allclose(reference(input_ids=ids).logits, plugged_logits, atol=1e-6)
