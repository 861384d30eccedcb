"""Group-relative advantages: GRPO, Dr. GRPO, Latent-GRPO masks, and the dynamic-sampling filter.

Rewards arrive flat, [N] with N = num_groups * group_size, group members contiguous (sample i belongs to group
i // group_size). Every function returns tensors plus counts of what it dropped or zeroed: nothing is dropped silently.

Which std: GRPO (DeepSeekMath, N-GRPO eq. 12) divides by "std(r)" without saying which; we use the UNBIASED sample std
(divide by n-1), as verl (`torch.std`) and TRL do, so numbers match those trainers. A group with fewer than two
samples counted in its statistics has no relative signal: its advantages are 0 and it is counted as degenerate; a group
whose counted rewards are all equal gets exactly 0 as well (not 0/eps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupAdvantages:
    """Per-sample advantages [N] and what was zeroed on the way."""

    advantages: torch.Tensor  # [N] float32
    group_mean: torch.Tensor  # [num_groups] mean used per group (over valid samples if so configured)
    group_std: torch.Tensor  # [num_groups] unbiased std used per group (0 where undefined)
    num_invalid_zeroed: int  # samples whose advantage was forced to 0 because they were invalid (truncated)
    num_degenerate_groups: int  # groups with < 2 samples in their statistics: all advantages 0


def _grouped(values: torch.Tensor, group_size: int) -> torch.Tensor:
    if values.ndim != 1:
        raise ValueError(f"expected a flat [N] tensor, got shape {tuple(values.shape)}")
    if group_size < 1 or values.numel() % group_size != 0:
        raise ValueError(f"N={values.numel()} is not a multiple of group_size={group_size}")
    return values.reshape(-1, group_size)


def grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
    invalid: torch.Tensor | None = None,
    exclude_invalid_from_stats: bool = False,
) -> GroupAdvantages:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps); with normalize_std=False Dr. GRPO's A_i = r_i - mean_g.

    invalid [N] bool (Latent-GRPO invalid-sample masking): those samples get advantage 0. By default they still count
    in the group mean/std (Latent-GRPO's standard setting); exclude_invalid_from_stats=True leaves them out (its
    high-difficulty setting).
    """
    r = _grouped(rewards.to(torch.float32), group_size)
    bad = torch.zeros_like(r, dtype=torch.bool) if invalid is None else _grouped(invalid.to(torch.bool), group_size)
    in_stats = ~bad if exclude_invalid_from_stats else torch.ones_like(bad)
    w = in_stats.to(torch.float32)
    count = w.sum(dim=1)
    mean = (r * w).sum(dim=1) / count.clamp(min=1)
    var = (((r - mean[:, None]) ** 2) * w).sum(dim=1) / (count - 1).clamp(min=1)
    std = var.sqrt()
    degenerate = count < 2
    # all counted rewards equal: exactly no signal (avoids 1e-17 / eps blow-ups from a mean like 0.1*3/3)
    inf = torch.full_like(r, float("inf"))
    all_equal = torch.where(in_stats, r, inf).amin(dim=1) == torch.where(in_stats, r, -inf).amax(dim=1)
    std = torch.where(degenerate | all_equal, torch.zeros_like(std), std)
    centred = r - mean[:, None]
    adv = centred / (std[:, None] + eps) if normalize_std else centred
    no_signal = (degenerate | all_equal)[:, None]
    adv = torch.where(no_signal | bad, torch.zeros_like(adv), adv)
    return GroupAdvantages(
        advantages=adv.reshape(-1),
        group_mean=mean,
        group_std=std,
        num_invalid_zeroed=int(bad.sum()),
        num_degenerate_groups=int(degenerate.sum()),
    )


def dr_grpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    invalid: torch.Tensor | None = None,
    exclude_invalid_from_stats: bool = False,
) -> GroupAdvantages:
    """Dr. GRPO (Liu et al. 2025): A_i = r_i - mean_g, no division by the std."""
    return grpo_advantages(rewards, group_size, normalize_std=False, invalid=invalid,
                           exclude_invalid_from_stats=exclude_invalid_from_stats)


