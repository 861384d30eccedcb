"""The post-hook's write of one sampler call's gated rows: virtual ids, ring records, emitted ids and logprobs.

For each gated row that mixes, the id vLLM emits becomes VIRTUAL_BASE + c (c: the running counter) and slot c % S of
the ring gets (cand, alpha) (what the embedding feeds next), the text token and its logprob (what the records
return). The text token is the group's anchor, or vLLM's sampled token where the request emits "sampled" (then the
row mixes only if that token is no stop / never-mix id: a virtual id would hide it); gaussian_noise rows emit the
sampled token with cand = (token, ...), alpha = (1, 0, ...) and a noise row. Rows that do not mix write into the
sink row (index capacity). Everything stays on device: no tensor value is read on the host.
"""

from __future__ import annotations

import torch

from ngrpo_ray.engine.embedding_patch import VIRTUAL_BASE
from ngrpo_ray.engine.hook_batch import NOISE, GatedGroup, Pending

_INT32_MAX = (1 << 31) - 1


def _group_records(hook, g: GatedGroup, slots: torch.Tensor, drawn: torch.Tensor, drawn_lp: torch.Tensor | None):
    """(mixed, cand, alpha, token, logprob) of one group's rows."""
    table, V = hook.requests, hook.vocab_size

    def lp_or_zero():
        return drawn_lp if drawn_lp is not None else torch.zeros(drawn.shape[0], device=drawn.device)

    def banned_drawn():
        return table.id_sets[table.ban_set.index_select(0, slots), drawn.clamp(0, V)]

    if g.kind == NOISE:  # the sampled token, unless it is a stop / never-mix id
        mixed = ~table.stopped.index_select(0, slots) & ~banned_drawn()
        cand = drawn.unsqueeze(1).expand(-1, hook.k_max)
        alpha = torch.zeros(drawn.shape[0], hook.k_max, dtype=torch.float32, device=drawn.device)
        alpha[:, 0] = 1.0
        return mixed, cand, alpha, drawn, lp_or_zero()
    anchor_lp = g.anchor_logprob if g.anchor_logprob is not None else _anchor_logprob(hook, g, drawn, drawn_lp)
    mixed, token, logprob = g.mixed, g.anchor, anchor_lp
    if g.emit_sampled is not None:
        mixed = mixed & ~(g.emit_sampled & banned_drawn())
        token = torch.where(g.emit_sampled, drawn, g.anchor)
        logprob = torch.where(g.emit_sampled, lp_or_zero(), anchor_lp)
    return mixed, g.cand, g.alpha, token, logprob


def _anchor_logprob(hook, g: GatedGroup, drawn: torch.Tensor, drawn_lp: torch.Tensor | None) -> torch.Tensor:
    """log_softmax(z)[anchor] at temperature 1 without a pass over the vocabulary: vLLM's raw logprob of the
    drawn token s is z_s - logsumexp(z), so logsumexp(z) = z_s - lp_s."""
    from ngrpo_ray.engine.hook_batch import log_norm

    if drawn_lp is None:  # no logprobs requested from vLLM: the full pass
        return g.anchor_z - log_norm(g.z)
    z_s = g.z.gather(1, drawn.clamp_max(hook.vocab_size - 1).unsqueeze(1)).squeeze(1)
    return g.anchor_z - (z_s - drawn_lp)


def write_gated(hook, p: Pending, sampled: torch.Tensor, lp) -> None:
    """Virtual ids and ring records for the gated rows that mix; vLLM's emitted ids and logprobs rewritten."""
    drawn_all = sampled.index_select(0, p.g_rows)[:, 0].long()
    current_lp = lp.logprobs.index_select(0, p.g_rows)[:, 0].float() if lp is not None else None
    parts = [_group_records(hook, g, p.g_slots[g.start : g.end], drawn_all[g.start : g.end],
                            None if current_lp is None else current_lp[g.start : g.end]) for g in p.groups]
    if len(parts) == 1:
        mixed, cand, alpha, token, record_lp = parts[0]
    else:
        mixed, cand, alpha, token, record_lp = (torch.cat([part[i] for part in parts]) for i in range(5))
    m = mixed.long()
    offset = torch.cumsum(m, 0) - m  # rank among this step's mixed rows
    c = hook.counter + offset
    vid = VIRTUAL_BASE + c
    if VIRTUAL_BASE + hook.counter_bound > _INT32_MAX and int(vid.max()) + 1 > _INT32_MAX:  # rare: syncs
        raise RuntimeError("ngrpo virtual-id counter exhausted (int32); restart the engine")
    hook.counter += m.sum()
    emb = hook.embedding
    slot = torch.where(mixed, torch.remainder(c, emb.ngrpo_slots), hook.capacity)  # capacity: a write sink
    emb.ngrpo_ids[slot] = torch.where(mixed, vid, -1)
    emb.ngrpo_cand[slot] = cand
    emb.ngrpo_alpha[slot] = alpha.to(emb.ngrpo_alpha.dtype)
    hook.record_logprob[slot] = record_lp
    hook.record_token[slot] = token
    if emb.ngrpo_has_noise:  # every slot written this step gets its noise row (zeros for mixtures)
        noise = torch.zeros(mixed.shape[0], emb.embedding_dim, dtype=emb.ngrpo_noise.dtype, device=drawn_all.device)
        seeds = torch.full((mixed.shape[0],), -1, dtype=torch.int64, device=drawn_all.device)
        for g in p.groups:
            if g.kind == NOISE:
                noise[g.start : g.end] = g.noise
                seeds[g.start : g.end] = g.noise_seed
        emb.ngrpo_noise[slot] = noise
        hook.record_noise_seed[slot] = seeds
    final = torch.where(mixed, vid, drawn_all)
    sampled[p.g_rows, 0] = final.to(sampled.dtype)
    if lp is not None:
        lp.logprobs[p.g_rows, 0] = torch.where(mixed, record_lp, current_lp).to(lp.logprobs.dtype)
        lp.logprob_token_ids[p.g_rows, 0] = final.to(lp.logprob_token_ids.dtype)
