"""`offsite memory build`: the external memory of (f(c), next token) pairs, from the owner or from the emulator.

- `--server`: the owner computes f(c) with the full model. The token ids of every context go to the owner.
- `--emulator`: the pulled emulator computes it on this machine, and nothing leaves it (the hybrid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..common import output_dir
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
from .local_model import load_emulator
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
    """Representations from the owner's full model; `head_dir` (a pulled head) supplies the tokenizer."""
    output_dir.check(out, output_dir.MEMORY)  # before any token id leaves
    manifest = verify_bundle(head_dir, owner_key)
    card = remote.model_card()
    if card.base_fingerprint != manifest["base_fingerprint"]:
        raise ValueError(f"{head_dir} is the head of another model than the one this owner serves")
    representer = RemoteRepresenter(remote, int(card.hidden_size))
    info = {"source": "owner", "base_fingerprint": card.base_fingerprint}
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
) -> Memory:
    output_dir.check(out, output_dir.MEMORY)  # before the emulator loads
    emulator, tokenizer, manifest = load_emulator(emulator_dir, owner_key)
    info = {"source": f"emulator {manifest['id']}", "base_fingerprint": manifest["base_fingerprint"]}
    representer = LocalRepresenter(emulator)
    return _build(representer, tokenizer, examples, out, dtype, max_length, info, show_progress, contexts)
