"""Semantic Neighbor Mixing for the gated rows of one sampler call (device, vectorised over the rows).

anchor = argmax z (z = logits / temperature), C = neighbor_table[anchor, :k] (padding columns point at the anchor
with alpha 0), and alpha by the request's alpha_source:
- "logits" (paper eq. 9): softmax(logits[C] / tau);
- "filtered_probs" (the authors' released code): the probabilities after the request's top-k / top-p filtering,
  renormalised over C (core.strategies.neighbor_mix.neighbor_alpha): softmax over C of z, with the candidates that
  top-k (z below the k-th largest) or top-p (the probability mass of the tokens above it already reaches top_p) drop
  set to -inf. The anchor is never dropped. Per candidate column one [n, V] pass (k is small); no sort.
The row mixes unless its request stopped or the anchor is a stop / never-mix id. No tensor value is read on the host.
"""

from __future__ import annotations

import numpy as np
import torch

from ngrpo_ray.engine.hook_batch import NEIGHBOR, GatedGroup
from ngrpo_ray.engine.request_options import METRICS


def neighbor_group(hook, logits: torch.Tensor, z: torch.Tensor, log_norm: torch.Tensor | None, rows: torch.Tensor,
                   slot_t: torch.Tensor, slots: np.ndarray, start: int, end: int, comp) -> GatedGroup:
    """z: [n, V] the rows' scaled logits (temperature 1 when ``log_norm`` is None: the reuse path). ``comp``'s host
    facts (hook_batch.Composition) skip the padding columns, the filtered alpha and emit "sampled" when no row of the
    batch uses them: each skip leaves the values bit for bit, and each op saved is a kernel launch per decode step."""
    table = hook.requests
    anchor_z, anchor = z.max(dim=-1)  # the first maximum, as argmax
    banned = table.id_sets[table.ban_set.index_select(0, slot_t), anchor]
    group = GatedGroup(NEIGHBOR, start, end, mixed=~table.stopped.index_select(0, slot_t) & ~banned, anchor=anchor)
    cand = candidates(hook, slots, anchor)
    in_set = None
    if not comp.full_k:  # rows with k < k_max: padding columns point at the anchor with alpha 0
        col = torch.arange(hook.k_max, device=anchor.device).unsqueeze(0)
        in_set = col < table.k.index_select(0, slot_t).unsqueeze(1)
        cand = torch.where(in_set, cand, anchor.unsqueeze(1))
    scores = logits[rows.unsqueeze(1), cand].float() / table.tau.index_select(0, slot_t).unsqueeze(1)
    if in_set is not None:
        scores = torch.where(in_set, scores, float("-inf"))
    alpha = torch.softmax(scores, dim=-1)
    if comp.filtered and table.filtered[slots].any():  # host columns: some request takes the released code's alpha
        keep = _filter_keep(table, z, cand, slot_t, slots)
        keep = keep if in_set is None else keep & in_set
        alpha_f = torch.softmax(torch.where(keep, z.gather(1, cand), float("-inf")), dim=-1)
        alpha = torch.where(table.filtered_t.index_select(0, slot_t).unsqueeze(1), alpha_f, alpha)
    group.cand, group.alpha = cand, alpha
    if comp.emits_sampled:
        group.emit_sampled = table.emit_sampled.index_select(0, slot_t)
    if log_norm is not None:
        group.anchor_logprob = anchor_z - log_norm
    else:
        group.z, group.anchor_z = z, anchor_z
    return group


def _filter_keep(table, z: torch.Tensor, cand: torch.Tensor, slot_t: torch.Tensor, slots: np.ndarray) -> torch.Tensor:
    """[n, k] bool: the candidates that survive the request's top-k and top-p filters (core.sampling.filtered_logits)."""
    V = z.shape[1]
    minus_inf = float("-inf")  # a Python scalar: torch.tensor(-inf, device=...) is a blocking copy on CUDA
    top_k = table.filter_top_k[slots]
    if (top_k > 0).any():  # top-k: drop tokens below the k-th largest z
        widest = int(top_k.max())
        kth_col = (table.top_k_t.index_select(0, slot_t) - 1).clamp_min(0).unsqueeze(1)
        kth = torch.topk(z, min(widest, V), dim=-1).values.gather(1, kth_col)
        kth = torch.where(table.top_k_t.index_select(0, slot_t).unsqueeze(1) > 0, kth, minus_inf)
        z = z.masked_fill(z < kth, float("-inf"))
    z_c = z.gather(1, cand)
    keep = z_c > minus_inf
    if (table.filter_top_p[slots] < 1.0).any():  # top-p: drop a token when the mass above it reaches top_p
        p = torch.softmax(z, dim=-1)
        top_p = table.top_p_t.index_select(0, slot_t)
        for j in range(cand.shape[1]):
            above = (p * (z > z_c[:, j : j + 1])).sum(-1)
            keep[:, j] &= above < top_p
    return keep


def candidates(hook, slots: np.ndarray, anchor: torch.Tensor) -> torch.Tensor:
    """Neighbor-table rows of the anchors, by each request's metric (grouped on the host)."""
    codes = hook.requests.metric[slots]
    first = int(codes[0])
    if (codes == first).all():
        return hook.tables.rows(METRICS[first], anchor)
    out = torch.empty(len(slots), hook.k_max, dtype=torch.long, device=anchor.device)
    for code in np.unique(codes):
        idx = hook.to_device(np.flatnonzero(codes == code))
        out[idx] = hook.tables.rows(METRICS[int(code)], anchor.index_select(0, idx))
    return out
