"""Plugs a validated adapter into a copy of the full model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PreTrainedModel

from ...common.adapter_format import EMULATOR_INDICES, LORA, block_indices
from ...common.contract import ADAPTER_WEIGHTS_FILE, MANIFEST_NAME
from ...common.manifest import read_manifest


class EmulatorOnlyAdapter(ValueError):
    """Its keys name the emulator's blocks: applied to the full model's blocks of those numbers they would mean
    nothing, so it is served by proxy-tuning instead (owner/adapters/delivery.py)."""


def plug(full: PreTrainedModel, adapter_dir: Path, method: str) -> torch.nn.Module:
    """The full model with the adapter applied; `full` itself is left untouched."""
    manifest = adapter_dir / MANIFEST_NAME  # a plain PEFT directory has none, and is full-model indexed
    if manifest.is_file() and block_indices(read_manifest(adapter_dir)) == EMULATOR_INDICES:
        raise EmulatorOnlyAdapter(f"adapter {adapter_dir.name} was trained on every emulator block")
    model = copy.deepcopy(full)
    if method == LORA:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"adapter keys not in the model: {result.unexpected_keys[:3]}")
    return model.eval()
