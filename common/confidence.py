"""Uncertainty of accuracies and corpus scores: bootstrap CIs over examples and seeds, and paired tests.

A cell's outcome is a 0/1 vector over the same test examples; a row holds one vector per seed (a matrix
seeds × examples). Resampling draws seeds and examples with replacement, so the interval covers both the test-set
noise and the training noise. Two rows are compared on the same resampled examples (paired).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high}


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _draws(seeds: int, examples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, seeds, size=(BOOTSTRAP_SAMPLES, seeds)), rng.integers(
        0, examples, size=(BOOTSTRAP_SAMPLES, examples)
    )


def _resampled_means(matrix: np.ndarray, seed_draws: np.ndarray, example_draws: np.ndarray) -> np.ndarray:
    # per draw: mean over the drawn seeds of each seed's accuracy on the drawn examples
    per_seed = matrix[:, example_draws].mean(axis=2).T  # draws × seeds
    return np.take_along_axis(per_seed, seed_draws, axis=1).mean(axis=1)


def estimate(matrix: np.ndarray) -> Estimate:
    """Mean accuracy of a seeds × examples 0/1 matrix and its bootstrap CI."""
    matrix = np.atleast_2d(np.asarray(matrix, dtype=float))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    samples = _resampled_means(matrix, *_draws(*matrix.shape, rng))
    return Estimate(float(matrix.mean()), *_interval(samples))


@dataclass(frozen=True)
class Comparison:
    difference: Estimate  # a − b
    p_value: float  # two-sided paired bootstrap: how often the resampled difference crosses zero

    def as_dict(self) -> dict[str, float]:
        return {**{f"difference_{k}": v for k, v in self.difference.as_dict().items()}, "p_value": self.p_value}


def _seed_draws(a: np.ndarray, b: np.ndarray, same_seeds: bool, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Seed resamples of two rows: shared when row k of both is the same trained adapter (`same_seeds`)."""
    seeds_a = rng.integers(0, a.shape[0], size=(BOOTSTRAP_SAMPLES, a.shape[0]))
    if same_seeds:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"rows paired by seed have {a.shape[0]} and {b.shape[0]} seeds")
        return seeds_a, seeds_a
    return seeds_a, rng.integers(0, b.shape[0], size=(BOOTSTRAP_SAMPLES, b.shape[0]))


def compare(a: np.ndarray, b: np.ndarray, same_seeds: bool = False) -> Comparison:
    """Paired comparison of two rows on the same examples.

    Each row's seeds are resampled on their own, unless `same_seeds` says row k of both comes from one training
    (emulator + adapter and plug-in of the same adapter), when they are resampled together.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows scored on different examples: {a.shape[1]} against {b.shape[1]}")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    example_draws = rng.integers(0, a.shape[1], size=(BOOTSTRAP_SAMPLES, a.shape[1]))
    seeds_a, seeds_b = _seed_draws(a, b, same_seeds, rng)
    samples = _resampled_means(a, seeds_a, example_draws) - _resampled_means(b, seeds_b, example_draws)
    observed = float(a.mean() - b.mean())
    crossing = min((samples <= 0).mean(), (samples >= 0).mean())
    return Comparison(Estimate(observed, *_interval(samples)), float(min(1.0, 2 * crossing)))


def suite_estimate(matrices: list[np.ndarray], weights: list[float] | None = None) -> Estimate:
    """The mean over tasks of each task's accuracy; tasks are resampled independently of one another."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    weights = weights or [1.0] * len(matrices)
    total, samples = 0.0, np.zeros(BOOTSTRAP_SAMPLES)
    for matrix, weight in zip(matrices, weights, strict=True):
        matrix = np.atleast_2d(np.asarray(matrix, dtype=float))
        total += weight * matrix.mean()
        samples += weight * _resampled_means(matrix, *_draws(*matrix.shape, rng))
    norm = sum(weights)
    return Estimate(total / norm, *_interval(samples / norm))


