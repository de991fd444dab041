"""`offsite-owner export`: a stored adapter merged into the full model, loadable by plain transformers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_LAYOUT, sentiment_examples
from transformers import AutoModelForCausalLM, AutoTokenizer

from offsite.client.training import train_adapter
from offsite.client.training.config import TrainConfig
from offsite.common.adapter_format import FULL, LORA, PEMA
from offsite.common.manifest import sha256_file
from offsite.common.model_loading import LoadedModel, fingerprint, load_model
from offsite.common.signing import public_key_hex, signature_is_valid
from offsite.owner.adapters.plugin import plug
from offsite.owner.emulator import EmulatorSpec
from offsite.owner.export import EXPORT_MANIFEST, ExportRefused, add_legacy_rope_keys, export_adapter, find_adapter
from offsite.owner.service import OwnerService
from offsite.owner.store import Store, new_record

EMULATOR = f"uniform-{TINY_LAYOUT}"
PROMPTS = ["Review: great film 3\nSentiment:", "the cat sits on the mat", "a dull, boring film"]
TOLERANCE = 1e-4


@dataclass
class StoredAdapters:
    store_dir: Path
    model_dir: Path
    loaded: LoadedModel
    ids: dict[str, str]  # method -> adapter id


@pytest.fixture(scope="module")
def stored(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> StoredAdapters:
    """A store where tenant alice pushed one LoRA and one full-block adapter, trained on the tiny Llama's emulator."""
    root = tmp_path_factory.mktemp("export")
    model_dir = tiny_model_dir("llama")
    store = Store(root / "store")
    store.add_tenant("alice")
    service = OwnerService(load_model(str(model_dir)), store, [EmulatorSpec.parse(f"uniform:{TINY_LAYOUT}")])
    ids = {}
    for method, learning_rate in ((LORA, 1e-2), (FULL, 1e-3)):
        adapter = root / method
        train_adapter(
            service.emulators[EMULATOR].directory,
            sentiment_examples(16),
            TrainConfig(method=method, epochs=1, learning_rate=learning_rate, train_blocks="all"),
            adapter,
            show_progress=False,
        )
        paths = sorted(adapter.iterdir())
        declared = [(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]
        chunks = iter([(p.name, 0, p.read_bytes()) for p in paths])
        ids[method] = service.push_adapter("alice", EMULATOR, declared, chunks).adapter_id
    store.close()
    return StoredAdapters(root / "store", model_dir, service.loaded, ids)


def export_cli(stored: StoredAdapters, adapter_id: str, out: Path) -> tuple[int, dict, str]:
    """Runs `offsite-owner export ... --json`; returns exit code, the JSON result, and stderr."""
    args = ["--adapter-id", adapter_id, "--out", str(out), "--store", str(stored.store_dir)]
    completed = subprocess.run(
        [sys.executable, "-m", "offsite.owner", "export", *args, "--model", str(stored.model_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = completed.stdout.strip().splitlines()
    return completed.returncode, json.loads(lines[-1]) if lines else {}, completed.stderr


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_export_matches_plug_in(stored: StoredAdapters, method: str, out: Path) -> None:
    exported = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, nothing of offsite
    tokenizer = AutoTokenizer.from_pretrained(out)
    store = Store(stored.store_dir)
    plugged = plug(stored.loaded.model, store.verified_adapter_dir(stored.ids[method]), method)
    store.close()
    assert exported.dtype == torch.float32
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        assert ids.tolist() == [stored.loaded.tokenizer(prompt)["input_ids"]]
        expected = logits(plugged, ids)
        assert (expected - logits(stored.loaded.model, ids)).abs().max() > 1e-3  # the adapter changed the model
        torch.testing.assert_close(logits(exported, ids), expected, atol=TOLERANCE, rtol=0)


def test_cli_exports_a_lora_adapter_that_plain_transformers_loads_with_the_plug_in_logits(
    stored: StoredAdapters, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    adapter_id = stored.ids[LORA]
    code, result, stderr = export_cli(stored, adapter_id, out)
    assert code == 0, stderr
    assert result["ok"] and result["adapter_id"] == adapter_id and result["tenant"] == "alice"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(result["files"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*result["files"], EXPORT_MANIFEST])
    assert not any(name.startswith("adapter_") for name in result["files"])  # merged, not a PEFT directory
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # what transformers 4.x consumers read
    assert_export_matches_plug_in(stored, LORA, out)

    provenance = json.loads((out / EXPORT_MANIFEST).read_text())
    store = Store(stored.store_dir)
    adapter_dir = store.verified_adapter_dir(adapter_id)
    assert provenance["adapter_sha256"] == sha256_file(adapter_dir / "adapter_model.safetensors")
    assert provenance["base_fingerprint"] == fingerprint(stored.loaded.model) == result["base_fingerprint"]
    assert provenance["signed_by"] == public_key_hex(store.signing_key())
    body = {k: v for k, v in provenance.items() if k != "signature"}
    assert signature_is_valid(provenance["signed_by"], body, provenance["signature"])
    assert all(sha256_file(out / name) == entry["sha256"] for name, entry in provenance["files"].items())
    store.close()


def test_a_full_block_adapter_exports_with_the_plug_in_logits_and_replaces_an_earlier_export(
    stored: StoredAdapters, tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    store = Store(stored.store_dir)
    export_adapter(store, stored.ids[LORA], out, str(stored.model_dir))
    manifest = export_adapter(store, stored.ids[FULL], out, str(stored.model_dir))  # an export may replace an export
    store.close()
    assert manifest["method"] == FULL and manifest["adapter_id"] == stored.ids[FULL]
    assert not out.with_name("merged.partial").exists()
    assert_export_matches_plug_in(stored, FULL, out)


def test_a_non_empty_out_it_did_not_create_is_refused_and_kept(stored: StoredAdapters, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, result, _ = export_cli(stored, stored.ids[LORA], out)
    assert code == 2 and not result["ok"]
    assert "is not empty" in result["error"] and str(out) in result["error"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert not out.with_name("mine.partial").exists()


def test_an_unknown_adapter_id_is_a_clear_error(stored: StoredAdapters, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    code, result, _ = export_cli(stored, "0" * 64, out)
    assert code == 2 and f"no adapter {'0' * 64!r} of any tenant" in result["error"]
    assert not out.exists() and not out.with_name("merged.partial").exists()
    store = Store(stored.store_dir)
    with pytest.raises(ExportRefused, match="of tenant 'bob'"):
        find_adapter(store, stored.ids[LORA], tenant="bob")  # alice's adapter is not bob's
    store.close()


def test_a_pema_adapter_and_an_ambiguous_id_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    for tenant in ("alice", "bob"):
        store.add_tenant(tenant)
    for tenant, adapter_id, method in (("alice", "p" * 64, PEMA), ("alice", "s" * 64, LORA), ("bob", "s" * 64, LORA)):
        with store.staging() as staged:
            (staged / "weights").write_bytes(b"registry only")
            store.commit_adapter(tenant, staged, new_record(tenant, adapter_id, method, EMULATOR, 13, 1))
    with pytest.raises(ExportRefused, match="PEMA adapter"):
        find_adapter(store, "p" * 64)
    with pytest.raises(ExportRefused, match="held by tenants alice, bob; pass --tenant"):
        find_adapter(store, "s" * 64)
    assert find_adapter(store, "s" * 64, tenant="bob").tenant == "bob"
    store.close()


def test_an_adapter_is_refused_for_another_base_model(stored: StoredAdapters, tiny_model_dir, tmp_path: Path) -> None:
    store = Store(stored.store_dir)
    with pytest.raises(ExportRefused, match="another base model"):
        export_adapter(store, stored.ids[LORA], tmp_path / "merged", str(tiny_model_dir("mistral")))
    store.close()
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_legacy_rope_keys_carry_theta_and_scaling_and_leave_ropeless_configs_alone(tmp_path: Path) -> None:
    scaled = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}, "model_type": "llama"}
    ropeless = {"model_type": "gpt2", "n_positions": 1024}
    for name, config in (("scaled", scaled), ("ropeless", ropeless)):
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        add_legacy_rope_keys(tmp_path / f"{name}.json")
    written = json.loads((tmp_path / "scaled.json").read_text())
    assert written["rope_theta"] == 500000.0
    assert written["rope_scaling"] == {"rope_type": "llama3", "type": "llama3", "factor": 8.0}
    assert written["rope_parameters"] == scaled["rope_parameters"]  # transformers 5 reads these unchanged
    assert json.loads((tmp_path / "ropeless.json").read_text()) == ropeless
