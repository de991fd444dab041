"""CRaSh: linear CKA, adjacency-constrained clustering on a planted structure, sink tokens, and the bundle it builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYOUT
from transformers import AutoModelForCausalLM

from offsite.common.architectures import blocks, depth
from offsite.common.model_loading import fingerprint, load_model
from offsite.common.signing import load_or_create_private_key
from offsite.owner.emulator import EmulatorSpec, build_emulator
from offsite.owner.emulator.crash import (
    MEAN_POOLING,
    POOLINGS,
    cka_matrix,
    cluster_adjacent,
    linear_cka,
    pooled,
    representative,
)
from offsite.owner.emulator.statistics import counted_tokens

PLANTED = [[0, 1], [2, 3, 4], [5], [6, 7, 8, 9]]


def test_linear_cka_is_one_for_the_same_space_and_invariant_to_rotation_and_scale() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(200, 16, generator=generator)) < 0.2


def test_clustering_recovers_a_planted_run_structure() -> None:
    generator = torch.Generator().manual_seed(1)
    representations = []
    for group in PLANTED:
        base = torch.randn(300, 24, generator=generator)
        representations += [base + 0.3 * torch.randn(300, 24, generator=generator) for _ in group]
    clusters = cluster_adjacent(cka_matrix(representations), len(PLANTED))
    assert clusters == PLANTED
    assert [representative(c) for c in clusters] == [1, 3, 5, 8]  # the reference's cluster[len // 2]


def _planted_block_states(windows: int = 48, length: int = 10, width: int = 24) -> list[torch.Tensor]:
    """Per block [windows, length, width]: blocks of a planted group share a base state, the others do not."""
    generator = torch.Generator().manual_seed(2)
    states = []
    for group in PLANTED:
        base = torch.randn(windows, length, width, generator=generator)
        states += [base + 0.3 * torch.randn(windows, length, width, generator=generator) for _ in group]
    return states


@pytest.mark.parametrize("pooling", POOLINGS)
def test_cka_and_clustering_ignore_a_huge_norm_first_token(pooling: str) -> None:
    states = _planted_block_states()
    windows, length, width = states[0].shape
    ids = torch.arange(3, 3 + windows * length).view(windows, length)  # no BOS anywhere
    # A real sink: position 0 holds nearly the same state in every block, 1e4 times an ordinary token's norm.
    sink = 1e4 * (torch.randn(width) + 0.1 * torch.randn(windows, width))
    sunk = [block.clone() for block in states]
    for block in sunk:
        block[:, 0] = sink

    def similarity(blocks: list[torch.Tensor]) -> torch.Tensor:
        mask = counted_tokens(ids, blocks)
        return cka_matrix([pooled(block, mask, pooling) for block in blocks])

    with_sink = similarity(sunk)
    every_other = [block[:, 1:] for block in states]  # the same blocks without position 0 at all
    no_sink = cka_matrix([b.mean(dim=1) if pooling == MEAN_POOLING else b.flatten(0, 1) for b in every_other])
    torch.testing.assert_close(with_sink, no_sink, rtol=0, atol=1e-6)
    assert cluster_adjacent(with_sink, len(PLANTED)) == PLANTED

    # Counting the sink, as a naive pooling does, makes every pair of blocks look alike.
    naive = cka_matrix([b.mean(dim=1) if pooling == MEAN_POOLING else b.flatten(0, 1) for b in sunk])
    assert float(naive.min()) > 0.99 and float(with_sink.min()) < 0.5


def test_clustering_only_merges_neighbours() -> None:
    # Blocks 0 and 2 are identical but 1 sits between them: they may only meet through 1.
    similarity = torch.tensor([[1.0, 0.1, 0.99], [0.1, 1.0, 0.1], [0.99, 0.1, 1.0]], dtype=torch.float64)
    assert cluster_adjacent(similarity, 2) in ([[0, 1], [2]], [[0], [1, 2]])
    with pytest.raises(ValueError, match="cannot make 4 clusters of 3 blocks"):
        cluster_adjacent(similarity, 4)


@pytest.fixture()
def public_text(tmp_path: Path) -> Path:
    path = tmp_path / "public.txt"
    path.write_text("the river runs past the old mill and into the sea. " * 80)
    return path


@pytest.mark.parametrize("share", [False, True])
def test_crash_bundle_keeps_one_block_per_cluster(share: bool, tiny_model_dir, public_text: Path, tmp_path: Path):
    loaded = load_model(str(tiny_model_dir("llama")))
    key = load_or_create_private_key(tmp_path / "key.pem")
    spec = EmulatorSpec.parse(f"crash:{TINY_LAYOUT},samples=8,data={public_text},share={str(share).lower()}")
    manifest = build_emulator(
        loaded.model, loaded.tokenizer, spec, tmp_path / "emu", key, fingerprint(loaded.model), "t", show_progress=False
    )
    clusters, kept = manifest["params"]["clusters"], manifest["params"]["kept"]
    assert sorted(sum(clusters, [])) == [1, 2, 3, 4] and len(clusters) == 2  # the middle of a 6-block model, 2 kept
    assert kept == [representative(c) for c in clusters]
    middle = [k for c, k in zip(clusters, kept, strict=True) for _ in c] if share else kept
    assert manifest["block_map"] == [0, *middle, 5]
    emulator = AutoModelForCausalLM.from_pretrained(tmp_path / "emu")
    assert depth(emulator.config) == len(manifest["block_map"])
    assert manifest["adapter_blocks"] == {"emulator": [0, len(manifest["block_map"]) - 1], "full": [0, 5]}
    for emulator_index, full_index in enumerate(manifest["block_map"]):
        ours, theirs = blocks(emulator)[emulator_index].state_dict(), blocks(loaded.model)[full_index].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
