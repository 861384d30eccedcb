"""Rollout correction: weights that account for the engine (behaviour policy) not being the trainer's old policy.

The engine samples a response with its own kernels and dtype (pi_behaviour, the record's ``logprobs``); the trainer
recomputes the same tokens' log-probs with the weights it holds (pi_old, ``trainer.old_logprobs: recompute``). In bf16
they differ (issue 14: max |diff| 0.48, 45% of tokens over 0.1 on a peaked model), so the PPO/GRPO update, whose ratio
is pi_theta / pi_old, treats the engine's samples as if pi_old had drawn them. The correction multiplies each token's
policy-gradient term by a DETACHED weight built from r = pi_old / pi_behaviour:

  tis  truncated importance sampling: w = min(r, C)                      (Yao et al. 2025; TRL, verl rollout_is)
  mis  masked importance sampling:    w = 1 if 1/C <= r <= C else 0      (drop what is too far off-policy)

  level token:    r_t = exp(logp_old_t - logp_behaviour_t), one weight per token
  level sequence: r_i = exp(sum_t (logp_old_t - logp_behaviour_t)), one weight per sequence for all its tokens

The log ratio is clamped to +-20 before exp (as verl). The KL term, if any, is not weighted (verl does the same).
The PPO ratio pi_theta / pi_old and its clip are unchanged: the weight multiplies the clipped term (verl's
decoupled form). With GSPO the per-token term is the sequence's objective min(s_i A_i, clip(s_i) A_i) repeated over
its tokens, so a sequence-level weight scales that objective by w_i, and token-level weights scale it by their mean
over the sequence's tokens (GSPO-token instead routes token t's gradient through token t: weighted token by token).
With ``old_logprobs: rollout`` pi_old IS pi_behaviour, r = 1 and the correction is the identity: the config refuses
that combination instead of silently doing nothing.

Defaults: token level, C = 2 -- verl's rollout_is example (``rollout_is: token``, ``rollout_is_threshold: 2.0``) and
TRL's original ``vllm_importance_sampling_correction`` (token TIS, cap 2; newer TRL moved to sequence masking, cap 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

CorrectionMode = Literal["none", "tis", "mis"]
CorrectionLevel = Literal["token", "sequence"]
CORRECTION_MODES: tuple[str, ...] = ("none", "tis", "mis")
CORRECTION_LEVELS: tuple[str, ...] = ("token", "sequence")
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class RolloutCorrection:
    mode: CorrectionMode = "none"
    level: CorrectionLevel = "token"
    cap: float = 2.0  # C: the TIS truncation, and the MIS interval [1/C, C]

    def __post_init__(self) -> None:
        if self.mode not in CORRECTION_MODES:
            raise ValueError(f"rollout_correction={self.mode!r}; allowed: {', '.join(CORRECTION_MODES)}")
        if self.level not in CORRECTION_LEVELS:
            raise ValueError(f"rollout_correction_level={self.level!r}; allowed: {', '.join(CORRECTION_LEVELS)}")
        if not self.cap > 1.0:
            raise ValueError(f"rollout_correction_cap={self.cap} must be > 1")

    @property
    def active(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class CorrectionWeights:
    weights: torch.Tensor  # [B, T] float32, detached; 0 off the response mask
    sums: dict[str, torch.Tensor]  # reducible counts (SUM over micro-batches and ranks); see finalize_correction


def importance_log_ratio(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                         level: str) -> torch.Tensor:
    """log(pi_old / pi_behaviour) per token [B, T] (token level) or per sequence [B] (sequence level: the sum over
    the response), 0 off the mask, clamped to +-20."""
    m = mask.to(torch.float32)
    diff = (old_logp.detach().float() - behaviour_logp.detach().float()) * m
    if level == "sequence":
        diff = diff.sum(dim=1)
    elif level != "token":
        raise ValueError(f"level={level!r}; allowed: {', '.join(CORRECTION_LEVELS)}")
    return diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@torch.no_grad()
def correction_weights(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                       config: RolloutCorrection) -> CorrectionWeights:
    """The per-token weights [B, T] of ``config`` and the counts behind its metrics.

    Counted units are tokens (token level) or sequences with a non-empty response (sequence level): ``affected`` is
    the number capped (tis: r > C) or masked (mis: r outside [1/C, C]).
    """
    on = mask.to(torch.bool)
    m = on.to(torch.float32)
    if not config.active:
        return CorrectionWeights(weights=m, sums=_sums(m, on, torch.zeros_like(on), on))
    ratio = importance_log_ratio(old_logp, behaviour_logp, on, config.level).exp()
    if config.mode == "tis":
        unit_w, affected = ratio.clamp(max=config.cap), ratio > config.cap
    else:
        keep = (ratio >= 1.0 / config.cap) & (ratio <= config.cap)
        unit_w, affected = keep.to(torch.float32), ~keep
    if config.level == "sequence":
        units = on.any(dim=1)
        weights = unit_w[:, None] * m
        affected = affected & units
    else:
        units = on
        weights = unit_w * m
        affected = affected & on
    return CorrectionWeights(weights=weights, sums=_sums(weights, on, affected, units))


def _sums(weights: torch.Tensor, on: torch.Tensor, affected: torch.Tensor, units: torch.Tensor) -> dict:
    return {
        "rc_affected_count": affected.sum().to(torch.float64),
        "rc_unit_count": units.sum().to(torch.float64),
        "rc_weight_sum": (weights * on).sum().to(torch.float64),
        "rc_token_count": on.sum().to(torch.float64),
    }


def finalize_correction(summed: dict[str, torch.Tensor], config: RolloutCorrection) -> dict[str, float]:
    """Loggable numbers: the fraction of units (tokens or sequences) capped (tis) or masked (mis), and the mean
    weight over response tokens (for mis: the fraction of tokens kept). Empty when the correction is off."""
    if not config.active:
        return {}
    units = max(float(summed["rc_unit_count"]), 1.0)
    tokens = max(float(summed["rc_token_count"]), 1.0)
    name = "capped_fraction" if config.mode == "tis" else "masked_fraction"
    return {name: float(summed["rc_affected_count"]) / units, "weight_mean": float(summed["rc_weight_sum"]) / tokens}
