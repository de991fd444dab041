"""`offsite memory build`: the external memory of (f(c), next token) pairs, from the owner or from the emulator.

- `--server`: the owner computes f(c) with the full model. The token ids of every context go to the owner.
- `--emulator`: the pulled emulator computes it on this machine, and nothing leaves it (the hybrid). Where the bundle
  ships the owner's bridge, every state goes through it (unless `bridge=False`), so the keys resemble the full
  model's f(c), which the adapter meets at generation time; memory.json records `bridge`: whether it did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..common import output_dir
from ..common.bridge import BridgedRepresenter
from ..common.emulator_loading import load_emulator
from ..common.examples import Example
from ..common.manifest import verify_bundle
from ..common.pema.memory import Memory
from ..common.pema.representation import (
    OWN_GENERATION,
    TEACHER_FORCING,
    LocalRepresenter,
    Representer,
    build_memory,
    own_generation,
    teacher_forcing,
)
from .connection import Remote
from .local_model import load_bridge
from .pull import model_card
from .representations import RemoteRepresenter


def _build(
    representer: Representer,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    out: Path,
    dtype: str,
    max_length: int,
    info: dict[str, Any],
    show_progress: bool,
    contexts_kind: str,
) -> Memory:
    contexts = teacher_forcing(tokenizer, examples, max_length)
    if not contexts:
        raise ValueError("no example has a completion to remember")
    if contexts_kind == OWN_GENERATION:
        with tqdm(total=len(contexts), desc="generating contexts", unit="ex", disable=not show_progress) as bar:
            contexts = own_generation(representer, contexts, progress=bar.update)
    elif contexts_kind != TEACHER_FORCING:
        raise ValueError(f"contexts must be {TEACHER_FORCING} or {OWN_GENERATION}, not {contexts_kind!r}")
    info = {**info, "contexts": contexts_kind, "examples": len(contexts)}
    with (
        output_dir.staged(out, output_dir.MEMORY) as work,
        tqdm(total=len(contexts), desc="building memory", unit="ex", disable=not show_progress) as bar,
    ):
        return build_memory(representer, contexts, work, dtype, info, progress=bar.update)


def _emulator_representer(
    emulator: PreTrainedModel, directory: Path, manifest: dict[str, Any], bridge: bool
) -> Representer:
    """The emulator's f(c), through the bundle's bridge where it ships one and `bridge` asks for it."""
    local = LocalRepresenter(emulator)
    owner_bridge = load_bridge(directory, manifest, emulator) if bridge else None
    return local if owner_bridge is None else BridgedRepresenter(local, owner_bridge)


def hybrid_representer(emulator_dir: Path, owner_key: str | None = None, bridge: bool = True) -> Representer:
    """What a hybrid memory is built with: the verified emulator bundle's states, bridged where it ships a bridge."""
    emulator, _, manifest = load_emulator(emulator_dir, owner_key)
    return _emulator_representer(emulator, emulator_dir, manifest, bridge)


def build_memory_remote(
    remote: Remote,
    head_dir: Path,
    examples: list[Example],
    out: Path,
    dtype: str = "float16",
    max_length: int = 256,
    owner_key: str | None = None,
    show_progress: bool = True,
    contexts: str = TEACHER_FORCING,
) -> Memory:
    """Representations from the owner's full model; `head_dir` (a pulled head) supplies the tokenizer. Before any
    token id leaves, the owner must present the pinned key (where one is given) and the head must be signed by the
    key it presents: the ids go to the owner whose head the memory will be trained for, and to no other."""
    output_dir.check(out, output_dir.MEMORY)
    card = model_card(remote, owner_key)
    manifest = verify_bundle(head_dir, card.owner_public_key)
    if card.base_fingerprint != manifest["base_fingerprint"]:
        raise ValueError(f"{head_dir} is the head of another model than the one this owner serves")
    representer = RemoteRepresenter(remote, int(card.hidden_size))
    info = {"source": "owner", "base_fingerprint": card.base_fingerprint, "owner_public_key": card.owner_public_key}
    tokenizer = AutoTokenizer.from_pretrained(head_dir)
    return _build(representer, tokenizer, examples, out, dtype, max_length, info, show_progress, contexts)


def build_memory_local(
    emulator_dir: Path,
    examples: list[Example],
    out: Path,
    dtype: str = "float16",
    max_length: int = 256,
    owner_key: str | None = None,
    show_progress: bool = True,
    contexts: str = TEACHER_FORCING,
    bridge: bool = True,
) -> Memory:
    output_dir.check(out, output_dir.MEMORY)  # before the emulator loads
    emulator, tokenizer, manifest = load_emulator(emulator_dir, owner_key)
    representer = _emulator_representer(emulator, emulator_dir, manifest, bridge)
    info = {
        "source": f"emulator {manifest['id']}",
        "base_fingerprint": manifest["base_fingerprint"],
        "bridge": isinstance(representer, BridgedRepresenter),
    }
    return _build(representer, tokenizer, examples, out, dtype, max_length, info, show_progress, contexts)
