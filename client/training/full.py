"""Full tuning of the emulator's adapter blocks, exported as safetensors with full-model key names."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from transformers import PreTrainedModel

from ...common.adapter_format import renumber_blocks
from ...common.architectures import ArchitectureSpec, block_prefix
from ...common.contract import ADAPTER_WEIGHTS_FILE


def attach(emulator: PreTrainedModel, spec: ArchitectureSpec, blocks: list[int]) -> PreTrainedModel:
    prefixes = tuple(block_prefix(spec, i) for i in blocks)
    for name, parameter in emulator.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))
    return emulator


def export(model: PreTrainedModel, spec: ArchitectureSpec, mapping: dict[int, int], out: Path) -> int:
    prefixes = tuple(block_prefix(spec, i) for i in mapping)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}
    state = renumber_blocks(state, spec, mapping)
    save_file(state, str(out / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    return sum(v.numel() for v in state.values())
