"""An emulator bundle loaded as a model, optionally with an adapter trained on it: the data owner's training and
local evaluation run it, and the owner runs it for proxy-tuning (owner/adapters/delivery.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .adapter_format import EMULATOR_INDICES, LORA, block_indices, renumber_blocks
from .architectures import spec_for
from .contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from .manifest import read_manifest, verify_bundle, verify_files


def load_emulator(
    directory: Path, owner_key: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    manifest = verify_bundle(directory, owner_key)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory), manifest


def plug_into_emulator(emulator: PreTrainedModel, emulator_manifest: dict, adapter_dir: Path) -> torch.nn.Module:
    """Applies the adapter, mapping full-model block indices back to the emulator's (an emulator-indexed one as is)."""
    adapter_manifest = read_manifest(adapter_dir)
    verify_files(adapter_dir, adapter_manifest)
    if adapter_manifest["emulator"] != emulator_manifest["id"]:
        raise ValueError(f"{adapter_dir} was trained on {adapter_manifest['emulator']}, not {emulator_manifest['id']}")
    spec = spec_for(emulator.config)
    blocks = emulator_manifest["adapter_blocks"]
    if block_indices(adapter_manifest) == EMULATOR_INDICES:
        to_emulator = {i: i for i in range(len(emulator_manifest["block_map"]))}
    else:
        to_emulator = dict(zip(blocks["full"], blocks["emulator"], strict=False))
    state = renumber_blocks(load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE)), spec, to_emulator)
    if adapter_manifest["method"] != LORA:
        emulator.load_state_dict(state, strict=False)
        return emulator.eval()
    config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    config["layers_to_transform"] = sorted(to_emulator[i] for i in config["layers_to_transform"])
    config.pop("peft_type", None)
    known = set(LoraConfig.__dataclass_fields__)
    lora = LoraConfig(**{k: v for k, v in config.items() if k in known})
    model = get_peft_model(emulator, lora)
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ValueError(f"adapter keys that fit no emulator module: {result.unexpected_keys[:3]}")
    return model.eval()
