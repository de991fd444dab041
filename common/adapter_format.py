"""Adapter bundles: PEFT LoRA directories or full-block safetensors, keyed by full-model block indices; or LoRA on
every block of an emulator, keyed by the emulator's own indices (its manifest says `block_indices: emulator`)."""

from __future__ import annotations

import re
from typing import Any

from .architectures import ArchitectureSpec

LORA = "lora"
FULL = "full"
PEMA = "pema"
METHODS = (LORA, FULL, PEMA)
EMULATOR_METHODS = (LORA, FULL)  # trained inside an emulator's adapter blocks

# Whose block indices an adapter's keys use. An adapter on the emulator's adapter blocks is renumbered to the full
# model's and plugs in; one on every emulator block (the compressed middle too) fits the emulator only, so the owner
# serves it by proxy-tuning (owner/adapters/delivery.py).
FULL_MODEL_INDICES = "full"
EMULATOR_INDICES = "emulator"
BLOCK_INDICES_FIELD = "block_indices"


def block_indices(adapter_manifest: dict[str, Any]) -> str:
    """The adapter's block indexing; manifests written before emulator-indexed adapters existed are full-model."""
    return adapter_manifest.get(BLOCK_INDICES_FIELD, FULL_MODEL_INDICES)


# PEFT prefixes the wrapped model's own key names with this when it saves an adapter.
PEFT_PREFIX = "base_model.model."


def lora_key_pattern(spec: ArchitectureSpec) -> re.Pattern[str]:
    """`base_model.model.<blocks>.<i>.<module>.lora_<A|B>.weight` → (i, module, A|B)."""
    return re.compile(rf"^{re.escape(PEFT_PREFIX + spec.blocks)}\.(\d+)\.([\w.]+)\.lora_(A|B)\.weight$")


def full_key_pattern(spec: ArchitectureSpec) -> re.Pattern[str]:
    """`<blocks>.<i>.<parameter>` → (i, parameter)."""
    return re.compile(rf"^{re.escape(spec.blocks)}\.(\d+)\.([\w.]+)$")


def renumber_blocks(state: dict[str, Any], spec: ArchitectureSpec, mapping: dict[int, int]) -> dict[str, Any]:
    """Renames `<blocks>.<i>.` to `<blocks>.<mapping[i]>.` in every key (emulator → full-model indices)."""
    pattern = re.compile(rf"(^|\.){re.escape(spec.blocks)}\.(\d+)\.")

    def rename(key: str) -> str:
        match = pattern.search(key)
        if match is None:
            raise ValueError(f"{key} is not inside a transformer block")
        index = int(match.group(2))
        if index not in mapping:
            raise ValueError(f"{key} is in block {index}, which is not an adapter block")
        return key[: match.start(2)] + str(mapping[index]) + key[match.end(2) :]

    return {rename(k): v for k, v in state.items()}


def adapter_manifest_body(method: str, emulator_manifest: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": method,
        "emulator": emulator_manifest["id"],
        "emulator_signature": emulator_manifest.get("signature", ""),
        "base_fingerprint": emulator_manifest["base_fingerprint"],
        "architecture": emulator_manifest["architecture"],
        "adapter_blocks": emulator_manifest["adapter_blocks"]["full"],
        **extra,
    }
