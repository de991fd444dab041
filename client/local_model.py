"""The pulled emulator on the data owner's machine, optionally with a trained adapter plugged in."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from ..common.bridge import Bridge, bundle_bridge


def load_bridge(directory: Path, manifest: dict, emulator: PreTrainedModel) -> Bridge | None:
    """The bridge a bundle verified by `load_emulator` ships (checked against the emulator's width), or None."""
    return bundle_bridge(directory, manifest, int(emulator.config.hidden_size))
