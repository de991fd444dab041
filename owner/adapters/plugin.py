"""Plugs a validated adapter into a copy of the full model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PreTrainedModel

from ...common.adapter_format import LORA
from ...common.contract import ADAPTER_WEIGHTS_FILE


def plug(full: PreTrainedModel, adapter_dir: Path, method: str) -> torch.nn.Module:
    """The full model with the adapter applied; `full` itself is left untouched."""
    model = copy.deepcopy(full)
    if method == LORA:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"adapter keys not in the model: {result.unexpected_keys[:3]}")
    return model.eval()
