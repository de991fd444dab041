"""The bridge: an affine map f ≈ W·e + b from an emulator's final pre-norm states e to the full model's f.

The owner fits it on public text (owner/emulator/bridge.py) and ships it inside the emulator bundle as
`bridge.safetensors` (`weight` [d, d], `bias` [d]), listed, hashed and signed in `offsite.json` like every other
file, whose `bridge` entry names the file and the hidden size. A hybrid memory built on the data owner's machine
passes every emulator state through it, so the PEMA adapter trains on keys near the full model's f(x), the states it
is applied to at generation time. A bridge may also ship `residual` [d, d]: a factor R of the covariance R·Rᵀ of what
it leaves (f − W·e − b) on held-out public text, with which hybrid PEMA trains on noisy keys (common/pema/training.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .contract import BRIDGE_WEIGHTS_FILE
from .manifest import BundleError
from .pema.representation import Representer

WEIGHT, BIAS, RESIDUAL = "weight", "bias", "residual"


@dataclass(frozen=True)
class Bridge:
    weight: torch.Tensor  # [d, d], nn.Linear's layout: output i is weight[i] · e
    bias: torch.Tensor  # [d]
    residual: torch.Tensor | None = None  # [d, d] R, R·Rᵀ = the covariance of f − (W·e + b) on held-out text

    @property
    def hidden_size(self) -> int:
        return int(self.bias.shape[0])

    def apply(self, states: torch.Tensor) -> torch.Tensor:
        """W·e + b for every state of `states` [..., d]."""
        return torch.nn.functional.linear(states.float(), self.weight, self.bias)

    def save(self, path: Path) -> None:
        tensors = {WEIGHT: self.weight.float().contiguous(), BIAS: self.bias.float().contiguous()}
        if self.residual is not None:
            tensors[RESIDUAL] = self.residual.float().contiguous()
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: Path, hidden_size: int) -> Bridge:
        """Reads and checks a bridge for states of `hidden_size`; anything else is a BundleError naming the file."""
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise BundleError(f"{path}: not a readable safetensors file ({error})") from None
        if not {WEIGHT, BIAS} <= set(tensors) <= {WEIGHT, BIAS, RESIDUAL}:
            raise BundleError(
                f"{path}: holds {sorted(tensors)}, expected {WEIGHT!r} and {BIAS!r} (and optionally {RESIDUAL!r})"
            )
        square = [hidden_size, hidden_size]
        for name, shape in ((WEIGHT, square), (BIAS, [hidden_size]), (RESIDUAL, square)):
            tensor = tensors.get(name)
            if tensor is None:
                continue
            if list(tensor.shape) != shape:
                raise BundleError(
                    f"{path}: {name} has shape {list(tensor.shape)}, but the emulator's hidden size "
                    f"{hidden_size} needs {shape}"
                )
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise BundleError(f"{path}: {name} must hold finite floating-point values")
        residual = tensors.get(RESIDUAL)
        return cls(tensors[WEIGHT].float(), tensors[BIAS].float(), None if residual is None else residual.float())


def bundle_bridge(directory: Path, manifest: dict[str, Any], hidden_size: int) -> Bridge | None:
    """The bridge a verified emulator bundle ships, or None where its manifest names none."""
    facts = manifest.get("bridge")
    if facts is None:
        return None
    if not isinstance(facts, dict) or facts.get("file") != BRIDGE_WEIGHTS_FILE:
        raise BundleError(f"{directory}: the manifest's bridge entry does not name {BRIDGE_WEIGHTS_FILE}")
    if facts.get("hidden_size") != hidden_size:
        raise BundleError(
            f"{directory}: the bridge is for hidden size {facts.get('hidden_size')}, the emulator's is {hidden_size}"
        )
    return Bridge.load(directory / BRIDGE_WEIGHTS_FILE, hidden_size)


class BridgedRepresenter:
    """A Representer whose states go through the bridge; its greedy next tokens stay the emulator's own."""

    def __init__(self, inner: Representer, bridge: Bridge):
        if bridge.hidden_size != inner.hidden_size:
            raise ValueError(f"a bridge of hidden size {bridge.hidden_size} for states of {inner.hidden_size}")
        self.inner, self.bridge = inner, bridge
        self.hidden_size = inner.hidden_size

    def represent(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        return [self.bridge.apply(states) for states in self.inner.represent(sequences)]

    def next_tokens(self, sequences: Sequence[Sequence[int]]) -> list[int]:
        return self.inner.next_tokens(sequences)
