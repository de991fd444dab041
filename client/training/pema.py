"""`offsite train --method pema`: both PEMA phases on a memory, written as a PEMA bundle for the head artifact."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from ...common.adapter_format import PEMA
from ...common.bridge import bundle_bridge
from ...common.contract import HEAD_ARTIFACT
from ...common.manifest import verify_bundle, write_manifest
from ...common.pema.bundle import save_pema
from ...common.pema.config import HYBRID_KEY_NOISE, PemaConfig
from ...common.pema.head import HEAD_CONFIG_FILE, Head
from ...common.pema.memory import Memory
from ...common.pema.training import train_pema


def load_head(directory: Path, owner_key: str | None = None) -> tuple[Head, dict[str, Any]]:
    """A pulled head artifact, or an emulator bundle (its final norm and head are the full model's own)."""
    manifest = verify_bundle(directory, owner_key)
    if (directory / HEAD_CONFIG_FILE).is_file():
        return Head.load(directory), manifest
    return Head.from_model(AutoModelForCausalLM.from_pretrained(directory)), manifest


def hybrid_key_noise(memory: Memory, head_dir: Path, manifest: dict[str, Any], scale: float) -> torch.Tensor | None:
    """The training noise factor of a memory built through the owner's bridge: `scale` × the residual factor the
    bridge ships. None for any other memory, or where `head_dir` (the emulator bundle) ships no residual."""
    if scale < 0:
        raise ValueError(f"key noise must be >= 0, got {scale}")
    if not memory.info.get("bridge") or scale == 0:
        return None
    bridge = bundle_bridge(head_dir, manifest, memory.hidden_size)
    return None if bridge is None or bridge.residual is None else bridge.residual * scale


def train_pema_bundle(
    memory_dir: Path,
    head_dir: Path,
    config: PemaConfig,
    out: Path,
    owner_key: str | None = None,
    show_progress: bool = True,
    key_noise: float = HYBRID_KEY_NOISE,
) -> dict[str, Any]:
    memory = Memory.open(memory_dir)
    head, head_manifest = load_head(head_dir, owner_key)
    if memory.info.get("base_fingerprint") != head_manifest["base_fingerprint"]:
        raise ValueError(f"{memory_dir} was built for another base model than {head_dir}")
    noise = hybrid_key_noise(memory, head_dir, head_manifest, key_noise)
    applied = key_noise if noise is not None else 0.0
    adapter, report = train_pema(memory, head, config, show_progress, key_noise=noise)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    parameters = save_pema(adapter, config, partial)
    body = {
        "method": PEMA,
        "emulator": HEAD_ARTIFACT,
        "base_fingerprint": head_manifest["base_fingerprint"],
        "architecture": head_manifest.get("architecture", ""),
        "training": {
            **asdict(config),
            # no row or example count: the pushed manifest would tell the owner how much data there was
            "memory_source": memory.info.get("source"),
            "memory_bridge": bool(memory.info.get("bridge")),  # generation reading the emulator bridges it alike
            "key_noise": applied,
            "phase1_epochs": report.phase1.epochs,
            "phase2_epochs": report.phase2.epochs,
        },
    }
    write_manifest(partial, body)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return {
        "adapter_dir": str(out),
        "method": PEMA,
        "parameters": parameters,
        "memory_rows": len(memory),
        "key_noise": applied,
        "phase1_validation_mse": min(report.phase1.validation_loss),
        "phase2_validation_loss": min(report.phase2.validation_loss),
        "validation_ce": report.phase2_validation_ce,
        "model_validation_ce": report.model_validation_ce,
        "validation_examples": report.validation_examples,
        "gate_validation_nll": min(report.gate.validation_loss) if report.gate else None,
        "length_mae_tokens": report.length_mae_tokens,
        "seconds": report.seconds,
    }
