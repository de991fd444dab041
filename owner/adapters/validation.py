"""Validates an uploaded adapter before it may touch the full model.

Only safetensors and JSON are read. Keys must lie in the emulator's adapter blocks, shapes and dtypes must
match the full model, values must be finite, and the PEFT config may not ask for anything beyond LoRA on
those blocks (no modules_to_save, no importable module names).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel

from ...common.adapter_format import (
    BLOCK_INDICES_FIELD,
    EMULATOR_INDICES,
    FULL,
    FULL_MODEL_INDICES,
    LORA,
    METHODS,
    PEMA,
    block_indices,
    full_key_pattern,
    lora_key_pattern,
)
from ...common.architectures import is_conv1d, spec_for
from ...common.contract import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    FLOAT_DTYPES,
    HEAD_ARTIFACT,
    HEAD_FORMAT,
    MANIFEST_NAME,
    MAX_ADAPTER_TENSORS,
    MAX_LORA_ALPHA,
    MAX_LORA_RANK,
    MAX_PEMA_RANK,
    PEMA_CONFIG_FILE,
    PEMA_WEIGHTS_FILE,
)
from ...common.pema.bundle import pema_shapes, read_pema_config

# adapter_config.json is checked against an allowlist: a field not named here is refused, so that an option of a
# newer PEFT that widens what an adapter may do (or makes PEFT import a named module) is refused until reviewed.
_LORA_CHECKED_FIELDS = frozenset(
    {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "layers_pattern", "bias"}
)
_LORA_TEXT_FIELDS = frozenset({"task_type", "base_model_name_or_path", "revision", "peft_version"})  # descriptive
_LORA_BOOLEAN_FIELDS = frozenset({"inference_mode", "fan_in_fan_out", "init_lora_weights", "use_rslora"})
# Fields that may only hold a value that asks for nothing beyond plain LoRA.
_LORA_NEUTRAL_FIELDS: dict[str, tuple[Any, ...]] = {
    "auto_mapping": (None,),
    "exclude_modules": (None, []),
    "modules_to_save": (None, []),
    "rank_pattern": ({},),
    "alpha_pattern": ({},),
    "megatron_config": (None,),
    "megatron_core": (None, "megatron.core"),
    "trainable_token_indices": (None,),
    "loftq_config": ({}, None),
    "eva_config": (None,),
    "corda_config": (None,),
    "lora_ga_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "use_dora": (False,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False,),
    "qalora_group_size": tuple(2**i for i in range(11)),  # read only with use_qalora
    "layer_replication": (None,),
    "runtime_config": (None, {}, {"ephemeral_gpu_offload": False}),
    "lora_bias": (False,),
    "target_parameters": (None, []),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "ensure_weight_tying": (False,),
}


def _same(value: Any, allowed: Any) -> bool:
    return type(value) is type(allowed) and value == allowed  # 0 is not False, 1.0 is not 1


def _check_lora_fields(config: dict[str, Any]) -> None:
    for name, value in sorted(config.items()):
        if name in _LORA_CHECKED_FIELDS:
            continue
        if name in _LORA_TEXT_FIELDS:
            ok = value is None or isinstance(value, str)
        elif name in _LORA_BOOLEAN_FIELDS:
            ok = isinstance(value, bool)
        elif name in _LORA_NEUTRAL_FIELDS:
            ok = any(_same(value, allowed) for allowed in _LORA_NEUTRAL_FIELDS[name])
        else:
            raise AdapterRejected(f"{ADAPTER_CONFIG_FILE}: field {name!r} is not allowed")
        if not ok:
            raise AdapterRejected(f"{ADAPTER_CONFIG_FILE}: {name} is not allowed to be {value!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= MAX_LORA_ALPHA:
        raise AdapterRejected(f"{ADAPTER_CONFIG_FILE}: lora_alpha must be a number in (0, {MAX_LORA_ALPHA}]")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterRejected(f"{ADAPTER_CONFIG_FILE}: lora_dropout must be a number in [0, 1)")


def _refuse_constant(name: str) -> None:
    raise AdapterRejected(f"{name} is not a number JSON allows")


class AdapterRejected(ValueError):
    """The upload is not acceptable; the message says precisely why."""


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class ValidatedAdapter:
    method: str
    parameters: int
    checks: list[Check] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)  # no NaN/Infinity
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterRejected(f"{path.name} is not valid JSON: {error}") from None
    except AdapterRejected as error:
        raise AdapterRejected(f"{path.name}: {error}") from None
    if not isinstance(value, dict):
        raise AdapterRejected(f"{path.name} must hold a JSON object")
    return value


def _read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, from the safetensors header alone: names, dtypes and shapes are checked before a single
    tensor is read, so a file of 300k tensors or of huge ones costs nothing to refuse."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {k: handle.get_slice(k) for k in handle.keys()}
    except SafetensorError as error:
        raise AdapterRejected(f"{path.name} is not a valid safetensors file: {error}") from None
    if len(slices) > MAX_ADAPTER_TENSORS:
        raise AdapterRejected(f"{path.name} holds {len(slices)} tensors; at most {MAX_ADAPTER_TENSORS}")
    bad = sorted((k, s.get_dtype()) for k, s in slices.items() if s.get_dtype() not in FLOAT_DTYPES)
    if bad:
        key, dtype = bad[0]
        raise AdapterRejected(
            f"{path.name}: tensor {key} has dtype {dtype}; allowed: {', '.join(sorted(FLOAT_DTYPES))}"
        )
    return {k: tuple(s.get_shape()) for k, s in slices.items()}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def _check_lora(
    shapes: dict[str, tuple[int, ...]], config: dict[str, Any], full: PreTrainedModel, shaped_like: dict[int, int]
) -> list[Check]:
    """`shaped_like`: each block index the adapter may name → the full-model block whose layers it must fit."""
    blocks = set(shaped_like)
    spec = spec_for(full.config)
    pattern = lora_key_pattern(spec)
    if config.get("peft_type") != "LORA":
        raise AdapterRejected(f"{ADAPTER_CONFIG_FILE}: peft_type must be LORA, not {config.get('peft_type')!r}")
    _check_lora_fields(config)
    if config.get("bias", "none") != "none":
        raise AdapterRejected(f"{ADAPTER_CONFIG_FILE}: bias must be 'none'")
    layers = config.get("layers_to_transform")
    if not isinstance(layers, list) or not layers or not set(layers) <= blocks:
        raise AdapterRejected(
            f"{ADAPTER_CONFIG_FILE}: layers_to_transform {layers!r} must be a non-empty subset of "
            f"the adapter blocks {sorted(blocks)}"
        )
    if config.get("layers_pattern") not in (spec.layers_pattern, [spec.layers_pattern]):
        raise AdapterRejected(f"{ADAPTER_CONFIG_FILE}: layers_pattern must be {spec.layers_pattern!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
        raise AdapterRejected(f"{ADAPTER_CONFIG_FILE}: r must be an integer in 1..{MAX_LORA_RANK}, got {rank!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterRejected(f"{ADAPTER_CONFIG_FILE}: target_modules must be a list of module names")

    modules: dict[tuple[int, str], set[str]] = {}
    for key, shape in shapes.items():
        match = pattern.match(key)
        if match is None:
            raise AdapterRejected(f"{ADAPTER_WEIGHTS_FILE}: key {key} is not a LoRA weight inside a transformer block")
        index, module_path, half = int(match.group(1)), match.group(2), match.group(3)
        if index not in blocks:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS_FILE}: key {key} is in block {index}, outside the adapter blocks {sorted(blocks)}"
            )
        if module_path.rsplit(".", 1)[-1] not in targets:
            raise AdapterRejected(f"{ADAPTER_WEIGHTS_FILE}: key {key} targets a module missing from target_modules")
        try:
            target = full.get_submodule(f"{spec.blocks}.{shaped_like[index]}.{module_path}")
        except AttributeError:
            raise AdapterRejected(f"{ADAPTER_WEIGHTS_FILE}: key {key} names no module of the model") from None
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise AdapterRejected(f"{ADAPTER_WEIGHTS_FILE}: key {key} names a module that is not a linear layer")
        in_features, out_features = (
            (weight.shape[0], weight.shape[1]) if is_conv1d(target) else (weight.shape[1], weight.shape[0])
        )
        expected = (rank, in_features) if half == "A" else (out_features, rank)
        if shape != expected:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS_FILE}: tensor {key} has shape {list(shape)}, expected {list(expected)}"
            )
        modules.setdefault((index, module_path), set()).add(half)
    incomplete = sorted(f"{i}.{m}" for (i, m), halves in modules.items() if halves != {"A", "B"})
    if incomplete:
        raise AdapterRejected(
            f"{ADAPTER_WEIGHTS_FILE}: modules without both lora_A and lora_B: {', '.join(incomplete)}"
        )
    return [
        Check("lora_config", True, f"r={rank}, blocks {sorted(set(layers))}"),
        Check("keys_in_adapter_blocks", True, f"{len(modules)} LoRA modules"),
        Check("shapes", True, "every lora_A/lora_B matches its target layer"),
    ]


def _check_full(shapes: dict[str, tuple[int, ...]], full: PreTrainedModel, blocks: set[int]) -> list[Check]:
    spec = spec_for(full.config)
    pattern = full_key_pattern(spec)
    reference = full.state_dict()
    for key, shape in shapes.items():
        match = pattern.match(key)
        if match is None or key not in reference:
            raise AdapterRejected(f"{ADAPTER_WEIGHTS_FILE}: key {key} is not a parameter of a transformer block")
        if int(match.group(1)) not in blocks:
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS_FILE}: key {key} is in block {match.group(1)}, "
                f"outside the adapter blocks {sorted(blocks)}"
            )
        if shape != tuple(reference[key].shape):
            raise AdapterRejected(
                f"{ADAPTER_WEIGHTS_FILE}: tensor {key} has shape {list(shape)}, expected {list(reference[key].shape)}"
            )
    return [
        Check("keys_in_adapter_blocks", True, f"{len(shapes)} block parameters"),
        Check("shapes", True, "every tensor matches the full model"),
    ]


def _validate_pema(directory: Path, full: PreTrainedModel) -> ValidatedAdapter:
    expected_files = {PEMA_WEIGHTS_FILE, PEMA_CONFIG_FILE, MANIFEST_NAME}
    present = {p.name for p in directory.iterdir()}
    if present != expected_files:
        raise AdapterRejected(
            f"a pema adapter consists of {', '.join(sorted(expected_files))}; got {', '.join(sorted(present))}"
        )
    raw = _read_json(directory / PEMA_CONFIG_FILE)
    hidden_size = int(full.config.hidden_size)
    rank = raw.get("rank")
    if not isinstance(rank, int) or not 1 <= rank <= MAX_PEMA_RANK:
        raise AdapterRejected(f"{PEMA_CONFIG_FILE}: rank must be an integer in 1..{MAX_PEMA_RANK}")
    if raw.get("hidden_size") != hidden_size:
        raise AdapterRejected(
            f"{PEMA_CONFIG_FILE}: hidden_size {raw.get('hidden_size')!r}, the model has {hidden_size}"
        )
    try:
        config, _ = read_pema_config(raw)
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterRejected(f"{PEMA_CONFIG_FILE}: {error}") from None
    if not 0 <= config.gate_width <= MAX_PEMA_RANK:
        raise AdapterRejected(f"{PEMA_CONFIG_FILE}: gate_width must be an integer in 0..{MAX_PEMA_RANK}")
    shapes = _read_header(directory / PEMA_WEIGHTS_FILE)
    expected = pema_shapes(hidden_size, rank, config.gate_width, config.length_predictor)
    if set(shapes) != set(expected):
        raise AdapterRejected(f"{PEMA_WEIGHTS_FILE}: tensors must be exactly {', '.join(sorted(expected))}")
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise AdapterRejected(f"{PEMA_WEIGHTS_FILE}: {name} has shape {shapes[name]}, expected {shape}")
    tensors = _load_tensors(directory / PEMA_WEIGHTS_FILE)
    for name in expected:
        if not torch.isfinite(tensors[name]).all():
            raise AdapterRejected(f"{PEMA_WEIGHTS_FILE}: tensor {name} has NaN or infinite values")
    checks = [
        Check("pema_config", True, f"r={rank}, hidden {hidden_size}"),
        Check("shapes", True, f"{len(expected)} tensors match the model's hidden size"),
        Check("finite", True, "no NaN or Inf"),
    ]
    return ValidatedAdapter(PEMA, sum(t.numel() for t in tensors.values()), checks)


def _indexed_blocks(manifest: dict[str, Any], method: str, emulator_manifest: dict[str, Any]) -> dict[int, int]:
    """The block indices this adapter may name, each → the full-model block whose shapes it has."""
    indices = block_indices(manifest)
    if indices == FULL_MODEL_INDICES:
        return {b: b for b in emulator_manifest["adapter_blocks"]["full"]}
    if indices != EMULATOR_INDICES:
        raise AdapterRejected(
            f"{MANIFEST_NAME}: {BLOCK_INDICES_FIELD} must be {FULL_MODEL_INDICES!r} or {EMULATOR_INDICES!r}, "
            f"got {indices!r}"
        )
    if method != LORA:
        raise AdapterRejected(f"{MANIFEST_NAME}: only a {LORA} adapter may be indexed by the emulator's blocks")
    return dict(enumerate(emulator_manifest["block_map"]))  # emulator block i is shaped like full block block_map[i]


def validate_adapter(
    directory: Path, full: PreTrainedModel, emulator_manifest: dict[str, Any], base_fingerprint: str
) -> ValidatedAdapter:
    """Raises AdapterRejected with a precise message, or returns what was checked."""
    manifest = _read_json(directory / MANIFEST_NAME)
    method = manifest.get("method")
    if method not in METHODS:
        raise AdapterRejected(f"{MANIFEST_NAME}: method must be one of {', '.join(METHODS)}, got {method!r}")
    if manifest.get("base_fingerprint") != base_fingerprint:
        raise AdapterRejected(f"{MANIFEST_NAME}: trained for another base model (fingerprint mismatch)")
    is_head = emulator_manifest.get("format") == HEAD_FORMAT
    if (method == PEMA) != is_head:
        raise AdapterRejected(
            f"a PEMA adapter is pushed for the {HEAD_ARTIFACT!r} artifact, a {method} adapter for an emulator"
        )
    if method == PEMA:
        return _validate_pema(directory, full)
    weights = directory / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterRejected(f"the upload has no {ADAPTER_WEIGHTS_FILE}")
    expected_files = {ADAPTER_WEIGHTS_FILE, MANIFEST_NAME} | ({ADAPTER_CONFIG_FILE} if method == LORA else set())
    present = {p.name for p in directory.iterdir()}
    if present != expected_files:
        raise AdapterRejected(
            f"a {method} adapter consists of {', '.join(sorted(expected_files))}; got {', '.join(sorted(present))}"
        )

    shapes = _read_header(weights)
    if not shapes:
        raise AdapterRejected(f"{ADAPTER_WEIGHTS_FILE} holds no tensors")
    shaped_like = _indexed_blocks(manifest, method, emulator_manifest)
    if method == LORA:
        checks = _check_lora(shapes, _read_json(directory / ADAPTER_CONFIG_FILE), full, shaped_like)
    else:
        assert method == FULL
        checks = _check_full(shapes, full, set(shaped_like))
    tensors = _load_tensors(weights)  # only now: every name and shape checked out
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterRejected(f"{ADAPTER_WEIGHTS_FILE}: tensor {key} has NaN or infinite values")
    checks.append(Check("finite", True, "no NaN or Inf"))
    checks.append(
        Check(
            "safetensors_only",
            True,
            f"{len(tensors)} tensors, dtypes {sorted({str(t.dtype) for t in tensors.values()})}",
        )
    )
    return ValidatedAdapter(method, sum(t.numel() for t in tensors.values()), checks)
