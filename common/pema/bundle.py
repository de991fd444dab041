"""The PEMA bundle: `pema_model.safetensors` (A, B_rct, B_pd; the gate and the length predictor when trained),
`pema_config.json` and `offsite.json`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..contract import PEMA_CONFIG_FILE, PEMA_WEIGHTS_FILE
from .adapter import PemaAdapter
from .config import PemaConfig
from .gate import CONFIDENCE_FEATURES


def save_pema(adapter: PemaAdapter, config: PemaConfig, directory: Path) -> int:
    """Writes weights and config; returns the parameter count."""
    state = {name: tensor.detach().contiguous() for name, tensor in adapter.state_dict().items()}
    save_file(state, str(directory / PEMA_WEIGHTS_FILE), metadata={"format": "pt"})
    hidden_size = adapter.A.weight.shape[1]
    (directory / PEMA_CONFIG_FILE).write_text(json.dumps({**asdict(config), "hidden_size": hidden_size}, indent=2))
    return sum(t.numel() for t in state.values())


def pema_shapes(
    hidden_size: int, rank: int, gate_width: int = 0, length_predictor: bool = False
) -> dict[str, tuple[int, ...]]:
    """Every tensor a bundle of this configuration holds, and its shape: the one list the loader and the owner's
    validation check against."""
    d = hidden_size
    shapes: dict[str, tuple[int, ...]] = {"A.weight": (rank, d), "B_rct.weight": (d, rank), "B_pd.weight": (d, rank)}
    if gate_width:
        shapes |= {
            "gate.net.0.weight": (gate_width, 2 * d + CONFIDENCE_FEATURES),
            "gate.net.0.bias": (gate_width,),
            "gate.net.2.weight": (1, gate_width),
            "gate.net.2.bias": (1,),
        }
    if length_predictor:
        shapes |= {"length.mean": (d,), "length.scale": (d,), "length.weight": (d,), "length.bias": (1,)}
    return shapes


def read_pema_config(raw: dict) -> tuple[PemaConfig, int]:
    """(config, hidden size) from a parsed pema_config.json; ValueError if it does not check out."""
    raw = dict(raw)
    hidden_size = int(raw.pop("hidden_size"))
    known = set(PemaConfig.__dataclass_fields__)
    config = PemaConfig(**{k: v for k, v in raw.items() if k in known})
    config.check()
    return config, hidden_size


def load_pema(directory: Path) -> tuple[PemaAdapter, PemaConfig]:
    config, hidden_size = read_pema_config(json.loads((directory / PEMA_CONFIG_FILE).read_text()))
    tensors = load_file(str(directory / PEMA_WEIGHTS_FILE))
    expected = pema_shapes(hidden_size, config.rank, config.gate_width, config.length_predictor)
    if set(tensors) != set(expected) or any(tuple(tensors[k].shape) != v for k, v in expected.items()):
        raise ValueError(f"{directory / PEMA_WEIGHTS_FILE}: expected tensors {expected}")
    adapter = PemaAdapter(hidden_size, config.rank, 0.0, config.alpha, config.gate_width, config.length_predictor)
    adapter.load_state_dict({k: v.float() for k, v in tensors.items()})
    return adapter.eval(), config
