"""The soft-token baselines for the gated rows of one sampler call (device, vectorised over the rows), as
core.strategies.soft_mixtures defines them:

candidates c = top-K of logp = log_softmax(logits / temperature) (K = the request's top_k, the record width);
- gumbel_topk (SofT-GRPO): scores = logp_c + g, weights = softmax(scores / gumbel_tau), anchor = c[argmax scores];
- soft_thinking: weights = softmax(logp_c) (the probabilities renormalised over the top-K), anchor = c[0];
- latent_gumbel (Latent-GRPO): g clamped to noise_clamp and, one-sided, shifted by -noise_clamp[0];
  scores = logp_c + noise_scale * g, weights = softmax(scores / gumbel_tau), anchor = c[argmax scores].
g is Gumbel(0, 1) noise from the response's counter-based stream (core.gate_stream.gumbel, keyed by the step and the
candidate rank), the reference generator's draws, so a replay recomputes the weights. The anchor's logprob is
logp at the anchor. Rows of several requests with different K share one top-K of the widest; the columns past a
row's own K are padding (the first candidate, weight 0). No tensor value is read on the host.
"""

from __future__ import annotations

import numpy as np
import torch

from ngrpo_ray.core import gate_stream
from ngrpo_ray.engine.hook_batch import SOFT, GatedGroup, pad_columns

SOFT_THINKING = gate_stream.STRATEGY_CODES["soft_thinking"]
LATENT = gate_stream.STRATEGY_CODES["latent_gumbel"]


def soft_group(hook, z: torch.Tensor, log_norm: torch.Tensor | None, slot_t: torch.Tensor, slots: np.ndarray,
               steps: np.ndarray, start: int, end: int) -> GatedGroup:
    """z: [n, V] the rows' scaled logits; ``log_norm`` [n] their logsumexp (None: computed here)."""
    table = hook.requests
    logp = z - (log_norm if log_norm is not None else torch.logsumexp(z, dim=-1)).unsqueeze(1)
    width = min(int(table.width[slots].max()), z.shape[1])  # host column
    top_logp, cand = torch.topk(logp, width, dim=-1)
    keys_steps = hook.to_device(np.stack([table.key[slots], steps]))
    g = gate_stream.gumbel(keys_steps[0], keys_steps[1], width)
    code = table.code_t.index_select(0, slot_t).unsqueeze(1)
    lo = table.clamp_lo.index_select(0, slot_t).unsqueeze(1)
    hi = table.clamp_hi.index_select(0, slot_t).unsqueeze(1)
    one_sided = table.one_sided.index_select(0, slot_t).unsqueeze(1)
    latent = torch.maximum(torch.minimum(g, hi), lo)  # clamp with per-row bounds
    latent = torch.where(one_sided, latent - lo, latent)
    noise = torch.where(code == LATENT, table.noise_scale.index_select(0, slot_t).unsqueeze(1) * latent, g)
    scores = torch.where(code == SOFT_THINKING, top_logp, top_logp + noise)
    temp = torch.where(code.squeeze(1) == SOFT_THINKING, torch.ones_like(lo.squeeze(1)),
                       table.gumbel_tau.index_select(0, slot_t))
    col = torch.arange(width, device=z.device).unsqueeze(0)
    in_set = col < table.width_t.index_select(0, slot_t).unsqueeze(1)
    # a Python -inf, not torch.tensor(-inf, device=...): that would be a blocking host-to-device copy every step
    alpha = torch.softmax(torch.where(in_set, scores / temp.unsqueeze(1), float("-inf")), dim=-1)
    pick = torch.where(in_set, scores, float("-inf")).argmax(dim=-1, keepdim=True)
    anchor = cand.gather(1, pick).squeeze(1)
    cand = torch.where(in_set, cand, cand[:, :1])
    cand, alpha = pad_columns(cand, alpha, hook.k_max)
    banned = table.id_sets[table.ban_set.index_select(0, slot_t), anchor]
    return GatedGroup(SOFT, start, end, mixed=~table.stopped.index_select(0, slot_t) & ~banned, cand=cand,
                      alpha=alpha, anchor=anchor, anchor_logprob=top_logp.gather(1, pick).squeeze(1),
                      emit_sampled=table.emit_sampled.index_select(0, slot_t))
