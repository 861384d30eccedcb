"""The rollout-vs-trainer gap: how far the engine's log-probs (behaviour policy) are from the trainer's for the SAME
sampled tokens and inputs, before any update.

diff_t = logp_trainer_t - logp_behaviour_t over response tokens. Logged per iteration (``mismatch/...``):
  abs_diff_mean, abs_diff_max    mean and max |diff_t|
  k3_kl                          mean of k3 = exp(-d) - 1 + d with d = logp_behaviour - logp_trainer: an unbiased,
                                 non-negative estimate of KL(behaviour || trainer), since the tokens were drawn by the
                                 engine (core.kl.kl_per_token with the engine as "policy" and the trainer as "ref")
  frac_abs_diff_over_0.1         fraction of tokens with |diff_t| > 0.1
  seq_ratio_p50/p90/min/max      over sequences, exp(sum_t diff_t): the SEQUENCE importance weight
                                 pi_trainer(y) / pi_behaviour(y) (the un-normalised product, as sequence-level rollout
                                 correction uses; GSPO's length-normalised exp(mean) would hide long-response drift)
  tokens, sequences_measured     how much was measured (fraction of the batch's sequences)
Sums and maxes are kept separately so ranks and micro-batches reduce exactly (SUM, or MAX for *_max keys); the
per-sequence log ratios travel in a vector indexed by the sequence's global position, summed over ranks.
"""

from __future__ import annotations

import torch

from ngrpo_ray.core.kl import kl_per_token

DIFF_THRESHOLD = 0.1
LOG_RATIO_CLAMP = 20.0


@torch.no_grad()
def gap_sums(trainer_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reducible token statistics of one [B, T] batch (float64 scalars)."""
    on = mask.to(torch.bool)
    t, b = trainer_logp.detach().double(), behaviour_logp.detach().double()
    absdiff = (t - b).abs() * on
    k3 = kl_per_token(b, t, "k3") * on
    return {
        "gap_token_count": on.sum().to(torch.float64),
        "gap_abs_diff_sum": absdiff.sum(),
        "gap_abs_diff_max": absdiff.max() if absdiff.numel() else torch.tensor(0.0, dtype=torch.float64),
        "gap_over_threshold_count": ((absdiff > DIFF_THRESHOLD) & on).sum().to(torch.float64),
        "gap_k3_sum": k3.sum(),
    }


@torch.no_grad()
def sequence_log_ratios(trainer_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] float64: sum over each response of (logp_trainer - logp_behaviour)."""
    on = mask.to(torch.bool)
    return ((trainer_logp.detach().double() - behaviour_logp.detach().double()) * on).sum(dim=1)


def empty_gap_sums() -> dict[str, torch.Tensor]:
    """The keys of gap_sums at zero (a rank that measured nothing still joins the reduction with the same keys)."""
    z = torch.zeros((), dtype=torch.float64)
    return {k: z.clone() for k in ("gap_token_count", "gap_abs_diff_sum", "gap_abs_diff_max",
                                   "gap_over_threshold_count", "gap_k3_sum")}


def add_gap_sums(total: dict[str, torch.Tensor], part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.maximum(total[k], part[k]) if k.endswith("_max") else total[k] + part[k] for k in total}


def finalize_gap(summed: dict[str, torch.Tensor], seq_log_ratio: torch.Tensor, measured: torch.Tensor) -> dict[str, float]:
    """Loggable numbers from reduced sums and the per-sequence log ratios of the measured sequences.

    ``seq_log_ratio`` [N] and ``measured`` [N] (1 where the sequence was measured) cover the whole batch."""
    tokens = float(summed["gap_token_count"])
    n = max(tokens, 1.0)
    chosen = measured.to(torch.bool)
    out = {
        "abs_diff_mean": float(summed["gap_abs_diff_sum"]) / n,
        "abs_diff_max": float(summed["gap_abs_diff_max"]),
        "k3_kl": float(summed["gap_k3_sum"]) / n,
        f"frac_abs_diff_over_{DIFF_THRESHOLD}": float(summed["gap_over_threshold_count"]) / n,
        "tokens": tokens,
        "sequences_measured": float(chosen.sum()) / max(int(measured.numel()), 1),
    }
    if bool(chosen.any()):
        ratios = seq_log_ratio.double()[chosen].clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        q = torch.quantile(ratios, torch.tensor([0.5, 0.9], dtype=torch.float64))
        out.update({"seq_ratio_p50": float(q[0]), "seq_ratio_p90": float(q[1]),
                    "seq_ratio_min": float(ratios.min()), "seq_ratio_max": float(ratios.max())})
    return out
