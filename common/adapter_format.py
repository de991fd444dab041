"""Adapter bundles: PEFT LoRA directories or full-block safetensors, both keyed by full-model block indices."""

from __future__ import annotations

import re
from typing import Any

from .architectures import ArchitectureSpec

LORA = "lora"
FULL = "full"
PEMA = "pema"
METHODS = (LORA, FULL, PEMA)
EMULATOR_METHODS = (LORA, FULL)  # trained inside an emulator's adapter blocks

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
