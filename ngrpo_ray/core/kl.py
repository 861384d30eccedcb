"""Per-token KL estimators between the policy and the reference, and the two ways to use them.

log_r = logp - logp_ref (log-probs of the sampled tokens), clamped to +-20 for every estimator (so exp never
overflows; k1/k2 are unchanged inside that range):
  k1 = log_r                       (unbiased, high variance; the usual choice for KL-as-reward)
  k2 = 0.5 * log_r**2
  k3 = exp(-log_r) - 1 + log_r     (Schulman's low-variance estimator: verl `low_var_kl`, TRL's only one), clamped to
                                   +-10 like verl. Use k2 or k3 as a loss term.
A clamped value has zero gradient, as in verl.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens; same shape as logp."""
    log_r = (logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return (torch.exp(-log_r) - 1.0 + log_r).clamp(-K3_CLAMP, K3_CLAMP)
    raise ValueError(f"unknown kl estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}")


def kl_penalized_token_rewards(
    rewards: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    response_mask: torch.Tensor,
    beta: float,
    estimator: KLEstimator = "k1",
) -> torch.Tensor:
    """KL as reward (verl `use_kl_in_reward`): token rewards [N, T] = r_i at the last response token minus
    beta * KL_t at every response token (0 outside the mask). Sum over T for a sequence-level reward (GRPO).

    Computed without gradient: a reward is a constant for the policy update.
    """
    with torch.no_grad():
        mask = response_mask.to(logp.dtype)
        lengths = response_mask.to(torch.int64).sum(dim=1)
        token_rewards = -beta * kl_per_token(logp, ref_logp, estimator) * mask
        rows = torch.nonzero(lengths > 0).squeeze(1)
        # last True position of each non-empty row: T-1 minus the first True of the flipped row
        last = response_mask.shape[1] - 1 - response_mask.to(torch.int64).flip(1).argmax(dim=1)
        token_rewards[rows, last[rows]] += rewards.to(token_rewards.dtype)[rows]
    return token_rewards
