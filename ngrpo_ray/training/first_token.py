"""Latent-GRPO's correct-path first-token selection on rollout batches (algorithm.first_token_selection), Ray-free.

core.advantages.correct_path_first_token_selection needs each response's mask and old log-probs; here they come from
the rollout records: pi_old is the engine's log-prob of each emitted token (the behaviour policy, equal to the
trainer's recomputed pi_old up to the engine/trainer gap, ~1e-4 in fp32; only the argmax over a group's correct
responses of the length-normalised sum is used). The result is one advantage per token, which the train step takes
as is: the group's best-scoring correct response keeps its first step's advantage, every other response of the group
gets 0 there.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ngrpo_ray.core.advantages import correct_path_first_token_selection


def first_token_advantages(batches: Sequence[Any], advantages: torch.Tensor, correct: torch.Tensor,
                           group_size: int) -> tuple[list[torch.Tensor], dict[str, float]]:
    """batches: RolloutBatch-like (``logprobs``: per response [T_i]) in training order; advantages [N]; correct [N]
    bool. Returns N per-token advantage tensors [T_i] and the counts."""
    logprobs = [lp.float() for b in batches for lp in b.logprobs]
    if len(logprobs) != advantages.numel():
        raise ValueError(f"{advantages.numel()} advantages for {len(logprobs)} responses")
    lengths = [int(lp.numel()) for lp in logprobs]
    T = max(lengths + [1])
    mask = torch.zeros(len(logprobs), T, dtype=torch.bool)
    old = torch.zeros(len(logprobs), T)
    for i, lp in enumerate(logprobs):
        mask[i, : lengths[i]] = True
        old[i, : lengths[i]] = lp
    out = correct_path_first_token_selection(advantages.float(), mask, old, correct.bool(), group_size)
    per_token = [out.token_advantages[i, : lengths[i]].clone() for i in range(len(logprobs))]
    return per_token, {"adv/first_steps_zeroed": float(out.num_first_steps_zeroed),
                       "adv/groups_without_correct": float(out.num_groups_without_correct)}
