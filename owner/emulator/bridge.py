"""The owner's bridge for the hybrid PEMA: fitted on public text, measured on held-out text, before it is published.

A hybrid memory is built with the emulator's final pre-norm states e, but its PEMA adapter is applied to the full
model's f; on SmolLM2 the two are far apart (median cosine 0.59), and the hybrid scores 0 BLEU. The bridge is the
affine map f ≈ W·e + b (common/bridge.py) that the owner fits and ships in the bundle.

- Rows: the positions that count in a statistic (`statistics.counted_tokens` on both final states): never the
  attention sink at position 0 (norm ~23,000 in SmolLM2 against 130–665 elsewhere, it would dominate any
  least-squares fit), a BOS token, or a massive token of either model.
- Fit: ridge least squares pulled toward the identity (no bridge at all) rather than toward zero, in closed form
  from float64 sums: Wᵀ = (Sₑₑ + λI)⁻¹(Sₑf + λI) over centred scatter matrices, b = f̄ − W·ē. λ = α·tr(Sₑₑ)/d with α
  from RIDGE_GRID, the one with the least NMSE on every RIDGE_VALIDATION_EVERY-th fit window; then the fit is redone
  on all of them.
- Text: BRIDGE_FIT_WINDOWS windows spread over the builder's public text (default the Gutenberg training novels); the
  figures come from the report card's held-out windows of the held-out novel, which no fit sees.
- Residual: R with R·Rᵀ the covariance of f − (W·e + b) over the held-out windows' counted positions, shipped with
  the bridge: hybrid PEMA trains on keys with that much noise added, so it leans less on the directions where the
  bridged emulator and the full model disagree (bench/pema_key_noise.py). It is second-order statistics of an error
  on public text, no token, state or output of the full model's.
- Figures: NMSE is the mean over positions of ‖x − f‖²/‖f‖² (each position weighs the same, not sum over sum), cosine
  the median over positions. What publishing reveals goes through the owner's own head (the PEMA head): top-1
  next-token agreement with the full model and perplexity, of head(e), head(W·e + b) and head(f).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...common.bridge import Bridge
from ...common.contract import BRIDGE_WEIGHTS_FILE
from ...common.pema.head import Head
from ...common.pema.representation import LocalRepresenter
from .public_text import GUTENBERG_HELDOUT_TEXT, GUTENBERG_TEXT, PublicTextError, load_chunks
from .report_card import REPORT_SEQ_LEN, heldout_windows
from .statistics import counted_tokens, covariance_factor

# 128 windows of 128 tokens: ~16,000 rows, 28 per input dimension of SmolLM2's 576-wide map.
BRIDGE_FIT_WINDOWS = 128
RIDGE_VALIDATION_EVERY = 8  # 1 fit window in 8 chooses the ridge
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # × the emulator states' mean variance per dimension
FORWARD_BATCH = 4  # windows per forward: three [512, vocab] logit tensors at a time while measuring
NO_TARGET = -1  # a window's last position has no next token to predict


@dataclass(frozen=True)
class PairedStates:
    """Both models' final pre-norm states at the counted positions of some windows."""

    emulator: torch.Tensor  # [rows, d]
    full: torch.Tensor  # [rows, d]
    targets: torch.Tensor  # [rows] the next token in the window, NO_TARGET at its end


