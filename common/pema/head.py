"""The LM head with the model's true final norm: what turns a final-layer representation into next-token logits.

It travels as `head.safetensors` (norm weight, norm bias if any, head weight) and `head.json` (norm kind and eps), so
the data owner can train PEMA's prediction loss without the model. The reference code saved the wrong norm for OPT;
here the norm is whatever module the architecture table names as the model's final norm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from ..architectures import get_module, spec_for

HEAD_WEIGHTS_FILE = "head.safetensors"
HEAD_CONFIG_FILE = "head.json"
RMS = "rms"
LAYER = "layer"


@dataclass
class Head:
    kind: str  # RMS or LAYER
    eps: float
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor | None
    weight: torch.Tensor  # [vocab, hidden]

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> Head:
        spec = spec_for(model.config)
        norm = get_module(model, spec.final_norm)
        head = get_module(model, spec.lm_head)
        if isinstance(norm, torch.nn.LayerNorm):
            kind, eps, bias = LAYER, float(norm.eps), norm.bias.detach().clone() if norm.bias is not None else None
        else:
            eps_attribute = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
            if eps_attribute is None:
                raise ValueError(f"final norm {type(norm).__name__} is neither LayerNorm nor an RMS norm")
            kind, eps, bias = RMS, float(eps_attribute), None
        return cls(kind, eps, norm.weight.detach().clone().float(), bias, head.weight.detach().clone().float())

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        if self.kind == LAYER:
            return torch.nn.functional.layer_norm(
                hidden, (hidden.shape[-1],), self.norm_weight, self.norm_bias, self.eps
            )
        scaled = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return scaled * self.norm_weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.normalize(hidden) @ self.weight.T

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"norm.weight": self.norm_weight.contiguous(), "lm_head.weight": self.weight.contiguous()}
        if self.norm_bias is not None:
            tensors["norm.bias"] = self.norm_bias.contiguous()
        save_file(tensors, str(directory / HEAD_WEIGHTS_FILE))
        config = {
            "norm": self.kind,
            "eps": self.eps,
            "hidden_size": self.weight.shape[1],
            "vocab": self.weight.shape[0],
        }
        (directory / HEAD_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Head:
        config = json.loads((directory / HEAD_CONFIG_FILE).read_text())
        if config.get("norm") not in (RMS, LAYER):
            raise ValueError(f"{directory / HEAD_CONFIG_FILE}: norm must be {RMS!r} or {LAYER!r}")
        tensors = load_file(str(directory / HEAD_WEIGHTS_FILE))
        return cls(
            config["norm"],
            float(config["eps"]),
            tensors["norm.weight"],
            tensors.get("norm.bias"),
            tensors["lm_head.weight"],
        )