@dataclass(frozen=True)
class FirstTokenSelection:
    """Per-token advantages [N, T] after Latent-GRPO's correct-path first-token selection."""

    token_advantages: torch.Tensor  # [N, T] = advantage * response_mask, first step zeroed except for the kept sample
    first_step_kept: torch.Tensor  # [N] bool: the sample whose first step keeps its advantage (one per group at most)
    first_step_index: torch.Tensor  # [N] int64: the position treated as the first latent step
    num_first_steps_zeroed: int  # samples whose first step advantage was set to 0 (was nonzero before)
    num_groups_without_correct: int  # groups with no correct sample: every first step zeroed


def correct_path_first_token_selection(
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    old_logp: torch.Tensor,
    correct: torch.Tensor,
    group_size: int,
    first_step_index: torch.Tensor | None = None,
) -> FirstTokenSelection:
    """Latent-GRPO: among a group's correct samples, the one with the highest length-normalised old log-prob
    (sum of old_logp over its response mask / its length) keeps its first latent step's advantage; every other sample
    of the group (correct or not) gets advantage 0 at its first latent step, so the mixture of several correct first
    steps is not reinforced at once. Ties go to the lowest index.

    advantages [N] (sequence) or [N, T]; response_mask, old_logp [N, T]; correct [N] bool;
    first_step_index [N] (default: the first position of each response mask).
    """
    mask = response_mask.to(torch.bool)
    n, t = mask.shape
    if advantages.ndim == 1:
        token_adv = advantages.to(torch.float32)[:, None].expand(n, t).clone()
    else:
        token_adv = advantages.to(torch.float32).clone()
    token_adv = token_adv * mask
    lengths = mask.sum(dim=1)
    if first_step_index is None:
        # argmax of a bool row gives its first True; empty rows get 0 (and their token advantages are all 0 anyway)
        first_step_index = mask.to(torch.int64).argmax(dim=1)
    first_step_index = first_step_index.to(torch.int64)

    score = (old_logp.to(torch.float32) * mask).sum(dim=1) / lengths.clamp(min=1)
    score = torch.where(correct.to(torch.bool) & (lengths > 0), score, torch.full_like(score, float("-inf")))
    grouped = _grouped(score, group_size)
    best = grouped.argmax(dim=1)  # first maximum on ties
    has_correct = torch.isfinite(grouped).any(dim=1)
    kept = torch.zeros_like(grouped, dtype=torch.bool)
    kept[torch.arange(grouped.shape[0]), best] = True
    kept &= has_correct[:, None]
    kept = kept.reshape(-1)

    rows = torch.arange(n)
    before = token_adv[rows, first_step_index]
    zero_here = ~kept
    token_adv[rows[zero_here], first_step_index[zero_here]] = 0.0
    return FirstTokenSelection(
        token_advantages=token_adv,
        first_step_kept=kept,
        first_step_index=first_step_index,
        num_first_steps_zeroed=int(((before != 0) & zero_here).sum()),
        num_groups_without_correct=int((~has_correct).sum()),
    )


@dataclass(frozen=True)
class DynamicSamplingFilter:
    """DAPO dynamic sampling: keep only groups whose rewards are not all equal (they carry a gradient)."""

    keep_groups: torch.Tensor  # [num_groups] bool
    keep_samples: torch.Tensor  # [N] bool (keep_groups repeated group_size times)
    num_kept_groups: int
    num_dropped_groups: int
    num_dropped_all_correct: int  # dropped groups whose common reward is >= correct_reward (too easy)
    num_dropped_other: int  # the rest of the dropped groups (all wrong: too hard)


def dynamic_sampling_filter(
    rewards: torch.Tensor, group_size: int, atol: float = 0.0, correct_reward: float = 1.0
) -> DynamicSamplingFilter:
    """Boolean keep-mask of groups whose rewards are not all equal (max - min > atol). The caller refills the batch."""
    r = _grouped(rewards.to(torch.float32), group_size)
    spread = r.max(dim=1).values - r.min(dim=1).values
    keep = spread > atol
    dropped = ~keep
    all_correct = r.min(dim=1).values >= correct_reward
    return DynamicSamplingFilter(
        keep_groups=keep,
        keep_samples=keep.repeat_interleave(group_size),
        num_kept_groups=int(keep.sum()),
        num_dropped_groups=int(dropped.sum()),
        num_dropped_all_correct=int((dropped & all_correct).sum()),
        num_dropped_other=int((dropped & ~all_correct).sum()),
    )
