"""Intervals for a comparison of training runs that resample the runs (seeds) as well as the problems. numpy only.

A training run is the unit that varies most: two seeds of one method can differ by more than two methods do, so an
interval over problems alone understates the uncertainty of a method's number. Each bootstrap resample here draws,
for every method, as many runs as it has with replacement from its own runs, and one set of problem indices with
replacement shared by all methods (so differences between methods stay paired over problems). The drawn runs'
samples are pooled per problem, as the point estimate pools all runs, and the statistic is computed on that pool.
Runs of different methods are drawn independently: seed s of two methods shares nothing but the number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ngrpo_ray.core.metrics import ConfidenceInterval, pass_at_k_per_problem


@dataclass(frozen=True)
class RunResamples:
    runs: dict[str, np.ndarray]  # method -> [R, S_method] indices of the drawn runs
    problems: np.ndarray  # [R, P] indices of the drawn problems, shared by every method

    @property
    def count(self) -> int:
        return int(self.problems.shape[0])


def draw_resamples(runs_per_method: dict[str, int], problems: int, n_resamples: int = 2000,
                   seed: int = 0) -> RunResamples:
    rng = np.random.default_rng(seed)
    problem_idx = rng.integers(0, problems, size=(n_resamples, problems))
    run_idx = {m: rng.integers(0, s, size=(n_resamples, s)) for m, s in sorted(runs_per_method.items())}
    return RunResamples(run_idx, problem_idx)


def _check(correct: np.ndarray) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim != 3:
        raise ValueError(f"expected per-sample correctness [runs, problems, n], got shape {c.shape}")
    return c.astype(bool)


def pooled_counts(correct: np.ndarray, runs: np.ndarray, problems: np.ndarray) -> np.ndarray:
    """correct [S, P, n]; runs [R, S]; problems [R, P] -> correct samples per drawn problem, pooled over the drawn
    runs: [R, P] (each out of S * n samples)."""
    per_run = _check(correct).sum(axis=2)  # [S, P]
    return per_run[runs[:, :, None], problems[:, None, :]].sum(axis=1)


def resampled_mean_at_n(correct: np.ndarray, method: str, res: RunResamples) -> np.ndarray:
    """Mean@n of the pooled runs in each resample: [R]."""
    s, _, n = np.shape(correct)
    return pooled_counts(correct, res.runs[method], res.problems).mean(axis=1) / (s * n)


def resampled_pass_at_k(correct: np.ndarray, method: str, res: RunResamples, k: int) -> np.ndarray:
    """Unbiased Pass@k of the pooled runs in each resample: [R]. Every pool has S * n samples, so Pass@k per problem
    is a lookup by its count of correct samples."""
    s, _, n = np.shape(correct)
    table = pass_at_k_per_problem(np.full(s * n + 1, s * n), np.arange(s * n + 1), k)
    return table[pooled_counts(correct, res.runs[method], res.problems)].mean(axis=1)


def interval(estimate: float, resampled: np.ndarray, confidence: float = 0.95) -> ConfidenceInterval:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(np.asarray(resampled, dtype=np.float64), [tail, 100.0 - tail])
    return ConfidenceInterval(estimate=float(estimate), low=float(low), high=float(high), confidence=confidence,
                              n_resamples=int(len(resampled)))
