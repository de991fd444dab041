"""Training-free, gradient-preserving emulator after GradOT (Yao et al., ACL 2025, arXiv 2507.04455).

GradOT's argument: the data owner only ever sees the middle through the gradients it sends to the adapter, so a good
emulator keeps those gradients close to the full model's while its own predictions get worse. It compresses the
middle blocks without training: a rank decomposition of multi-head attention and a selective pruning of MLP channels.

What this module does, in one calibration pass (forward and backward) of the uncompressed model on public text:

- Every block stays (no layer drop). Each middle linear keeps the share `fraction` of its weight parameters, by
  default N/M for the layout `l-N-r` (M middle blocks): the size the uniform drop would keep, as in lowrank.py.
- MLP: channel c of the intermediate width (a row of gate/up or fc1, a column of down or fc2) is scored by the
  first-order Taylor estimate of the loss change its removal causes, Σ_tokens |h_c · ∂L/∂h_c|, h being the input of
  the down projection and L the LM loss. That is also the size of the gradient path through the channel, which is
  what reaches the bottom adapter. The top k = round(fraction · width) channels of each middle block are kept.
- Attention (every other linear of a middle block): lowrank.py's projection onto the dominant output subspace, at
  the rank its budget allows.
- Every statistic, and the loss the gradients come from, counts only `statistics.counted_tokens`: no attention
  sink (position 0 and the few mid-text tokens with a massive state), no BOS, no padding. A sink's hidden state is
  orders of magnitude larger than the rest (SmolLM2: norm ~23,000 against 130-665) and would dominate any sum.

Deviations from the paper (whose details beyond its abstract were not available here):

- The score is first-order Taylor importance on the LM loss, not the paper's gradient-preserving compression score;
  the choice "rank for attention, channels for MLP" is fixed rather than chosen per module by that score.
- Ranks and channel counts follow the uniform parameter budget, not a dynamic per-layer rank.
- One-shot: all statistics come from the uncompressed model, not block by block.
- Storage: a Hugging Face config has one `intermediate_size` for every block and the adapter blocks keep theirs, so
  the pruned channels are zeroed in place (weights and biases, so they are not shipped) and the projected attention
  weights are stored dense. The bundle loads with plain `from_pretrained` but is not smaller on disk; the manifest
  records the effective parameter count (`middle_effective_parameters`), as lowrank.py does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ...common.architectures import UnsupportedArchitecture, blocks, depth
from .bundle import materialize
from .interface import BuildRequest, Built, positive_int
from .layout import Layout
from .lowrank import (
    CALIBRATION_SEQ_LEN,
    DEFAULT_SAMPLES,
    OutputStatistics,
    budget_rank,
    factored_parameters,
    middle_linears,
    project_layer,
    projector,
    uniform_fraction,
    unit_fraction,
    weight_out_in,
)
from .public_text import load_chunks
from .statistics import content_labels, counted_tokens

OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "fraction": unit_fraction,
    "samples": positive_int,
    "data": Path,
}
CALIBRATION_BATCH = 4
EXCLUDED_FROM_STATISTICS = "attention sinks (position 0, massive tokens), BOS and padding"

# How each family names its MLP inside a block: the projections whose output rows are the intermediate channels, and
# the one whose input columns are. Matched by name, not by model type.
MLP_NAMES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # Llama, Mistral, Qwen2
    (("fc1",), "fc2"),  # OPT
    (("mlp.c_fc",), "mlp.c_proj"),  # GPT-2 (Conv1D), GPT-Neo
    (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),  # GPT-NeoX, Bloom
)


@dataclass(frozen=True)
class Mlp:
    inputs: tuple[torch.nn.Module, ...]  # each output row is a channel
    output: torch.nn.Module  # each input column is a channel

    @property
    def channels(self) -> int:
        return int(weight_out_in(self.output).shape[1])

    def weights(self) -> int:
        return sum(weight_out_in(m).numel() for m in (*self.inputs, self.output))


def block_mlp(block: torch.nn.Module) -> Mlp:
    modules = dict(block.named_modules())
    for inputs, output in MLP_NAMES:
        if output in modules and all(name in modules for name in inputs):
            return Mlp(tuple(modules[name] for name in inputs), modules[output])
    raise UnsupportedArchitecture(f"gradot does not know the MLP of {type(block).__name__}")


def per_token(values: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """`values` as [batch, seq, width]: OPT flattens batch and time before its MLP."""
    return values.reshape(*counted.shape, values.shape[-1])


def counted_loss(logits: torch.Tensor, window: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """The next-token loss of the predictions made at counted positions."""
    labels = content_labels(window, counted)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@dataclass
class Calibration:
    channel_scores: dict[int, torch.Tensor]  # middle block index -> Taylor importance of each MLP channel
    attention: dict[str, OutputStatistics]  # attention linear -> its output statistics


def add_taylor_scores(
    scores: dict[int, torch.Tensor], activations: dict[int, torch.Tensor], loss: torch.Tensor, counted: torch.Tensor
) -> None:
    """Adds Σ_counted tokens |h_c · ∂loss/∂h_c| to every MLP channel's score."""
    order = sorted(activations)
    gradients = torch.autograd.grad(loss, [activations[index] for index in order])
    for index, gradient in zip(order, gradients, strict=True):
        taylor = per_token((activations[index].detach() * gradient).abs(), counted)[counted]
        scores[index] += taylor.sum(dim=0).double()


