"""An upload is judged by its safetensors header first: names, dtypes and shapes are refused before any tensor is
read (issue 16, finding 9: 300k tensors took 6 s to load before the key check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from offsite.common.contract import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MAX_ADAPTER_TENSORS
from offsite.common.manifest import write_manifest
from offsite.common.model_loading import fingerprint, load_model
from offsite.owner.adapters import validation
from offsite.owner.adapters.validation import AdapterRejected, validate_adapter


def _upload(directory: Path, tensors: dict[str, torch.Tensor], base: str) -> Path:
    directory.mkdir()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "bias": "none",
        "layers_to_transform": [0],
        "layers_pattern": "layers",
    }
    (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    write_manifest(directory, {"method": "lora", "base_fingerprint": base, "emulator": "uniform-1-2-1"})
    return directory


@pytest.fixture
def never_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> dict[str, torch.Tensor]:
        raise AssertionError(f"{path.name} was read before its header was checked")

    monkeypatch.setattr(validation, "_load_tensors", refuse)


@pytest.mark.usefixtures("never_loaded")
def test_too_many_tensors_are_refused_from_the_header(tiny_model_dir, tmp_path: Path) -> None:
    full = load_model(str(tiny_model_dir("llama"))).model
    many = {f"t{i}": torch.zeros(1) for i in range(MAX_ADAPTER_TENSORS + 1)}
    upload = _upload(tmp_path / "many", many, fingerprint(full))
    with pytest.raises(AdapterRejected, match=f"at most {MAX_ADAPTER_TENSORS}"):
        validate_adapter(upload, full, {"adapter_blocks": {"full": [0]}}, fingerprint(full))


@pytest.mark.usefixtures("never_loaded")
def test_a_wrong_shape_is_refused_before_the_tensor_is_read(tiny_model_dir, tmp_path: Path) -> None:
    full = load_model(str(tiny_model_dir("llama"))).model
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    upload = _upload(tmp_path / "big", {key: torch.zeros(4, 100_000)}, fingerprint(full))
    with pytest.raises(AdapterRejected, match="has shape"):
        validate_adapter(upload, full, {"adapter_blocks": {"full": [0]}}, fingerprint(full))
