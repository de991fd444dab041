"""Emulator builders behind one interface: each picks (or makes) the blocks that stand in for the middle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...common.architectures import depth
from . import uniform
from .bundle import materialize, write_bundle
from .layout import Layout, LayoutError

BlockSelector = Callable[[PreTrainedModel, Layout], list[int]]

BUILDERS: dict[str, BlockSelector] = {"uniform": uniform.select_blocks}


@dataclass(frozen=True)
class EmulatorSpec:
    method: str
    layout: Layout

    @classmethod
    def parse(cls, text: str) -> EmulatorSpec:
        """`METHOD:L-N-R`, e.g. `uniform:2-8-2`."""
        method, sep, layout = text.partition(":")
        if not sep:
            raise LayoutError(f"emulator {text!r} is not of the form METHOD:L-N-R, e.g. uniform:2-8-2")
        if method not in BUILDERS:
            raise LayoutError(f"unknown emulator method {method!r}; available: {', '.join(sorted(BUILDERS))}")
        return cls(method, Layout.parse(layout))

    @property
    def id(self) -> str:
        return f"{self.method}-{self.layout}"


def build_emulator(
    full: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: EmulatorSpec,
    out: Path,
    key: Ed25519PrivateKey,
    base_fingerprint: str,
    model_name: str,
) -> dict[str, Any]:
    """Builds the emulator `spec` of `full` into `out` and returns its signed manifest."""
    block_map = BUILDERS[spec.method](full, spec.layout)
    total = depth(full.config)
    emulator = materialize(full, block_map)
    body = {
        "id": spec.id,
        "method": spec.method,
        "params": {"layout": str(spec.layout)},
        "base_model": model_name,
        "base_fingerprint": base_fingerprint,
        "base_depth": total,
        "architecture": full.config.model_type,
        "block_map": block_map,
        "adapter_blocks": {
            "emulator": spec.layout.emulator_adapter_blocks(),
            "full": spec.layout.adapter_blocks(total),
        },
    }
    return write_bundle(emulator, tokenizer, out, key, body)
