"""The PEMA bundle: `pema_model.safetensors` (A, B_rct, B_pd), `pema_config.json` and `offsite.json`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..contract import PEMA_CONFIG_FILE, PEMA_WEIGHTS_FILE
from .adapter import PemaAdapter
from .config import PemaConfig

TENSOR_NAMES = ("A.weight", "B_rct.weight", "B_pd.weight")


def save_pema(adapter: PemaAdapter, config: PemaConfig, directory: Path) -> int:
    """Writes weights and config; returns the parameter count."""
    state = {name: tensor.detach().contiguous() for name, tensor in adapter.state_dict().items()}
    save_file(state, str(directory / PEMA_WEIGHTS_FILE), metadata={"format": "pt"})
    hidden_size = adapter.A.weight.shape[1]
    (directory / PEMA_CONFIG_FILE).write_text(json.dumps({**asdict(config), "hidden_size": hidden_size}, indent=2))
    return sum(t.numel() for t in state.values())


def pema_shapes(hidden_size: int, rank: int) -> dict[str, tuple[int, int]]:
    return {"A.weight": (rank, hidden_size), "B_rct.weight": (hidden_size, rank), "B_pd.weight": (hidden_size, rank)}


def load_pema(directory: Path) -> tuple[PemaAdapter, PemaConfig]:
    raw = json.loads((directory / PEMA_CONFIG_FILE).read_text())
    hidden_size = int(raw.pop("hidden_size"))
    known = set(PemaConfig.__dataclass_fields__)
    config = PemaConfig(**{k: v for k, v in raw.items() if k in known})
    config.check()
    tensors = load_file(str(directory / PEMA_WEIGHTS_FILE))
    expected = pema_shapes(hidden_size, config.rank)
    if set(tensors) != set(expected) or any(tuple(tensors[k].shape) != v for k, v in expected.items()):
        raise ValueError(f"{directory / PEMA_WEIGHTS_FILE}: expected tensors {expected}")
    adapter = PemaAdapter(hidden_size, config.rank, dropout=0.0)
    adapter.load_state_dict({k: v.float() for k, v in tensors.items()})
    return adapter.eval(), config