def calibrate(
    model: PreTrainedModel, mlps: Mapping[int, Mlp], attention: Mapping[str, torch.nn.Module], chunks: torch.Tensor
) -> Calibration:
    """One forward and backward pass per batch; the weights get no gradients, only the MLP activations do."""
    scores = {index: torch.zeros(mlp.channels, dtype=torch.float64) for index, mlp in mlps.items()}
    stats = {name: OutputStatistics(weight_out_in(m).shape[0]) for name, m in attention.items()}
    activations: dict[int, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}  # this batch's; which tokens count is known only after the forward
    hooks = [
        mlp.output.register_forward_pre_hook(lambda _m, inputs, index=index: activations.__setitem__(index, inputs[0]))
        for index, mlp in mlps.items()
    ]
    hooks += [
        module.register_forward_hook(lambda _m, _i, output, name=name: outputs.__setitem__(name, output.detach()))
        for name, module in attention.items()
    ]
    try:
        with torch.enable_grad():
            for window in chunks.split(CALIBRATION_BATCH):
                result = model(input_ids=window, output_hidden_states=True)
                counted = counted_tokens(window, result.hidden_states, bos_token_id=model.config.bos_token_id)
                for name, output in outputs.items():
                    stats[name].add(per_token(output, counted), counted)
                if activations:
                    add_taylor_scores(scores, activations, counted_loss(result.logits, window, counted), counted)
                activations.clear()
                outputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return Calibration(scores, stats)


@torch.no_grad()
def prune_channels(mlp: Mlp, keep: torch.Tensor) -> None:
    """Zeroes every channel outside `keep`: its rows (and biases) of the input projections, its output column."""
    dropped = torch.ones(mlp.channels, dtype=torch.bool)
    dropped[keep] = False
    for module in mlp.inputs:
        weight_out_in(module)[dropped] = 0.0
        if getattr(module, "bias", None) is not None:
            module.bias[dropped] = 0.0
    weight_out_in(mlp.output)[:, dropped] = 0.0


def kept_channels(channels: int, fraction: float) -> int:
    return max(1, min(channels, round(fraction * channels)))


def compress(model: PreTrainedModel, layout: Layout, chunks: torch.Tensor, fraction: float) -> dict[str, Any]:
    """Prunes the middle MLPs and projects the middle attention of `model` in place; returns what it chose."""
    stack = blocks(model)
    mlps = {index: block_mlp(stack[index]) for index in range(layout.bottom, depth(model.config) - layout.top)}
    in_mlps = {id(m) for mlp in mlps.values() for m in (*mlp.inputs, mlp.output)}
    attention = {name: m for name, m in middle_linears(model, layout).items() if id(m) not in in_mlps}
    calibration = calibrate(model, mlps, attention, chunks)

    dense = effective = 0
    channels: dict[str, int] = {}
    for index, mlp in mlps.items():
        keep = kept_channels(mlp.channels, fraction)
        prune_channels(mlp, torch.topk(calibration.channel_scores[index], keep).indices)
        channels[str(index)] = keep
        dense += mlp.weights()
        effective += mlp.weights() // mlp.channels * keep  # every MLP weight has the channels along one side
    ranks: dict[str, int] = {}
    for name, module in attention.items():
        out_features, in_features = weight_out_in(module).shape
        rank = budget_rank(out_features, in_features, fraction)
        project_layer(module, projector(*calibration.attention[name].mean_and_covariance(), rank))
        ranks[name] = rank
        dense += out_features * in_features
        effective += factored_parameters(out_features, in_features, rank)
    return {
        "mlp_channels": channels,
        "attention_ranks": ranks,
        "middle_dense_parameters": dense,
        "middle_effective_parameters": effective,
    }


def build(request: BuildRequest) -> Built:
    layout, total = request.layout, depth(request.full.config)
    layout.check(total)
    samples = request.options.get("samples", DEFAULT_SAMPLES)
    text = load_chunks(request.tokenizer, request.options.get("data"), CALIBRATION_SEQ_LEN, 0.0, max_chunks=samples)
    block_map = list(range(total))  # every block stays; the middle ones lose channels and rank instead
    emulator = materialize(request.full, block_map)
    fraction = request.options.get("fraction", uniform_fraction(layout, total))
    summary = compress(emulator, layout, text.train, fraction)
    params = {
        "fraction": fraction,
        "calibration_windows": len(text.train),
        "public_text_sha256": text.sha256,
        "statistics_exclude": EXCLUDED_FROM_STATISTICS,
        **summary,
    }
    return Built(emulator, block_map, params)
