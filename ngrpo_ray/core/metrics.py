"""Evaluation metrics (N-GRPO paper appendix C.2) and bootstrap confidence intervals over problems. numpy only.

- mean_at_n: fraction correct over the n samples of each problem (unbiased Pass@1), averaged over problems.
- pass_at_k: the unbiased estimator 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i), exactly 1 where
  n - c < k, averaged over problems.
- bootstrap_best_at_k: verl's `best@k` (resampling k of the n scores WITH replacement, max, averaged over resamples).
  A different, biased number (1 correct of 32 gives about 0.64 at k = 32, not 1.0); report it only under its name.
- bootstrap_ci / paired_bootstrap_ci: percentile confidence intervals over problems, seeded and vectorised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _correct_matrix(correct: np.ndarray) -> np.ndarray:
    c = np.asarray(correct, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"expected per-sample correctness [problems, n], got shape {c.shape}")
    return c


def mean_at_n(correct: np.ndarray) -> float:
    """correct [P, n] (bool or 0/1 scores): mean over problems of the per-problem fraction correct."""
    return float(_correct_matrix(correct).mean(axis=1).mean())


def pass_at_k_per_problem(num_samples: np.ndarray, num_correct: np.ndarray, k: int) -> np.ndarray:
    """Unbiased Pass@k of each problem from n (samples) and c (correct), product form (no big binomials)."""
    n = np.atleast_1d(np.asarray(num_samples, dtype=np.int64))
    c = np.atleast_1d(np.asarray(num_correct, dtype=np.int64))
    n, c = np.broadcast_arrays(n, c)
    if k < 1 or np.any(k > n):
        raise ValueError(f"k={k} must be in [1, n] for every problem (min n = {int(n.min())})")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("num_correct must be in [0, num_samples]")
    out = np.ones(n.shape, dtype=np.float64)
    for idx in np.flatnonzero(n - c >= k):
        ni, ci = int(n.flat[idx]), int(c.flat[idx])
        i = np.arange(ni - ci + 1, ni + 1, dtype=np.float64)
        out.flat[idx] = 1.0 - np.prod(1.0 - k / i)
    return out


def pass_at_k(correct: np.ndarray, k: int) -> float:
    """correct [P, n] bool: unbiased Pass@k averaged over problems."""
    c = _correct_matrix(correct) > 0
    return float(pass_at_k_per_problem(np.full(c.shape[0], c.shape[1]), c.sum(axis=1), k).mean())


def bootstrap_best_at_k_per_problem(scores: np.ndarray, k: int, n_bootstrap: int = 1000, seed: int = 42) -> np.ndarray:
    """verl's best@k for each problem: mean over n_bootstrap resamples of max(k scores drawn with replacement).

    scores [P, n]. Like verl (`bootstrap_metric`), every problem is resampled with a fresh np.random.seed(seed) stream,
    so its indices are those of verl's loop; drawn in one call here (same legacy RandomState stream).
    """
    s = _correct_matrix(scores)
    idx = np.random.RandomState(seed).choice(s.shape[1], size=(n_bootstrap, k), replace=True)
    out = np.empty(s.shape[0], dtype=np.float64)
    for start in range(0, s.shape[0], 64):  # 64 problems at a time keeps [64, n_bootstrap, k] small
        out[start:start + 64] = s[start:start + 64][:, idx].max(axis=2).mean(axis=1)
    return out


def bootstrap_best_at_k(scores: np.ndarray, k: int, n_bootstrap: int = 1000, seed: int = 42) -> float:
    """verl's bootstrap best@k averaged over problems (NOT the unbiased Pass@k)."""
    return float(bootstrap_best_at_k_per_problem(scores, k, n_bootstrap, seed).mean())


@dataclass(frozen=True)
class ConfidenceInterval:
    estimate: float  # the statistic on the original problems
    low: float
    high: float
    confidence: float
    n_resamples: int


def _mean_over_problems(resampled: np.ndarray) -> np.ndarray:
    return resampled.mean(axis=1)


def bootstrap_ci(
    per_problem: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] = _mean_over_problems,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    chunk: int = 1_000,
) -> ConfidenceInterval:
    """Percentile bootstrap over problems. per_problem [P] or [P, ...] (one row per problem, e.g. its Pass@k or its
    per-sample correctness). statistic maps a stack of resampled datasets [R, P, ...] to [R]; default: the mean over
    problems. Resamples are drawn in chunks so memory stays at chunk * P rows."""
    x = np.asarray(per_problem, dtype=np.float64)
    if x.shape[0] < 1:
        raise ValueError("need at least one problem")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    p = x.shape[0]
    stats = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        stats[start:start + r] = statistic(x[rng.integers(0, p, size=(r, p))])
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return ConfidenceInterval(estimate=float(statistic(x[None])[0]), low=float(low), high=float(high),
                              confidence=confidence, n_resamples=n_resamples)


def paired_bootstrap_ci(
    after: np.ndarray,
    before: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray] = _mean_over_problems,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> ConfidenceInterval:
    """CI of statistic(after) - statistic(before) on the same problems: both runs are resampled with the SAME problem
    indices, so problem difficulty cancels. after, before [P] or [P, ...] with the same problem order."""
    a = np.asarray(after, dtype=np.float64)
    b = np.asarray(before, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired runs need the same problems: {a.shape[0]} vs {b.shape[0]}")
    width = int(np.prod(a.shape[1:], dtype=np.int64))
    stacked = np.concatenate([a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)], axis=1)

    def difference(resampled: np.ndarray) -> np.ndarray:
        ra = resampled[..., :width].reshape(resampled.shape[:2] + a.shape[1:])
        rb = resampled[..., width:].reshape(resampled.shape[:2] + b.shape[1:])
        return statistic(ra) - statistic(rb)

    return bootstrap_ci(stacked, difference, confidence=confidence, n_resamples=n_resamples, seed=seed)
