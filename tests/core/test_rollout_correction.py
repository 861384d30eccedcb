"""Rollout correction (issue 14): TIS weights and MIS masks by hand on a constructed engine-vs-trainer mismatch, at
token and sequence level, and the policy loss's gradient scaled by exactly those factors (GRPO per token, GSPO per
sequence), the KL term left alone."""

import math

import pytest
import torch

from ngrpo_ray.core.losses import PolicyLossConfig, global_normalizers, policy_loss
from ngrpo_ray.core.rollout_correction import (
    RolloutCorrection,
    correction_weights,
    finalize_correction,
    importance_log_ratio,
)

# r = pi_old / pi_behaviour per token; off-mask positions carry wild values that must be ignored.
#   row 0: [0.4, 1.0, 3.0]            sequence ratio 1.2
#   row 1: [2.5, 1.2, (masked 50)]    sequence ratio 3.0
#   row 2: [0.3, (masked), (masked)]  sequence ratio 0.3
RATIOS = [[0.4, 1.0, 3.0], [2.5, 1.2, 50.0], [0.3, 1e-6, 80.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -2.0], [-0.7, -1.0, -1.0]])
BEHAVIOUR = OLD - torch.tensor(RATIOS).log()  # log(pi_old / pi_behaviour) = log RATIOS
ADV = torch.tensor([1.0, -2.0, 0.5])
C = 2.0

# expected weights (0 off the mask), and the capped / masked counts
TIS_TOKEN = [[0.4, 1.0, 2.0], [2.0, 1.2, 0.0], [0.3, 0.0, 0.0]]  # 3.0 and 2.5 capped: 2 of 6 tokens
MIS_TOKEN = [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # 0.4, 3.0, 2.5, 0.3 outside [0.5, 2]: 4 of 6
TIS_SEQ = [[1.2, 1.2, 1.2], [2.0, 2.0, 0.0], [0.3, 0.0, 0.0]]  # sequence 1 (3.0) capped: 1 of 3
MIS_SEQ = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # sequences 1 (3.0) and 2 (0.3) masked: 2 of 3

CASES = [  # mode, level, weights, metric name, affected fraction, mean weight over the 6 response tokens
    ("tis", "token", TIS_TOKEN, "capped_fraction", 2 / 6, 6.9 / 6),
    ("mis", "token", MIS_TOKEN, "masked_fraction", 4 / 6, 2 / 6),
    ("tis", "sequence", TIS_SEQ, "capped_fraction", 1 / 3, 7.9 / 6),
    ("mis", "sequence", MIS_SEQ, "masked_fraction", 2 / 3, 3 / 6),
]


@pytest.mark.parametrize("mode, level, expected, name, fraction, mean_weight", CASES)
def test_weights_and_counts_by_hand(mode, level, expected, name, fraction, mean_weight):
    cfg = RolloutCorrection(mode, level, C)
    cw = correction_weights(OLD, BEHAVIOUR, MASK, cfg)
    torch.testing.assert_close(cw.weights, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert not cw.weights.requires_grad
    f = finalize_correction(cw.sums, cfg)
    assert f[name] == pytest.approx(fraction) and f["weight_mean"] == pytest.approx(mean_weight, rel=1e-5)


def test_sequence_log_ratio_is_the_masked_sum():
    torch.testing.assert_close(importance_log_ratio(OLD, BEHAVIOUR, MASK, "sequence"),
                               torch.tensor([math.log(1.2), math.log(3.0), math.log(0.3)]), rtol=1e-5, atol=1e-6)


def test_none_is_the_mask_and_logs_nothing():
    cfg = RolloutCorrection("none")
    cw = correction_weights(OLD, BEHAVIOUR, MASK, cfg)
    torch.testing.assert_close(cw.weights, MASK.float())
    assert finalize_correction(cw.sums, cfg) == {}


def test_config_checks():
    with pytest.raises(ValueError, match="rollout_correction_cap"):
        RolloutCorrection("tis", "token", 1.0)
    with pytest.raises(ValueError, match="allowed: none, tis, mis"):
        RolloutCorrection("is")
    with pytest.raises(ValueError, match="allowed: token, sequence"):
        RolloutCorrection("tis", "geometric")


def _grad(cfg: PolicyLossConfig, weights: torch.Tensor | None, ref=None):
    """d loss / d logp at logp = pi_old (PPO ratio 1: nothing clipped)."""
    logp = OLD.clone().requires_grad_(True)
    out = policy_loss(logp, OLD, ADV, MASK, cfg, global_normalizers([MASK]), ref_logp=ref, is_weights=weights)
    out.loss.backward()
    return logp.grad


@pytest.mark.parametrize("mode, level, expected, name, fraction, mean_weight", CASES)
def test_grpo_gradient_is_scaled_per_token(mode, level, expected, name, fraction, mean_weight):
    w = correction_weights(OLD, BEHAVIOUR, MASK, RolloutCorrection(mode, level, C)).weights
    cfg = PolicyLossConfig(loss_type="grpo")
    plain, corrected = _grad(cfg, None), _grad(cfg, w)
    # by hand: seq_mean_token_mean over 3 sequences, ratio 1: d L / d logp_it = -A_i / |o_i| / 3, times w_it
    lengths = MASK.sum(dim=1, keepdim=True).float()
    hand = -ADV[:, None] / lengths / 3 * MASK
    torch.testing.assert_close(plain, hand)
    torch.testing.assert_close(corrected, hand * torch.tensor(expected), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["gspo", "gspo_token"])
@pytest.mark.parametrize("mode, level, expected, name, fraction, mean_weight", CASES)
def test_gspo_gradient_is_scaled_per_sequence(loss_type, mode, level, expected, name, fraction, mean_weight):
    """GSPO's term is the sequence's objective repeated over its tokens: the weight scales the whole sequence, by w_i
    (sequence level) or by the mean of its tokens' weights (token level), uniformly over its tokens.
    GSPO-token (s_it = sg[s_i] pi_t / sg[pi_t]) routes token t's term through token t only, so token-level weights
    scale token by token there, as in GRPO; sequence-level weights scale both alike."""
    w = correction_weights(OLD, BEHAVIOUR, MASK, RolloutCorrection(mode, level, C)).weights
    cfg = PolicyLossConfig(loss_type=loss_type)
    plain, corrected = _grad(cfg, None), _grad(cfg, w)
    lengths = MASK.sum(dim=1).float()
    # by hand: s_i = 1, d L / d logp_it = -A_i s_i / |o_i| / 3 (every token of the sequence alike)
    hand = (-ADV / lengths / 3)[:, None] * MASK
    torch.testing.assert_close(plain, hand)
    if loss_type == "gspo":
        factor = (torch.tensor(expected).sum(dim=1) / lengths)[:, None]  # mean weight of each sequence's tokens
    else:
        factor = torch.tensor(expected)
    torch.testing.assert_close(corrected, hand * factor, rtol=1e-5, atol=1e-7)


def test_kl_term_is_not_weighted():
    ref = (OLD - 1.0).detach()
    cfg = PolicyLossConfig(loss_type="grpo", beta=0.1, kl_estimator="k3")
    zero = torch.zeros_like(OLD)
    only_kl = _grad(cfg, zero, ref)
    # k3 with log_r = 1: d k3 / d logp = 1 - e^-1, aggregated like the pg term
    lengths = MASK.sum(dim=1, keepdim=True).float()
    torch.testing.assert_close(only_kl, 0.1 * (1 - math.exp(-1)) / lengths / 3 * MASK)
