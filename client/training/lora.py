"""LoRA inside the emulator's adapter blocks, exported as a PEFT directory with full-model block indices."""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedModel

from ...common.adapter_format import renumber_blocks
from ...common.architectures import ArchitectureSpec, linear_layer_names
from ...common.contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from .config import TrainConfig


def attach(emulator: PreTrainedModel, spec: ArchitectureSpec, blocks: list[int], config: TrainConfig) -> PeftModel:
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=linear_layer_names(emulator),
        layers_to_transform=blocks,
        layers_pattern=spec.layers_pattern,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(emulator, lora)


def export(model: PeftModel, spec: ArchitectureSpec, mapping: dict[int, int], base_name: str, out: Path) -> int:
    """Writes adapter_config.json + adapter_model.safetensors for the full model; returns the parameter count."""
    state = renumber_blocks(
        {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}, spec, mapping
    )
    save_file(state, str(out / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.peft_config["default"].to_dict()
    config["layers_to_transform"] = sorted(mapping.values())
    config["base_model_name_or_path"] = base_name
    config["target_modules"] = sorted(config["target_modules"])
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
    return sum(v.numel() for v in state.values())
