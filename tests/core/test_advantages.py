"""Advantages against hand-computed numbers: GRPO (unbiased std), Dr. GRPO, Latent-GRPO masks, dynamic sampling."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ngrpo_ray.core.advantages import (
    correct_path_first_token_selection,
    dr_grpo_advantages,
    dynamic_sampling_filter,
    grpo_advantages,
)

# two groups of 4
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
S3 = 1 / math.sqrt(3)  # unbiased std of group 1: sum of squares 4 * 0.25 = 1, / (4-1) -> var 1/3


def test_grpo_unbiased_std_by_hand():
    # group 1: mean 0.5, std sqrt(1/3) -> A = +-0.5 / 0.57735 = +-0.866025
    # group 2: mean 0.75, squares 3*0.0625 + 0.5625 = 0.75, / 3 -> var 0.25, std 0.5 -> A = 0.5, 0.5, 0.5, -1.5
    out = grpo_advantages(REWARDS, group_size=4, eps=0.0)
    h = 0.5 / S3
    expected = torch.tensor([h, -h, -h, h, 0.5, 0.5, 0.5, -1.5])
    torch.testing.assert_close(out.advantages, expected)
    torch.testing.assert_close(out.group_mean, torch.tensor([0.5, 0.75]))
    torch.testing.assert_close(out.group_std, torch.tensor([S3, 0.5]))
    assert out.num_invalid_zeroed == 0 and out.num_degenerate_groups == 0


def test_grpo_eps_enters_denominator():
    out = grpo_advantages(REWARDS, group_size=4, eps=0.5)
    # group 2, sample 4: -0.75 / (0.5 + 0.5) = -0.75
    assert out.advantages[7].item() == pytest.approx(-0.75)
    assert out.advantages[0].item() == pytest.approx(0.5 / (S3 + 0.5))


def test_dr_grpo_has_no_std():
    out = dr_grpo_advantages(REWARDS, group_size=4)
    torch.testing.assert_close(out.advantages, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]))


def test_all_equal_group_gets_exact_zero_not_zero_over_eps():
    out = grpo_advantages(torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0]), group_size=3)
    assert out.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert out.advantages[3].item() == pytest.approx((1 - 1 / 3) / (math.sqrt(1 / 3) + 1e-6))


INVALID = torch.tensor([False, True, False, False, False, False, False, True])


def test_invalid_samples_zeroed_but_in_stats_by_default():
    out = grpo_advantages(REWARDS, group_size=4, eps=0.0, invalid=INVALID)
    h = 0.5 / S3
    torch.testing.assert_close(out.advantages, torch.tensor([h, 0.0, -h, h, 0.5, 0.5, 0.5, 0.0]))
    assert out.num_invalid_zeroed == 2


def test_invalid_samples_excluded_from_stats():
    # group 1 valid rewards [1, 0, 1]: mean 2/3, squares 1/9 + 4/9 + 1/9 = 2/3, / 2 -> var 1/3
    #   A = (1/3)/0.57735 = 0.57735, (-2/3)/0.57735 = -1.154701
    # group 2 valid rewards [1, 1, 1]: all equal -> 0 (the invalid 0-reward sample no longer makes them "good")
    out = grpo_advantages(REWARDS, group_size=4, eps=0.0, invalid=INVALID, exclude_invalid_from_stats=True)
    torch.testing.assert_close(out.advantages, torch.tensor([S3, 0.0, -2 * S3, S3, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(out.group_mean, torch.tensor([2 / 3, 1.0]))
    assert out.num_invalid_zeroed == 2


def test_group_with_one_valid_sample_is_degenerate():
    invalid = torch.tensor([True, True, False, False, False, False])
    out = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), 3, invalid=invalid,
                          exclude_invalid_from_stats=True)
    assert out.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert out.num_degenerate_groups == 1
    assert out.advantages[3].item() > 0


def test_bad_group_size_rejected():
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo_advantages(torch.zeros(5), group_size=2)


def test_correct_path_first_token_selection_by_hand():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])
    old_logp = torch.tensor([
        [-0.5, -0.5, -0.5],  # correct, mean -0.5 (sum -1.5)
        [-0.6, -0.6, -9.0],  # correct, mean -0.6 (sum -1.2: a SUM would pick this one; the mean picks row 0)
        [-0.1, -0.1, -0.1],  # wrong (highest score, but not correct)
        [-7.0, -1.0, -3.0],  # correct, mean over its mask -2; first step at position 1
        [-1.0, -1.0, -1.0],  # group 3: nobody correct
        [-1.0, -1.0, -1.0],
    ])
    correct = torch.tensor([True, True, False, True, False, False])
    adv = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.5, -0.5])
    out = correct_path_first_token_selection(adv, mask, old_logp, correct, group_size=2)
    expected = torch.tensor([
        [1.0, 1.0, 1.0],   # kept
        [0.0, 2.0, 0.0],   # first step zeroed; position 2 outside the mask
        [0.0, -1.0, -1.0],  # wrong sample: first step zeroed too
        [0.0, 3.0, 3.0],   # kept (its first step is position 1)
        [0.0, 0.5, 0.5],   # no correct sample in the group: every first step zeroed
        [0.0, -0.5, -0.5],
    ])
    torch.testing.assert_close(out.token_advantages, expected)
    assert out.first_step_kept.tolist() == [True, False, False, True, False, False]
    assert out.first_step_index.tolist() == [0, 0, 0, 1, 0, 0]
    assert out.num_first_steps_zeroed == 4
    assert out.num_groups_without_correct == 1


def test_first_token_selection_explicit_first_step_and_token_advantages():
    mask = torch.ones(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = correct_path_first_token_selection(adv, mask, torch.tensor([[-1.0] * 3, [-2.0] * 3]),
                                             torch.tensor([True, True]), group_size=2,
                                             first_step_index=torch.tensor([2, 1]))
    torch.testing.assert_close(out.token_advantages, torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 6.0]]))


def test_dynamic_sampling_filter_counts():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.0, 1.0])
    out = dynamic_sampling_filter(rewards, group_size=2)
    assert out.keep_groups.tolist() == [False, False, True, False, True]
    assert out.keep_samples.tolist() == [False, False, False, False, True, True, False, False, True, True]
    assert (out.num_kept_groups, out.num_dropped_groups) == (2, 3)
    assert (out.num_dropped_all_correct, out.num_dropped_other) == (1, 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=12, max_size=12), st.sampled_from([2, 3, 4, 6]), st.booleans())
def test_advantages_zero_mean_per_group(values, group_size, normalize_std):
    rewards = torch.tensor(values, dtype=torch.float32) / 4
    out = grpo_advantages(rewards, group_size, normalize_std=normalize_std)
    sums = out.advantages.reshape(-1, group_size).sum(dim=1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-5, rtol=0)
    if normalize_std:  # non-degenerate groups have unit unbiased std
        grouped = out.advantages.reshape(-1, group_size)
        spread = rewards.reshape(-1, group_size)
        varied = spread.amax(1) > spread.amin(1)
        torch.testing.assert_close(grouped[varied].std(dim=1), torch.ones(int(varied.sum())), atol=1e-4, rtol=0)