def suite_difference(pairs: list[tuple[np.ndarray, np.ndarray]], same_seeds: bool = False) -> Estimate:
    """Mean over tasks of (a − b), each task's pair resampled on shared examples (and seeds, as in `compare`)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    total, samples = 0.0, np.zeros(BOOTSTRAP_SAMPLES)
    for a, b in pairs:
        a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
        example_draws = rng.integers(0, a.shape[1], size=(BOOTSTRAP_SAMPLES, a.shape[1]))
        seeds_a, seeds_b = _seed_draws(a, b, same_seeds, rng)
        total += a.mean() - b.mean()
        samples += _resampled_means(a, seeds_a, example_draws) - _resampled_means(b, seeds_b, example_draws)
    n = len(pairs)
    return Estimate(total / n, *_interval(samples / n))


def suite_ratio(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Estimate:
    """Σ(plug-in − zero-shot) / Σ(ceiling − zero-shot) over tasks: the share of the fine-tuning gain recovered."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    gained, possible = 0.0, 0.0
    gained_samples, possible_samples = np.zeros(BOOTSTRAP_SAMPLES), np.zeros(BOOTSTRAP_SAMPLES)
    for plug_in, zero_shot, ceiling in pairs:
        rows = [np.atleast_2d(np.asarray(m, dtype=float)) for m in (plug_in, zero_shot, ceiling)]
        example_draws = rng.integers(0, rows[0].shape[1], size=(BOOTSTRAP_SAMPLES, rows[0].shape[1]))
        means = [
            _resampled_means(m, rng.integers(0, m.shape[0], size=(BOOTSTRAP_SAMPLES, m.shape[0])), example_draws)
            for m in rows
        ]
        gained += rows[0].mean() - rows[1].mean()
        possible += rows[2].mean() - rows[1].mean()
        gained_samples += means[0] - means[1]
        possible_samples += means[2] - means[1]
    ratio = gained / possible if possible else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = gained_samples / possible_samples
    finite = samples[np.isfinite(samples)]
    if not finite.size:  # no gain to recover in any resample: the ratio is undefined
        return Estimate(ratio, float("nan"), float("nan"))
    return Estimate(ratio, *_interval(finite))


# ---- corpus metrics (BLEU, chrF): scored from per-example sufficient statistics, summed over the drawn examples

Score = Callable[[np.ndarray], float]  # summed statistics [k] -> corpus score


def _draw_counts(example_draws: np.ndarray, examples: int) -> np.ndarray:
    """[draws, examples]: how often each example was drawn."""
    counts = np.zeros((example_draws.shape[0], examples))
    np.add.at(counts, (np.arange(example_draws.shape[0])[:, None], example_draws), 1)
    return counts


def _resampled_scores(per_seed: np.ndarray, seed_draws: np.ndarray, counts: np.ndarray, score: Score) -> np.ndarray:
    # per draw: mean over the drawn seeds of each seed's corpus score on the drawn examples
    summed = np.einsum("bn,snk->bsk", counts, per_seed)
    scores = np.array([[score(summed[b, s]) for s in range(per_seed.shape[0])] for b in range(summed.shape[0])])
    return np.take_along_axis(scores, seed_draws, axis=1).mean(axis=1)


def _observed(per_seed: np.ndarray, score: Score) -> float:
    return float(np.mean([score(seed.sum(axis=0)) for seed in per_seed]))


def statistic_estimate(per_seed: np.ndarray, score: Score) -> Estimate:
    """Mean over seeds of a corpus score, `per_seed` seeds × examples × k statistics, and its bootstrap CI."""
    per_seed = np.asarray(per_seed, dtype=float)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    seed_draws, example_draws = _draws(per_seed.shape[0], per_seed.shape[1], rng)
    samples = _resampled_scores(per_seed, seed_draws, _draw_counts(example_draws, per_seed.shape[1]), score)
    return Estimate(_observed(per_seed, score), *_interval(samples))


def statistic_compare(a: np.ndarray, b: np.ndarray, score: Score, same_seeds: bool = False) -> Comparison:
    """`compare` for corpus scores: both rows on the same resampled examples."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows scored on different examples: {a.shape[1]} against {b.shape[1]}")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    counts = _draw_counts(rng.integers(0, a.shape[1], size=(BOOTSTRAP_SAMPLES, a.shape[1])), a.shape[1])
    seeds_a, seeds_b = _seed_draws(a, b, same_seeds, rng)
    samples = _resampled_scores(a, seeds_a, counts, score) - _resampled_scores(b, seeds_b, counts, score)
    crossing = min((samples <= 0).mean(), (samples >= 0).mean())
    observed = _observed(a, score) - _observed(b, score)
    return Comparison(Estimate(observed, *_interval(samples)), float(min(1.0, 2 * crossing)))
