"""bench/transport.py --smoke: a daemon per chunk size, pulls and pushes timed against disk reads (issue 14, item 5);
and `serve --pull-chunk-kib` is what the owner sends per chunk."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from offsite.client.pull import pull_emulator
from offsite.owner.config import ConfigError, resolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import transport  # noqa: E402


def test_smoke_measures_pull_push_and_disk_per_chunk_size() -> None:
    result = transport.main(["--smoke"])
    assert [row["chunk_kib"] for row in result["chunks"]] == [64, 1024]
    for row in result["chunks"]:
        for kind in ("pull", "push", "disk_read_sha256"):
            assert len(row[kind]["repeats_mb_per_s"]) == 2 and row[kind]["mb_per_s"] > 0
        assert row["pull_over_disk"] == pytest.approx(
            row["pull"]["mb_per_s"] / row["disk_read_sha256"]["mb_per_s"], abs=1e-3
        )
        assert row["pull"]["bytes"] == result["emulator_bytes"]
    assert result["target"]["measured"] == result["chunks"][1]["pull_over_disk"]


def test_pull_chunk_size_is_checked_against_what_clients_accept(tmp_path: Path) -> None:
    assert resolve({"store": str(tmp_path), "pull_chunk_kib": 64}, None).values["pull_chunk_kib"] == 64
    with pytest.raises(ConfigError, match="pull-chunk-kib: 8192 KiB is outside"):
        resolve({"store": str(tmp_path), "pull_chunk_kib": 8192}, None)


def test_the_owner_sends_chunks_of_its_configured_size(owner, tmp_path: Path) -> None:
    owner.service.chunk_bytes = 4096
    with owner.remote() as remote:
        card = remote.model_card()
        offer = card.emulators[0]
        largest = max(offer.files, key=lambda name: (owner.service.emulators[offer.id].directory / name).stat().st_size)
        sizes = [len(chunk.data) for chunk in remote.pull(offer.id, largest, 0)]
        pulled = pull_emulator(remote, tmp_path / "emulator", show_progress=False)
    assert card.chunk_bytes == 4096
    assert len(sizes) > 1 and max(sizes) == 4096 and all(size <= 4096 for size in sizes)
    assert pulled["bytes"] == offer.bytes  # every hash still verifies, chunk by chunk
