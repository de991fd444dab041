"""How the owner serves a stored adapter: plugged into the full model (plugin.py), or by proxy-tuning
(common/proxy_tuning.py), where the adapter runs on the emulator it was trained on and steers the full model's logits
by what it changes there. The delivery names are wire values (common/contract.py)."""

from __future__ import annotations

import copy
from pathlib import Path

from transformers import PreTrainedModel

from ...common.adapter_format import LORA
from ...common.contract import DELIVERIES, MANIFEST_NAME, PLUG_IN, PROXY
from ...common.emulator_loading import load_emulator, plug_into_emulator
from ...common.manifest import BundleError
from ...common.model_loading import input_device
from ...common.proxy_tuning import ProxyTuned
from ..store import AdapterRecord


class DeliveryRefused(Exception):
    """A delivery this owner cannot run for this adapter: a precondition, not a bad request."""


def requested_delivery(delivery: str, adapter_id: str) -> str:
    """The delivery a request names ('' is plug-in); ValueError for an unknown one, or a proxy with no adapter."""
    chosen = delivery or PLUG_IN
    if chosen not in DELIVERIES:
        raise ValueError(f"delivery must be one of {', '.join(DELIVERIES)} (empty: {PLUG_IN}), not {delivery!r}")
    if chosen == PROXY and not adapter_id:
        raise ValueError(f"delivery {PROXY} steers the full model by an adapter: give adapter_id")
    return chosen


def check_proxy(record: AdapterRecord, emulator_dir: Path) -> None:
    """Refuses what proxy-tuning cannot run: an adapter other than LoRA, or one whose emulator the store lacks."""
    if record.method != LORA:
        raise DeliveryRefused(
            f"delivery {PROXY} needs a {LORA} adapter; {record.id} is a {record.method} adapter "
            f"(delivery {PLUG_IN} serves it)"
        )
    if not (emulator_dir / MANIFEST_NAME).is_file():
        raise DeliveryRefused(
            f"delivery {PROXY} runs adapter {record.id} on emulator {record.emulator}, the one it was trained on, "
            "and this owner's store no longer holds it (serve --emulator rebuilds it)"
        )


def proxy_tuned(full: PreTrainedModel, emulator_dir: Path, adapter_dir: Path, owner_key: str) -> ProxyTuned:
    """The full model steered by the stored emulator with the adapter, against the same emulator without it."""
    try:
        emulator, _, manifest = load_emulator(emulator_dir, owner_key)
    except BundleError as error:
        raise DeliveryRefused(f"the stored emulator {emulator_dir.name} does not verify: {error}") from None
    emulator.to(input_device(full))  # its forwards take the same inputs as the full model's
    tuned = plug_into_emulator(copy.deepcopy(emulator), manifest, adapter_dir)  # PEFT wraps in place: a copy
    return ProxyTuned(full, tuned, emulator).eval()