@dataclass
class NormalEquations:
    """Running float64 sums of e, f, eᵀe and eᵀf: the fit never holds every row at once."""

    count: int
    sum_e: torch.Tensor
    sum_f: torch.Tensor
    ee: torch.Tensor
    ef: torch.Tensor

    @classmethod
    def zeros(cls, hidden_size: int) -> NormalEquations:
        vector = torch.zeros(hidden_size, dtype=torch.float64)
        matrix = torch.zeros(hidden_size, hidden_size, dtype=torch.float64)
        return cls(0, vector, vector.clone(), matrix, matrix.clone())

    def add(self, emulator: torch.Tensor, full: torch.Tensor) -> None:
        e, f = emulator.double(), full.double()
        self.count += len(e)
        self.sum_e += e.sum(0)
        self.sum_f += f.sum(0)
        self.ee += e.T @ e
        self.ef += e.T @ f

    def plus(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(
            self.count + other.count,
            self.sum_e + other.sum_e,
            self.sum_f + other.sum_f,
            self.ee + other.ee,
            self.ef + other.ef,
        )

    def solve(self, alpha: float) -> Bridge:
        """The ridge fit with λ = alpha·tr(Sₑₑ)/d, pulled toward W = I."""
        if self.count < 2:
            raise PublicTextError("the public text gave fewer than 2 rows to fit the bridge on")
        mean_e, mean_f = self.sum_e / self.count, self.sum_f / self.count
        see = self.ee - self.count * torch.outer(mean_e, mean_e)
        sef = self.ef - self.count * torch.outer(mean_e, mean_f)
        eye = torch.eye(len(mean_e), dtype=torch.float64)
        ridge = alpha * float(torch.trace(see)) / len(mean_e)
        weight = torch.linalg.solve(see + ridge * eye, sef + ridge * eye).T
        return Bridge(weight.float(), (mean_f - weight @ mean_e).float())


@dataclass(frozen=True)
class Match:
    cosine: float  # median over positions
    nmse: float  # mean over positions of ‖x − f‖² / ‖f‖²


def match(states: torch.Tensor, full: torch.Tensor) -> Match:
    cosine = torch.nn.functional.cosine_similarity(states.double(), full.double(), dim=-1)
    nmse = (states.double() - full.double()).pow(2).sum(-1) / full.double().pow(2).sum(-1)
    return Match(float(cosine.median()), float(nmse.mean()))


@dataclass(frozen=True)
class BridgeFit:
    bridge: Bridge
    alpha: float  # the chosen point of RIDGE_GRID
    rows: int
    validation_nmse: float  # of the chosen alpha, fitted without the validation windows


@dataclass(frozen=True)
class BridgeCard:
    """The bridge on held-out public text, at its counted positions; what the owner reads before publishing it."""

    positions: int
    text_sha256: str
    cosine_before: float  # median cosine of e against f
    cosine_after: float  # of W·e + b against f
    nmse_before: float
    nmse_after: float
    top1_emulator: float  # fraction of positions where head(e)'s top token is head(f)'s
    top1_bridged: float
    perplexity_emulator: float  # of head(e) on the text's next tokens
    perplexity_bridged: float
    perplexity_full: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PublishedBridge:
    bridge: Bridge
    facts: dict[str, Any]  # the manifest's `bridge` entry
    card: BridgeCard  # the report card's `bridge` entry


def paired_states(
    emulator: PreTrainedModel, full: PreTrainedModel, windows: torch.Tensor, bos_token_id: int | None
) -> Iterator[PairedStates]:
    """Batch by batch, both models' final pre-norm states at the counted positions of `windows` [n, seq]."""
    emulator_side, full_side = LocalRepresenter(emulator), LocalRepresenter(full)
    for start in range(0, len(windows), FORWARD_BATCH):
        batch = windows[start : start + FORWARD_BATCH]
        e = torch.stack(emulator_side.represent(batch.tolist()))
        f = torch.stack(full_side.represent(batch.tolist()))
        mask = counted_tokens(batch, [e, f], bos_token_id=bos_token_id)
        targets = torch.full_like(batch, NO_TARGET)
        targets[:, :-1] = batch[:, 1:]
        yield PairedStates(e[mask], f[mask], targets[mask])


def fit_bridge(
    emulator: PreTrainedModel, full: PreTrainedModel, windows: torch.Tensor, bos_token_id: int | None = None
) -> BridgeFit:
    """The ridge fit of f ≈ W·e + b on `windows`, its ridge chosen on every RIDGE_VALIDATION_EVERY-th of them."""
    if len(windows) < RIDGE_VALIDATION_EVERY:
        raise PublicTextError(f"the bridge needs at least {RIDGE_VALIDATION_EVERY} windows of public text")
    hidden_size = int(full.config.hidden_size)
    validating = torch.arange(len(windows)) % RIDGE_VALIDATION_EVERY == RIDGE_VALIDATION_EVERY - 1
    train = NormalEquations.zeros(hidden_size)
    for pairs in paired_states(emulator, full, windows[~validating], bos_token_id):
        train.add(pairs.emulator, pairs.full)
    held = list(paired_states(emulator, full, windows[validating], bos_token_id))
    held_e = torch.cat([pairs.emulator for pairs in held])
    held_f = torch.cat([pairs.full for pairs in held])
    scores = {alpha: match(train.solve(alpha).apply(held_e), held_f).nmse for alpha in RIDGE_GRID}
    alpha = min(scores, key=scores.__getitem__)
    validation = NormalEquations.zeros(hidden_size)
    validation.add(held_e, held_f)
    everything = train.plus(validation)
    return BridgeFit(everything.solve(alpha), alpha, everything.count, scores[alpha])


def measure_bridge(
    emulator: PreTrainedModel,
    full: PreTrainedModel,
    bridge: Bridge,
    head: Head,
    windows: torch.Tensor,
    text_sha256: str,
    bos_token_id: int | None = None,
) -> BridgeCard:
    """The match before and after the bridge, and what head(bridged state) predicts, on held-out `windows`."""
    before, after, full_rows = [], [], []
    agree = {"emulator": 0, "bridged": 0}
    loss = {"emulator": 0.0, "bridged": 0.0, "full": 0.0}
    predicted = 0
    for pairs in paired_states(emulator, full, windows, bos_token_id):
        bridged = bridge.apply(pairs.emulator)
        before.append(pairs.emulator)
        after.append(bridged)
        full_rows.append(pairs.full)
        has_target = pairs.targets != NO_TARGET
        targets = pairs.targets[has_target]
        predicted += len(targets)
        full_logits = head.logits(pairs.full[has_target])
        full_top = full_logits.argmax(-1)
        loss["full"] += float(torch.nn.functional.cross_entropy(full_logits, targets, reduction="sum"))
        for name, states in (("emulator", pairs.emulator), ("bridged", bridged)):
            logits = head.logits(states[has_target])
            agree[name] += int((logits.argmax(-1) == full_top).sum())
            loss[name] += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
    if not predicted:
        raise PublicTextError("the held-out public text has no counted position to measure the bridge on")
    f = torch.cat(full_rows)
    raw, mapped = match(torch.cat(before), f), match(torch.cat(after), f)
    return BridgeCard(
        positions=len(f),
        text_sha256=text_sha256,
        cosine_before=round(raw.cosine, 4),
        cosine_after=round(mapped.cosine, 4),
        nmse_before=round(raw.nmse, 6),
        nmse_after=round(mapped.nmse, 6),
        top1_emulator=round(agree["emulator"] / predicted, 4),
        top1_bridged=round(agree["bridged"] / predicted, 4),
        perplexity_emulator=round(math.exp(loss["emulator"] / predicted), 4),
        perplexity_bridged=round(math.exp(loss["bridged"] / predicted), 4),
        perplexity_full=round(math.exp(loss["full"] / predicted), 4),
    )


def residual_factor(
    emulator: PreTrainedModel, full: PreTrainedModel, bridge: Bridge, windows: torch.Tensor, bos_token_id: int | None
) -> torch.Tensor:
    """R [d, d], R·Rᵀ the covariance of f − (W·e + b) at the counted positions of held-out `windows`."""
    residuals = [p.full - bridge.apply(p.emulator) for p in paired_states(emulator, full, windows, bos_token_id)]
    return covariance_factor(torch.cat(residuals))


def spread_windows(windows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` windows evenly spaced over all of them, so a corpus of several books gives rows of each."""
    return windows[torch.linspace(0, len(windows) - 1, min(count, len(windows))).round().long()]


def build_bridge(
    full: PreTrainedModel, emulator: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: Path | None = None
) -> PublishedBridge:
    """Fits the bridge on `data` (default the Gutenberg training novels) and measures it on the held-out novel."""
    text = load_chunks(tokenizer, data or GUTENBERG_TEXT, REPORT_SEQ_LEN, 0.0)
    bos = tokenizer.bos_token_id
    fit = fit_bridge(emulator, full, spread_windows(text.train, BRIDGE_FIT_WINDOWS), bos)
    heldout, heldout_sha256 = heldout_windows(tokenizer, GUTENBERG_HELDOUT_TEXT)
    card = measure_bridge(emulator, full, fit.bridge, Head.from_model(full), heldout, heldout_sha256, bos)
    bridge = replace(fit.bridge, residual=residual_factor(emulator, full, fit.bridge, heldout, bos))
    facts = {
        "file": BRIDGE_WEIGHTS_FILE,
        "hidden_size": fit.bridge.hidden_size,
        "ridge_alpha": fit.alpha,
        "fit_rows": fit.rows,
        "validation_nmse": round(fit.validation_nmse, 6),
        "public_text": "gutenberg" if data is None else "data",
        "public_text_sha256": text.sha256,
        "excluded": "attention sinks (position 0), BOS and massive tokens of either model",
        "residual": "covariance factor of the residual on the held-out novel (hybrid PEMA's key noise)",
    }
    return PublishedBridge(bridge, facts, card)
