"""Mean@n, unbiased Pass@k against math.comb, verl's bootstrap best@k, bootstrap confidence intervals."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ngrpo_ray.core.metrics import (
    bootstrap_best_at_k,
    bootstrap_best_at_k_per_problem,
    bootstrap_ci,
    mean_at_n,
    paired_bootstrap_ci,
    pass_at_k,
    pass_at_k_per_problem,
)


def test_pass_at_k_equals_binomial_formula_on_a_grid():
    for n in (1, 2, 5, 16, 32, 64):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                got = pass_at_k_per_problem(n, c, k)[0]
                assert got == pytest.approx(expected, abs=1e-12), (n, c, k)
                if n - c < k:
                    assert got == 1.0  # exact, not 0.9999...


def test_pass_at_k_and_mean_at_n_by_hand():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    # mean@4: (1/4 + 2/4 + 0) / 3 = 0.25
    assert mean_at_n(correct) == pytest.approx(0.25)
    # pass@2: problem 1: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; problem 2: 1 - C(2,2)/C(4,2) = 5/6; problem 3: 0
    assert pass_at_k(correct, 2) == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    # pass@4 = any correct
    assert pass_at_k(correct, 4) == pytest.approx(2 / 3)
    # pass@1 = mean@n
    assert pass_at_k(correct, 1) == pytest.approx(mean_at_n(correct))


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k_per_problem([4], [1], 5)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.data())
def test_pass_at_k_monotone_and_bounded(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    p = pass_at_k_per_problem(n, c, k)[0]
    assert 0.0 <= p <= 1.0
    if k < n:
        assert pass_at_k_per_problem(n, c, k + 1)[0] >= p - 1e-12
    if c < n:
        assert pass_at_k_per_problem(n, c + 1, k)[0] >= p - 1e-12
    assert (p == 0.0) == (c == 0)


def _verl_best_at_k(data, k, n_bootstrap=1000, seed=42):
    """verl's bootstrap_metric(data, subset_size=k, reduce_fns=[np.max]) written as its loop."""
    np.random.seed(seed)
    values = []
    for _ in range(n_bootstrap):
        idxs = np.random.choice(len(data), size=k, replace=True)
        values.append(np.max([data[i] for i in idxs]))
    return float(np.mean(values))


def test_bootstrap_best_at_k_one_correct_of_32_is_about_064():
    scores = np.zeros((1, 32))
    scores[0, 7] = 1.0
    best = bootstrap_best_at_k(scores, 32)
    # expectation 1 - (31/32)^32 = 0.6379; the unbiased Pass@32 is 1.0
    assert best == pytest.approx(1 - (31 / 32) ** 32, abs=0.03)
    assert pass_at_k(scores > 0, 32) == 1.0
    assert best == _verl_best_at_k(scores[0], 32)  # same seeded stream as verl's loop: identical number


def test_bootstrap_best_at_k_matches_verl_loop_per_problem():
    rng = np.random.default_rng(0)
    scores = (rng.random((5, 16)) < 0.3).astype(float)
    got = bootstrap_best_at_k_per_problem(scores, 4, n_bootstrap=200, seed=7)
    expected = [_verl_best_at_k(row, 4, n_bootstrap=200, seed=7) for row in scores]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_bootstrap_ci_contains_truth_and_shrinks():
    rng = np.random.default_rng(1)
    widths = []
    for p in (100, 1600):
        values = (rng.random(p) < 0.3).astype(float)
        ci = bootstrap_ci(values, seed=2)
        assert ci.low <= 0.3 <= ci.high
        assert ci.low <= ci.estimate <= ci.high and ci.estimate == pytest.approx(values.mean())
        assert ci.n_resamples == 10_000 and ci.confidence == 0.95
        widths.append(ci.high - ci.low)
    # width ~ 1/sqrt(P): 16x the problems -> about a quarter of the width
    assert 0.15 < widths[1] / widths[0] < 0.4
    # seeded: the same call gives the same interval
    assert bootstrap_ci(values, seed=2) == bootstrap_ci(values, seed=2)


def test_bootstrap_ci_width_matches_normal_approximation():
    rng = np.random.default_rng(3)
    values = rng.normal(size=400)
    ci = bootstrap_ci(values, seed=4)
    half = 1.96 * values.std(ddof=1) / math.sqrt(400)
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.1)


def test_bootstrap_ci_custom_statistic_on_rows():
    # per problem (correct, attempted): the statistic is the pooled ratio sum(correct) / sum(attempted)
    rows = np.array([[1, 2], [3, 4], [0, 4], [2, 2]], dtype=float)
    ci = bootstrap_ci(rows, statistic=lambda x: x[..., 0].sum(1) / x[..., 1].sum(1), n_resamples=2000)
    assert ci.estimate == pytest.approx(6 / 12)
    assert ci.low < 0.5 < ci.high


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(5)
    difficulty = rng.random(300)
    before = (rng.random((300, 8)) < difficulty[:, None]).astype(float).mean(1)
    after = np.clip(before + 0.05 + rng.normal(0, 0.02, 300), 0, 1)
    paired = paired_bootstrap_ci(after, before, seed=6)
    assert paired.estimate == pytest.approx(after.mean() - before.mean())
    assert paired.low > 0.03 and paired.high < 0.07  # excludes 0, contains the +0.05 shift
    # pairing removes the between-problem variance: far narrower than the independent-sample interval
    a, b = bootstrap_ci(after, seed=6), bootstrap_ci(before, seed=7)
    unpaired_half = math.hypot((a.high - a.low) / 2, (b.high - b.low) / 2)
    assert (paired.high - paired.low) / 2 < unpaired_half / 3
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap_ci(after[:10], before)


def test_paired_bootstrap_on_per_sample_matrices():
    # rows are problems, columns samples; statistic: Pass@n (any correct) averaged over problems
    before = np.array([[0, 0], [1, 0], [0, 0], [1, 1]], dtype=float)
    after = np.array([[1, 0], [1, 1], [0, 0], [1, 0]], dtype=float)
    ci = paired_bootstrap_ci(after, before, statistic=lambda x: x.max(axis=-1).mean(axis=1), n_resamples=2000)
    assert ci.estimate == pytest.approx(3 / 4 - 2 / 4)  # only problem 0 changed from unsolved to solved
    assert 0.0 <= ci.low <= ci.estimate <= ci.high <= 0.75  # a resample holds problem 0 at most P times: +1 max
