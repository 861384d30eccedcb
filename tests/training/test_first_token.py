"""Latent-GRPO's first-token selection on rollout batches: per-token advantages, by hand."""

import torch

from ngrpo_ray.training.first_token import first_token_advantages


class B:  # RolloutBatch-like: only the engine's log-probs are read
    def __init__(self, logprobs):
        self.logprobs = [torch.tensor(x) for x in logprobs]


def test_best_correct_response_keeps_its_first_step():
    # group 0 (responses 0-2): 0 and 1 correct; mean old log-prob 0: (-1-3)/2 = -2, 1: (-0.5-0.5-2)/3 = -1 -> 1 wins.
    # group 1 (responses 3-5): none correct -> every first step zeroed.
    batches = [B([[-1.0, -3.0], [-0.5, -0.5, -2.0]]), B([[-0.1], [-1.0, -1.0], [-0.2, -0.2], [-0.3]])]
    adv = torch.tensor([0.5, 0.5, -1.0, 0.0, 0.0, 0.0])
    correct = torch.tensor([True, True, False, False, False, False])
    per_token, info = first_token_advantages(batches, adv, correct, group_size=3)
    assert [t.tolist() for t in per_token] == [[0.0, 0.5], [0.5, 0.5, 0.5], [0.0], [0.0, 0.0], [0.0, 0.0], [0.0]]
    assert info == {"adv/first_steps_zeroed": 2.0, "adv/groups_without_correct": 1.0}
