"""Paired comparison of two models over seeds: the mean difference of a metric and its bootstrap confidence interval.

Both models answered the same questions under the same seeds (a seed fixes the data order and the shared stage-1
run), so the comparison is paired twice: each resample draws seeds with replacement and, independently, questions
with replacement, and takes the same seeds and questions for both models. The metric is recomputed on each
resample, so a ratio such as POPE's F1 is resampled as a whole, not averaged per question.

# S seeds, Q questions, ... per-question fields
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# per-question outcomes [S, Q, ...] -> the metric per seed [S]
Metric = Callable[[np.ndarray], np.ndarray]


def accuracy(correct_SQ: np.ndarray) -> np.ndarray:
    """Share of questions answered correctly, per seed (``correct_SQ`` holds 0/1)."""
    return correct_SQ.mean(axis=1)


def pope_f1(yes_SQ2: np.ndarray) -> np.ndarray:
    """POPE F1 per seed from ``yes_SQ2[..., 0]`` = the prediction is yes, ``[..., 1]`` = the answer is yes."""
    said, truth = yes_SQ2[..., 0].astype(bool), yes_SQ2[..., 1].astype(bool)
    tp = (said & truth).sum(1)
    fp = (said & ~truth).sum(1)
    fn = (~said & truth).sum(1)
    denominator = 2 * tp + fp + fn  # F1 = 2TP / (2TP + FP + FN); 0 when there is nothing to find and nothing said
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


@dataclass(frozen=True)
class Difference:
    """``mean`` over seeds of metric(variant) - metric(reference), with the ``level`` bootstrap interval."""

    mean: float
    low: float
    high: float
    seeds: int
    questions: int
    level: float = 0.95

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(variant: np.ndarray, reference: np.ndarray, metric: Metric = accuracy, resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> Difference:
    """The paired difference of ``metric`` between ``variant`` and ``reference``, per-question outcomes of shape
    [S, Q, ...] (row s of both: the same seed; column q: the same question), with a percentile bootstrap interval
    over ``resamples`` draws of seeds and questions (``seed`` seeds the draws)."""
    variant, reference = np.asarray(variant), np.asarray(reference)
    if variant.shape != reference.shape or variant.ndim < 2:
        raise ValueError(f"outcomes must be [seeds, questions, ...] of one shape, got {variant.shape} and "
                         f"{reference.shape}")
    num_seeds, num_questions = variant.shape[:2]
    rng = np.random.default_rng(seed)
    differences = np.empty(resamples)
    for b in range(resamples):
        seeds_S = rng.integers(0, num_seeds, num_seeds)
        questions_Q = rng.integers(0, num_questions, num_questions)
        pick = np.ix_(seeds_S, questions_Q)
        differences[b] = (metric(variant[pick]) - metric(reference[pick])).mean()
    tail = (1 - level) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    mean = float((metric(variant) - metric(reference)).mean())
    return Difference(mean, float(low), float(high), num_seeds, num_questions, level)
