"""KL estimators k1/k2/k3 by hand, clamping, and KL as a per-token reward."""

import math

import pytest
import torch

from ngrpo_ray.core.kl import kl_penalized_token_rewards, kl_per_token


def test_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -1.5])
    ref = torch.tensor([-2.0, -1.0, -1.5])  # log_r = 1, -1, 0
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(kl_per_token(logp, ref, "k2"), torch.tensor([0.5, 0.5, 0.0]))
    # k3 = exp(-log_r) - 1 + log_r: e^-1 = 0.367879; e^1 - 2 = 0.718282; 0
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"),
                               torch.tensor([math.exp(-1), math.e - 2, 0.0]))


def test_k3_gradient_by_hand():
    logp = torch.tensor([-1.0], requires_grad=True)
    kl_per_token(logp, torch.tensor([-2.0]), "k3").sum().backward()
    # d/dlogp [exp(-log_r) - 1 + log_r] = 1 - exp(-log_r) = 1 - e^-1
    assert logp.grad.item() == pytest.approx(1 - math.exp(-1))


def test_clamping():
    logp = torch.tensor([30.0, -30.0, 5.0], requires_grad=True)
    ref = torch.zeros(3)
    # log_r clamped to +-20
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), torch.tensor([20.0, -20.0, 5.0]))
    torch.testing.assert_close(kl_per_token(logp, ref, "k2"), torch.tensor([200.0, 200.0, 12.5]))
    # k3(20) = e^-20 + 19 -> 10; k3(-20) = e^20 - 21 -> 10; k3(5) = e^-5 + 4 = 4.006738
    k3 = kl_per_token(logp, ref, "k3")
    torch.testing.assert_close(k3, torch.tensor([10.0, 10.0, math.exp(-5) + 4]))
    k3.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, 1 - math.exp(-5)]))  # clamped: no gradient


def test_unknown_estimator_names_allowed_values():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_per_token(torch.zeros(1), torch.zeros(1), "k4")


def test_kl_as_reward_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.7])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    ref = torch.zeros(3, 3)
    logp = torch.tensor([[1.0, -1.0, 5.0], [0.5, 0.0, 0.0], [1.0, 1.0, 1.0]])  # log_r = logp
    out = kl_penalized_token_rewards(rewards, logp, ref, mask, beta=0.1, estimator="k1")
    expected = torch.tensor([
        [-0.1, 0.1 + 1.0, 0.0],  # reward at the last response token (position 1); masked position 2 is 0
        [-0.05, 0.0, 0.0],       # reward 0 at position 2
        [0.0, 0.0, 0.0],         # empty response: nothing
    ])
    torch.testing.assert_close(out, expected)
    assert out[0].sum().item() == pytest.approx(1.0 - 0.1 * (1.0 - 1.0))
