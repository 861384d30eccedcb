"""Intervals that resample seeds as well as problems (core.seed_bootstrap), on hand-made grades."""

import numpy as np
import pytest

from ngrpo_ray.core.metrics import pass_at_k
from ngrpo_ray.core.seed_bootstrap import (RunResamples, draw_resamples, interval, pooled_counts,
                                           resampled_mean_at_n, resampled_pass_at_k)


def test_pooled_counts_by_hand():
    correct = np.array([[[1, 0], [1, 1], [0, 0]],   # run 0: 1, 2, 0 correct of 2
                        [[0, 0], [1, 0], [1, 1]]])  # run 1: 0, 1, 2
    runs = np.array([[0, 0], [1, 0]])  # resample 0 draws run 0 twice; resample 1 draws runs 1 and 0
    problems = np.array([[2, 1, 1], [0, 0, 2]])
    assert pooled_counts(correct, runs, problems).tolist() == [[0, 4, 4], [1, 1, 2]]
    res = RunResamples({"m": runs}, problems)
    assert resampled_mean_at_n(correct, "m", res).tolist() == pytest.approx([8 / 12, 4 / 12])


def test_identity_resample_gives_the_pooled_point_values():
    rng = np.random.default_rng(3)
    correct = rng.random((3, 5, 4)) < 0.4
    res = RunResamples({"m": np.arange(3)[None]}, np.arange(5)[None])
    pooled = np.concatenate(list(correct), axis=1)
    assert resampled_mean_at_n(correct, "m", res)[0] == pytest.approx(pooled.mean())
    for k in (1, 2, 4, 12):
        assert resampled_pass_at_k(correct, "m", res, k)[0] == pytest.approx(pass_at_k(pooled, k))


def test_seed_spread_widens_the_interval():
    # One seed learned everything, the other nothing. Drawn seed pairs: (A, A) 1/4 -> 1.0, (A, B) 1/2 -> 0.5,
    # (B, B) 1/4 -> 0.0, so the 2.5% and 97.5% percentiles are 0 and 1; a problems-only interval would be [0.5, 0.5].
    correct = np.stack([np.ones((16, 4)), np.zeros((16, 4))]).astype(bool)
    res = draw_resamples({"m": 2}, problems=16, n_resamples=4000, seed=0)
    means = resampled_mean_at_n(correct, "m", res)
    assert set(np.unique(means).round(6)) == {0.0, 0.5, 1.0}
    assert np.mean(means == 0.5) == pytest.approx(0.5, abs=0.03)
    ci = interval(0.5, means)
    assert (ci.estimate, ci.low, ci.high) == (0.5, 0.0, 1.0)


def test_differences_share_problems_and_identical_seeds_cancel():
    rng = np.random.default_rng(0)
    one_run = rng.random((1, 20, 4)) < 0.5
    same = np.repeat(one_run, 3, axis=0)  # three seeds with identical grades: seed draws cannot matter
    res = draw_resamples({"a": 3, "b": 3}, problems=20, n_resamples=500, seed=1)
    diff = resampled_mean_at_n(same, "a", res) - resampled_mean_at_n(same, "b", res)
    assert np.abs(diff).max() == 0.0  # same problem indices for both methods, so the pairing is exact
