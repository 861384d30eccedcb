"""Policy losses for one micro-batch: PPO-clip (GRPO, Dr. GRPO), GSPO, GSPO-token; clip-higher, dual-clip, KL term,
and the three aggregation modes with GLOBAL normalisers.

Why global normalisers: a data-parallel trainer with gradient accumulation sums (averages) gradients of micro-batch
losses. If each micro-batch divided by its own token or sequence count, the gradient would depend on how the batch was
split. Here every micro-batch divides by the counts of the WHOLE mini-batch (all ranks, all accumulation steps), so
sum over micro-batches and ranks of `policy_loss(...).loss` is exactly the full-batch loss. With DDP/DeepSpeed, which
AVERAGE gradients over world_size ranks, multiply the micro-batch loss by world_size before backward (or equivalently
pass global counts divided by world_size).

Aggregations (algorithms.md):
  token_mean              sum_{i,t} L_it / global_tokens              (TRL dapo, verl token-mean)
  seq_mean_token_mean     sum_i (sum_t L_it / |o_i|) / global_seqs     (TRL grpo, verl seq-mean-token-mean)
  seq_mean_token_sum_norm sum_i (sum_t L_it / max_len) / global_seqs   (Dr. GRPO, verl seq-mean-token-sum-norm)
Sequences with an empty response mask contribute nothing and are not counted in global_seqs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ngrpo_ray.core.kl import KLEstimator, kl_per_token

LossType = Literal["grpo", "gspo", "gspo_token", "dr_grpo"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "gspo", "gspo_token", "dr_grpo")
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
DEFAULT_AGGREGATION: dict[str, str] = {
    "grpo": "seq_mean_token_mean",  # N-GRPO eq. 13: 1/G sum_i 1/|o_i| sum_t
    "gspo": "seq_mean_token_mean",  # GSPO: 1/G sum_i of a sequence-level term
    "gspo_token": "seq_mean_token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
}
LOG_RATIO_CLAMP = 20.0  # as verl: keeps exp finite; a clamped ratio has no gradient


@dataclass(frozen=True)
class PolicyLossConfig:
    loss_type: LossType = "grpo"
    eps_low: float = 0.2
    eps_high: float = 0.2  # clip-higher (DAPO) when > eps_low
    dual_clip: float | None = None  # c > 1 (3 in DAPO/verl): for A < 0 the loss is capped at -c*A; None: off
    beta: float = 0.0  # KL-as-loss coefficient; 0: no KL term (ref_logp not needed)
    kl_estimator: KLEstimator = "k3"
    aggregation: Aggregation | None = None  # None: DEFAULT_AGGREGATION[loss_type]
    max_len: int | None = None  # the constant of seq_mean_token_sum_norm (the max response length)

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError("eps_low and eps_high must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip={self.dual_clip} must be > 1 (or None to turn it off)")
        if self.resolved_aggregation == "seq_mean_token_sum_norm" and not self.max_len:
            raise ValueError("aggregation seq_mean_token_sum_norm needs max_len (the max response length)")

    @property
    def resolved_aggregation(self) -> str:
        return self.aggregation or DEFAULT_AGGREGATION[self.loss_type]


@dataclass(frozen=True)
class GlobalNormalizers:
    """All-reduced counts of the whole mini-batch (every rank, every accumulation micro-batch)."""

    tokens: int  # response tokens
    seqs: int  # sequences with at least one response token


def global_normalizers(masks: Iterable[torch.Tensor]) -> GlobalNormalizers:
    """Counts over a list of response masks [B_j, T_j] (the micro-batches of this rank). On several ranks, all-reduce
    (SUM) the two numbers afterwards."""
    tokens = seqs = 0
    for m in masks:
        m = m.to(torch.bool)
        tokens += int(m.sum())
        seqs += int(m.any(dim=1).sum())
    return GlobalNormalizers(tokens=tokens, seqs=seqs)


@dataclass(frozen=True)
class PolicyLossOutput:
    loss: torch.Tensor  # scalar: this micro-batch's share of the global loss (sum the shares over micro-batches)
    metrics: dict[str, torch.Tensor]  # detached sums/counts/maxes; see finalize_policy_metrics


def _ratios(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Importance ratio per token [B, T], with the gradient each loss type wants."""
    log_ratio = logp - old_logp
    if loss_type in ("grpo", "dr_grpo"):
        return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lengths = mask.sum(dim=1).clamp(min=1)
    seq_log_ratio = (log_ratio * mask).sum(dim=1) / lengths  # log s_i: mean over the response
    if loss_type == "gspo":
        return torch.exp(seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))[:, None].expand_as(logp)
    # gspo_token: s_it = sg[s_i] * pi_t / sg[pi_t]: value s_i, d s_it / d logp_t = s_i
    token_log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()
    return torch.exp(token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _aggregate(values: torch.Tensor, mask: torch.Tensor, aggregation: str, norm: GlobalNormalizers,
               max_len: int | None) -> torch.Tensor:
    masked = values * mask
    if aggregation == "token_mean":
        return masked.sum() / max(norm.tokens, 1)
    if aggregation == "seq_mean_token_mean":
        per_seq = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.sum() / max(norm.seqs, 1)
    if aggregation == "seq_mean_token_sum_norm":
        return masked.sum() / (float(max_len) * max(norm.seqs, 1))
    raise ValueError(f"aggregation={aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PolicyLossConfig,
    normalizers: GlobalNormalizers,
    ref_logp: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """Loss to MINIMISE for one micro-batch: -(clipped surrogate) + beta * KL, aggregated with global normalisers.

    logp, old_logp, ref_logp, response_mask: [B, T]; advantages: [B] or [B, T] ("gspo" needs [B]: use "gspo_token"
    for per-token advantages); logits [B, T, V] optional, only for the entropy metric,
    or ``entropy`` [B, T], the per-token entropy already computed (the trainer computes it chunk by chunk and keeps
    no [B, T, V] tensor).
    is_weights [B, T] optional: rollout-correction weights (core.rollout_correction), detached, multiplying each token's
    policy-gradient term (not the KL term). For "gspo" the term is the sequence's objective repeated over its tokens,
    so a sequence-level weight scales that sequence's objective, and token-level weights scale it by their mean over
    the sequence's tokens (as the aggregation weighs them). "gspo_token" routes token t's gradient through token t
    only, so there token-level weights act token by token, as in "grpo" (same for sequence-level weights).

    Per token, with ratio R and advantage A:
      L = max(-A R, -A clip(R, 1-eps_low, 1+eps_high));  if dual_clip c and A < 0: L = min(L, -A c).
    """
    if logp.shape != old_logp.shape or logp.shape != response_mask.shape:
        raise ValueError(f"shapes differ: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, "
                         f"mask {tuple(response_mask.shape)}")
    if advantages.ndim == 2 and config.loss_type == "gspo":
        raise ValueError("loss_type 'gspo' takes sequence advantages [B]; use 'gspo_token' for per-token advantages")
    mask = response_mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    adv = adv[:, None].expand_as(logp) if adv.ndim == 1 else adv
    old_logp = old_logp.detach()

    ratio = _ratios(logp, old_logp, mask, config.loss_type)
    clipped_ratio = ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    pg = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    negative = adv < 0
    if config.dual_clip is not None:
        pg = torch.where(negative, torch.minimum(pg, -adv * config.dual_clip), pg)
    if is_weights is not None:
        if is_weights.shape != logp.shape:
            raise ValueError(f"is_weights {tuple(is_weights.shape)} must match logp {tuple(logp.shape)}")
        pg = pg * is_weights.detach().to(pg.dtype)

    total = pg
    kl = None
    if config.beta != 0.0:
        if ref_logp is None:
            raise ValueError(f"beta={config.beta} needs ref_logp")
        kl = kl_per_token(logp, ref_logp.detach(), config.kl_estimator)
        total = pg + config.beta * kl
    aggregation = config.resolved_aggregation
    loss = _aggregate(total, mask, aggregation, normalizers, config.max_len)

    with torch.no_grad():
        on = response_mask.to(torch.bool)
        r = ratio.detach()
        # a token is "clipped" where the clip removes its policy gradient
        high = on & (adv > 0) & (r > 1.0 + config.eps_high)
        low = on & negative & (r < 1.0 - config.eps_low)
        dual = on & negative & (r > config.dual_clip) if config.dual_clip is not None else torch.zeros_like(on)
        metrics: dict[str, torch.Tensor] = {
            "token_count": on.sum().to(torch.float64),
            "seq_count": on.any(dim=1).sum().to(torch.float64),
            "clip_high_count": high.sum().to(torch.float64),
            "clip_low_count": low.sum().to(torch.float64),
            "dual_clip_count": dual.sum().to(torch.float64),
            "clip_count": (high | low | dual).sum().to(torch.float64),
            "ratio_sum": (r * on).sum().to(torch.float64),
            "ratio_max": r[on].max().to(torch.float64) if on.any() else torch.tensor(0.0, dtype=torch.float64),
            "pg_loss": _aggregate(pg.detach(), mask, aggregation, normalizers, config.max_len).to(torch.float64),
            "loss": loss.detach().to(torch.float64),
        }
        if kl is not None:
            metrics["kl_sum"] = (kl.detach() * on).sum().to(torch.float64)
        if entropy is None and logits is not None:
            logprobs = torch.log_softmax(logits.detach().float(), dim=-1)
            entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
        if entropy is not None:
            metrics["entropy_sum"] = (entropy.detach().float() * on).sum().to(torch.float64)
    return PolicyLossOutput(loss=loss, metrics=metrics)


_MAX_KEYS = ("ratio_max",)


def reduce_policy_metrics(per_micro_batch: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Combine metrics of several micro-batches (or ranks): SUM everything except *_max keys (MAX). Across ranks use
    all_reduce with the same ops."""
    out: dict[str, torch.Tensor] = {}
    for m in per_micro_batch:
        for k, v in m.items():
            if k not in out:
                out[k] = v.clone()
            elif k in _MAX_KEYS:
                out[k] = torch.maximum(out[k], v)
            else:
                out[k] = out[k] + v
    return out


def finalize_policy_metrics(summed: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Turn reduced sums into loggable numbers: fractions and means per response token. `loss` and `pg_loss` are
    already shares of the global loss, so their sum is the mini-batch value."""
    tokens = max(float(summed["token_count"]), 1.0)
    out = {
        "clip_frac": float(summed["clip_count"]) / tokens,
        "clip_frac_high": float(summed["clip_high_count"]) / tokens,
        "clip_frac_low": float(summed["clip_low_count"]) / tokens,
        "dual_clip_frac": float(summed["dual_clip_count"]) / tokens,
        "ratio_mean": float(summed["ratio_sum"]) / tokens,
        "ratio_max": float(summed["ratio_max"]),
        "pg_loss": float(summed["pg_loss"]),
        "loss": float(summed["loss"]),
        "tokens": float(summed["token_count"]),
        "seqs": float(summed["seq_count"]),
    }
    if "kl_sum" in summed:
        out["kl_mean"] = float(summed["kl_sum"]) / tokens
    if "entropy_sum" in summed:
        out["entropy_mean"] = float(summed["entropy_sum"]) / tokens
    return out
