"""Rollout-vs-trainer gap statistics by hand on a constructed mismatch."""

import math

import pytest
import torch

from ngrpo_ray.core.mismatch import add_gap_sums, empty_gap_sums, finalize_gap, gap_sums, sequence_log_ratios

# diff = trainer - behaviour; row 0 [0.05, -0.2, 0.3], row 1 [0.0, 0.15, (masked 9.0)]
DIFF = torch.tensor([[0.05, -0.2, 0.3], [0.0, 0.15, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.0]])
BEHAVIOUR = TRAINER - DIFF


def _k3(d: float) -> float:  # KL(behaviour || trainer) term: log_r = behaviour - trainer = -d
    return math.exp(d) - 1 - d


def test_gap_by_hand():
    sums = gap_sums(TRAINER, BEHAVIOUR, MASK)
    seq = sequence_log_ratios(TRAINER, BEHAVIOUR, MASK)
    torch.testing.assert_close(seq, torch.tensor([0.15, 0.15], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    out = finalize_gap(sums, seq, torch.ones(2))
    diffs = [0.05, -0.2, 0.3, 0.0, 0.15]
    assert out["abs_diff_mean"] == pytest.approx(sum(abs(d) for d in diffs) / 5, rel=1e-6)
    assert out["abs_diff_max"] == pytest.approx(0.3, rel=1e-6)
    assert out["k3_kl"] == pytest.approx(sum(_k3(d) for d in diffs) / 5, rel=1e-5)
    assert out["frac_abs_diff_over_0.1"] == pytest.approx(3 / 5)  # 0.2, 0.3, 0.15
    assert out["seq_ratio_p50"] == pytest.approx(math.exp(0.15), rel=1e-6)
    assert out["seq_ratio_max"] == pytest.approx(math.exp(0.15), rel=1e-6)
    assert out["tokens"] == 5 and out["sequences_measured"] == 1.0


def test_percentiles_over_measured_sequences_only():
    log_ratios = torch.tensor([0.0, math.log(2.0), math.log(4.0), math.log(0.5), 7.0], dtype=torch.float64)
    measured = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])  # the last was not measured
    out = finalize_gap(empty_gap_sums(), log_ratios, measured)
    # ratios 0.5, 1, 2, 4: linear interpolation p50 = 1.5, p90 = 2 + 0.7 * 2 = 3.4
    assert out["seq_ratio_p50"] == pytest.approx(1.5) and out["seq_ratio_p90"] == pytest.approx(3.4)
    assert out["seq_ratio_min"] == pytest.approx(0.5) and out["seq_ratio_max"] == pytest.approx(4.0)
    assert out["sequences_measured"] == pytest.approx(0.8)


def test_sums_reduce_exactly_over_parts():
    whole = gap_sums(TRAINER, BEHAVIOUR, MASK)
    parts = add_gap_sums(add_gap_sums(empty_gap_sums(), gap_sums(TRAINER[:1], BEHAVIOUR[:1], MASK[:1])),
                         gap_sums(TRAINER[1:], BEHAVIOUR[1:], MASK[1:]))
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k])


def test_identical_log_probs_give_zero_gap():
    out = finalize_gap(gap_sums(TRAINER, TRAINER, MASK), sequence_log_ratios(TRAINER, TRAINER, MASK), torch.ones(2))
    assert out["abs_diff_max"] == 0 and out["k3_kl"] == 0 and out["seq_ratio_p90"] == 1.0
