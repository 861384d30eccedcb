import math

import torch

from ngrpo_ray.core.diagnostics import mixed_anchor_cosine, reward_by_mixing


def test_cosine_by_hand():
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cand = torch.tensor([[0, 1], [2, 0]])
    alpha = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # step 0: mixed (0.5, 0.5) vs anchor (1, 0): cos = 0.5 / (sqrt(0.5) * 1) = 1/sqrt(2); step 1: identical -> 1
    out = mixed_anchor_cosine(E, cand, alpha)
    assert math.isclose(out["cosine_min"], 1 / math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(out["cosine_mean"], (1 / math.sqrt(2) + 1) / 2, rel_tol=1e-6)
    assert out["cosine_frac_below"] == 0.5 and out["count"] == 2


def test_empty_is_nan_not_zero():
    out = mixed_anchor_cosine(torch.eye(3), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert math.isnan(out["cosine_mean"]) and out["count"] == 0


def test_reward_split():
    out = reward_by_mixing(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([2, 0, 0, 1]))
    assert out == {"reward_mixed": 1.0, "reward_unmixed": 0.5, "responses_mixed_fraction": 0.5}
