"""Uniform layer selection, layouts, signed manifests and tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offsite.common.manifest import BundleError, verify_bundle, write_manifest
from offsite.common.signing import load_or_create_private_key, public_key_hex
from offsite.owner.emulator import EmulatorSpec
from offsite.owner.emulator.layout import Layout, LayoutError
from offsite.owner.emulator.uniform import spaced_indices


def test_spaced_indices_follow_the_formula() -> None:
    # SmolLM2 (30 blocks) at 2-8-2: 26 middle blocks, keep round(i*25/7).
    assert spaced_indices(26, 8) == [0, 4, 7, 11, 14, 18, 21, 25]
    assert spaced_indices(6, 3) == [0, 3, 5]  # 2.5 rounds up
    assert spaced_indices(5, 5) == [0, 1, 2, 3, 4]
    assert spaced_indices(7, 1) == [3]


def test_layout_blocks() -> None:
    layout = Layout.parse("2-8-2")
    assert layout.adapter_blocks(30) == [0, 1, 28, 29]


@pytest.mark.parametrize(
    "text, message",
    [
        ("2-8", "not of the form"),
        ("a-b-c", "not of the form"),
        ("0-2-0", "no adapter blocks"),
        ("3-2-3", "no middle blocks"),
        ("1-5-1", "N must be between"),
    ],
)
def test_bad_layouts_are_explained(text: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        Layout.parse(text).check(6)


def test_emulator_spec_parsing() -> None:
    assert EmulatorSpec.parse("uniform:2-8-2").id == "uniform-2-8-2"
    with pytest.raises(LayoutError, match="unknown emulator method"):
        EmulatorSpec.parse("magic:2-8-2")


def _bundle(tmp_path: Path) -> tuple[Path, str]:
    key = load_or_create_private_key(tmp_path / "key.pem")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.safetensors").write_bytes(b"weights" * 100)
    (bundle / "config.json").write_text("{}")
    write_manifest(bundle, {"id": "x"}, key)
    return bundle, public_key_hex(key)


def test_verified_bundle_passes(tmp_path: Path) -> None:
    bundle, key = _bundle(tmp_path)
    assert verify_bundle(bundle, key)["id"] == "x"


def test_flipped_byte_names_the_file(tmp_path: Path) -> None:
    bundle, key = _bundle(tmp_path)
    data = bytearray((bundle / "model.safetensors").read_bytes())
    data[10] ^= 0xFF
    (bundle / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.safetensors: sha256 does not match"):
        verify_bundle(bundle, key)


def test_altered_manifest_breaks_the_signature(tmp_path: Path) -> None:
    bundle, key = _bundle(tmp_path)
    manifest = json.loads((bundle / "offsite.json").read_text())
    manifest["id"] = "y"
    (bundle / "offsite.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(bundle, key)


def test_other_signer_is_refused(tmp_path: Path) -> None:
    bundle, _ = _bundle(tmp_path)
    other = public_key_hex(load_or_create_private_key(tmp_path / "other.pem"))
    with pytest.raises(BundleError, match="pinned owner key"):
        verify_bundle(bundle, other)


def test_unlisted_file_is_refused(tmp_path: Path) -> None:
    bundle, key = _bundle(tmp_path)
    (bundle / "modeling_evil.py").write_text("import os")
    with pytest.raises(BundleError, match="modeling_evil.py: not listed"):
        verify_bundle(bundle, key)


def test_train_block_subsets() -> None:
    from offsite.client.training import chosen_blocks

    manifest = {"base_depth": 30, "adapter_blocks": {"emulator": [0, 1, 10, 11], "full": [0, 1, 28, 29]}}
    assert chosen_blocks(manifest, "all") == {0: 0, 1: 1, 10: 28, 11: 29}
    assert chosen_blocks(manifest, "top") == {10: 28, 11: 29}
    assert chosen_blocks(manifest, "bottom") == {0: 0, 1: 1}
    with pytest.raises(ValueError, match="must be one of"):
        chosen_blocks(manifest, "middle")
