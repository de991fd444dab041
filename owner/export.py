"""Merges a stored adapter into the full model and writes a plain Hugging Face model directory.

The directory loads with `AutoModelForCausalLM.from_pretrained(DIR)` alone, so lm-eval, vLLM or any other Hugging
Face tool can score or serve the adapted model. Beside the weights, `offsite_export.json` (signed with the owner's
key) records which adapter, tenant and base model it was made from.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from peft import PeftModel
from transformers import PreTrainedModel

from ..common import output_dir
from ..common.adapter_format import PEMA
from ..common.contract import ADAPTER_WEIGHTS_FILE
from ..common.manifest import describe_files, read_manifest, sha256_file
from ..common.model_loading import fingerprint, load_model
from ..common.signing import public_key_hex, sign
from .adapters.plugin import EmulatorOnlyAdapter, plug
from .store import AdapterRecord, Store

EXPORT_MANIFEST = "offsite_export.json"
EXPORT_FORMAT = "offsite.export/1"


class ExportRefused(ValueError):
    """The adapter cannot be exported: unknown, held by several tenants, PEMA, or made for another base model."""


def _export_files(directory: Path) -> set[str] | None:
    """The names an earlier export accounts for, so that a new export may replace it; None: not an export."""
    try:
        manifest = json.loads((directory / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        return None
    if not isinstance(manifest.get("files"), dict):
        return None
    return {EXPORT_MANIFEST, *manifest["files"]}


EXPORTED_MODEL = output_dir.BundleKind("exported model", _export_files)


def find_adapter(store: Store, adapter_id: str, tenant: str | None = None) -> AdapterRecord:
    """The registry record of `adapter_id`; `tenant` is needed only when several tenants pushed the same bytes."""
    names = [tenant] if tenant else [record.name for record in store.list_tenants()]
    held = [record for record in (store.get_adapter(name, adapter_id) for name in names) if record is not None]
    if not held:
        whose = f"tenant {tenant!r}" if tenant else "any tenant"
        raise ExportRefused(
            f"no adapter {adapter_id!r} of {whose} in the store {store.root}; give the full id that `offsite push` "
            "printed (`offsite adapters list` shows a tenant's ids)"
        )
    if len(held) > 1:
        raise ExportRefused(
            f"adapter {adapter_id} is held by tenants {', '.join(r.tenant for r in held)}; pass --tenant to say "
            "whose export this is"
        )
    record = held[0]
    if record.method == PEMA:
        raise ExportRefused(
            f"adapter {adapter_id} is a PEMA adapter: it mixes its own next-token distribution with the model's at "
            "generation time and has no weights to merge. Only LoRA and full-block adapters can be exported."
        )
    return record


def merged_model(full: PreTrainedModel, adapter_dir: Path, method: str) -> PreTrainedModel:
    """The full model with the adapter folded into its weights; `full` itself is left untouched."""
    try:
        plugged = plug(full, adapter_dir, method)  # the plug-in Evaluate and Generate use, so the export matches them
    except EmulatorOnlyAdapter as error:
        raise ExportRefused(
            f"{error}: it fits the emulator only, so there is no full model to merge it into (the owner serves it "
            "by proxy-tuning)"
        ) from None
    if isinstance(plugged, PeftModel):
        return cast(PreTrainedModel, plugged.merge_and_unload())
    return cast(PreTrainedModel, plugged)


def add_legacy_rope_keys(config_file: Path) -> None:
    """Repeats transformers 5's `rope_parameters` as the 4.x keys `rope_theta` and `rope_scaling`.

    Tools pinned to transformers 4.x (vLLM releases, older lm-eval installs) read only the old keys and would
    otherwise fall back to θ = 10,000 silently (SmolLM2 uses 100,000), so the export would serve another model.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return  # no rotary embedding (GPT-2, OPT, Bloom) or already in the old form
    config.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
        config.setdefault("rope_scaling", {**scaling, "type": scaling["rope_type"]})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_adapter(store: Store, adapter_id: str, out: Path, model: str, tenant: str | None = None) -> dict[str, Any]:
    """Writes the merged model to `out` and returns its provenance manifest (what `offsite_export.json` holds).

    `model` is the MODEL the daemon serves. `out` must be absent, empty, or an earlier export holding only its own
    files; anything else is refused before the model loads, and nothing of the user's is ever deleted.
    """
    output_dir.check(out, EXPORTED_MODEL)  # cheap refusals first: loading the model takes a while
    record = find_adapter(store, adapter_id, tenant)
    adapter_dir = store.verified_adapter_dir(adapter_id)  # refuses files changed on disk since the push
    adapter_manifest = read_manifest(adapter_dir)
    loaded = load_model(model, cache_dir=store.models_dir)
    base_fingerprint = fingerprint(loaded.model)
    if adapter_manifest.get("base_fingerprint") != base_fingerprint:
        raise ExportRefused(
            f"adapter {adapter_id} was trained for another base model than {model} (fingerprint mismatch); pass "
            "the --model the daemon serves"
        )
    merged = merged_model(loaded.model, adapter_dir, record.method)
    with output_dir.staged(out, EXPORTED_MODEL) as work:
        work.mkdir()
        merged.save_pretrained(work)  # safetensors, config.json and generation_config.json where the model has one
        add_legacy_rope_keys(work / "config.json")
        loaded.tokenizer.save_pretrained(work)
        manifest = _write_provenance(work, record, adapter_dir, loaded.name, base_fingerprint, store)
    return manifest


def _write_provenance(
    work: Path, record: AdapterRecord, adapter_dir: Path, base_model: str, base_fingerprint: str, store: Store
) -> dict[str, Any]:
    key = store.signing_key()
    body: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "adapter_id": record.id,
        "tenant": record.tenant,
        "method": record.method,
        "emulator": record.emulator,
        "adapter_sha256": sha256_file(adapter_dir / ADAPTER_WEIGHTS_FILE),
        "adapter_files": {path.name: sha256_file(path) for path in sorted(adapter_dir.iterdir())},
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": describe_files(work),
        "signed_by": public_key_hex(key),
    }
    manifest = dict(body, signature=sign(key, body))
    (work / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest
