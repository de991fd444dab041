"""The one place that knows where each supported Hugging Face family keeps its parts.

Every other module asks this table instead of branching on `model_type`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ArchitectureSpec:
    """Dotted attribute paths inside a `*ForCausalLM` model."""

    blocks: str  # the nn.ModuleList of transformer blocks
    final_norm: str
    lm_head: str
    embeddings: tuple[str, ...]  # token embeddings first, then positional / embedding norms

    @property
    def layers_pattern(self) -> str:
        """The name PEFT's `layers_to_transform` matches just before a block index."""
        return self.blocks.rsplit(".", 1)[-1]


_LLAMA_LIKE = ArchitectureSpec("model.layers", "model.norm", "lm_head", ("model.embed_tokens",))

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt2": ArchitectureSpec("transformer.h", "transformer.ln_f", "lm_head", ("transformer.wte", "transformer.wpe")),
    "opt": ArchitectureSpec(
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        "lm_head",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    ),
    "gpt_neox": ArchitectureSpec("gpt_neox.layers", "gpt_neox.final_layer_norm", "embed_out", ("gpt_neox.embed_in",)),
    "gpt_neo": ArchitectureSpec("transformer.h", "transformer.ln_f", "lm_head", ("transformer.wte", "transformer.wpe")),
    "bloom": ArchitectureSpec(
        "transformer.h",
        "transformer.ln_f",
        "lm_head",
        ("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
    ),
}

# Config fields that hold one entry per block and must follow the kept blocks.
_PER_BLOCK_CONFIG_FIELDS = ("layer_types", "attention_layers")


class UnsupportedArchitecture(ValueError):
    """The model's family is not in the architecture table."""


def spec_for(config: PretrainedConfig) -> ArchitectureSpec:
    try:
        return ARCHITECTURES[config.model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"model type {config.model_type!r} is not supported; supported: {supported}"
        ) from None


def depth(config: PretrainedConfig) -> int:
    # Every supported config maps num_hidden_layers onto its own field (n_layer, num_layers, ...).
    return int(config.num_hidden_layers)


def get_module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return model.get_submodule(dotted)


def blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    found = get_module(model, spec_for(model.config).blocks)
    assert isinstance(found, torch.nn.ModuleList)
    return found


def reduced_config(config: PretrainedConfig, kept_blocks: list[int]) -> PretrainedConfig:
    """The config of a model made of `kept_blocks` of `config`'s model, in that order."""
    reduced = copy.deepcopy(config)
    for field in _PER_BLOCK_CONFIG_FIELDS:
        values = getattr(reduced, field, None)
        if isinstance(values, list) and len(values) == depth(config):
            setattr(reduced, field, [values[i] for i in kept_blocks])
    if hasattr(reduced, "attention_types"):
        # GPT-Neo re-expands attention_types into attention_layers and checks it against the depth.
        reduced.attention_types = [[[kind], 1] for kind in reduced.attention_layers]
    reduced.num_hidden_layers = len(kept_blocks)
    if getattr(reduced, "quantization_config", None) is not None:
        del reduced.quantization_config
    return reduced


def block_prefix(spec: ArchitectureSpec, index: int) -> str:
    return f"{spec.blocks}.{index}."


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's Conv1D is a linear layer that stores its weight as [in, out]."""
    return isinstance(module, Conv1D)


def linear_layer_names(model: PreTrainedModel) -> list[str]:
    """Leaf names of every linear layer inside the blocks (what LoRA targets), e.g. q_proj, c_attn."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in blocks(model).named_modules()
        if isinstance(module, torch.nn.Linear) or is_conv1d(module)
    }
    return sorted(names)
