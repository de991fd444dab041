"""Emulator builders behind one interface (`interface.Builder`): one module per method, one bundle format."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...common import processes
from ...common.architectures import depth
from ...common.signing import canonical_json
from . import crash, distill, gradot, lowrank, uniform
from .bridge import build_bridge
from .bundle import write_bundle
from .interface import Builder, BuildRequest, parse_bool, parse_options
from .layout import Layout, LayoutError
from .report_card import measure

BUILDERS: dict[str, Builder] = {
    "uniform": uniform,
    "distill": distill,
    "crash": crash,
    "lowrank": lowrank,
    "gradot": gradot,
}
# Options of every method, beside each builder's own: `bridge=1` fits and ships the hybrid's bridge (bridge.py).
SHARED_OPTIONS: Mapping[str, Callable[[str], Any]] = {"bridge": parse_bool}


@dataclass(frozen=True)
class EmulatorSpec:
    method: str
    layout: Layout
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> EmulatorSpec:
        """`METHOD:L-N-R[,key=value...]`, e.g. `uniform:2-8-2`, `distill:2-8-2,steps=100`, `lowrank:2-8-2,bridge=1`."""
        method, sep, rest = text.partition(":")
        if not sep:
            raise LayoutError(f"emulator {text!r} is not of the form METHOD:L-N-R, e.g. uniform:2-8-2")
        if method not in BUILDERS:
            raise LayoutError(f"unknown emulator method {method!r}; available: {', '.join(sorted(BUILDERS))}")
        layout, *pairs = rest.split(",")
        options: dict[str, str] = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise LayoutError(f"emulator option {pair!r} is not of the form key=value")
            options[key.strip()] = value.strip()
        spec = cls(method, Layout.parse(layout), tuple(sorted(options.items())))
        spec.parsed_options()  # fail now, not after loading the model
        return spec

    def parsed_options(self) -> dict[str, Any]:
        return parse_options(self.method, {**BUILDERS[self.method].OPTIONS, **SHARED_OPTIONS}, dict(self.options))

    @property
    def id(self) -> str:
        base = f"{self.method}-{self.layout}"
        if not self.options:
            return base
        return f"{base}-{hashlib.sha256(canonical_json(dict(self.options))).hexdigest()[:8]}"


def build_emulator(
    full: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: EmulatorSpec,
    out: Path,
    key: Ed25519PrivateKey,
    base_fingerprint: str,
    model_name: str,
    show_progress: bool = True,
) -> dict[str, Any] | None:
    """Builds the emulator `spec` of `full` into `out` and returns its signed manifest.

    Under `accelerate launch` every process trains (distill is data-parallel) and rank 0 alone measures, signs and
    writes the bundle; the other ranks return None.

    Long builds keep resumable state in `out`'s sibling `<name>.work`, removed once the bundle is written. With the
    option `bridge=1` the bundle also ships `bridge.safetensors`, its facts under the manifest's `bridge` and its
    figures under the report card's.
    """
    total = depth(full.config)
    spec.layout.check(total)
    work_dir = out.with_name(out.name + ".work")
    request = BuildRequest(full, tokenizer, spec.layout, spec.parsed_options(), work_dir, show_progress)
    built = BUILDERS[spec.method].build(request)
    if not processes.is_main_process():
        return None
    adapters = built.adapters if built.adapters is not None else spec.layout.adapter_blocks(total)
    card = measure(full, built.model, tokenizer, request.options.get("data"))
    bridge = None
    if request.options.get("bridge"):
        bridge = build_bridge(full, built.model, tokenizer, request.options.get("data"))
        card = replace(card, bridge=bridge.card)
    body = {
        "id": spec.id,
        "method": spec.method,
        "params": {"layout": str(spec.layout), **built.params},
        "base_model": model_name,
        "base_fingerprint": base_fingerprint,
        "base_depth": total,
        "architecture": full.config.model_type,
        "block_map": built.block_map,
        "adapter_blocks": {
            "emulator": [position for position, block in enumerate(built.block_map) if block in adapters],
            "full": adapters,
        },
        "report_card": card.as_dict(),
    }
    if bridge is not None:
        body["bridge"] = bridge.facts
    manifest = write_bundle(built.model, tokenizer, out, key, body, bridge.bridge if bridge else None)
    shutil.rmtree(work_dir, ignore_errors=True)
    return manifest
