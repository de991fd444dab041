"""PEMA generation on the data owner's side: each step asks `Represent` for f(x); the pulled head gives P_LM from
it, and the adapter stays here. It runs the same token loop as the owner (common/generation), so the same adapter,
prompt and sampling settings give the same text on either side.

A hybrid adapter (trained on a memory the pulled emulator built here) can read, at generation too, the emulator's
states it learned on (`emulator_dir`), through the bridge where its memory went through it, while P_LM stays the
owner's full model's: its keys do not shift from the emulator's states to the full model's."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..common.emulator_loading import load_emulator
from ..common.examples import encode
from ..common.generation.loop import Piece, stream
from ..common.generation.sampling import SamplingConfig
from ..common.generation.steppers import LocalStepper, ReadingStepper, Stepper, StepResult
from ..common.manifest import read_manifest
from ..common.pema.bundle import load_pema
from ..common.pema.config import GATE, PemaConfig
from ..common.pema.head import Head
from ..common.pema.policy import pema_policy
from .connection import Remote
from .local_model import load_bridge
from .representations import RemoteRepresenter
from .training.pema import load_head


class RemoteStepper:
    """The owner keeps no cache between calls: each step sends every running row's whole sequence."""

    def __init__(self, representer: RemoteRepresenter, head: Head):
        self.representer, self.head = representer, head
        self.sequences: list[list[int]] = []

    def start(self, prompts: Sequence[Sequence[int]]) -> StepResult:
        self.sequences = [list(p) for p in prompts]
        return self._ask(range(len(prompts)))

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> StepResult:
        for row, token in zip(rows, tokens, strict=True):
            self.sequences[row].append(token)
        return self._ask(rows)

    def _ask(self, rows: Sequence[int]) -> StepResult:
        # The owner's head, pulled and verified, gives P_LM from f(x): no log-probs need cross the wire.
        states = self.representer.last([self.sequences[row] for row in rows])
        return states, torch.log_softmax(self.head.logits(states).float(), dim=-1)


def emulator_reader(
    remote_stepper: Stepper, adapter_dir: Path, config: PemaConfig, emulator_dir: Path, owner_key: str | None
) -> ReadingStepper:
    """The remote stepper's P_LM with the states of the emulator the adapter's memory was built with."""
    if config.schedule == GATE:
        raise ValueError(
            "the gate weighs P_LM as its memory's states gave it, not the full model's: read the emulator with the "
            "constant or gradual schedule"
        )
    emulator, _, manifest = load_emulator(emulator_dir, owner_key)
    training = read_manifest(adapter_dir).get("training", {})
    if training.get("memory_source") != f"emulator {manifest['id']}":
        raise ValueError(
            f"{adapter_dir} was trained on a memory from {training.get('memory_source') or 'an unknown source'}, "
            f"not from emulator {manifest['id']}: it reads the states it learned on, so pass that emulator or none"
        )
    # Adapters trained before `memory_bridge` was recorded took the bridge wherever the bundle shipped one.
    bridge = load_bridge(emulator_dir, manifest, emulator) if training.get("memory_bridge", True) else None
    return ReadingStepper(remote_stepper, LocalStepper(emulator), None if bridge is None else bridge.apply)


def generate_remote_pema(
    remote: Remote,
    adapter_dir: Path,
    head_dir: Path,
    prompt: str,
    sampling: SamplingConfig,
    planned_length: int | None = None,
    owner_key: str | None = None,
    emulator_dir: Path | None = None,
) -> Iterator[Piece]:
    """One piece per step, with the adapter's λ schedule; GU over `planned_length` (default: the adapter's own
    prediction from the prompt, else max_new_tokens). `emulator_dir`: a hybrid adapter reads that emulator's states."""
    sampling.check()
    adapter, config = load_pema(adapter_dir)
    head, _ = load_head(head_dir, owner_key)
    tokenizer = AutoTokenizer.from_pretrained(head_dir)
    stepper: Stepper = RemoteStepper(RemoteRepresenter(remote, adapter.A.weight.shape[1]), head)
    if emulator_dir is not None:
        stepper = emulator_reader(stepper, adapter_dir, config, emulator_dir, owner_key)
    policy = pema_policy(adapter, head, config, sampling.max_new_tokens, [planned_length] if planned_length else None)
    prompt_ids = encode(tokenizer, prompt, special=True)
    return stream(stepper, prompt_ids, policy, sampling, tokenizer.eos_token_id, tokenizer)
