"""`device_map`: the owner hands placement of the full model to accelerate; on the CPU it changes no result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offsite.common.model_loading import input_device, load_model, placement
from offsite.common.scoring import logits_at


def test_a_device_map_loads_through_accelerate_and_scores_as_the_plain_load(tiny_model_dir) -> None:
    directory = str(tiny_model_dir("llama"))
    plain, placed = load_model(directory), load_model(directory, device_map="auto")
    # accelerate chose the one device there is; a map over several devices would set hf_device_map
    assert placement(placed.model) == placement(plain.model) == "cpu"
    assert input_device(placed.model) == torch.device("cpu")
    ids = torch.tensor([[1, 5, 9, 13, 2], [1, 7, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 4, 2])
    with torch.no_grad():
        expected = logits_at(plain.model, ids, mask, rows, cols)
        assert torch.equal(logits_at(placed.model, ids, mask, rows, cols), expected)


def test_a_gguf_with_a_device_map_needs_the_conversion_cache(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="cache directory"):
        load_model(str(gguf), device_map="auto")
