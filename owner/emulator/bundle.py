"""Turns a block map into a smaller model and writes it as a signed, transformers-loadable bundle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ...common.architectures import block_prefix, reduced_config, spec_for
from ...common.bridge import Bridge
from ...common.contract import BRIDGE_WEIGHTS_FILE, EMULATOR_FORMAT
from ...common.manifest import write_manifest


def materialize(full: PreTrainedModel, block_map: list[int]) -> PreTrainedModel:
    """A fresh model whose block i is a copy of `full`'s block block_map[i]; embeddings, norm, head shared by copy."""
    spec = spec_for(full.config)
    emulator = AutoModelForCausalLM.from_config(reduced_config(full.config, block_map), dtype=torch.float32)
    prefix = spec.blocks + "."
    source = full.state_dict()
    state = {k: v.clone() for k, v in source.items() if not k.startswith(prefix)}
    for new_index, old_index in enumerate(block_map):
        old = block_prefix(spec, old_index)
        for key, value in source.items():
            if key.startswith(old):
                state[block_prefix(spec, new_index) + key[len(old) :]] = value.clone()
    emulator.load_state_dict(state, strict=True)
    emulator.tie_weights()
    return emulator.eval()


def parameter_count(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def write_bundle(
    emulator: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    key: Ed25519PrivateKey,
    manifest_body: dict[str, Any],
    bridge: Bridge | None = None,
) -> dict[str, Any]:
    """Writes config, weights, tokenizer, the bridge if any and the signed offsite.json, which lists and hashes every
    one of them; the directory appears whole or not at all."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    emulator.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if bridge is not None:
        bridge.save(partial / BRIDGE_WEIGHTS_FILE)
    body = dict(manifest_body, format=EMULATOR_FORMAT, parameters=parameter_count(emulator))
    manifest = write_manifest(partial, body, key)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return manifest
