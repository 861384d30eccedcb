"""Sampler pre/post hooks that implement Semantic Neighbor Mixing inside vLLM's V1 model runner (paper eq. 6-11).

Gate (host, no device read): each response has a counter-based stream (core.gate_stream) keyed by (mixing seed,
strategy, purpose, call, global index); its uniform at step t (tokens it emitted so far) decides m ~ Bernoulli(rho).
The per-request state lives in slots (engine.request_table): host columns for the gate, device columns for the
kernels, mapped to the persistent batch's rows by an index built only when the batch composition changes. So the
host knows which rows are gated without looking at any tensor, and the device work is sized by the gated rows.

Pre-hook, for the gated neighbor-mixing rows: z = logits / temperature, anchor = argmax z,
C = neighbor_table[anchor, :k], alpha = softmax(logits[C] / tau), anchor logprob = log_softmax(z)[anchor]; the row
mixes unless its request already emitted a stop_after id or the anchor is a stop / never-mix id (device masks).
Post-hook (sees vLLM's sampled ids): a mixed row's id becomes VIRTUAL_BASE + c and (C, alpha, logprob) go into ring
slot c % S; the logprob vLLM reports for every opted-in row is log_softmax(logits / temperature) of the emitted token
(the anchor at mixed steps), so every recorded logprob follows the records contract. The stopped flags are updated on
device from the emitted tokens.

Gaussian noise (the STHT baseline, strategy "gaussian_noise"): a gated row keeps vLLM's sampled token as its text;
its slot gets cand = (token, token, ...), alpha = (1, 0, ...) and the noise row noise_std * N(0, I) regenerated from an
int64 seed drawn from the response's stream (lane 1), on the host like core.records.noise_from_seeds, so the next
input is E[token] + noise and the trainer rebuilds it from the recorded seed. Its recorded logprob is the sampled
token's.

No host synchronisation on the per-step path: no tensor value is read into Python (tests/engine/test_hook_no_host_read
runs the hooks under a guard that fails on any such read). Records stay on device in the ring and are read in bulk
by ``records`` when the requests have finished. Cost per step: O(B) host numpy for the gate, O(G * V) device work on
the G ~ rho * B gated rows, and nothing over [B, V] when every temperature is 1 and vLLM runs in raw_logprobs mode
(its own logprob of the drawn token is then already log_softmax(z)[drawn]); otherwise z and its logsumexp are
computed for all opted-in rows, as the contract needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ngrpo_ray.core import gate_stream
from ngrpo_ray.engine.embedding_patch import VIRTUAL_BASE, MixingEmbedding
from ngrpo_ray.engine.neighbor_tables import NeighborTables
from ngrpo_ray.engine.request_options import METRICS
from ngrpo_ray.engine.request_table import NOISE_CODE, RequestTable

_INT32_MAX = (1 << 31) - 1


@dataclass
class _Composition:
    """The opted-in rows of one batch composition (rebuilt only when vLLM's persistent batch changes)."""

    req_ids: list[str]
    rows: np.ndarray  # [H] batch rows that opted in
    slots: np.ndarray  # [H] their request slots
    rows_t: torch.Tensor  # the same on device
    slots_t: torch.Tensor
    every_row: bool  # rows == 0..B-1: no copy of the [B, V] logits needed
    unit_temp: bool
    any_stop: bool  # some request has stop_after ids: the post-hook updates the stopped flags
    temps: torch.Tensor  # [H] device temperatures


@dataclass
class _Pending:
    """What the pre-hook computed for the post-hook of the same sampler call."""

    comp: _Composition
    scaled_logits: torch.Tensor | None  # [H, V] logits / temperature; None: vLLM's logprob is reused
    log_norm: torch.Tensor | None  # [H] logsumexp of scaled_logits
    num_mix: int = 0  # gated rows: the first num_mix neighbor mixing, then the gaussian_noise ones
    g_rows: torch.Tensor | None = None  # [G] batch rows
    g_slots: torch.Tensor | None = None  # [G] request slots
    g_pos: torch.Tensor | None = None  # [G] positions among the opted-in rows
    mixed: torch.Tensor | None = None  # [num_mix] bool
    cand: torch.Tensor | None = None  # [num_mix, k_max]
    alpha: torch.Tensor | None = None  # [num_mix, k_max]
    anchor_logprob: torch.Tensor | None = None  # [num_mix]; None: computed by the post-hook from vLLM's logprob
    z: torch.Tensor | None = None  # [num_mix, V] the gated rows' logits (temperature 1), kept for that
    anchor_z: torch.Tensor | None = None  # [num_mix] z at the anchor
    noise: torch.Tensor | None = None  # [G - num_mix, d]
    noise_seed: torch.Tensor | None = None  # [G - num_mix] int64

    @property
    def num_gated(self) -> int:
        return 0 if self.g_rows is None else int(self.g_rows.shape[0])


def _log_norm(z: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] logsumexp. On CPU through log_softmax (its kernel is several times faster than logsumexp's
    there), read at the row's maximum where the log-probability is nearest 0, so no precision is lost."""
    if z.device.type != "cpu":
        return torch.logsumexp(z, dim=-1)
    top = z.argmax(dim=-1, keepdim=True)
    return (z.gather(1, top) - torch.log_softmax(z, dim=-1).gather(1, top)).squeeze(1)


class MixingHook:
    """Owns the hook handles, the counter, the record columns and the per-request slots."""

    def __init__(self, runner, embedding: MixingEmbedding, vocab_size: int, seed: int, neighbor_mode: str):
        self.runner = runner
        self.embedding = embedding
        self.vocab_size = vocab_size
        self.device = embedding.weight.device
        self.k_max = embedding.ngrpo_k_max
        self.capacity = embedding.ngrpo_capacity
        self.seed = int(seed)  # the stream seed of requests whose mixing.seed is None
        self.counter = torch.zeros((), dtype=torch.int64, device=self.device)  # virtual ids handed out so far
        self.record_logprob = torch.zeros(self.capacity + 1, dtype=torch.float32, device=self.device)
        self.record_noise_seed = torch.full((self.capacity + 1,), -1, dtype=torch.int64, device=self.device)
        self.tables = NeighborTables(self.k_max, neighbor_mode)
        self.tables.bind(self.embedding_matrix())
        self.requests = RequestTable(self.device, vocab_size, self.k_max, self.seed, embedding.ngrpo_has_noise,
                                     capacity=max(256, 2 * int(getattr(runner, "max_num_reqs", 0) or 0)))
        self._comp: _Composition | None = None
        self._pending: _Pending | None = None
        self.steps_hooked = 0
        self.compositions = 0  # how often the batch composition changed (the only time rows are re-indexed)
        # Host-side upper bound of the counter (every gated row could mix): the exact, syncing check runs only
        # once this bound gets near int32.
        self._counter_bound = 0
        self.steps_reusing_vllm_logprob = 0
        self._raw_logprobs = getattr(runner.sampler, "logprobs_mode", None) == "raw_logprobs"
        self.resumed_rows = 0  # a request came back after missing steps: preempted and recomputed
        self._handles = [
            runner.sampler.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            runner.sampler.register_forward_hook(self._post_hook, with_kwargs=True),
        ]

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def embedding_matrix(self) -> torch.Tensor:
        return self.embedding.weight[: self.vocab_size]

    def rebind_embedding(self, embedding: MixingEmbedding) -> None:
        """After a weight change: new E -> neighbor tables rebuilt from scratch."""
        self.embedding = embedding
        self.tables.bind(self.embedding_matrix())

    def set_slots(self, slots: int) -> None:
        if not 1 <= slots <= self.capacity:
            raise ValueError(f"table_slots must be in [1, {self.capacity}] (the capacity fixed at engine build "
                             f"by additional_config['ngrpo']['table_capacity']), got {slots}")
        self.embedding.ngrpo_slots.fill_(slots)

    # ---- batch composition -----------------------------------------------------------------------------------
    def _composition(self, req_ids: list[str]) -> _Composition:
        """The opted-in rows of this batch; re-indexed only when vLLM's persistent batch changed."""
        comp = self._comp
        if comp is not None and comp.req_ids == req_ids:
            return comp
        table = self.requests
        table.release_gone(self.runner.requests)
        table.join(req_ids, self.runner.requests)
        previous = set(comp.req_ids) if comp is not None else set()
        rows, slots = [], []
        for i, rid in enumerate(req_ids):
            slot = table.slot_of.get(rid)
            if slot is not None:
                rows.append(i)
                slots.append(slot)
                if rid not in previous and table.step[slot] > 0:
                    self.resumed_rows += 1  # it had emitted tokens, missed steps, and is back: preempted
        rows_np, slots_np = np.asarray(rows, np.int64), np.asarray(slots, np.int64)
        rows_t, slots_t = self._to_device(rows_np), self._to_device(slots_np)
        temps = table.temp.index_select(0, slots_t)
        unit_temp = all(float(self.runner.requests[req_ids[r]].sampling_params.temperature) == 1.0 for r in rows)
        self._comp = _Composition(list(req_ids), rows_np, slots_np, rows_t, slots_t,
                                  rows == list(range(len(req_ids))), unit_temp,
                                  bool(table.has_stop[slots_np].any()) if slots else False, temps)
        self.compositions += 1
        return self._comp

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """Host numpy -> device tensor without waiting for the device (pinned staging on CUDA)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # ---- hooks -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _pre_hook(self, module, args, kwargs):
        self._pending = None
        logits = kwargs.get("logits", args[0] if args else None)
        req_ids = self.runner.input_batch.req_ids
        if logits is None or len(req_ids) != logits.shape[0]:  # warm-up / profiling dummy runs
            return None
        comp = self._composition(req_ids)
        if not len(comp.rows):
            return None
        self.steps_hooked += 1
        table, V = self.requests, self.vocab_size
        # The gate, on the host: the response's stream at its step, unless vLLM discards this row's sample
        # (a partial prefill), which then is no step of the response.
        live = ~self.runner.discard_request_mask.np[: len(req_ids)][comp.rows].astype(bool)
        steps = table.step[comp.slots]
        gated = (gate_stream.uniforms(table.key[comp.slots], steps) < table.rho[comp.slots]) & live
        table.step[comp.slots] = steps + live
        # vLLM's own logprob of the drawn token is log_softmax(logits)[drawn] in raw_logprobs mode, which is the
        # contract's value when every temperature is 1: then no full-vocab pass is needed here.
        reuse = comp.unit_temp and self._raw_logprobs and logits.shape[1] == V
        scaled = log_norm = None
        if reuse:
            self.steps_reusing_vllm_logprob += 1
        else:
            lg = (logits if comp.every_row else logits.index_select(0, comp.rows_t)).float()[:, :V]
            scaled = lg / comp.temps.unsqueeze(1)
            log_norm = _log_norm(scaled)
        p = _Pending(comp, scaled, log_norm)
        pos = np.flatnonzero(gated)
        if pos.size:
            is_noise = table.strategy[comp.slots[pos]] == NOISE_CODE
            pos = np.concatenate([pos[~is_noise], pos[is_noise]])  # neighbor mixing first, then gaussian_noise
            p.num_mix = int(pos.size - is_noise.sum())
            g = self._to_device(np.stack([comp.rows[pos], comp.slots[pos], pos]))
            p.g_rows, p.g_slots, p.g_pos = g[0], g[1], g[2]
            self._counter_bound += int(pos.size)
            if p.num_mix:
                self._mix_rows(logits, p, comp.slots[pos[: p.num_mix]])
            if p.num_mix < pos.size:
                n_pos = pos[p.num_mix:]
                self._noise_rows(p, comp.slots[n_pos], steps[n_pos])
        self._pending = p
        return None

    def _mix_rows(self, logits: torch.Tensor, p: _Pending, slots: np.ndarray) -> None:
        """Anchors, candidate sets, alpha and anchor logprobs of the gated neighbor-mixing rows (device)."""
        table, n, V = self.requests, p.num_mix, self.vocab_size
        rows, slot_t = p.g_rows[:n], p.g_slots[:n]
        if p.scaled_logits is not None:
            z = p.scaled_logits.index_select(0, p.g_pos[:n])
        else:  # every temperature is 1: z = logits, and the post-hook gets log_softmax(z)[anchor] from vLLM's value
            z = logits.index_select(0, rows)[:, :V].float()
        anchor = z.argmax(dim=-1)
        banned = table.id_sets[table.ban_set.index_select(0, slot_t), anchor]
        p.mixed = ~table.stopped.index_select(0, slot_t) & ~banned
        cand = self._candidates(slots, anchor)
        col = torch.arange(self.k_max, device=anchor.device).unsqueeze(0)
        in_set = col < table.k.index_select(0, slot_t).unsqueeze(1)
        cand = torch.where(in_set, cand, anchor.unsqueeze(1))  # padding points at the anchor, alpha 0
        cand_logits = logits[rows.unsqueeze(1), cand].float()
        scores = torch.where(in_set, cand_logits / table.tau.index_select(0, slot_t).unsqueeze(1),
                             torch.tensor(float("-inf"), device=anchor.device))
        p.cand = cand
        p.alpha = torch.softmax(scores, dim=-1)
        anchor_z = z.gather(1, anchor.unsqueeze(1)).squeeze(1)
        if p.scaled_logits is not None:
            p.anchor_logprob = anchor_z - p.log_norm.index_select(0, p.g_pos[:n])
        else:
            p.z, p.anchor_z = z, anchor_z

    def _candidates(self, slots: np.ndarray, anchor: torch.Tensor) -> torch.Tensor:
        """Neighbor-table rows of the anchors, by each request's metric (grouped on the host)."""
        codes = self.requests.metric[slots]
        first = int(codes[0])
        if (codes == first).all():
            return self.tables.rows(METRICS[first], anchor)
        out = torch.empty(len(slots), self.k_max, dtype=torch.long, device=anchor.device)
        for code in np.unique(codes):
            idx = self._to_device(np.flatnonzero(codes == code))
            out[idx] = self.tables.rows(METRICS[int(code)], anchor.index_select(0, idx))
        return out

    def _noise_rows(self, p: _Pending, slots: np.ndarray, steps: np.ndarray) -> None:
        """Seeds from the responses' streams and noise_std * N(0, I) rows, made on the host like
        core.records.noise_from_seeds (the trainer's rebuild), then sent to the device."""
        table, d = self.requests, self.embedding.embedding_dim
        seeds = gate_stream.noise_seeds(table.key[slots], steps)
        noise = torch.empty(len(slots), d, dtype=torch.float32)
        for j, (s, std) in enumerate(zip(seeds, table.noise_std[slots])):
            noise[j] = torch.randn(d, generator=torch.Generator().manual_seed(int(s))) * float(std)
        p.noise_seed = self._to_device(seeds)
        noise = noise.to(self.embedding.ngrpo_noise.dtype)
        p.noise = noise if self.device.type == "cpu" else noise.pin_memory().to(self.device, non_blocking=True)

    @torch.no_grad()
    def _post_hook(self, module, args, kwargs, output):
        p, self._pending = self._pending, None
        if p is None:
            return None
        comp, V = p.comp, self.vocab_size
        sampled = output.sampled_token_ids  # [B, 1] int32
        lp = output.logprobs_tensors
        if lp is not None and p.scaled_logits is not None:  # the contract's logprob: temperature only
            drawn = sampled.index_select(0, comp.rows_t)[:, 0].long()
            drawn_lp = p.scaled_logits.gather(1, drawn.clamp_max(V - 1).unsqueeze(1)).squeeze(1) - p.log_norm
            lp.logprobs[comp.rows_t, 0] = drawn_lp.to(lp.logprobs.dtype)
        if p.num_gated:
            self._write_gated(p, sampled, lp)
        if comp.any_stop:  # a request that emitted a stop_after id never mixes again (set on device)
            table = self.requests
            emitted = sampled.index_select(0, comp.rows_t)[:, 0].long().clamp(0, V)  # virtual ids -> column V
            hit = table.id_sets[table.stop_set.index_select(0, comp.slots_t), emitted]
            discard = self.runner.discard_request_mask.gpu[: sampled.shape[0]].index_select(0, comp.rows_t)
            table.stopped[comp.slots_t] = table.stopped.index_select(0, comp.slots_t) | (hit & ~discard.bool())
        return None

    def _write_gated(self, p: _Pending, sampled: torch.Tensor, lp) -> None:
        """Virtual ids and ring records for the gated rows that mix."""
        table, n, V = self.requests, p.num_mix, self.vocab_size
        drawn = sampled.index_select(0, p.g_rows)[:, 0].long()
        current_lp = lp.logprobs.index_select(0, p.g_rows)[:, 0].float() if lp is not None else None
        parts_mixed, parts_cand, parts_alpha, parts_lp = [], [], [], []
        if n:
            parts_mixed.append(p.mixed)
            parts_cand.append(p.cand)
            parts_alpha.append(p.alpha)
            parts_lp.append(p.anchor_logprob if p.anchor_logprob is not None else self._anchor_logprob(
                p, drawn[:n], current_lp))
        if n < p.num_gated:  # gaussian_noise rows: the sampled token, unless it is a stop / never-mix id
            n_slots, n_drawn = p.g_slots[n:], drawn[n:]
            banned = table.id_sets[table.ban_set.index_select(0, n_slots), n_drawn.clamp(0, V)]
            parts_mixed.append(~table.stopped.index_select(0, n_slots) & ~banned)
            parts_cand.append(n_drawn.unsqueeze(1).expand(-1, self.k_max))
            one_hot = torch.zeros(n_drawn.shape[0], self.k_max, dtype=torch.float32, device=drawn.device)
            one_hot[:, 0] = 1.0
            parts_alpha.append(one_hot)
            parts_lp.append(current_lp[n:] if current_lp is not None else torch.zeros_like(one_hot[:, 0]))
        mixed, cand = torch.cat(parts_mixed), torch.cat(parts_cand)
        alpha, record_lp = torch.cat(parts_alpha), torch.cat(parts_lp)
        m = mixed.long()
        offset = torch.cumsum(m, 0) - m  # rank among this step's mixed rows
        c = self.counter + offset
        vid = VIRTUAL_BASE + c
        if VIRTUAL_BASE + self._counter_bound > _INT32_MAX and int(vid.max()) + 1 > _INT32_MAX:  # rare: syncs
            raise RuntimeError("ngrpo virtual-id counter exhausted (int32); restart the engine")
        self.counter += m.sum()
        emb = self.embedding
        slot = torch.where(mixed, torch.remainder(c, emb.ngrpo_slots), self.capacity)  # capacity: a write sink
        emb.ngrpo_ids[slot] = torch.where(mixed, vid, -1)
        emb.ngrpo_cand[slot] = cand
        emb.ngrpo_alpha[slot] = alpha.to(emb.ngrpo_alpha.dtype)
        self.record_logprob[slot] = record_lp
        if emb.ngrpo_has_noise:  # every slot written this step gets its noise row (zeros for neighbor mixtures)
            noise = torch.zeros(mixed.shape[0], emb.embedding_dim, dtype=emb.ngrpo_noise.dtype, device=drawn.device)
            seeds = torch.full((mixed.shape[0],), -1, dtype=torch.int64, device=drawn.device)
            if p.noise is not None:
                noise[n:] = p.noise
                seeds[n:] = p.noise_seed
            emb.ngrpo_noise[slot] = noise
            self.record_noise_seed[slot] = seeds
        final = torch.where(mixed, vid, drawn)
        sampled[p.g_rows, 0] = final.to(sampled.dtype)
        if lp is not None:
            lp.logprobs[p.g_rows, 0] = torch.where(mixed, record_lp, current_lp).to(lp.logprobs.dtype)
            lp.logprob_token_ids[p.g_rows, 0] = final.to(lp.logprob_token_ids.dtype)

    def _anchor_logprob(self, p: _Pending, drawn: torch.Tensor, drawn_lp: torch.Tensor | None) -> torch.Tensor:
        """log_softmax(z)[anchor] at temperature 1 without a pass over the vocabulary: vLLM's raw logprob of the
        drawn token s is z_s - logsumexp(z), so logsumexp(z) = z_s - lp_s."""
        if drawn_lp is None:  # no logprobs requested from vLLM: the full pass
            return p.anchor_z - _log_norm(p.z)
        z_s = p.z.gather(1, drawn.clamp_max(self.vocab_size - 1).unsqueeze(1)).squeeze(1)
        return p.anchor_z - (z_s - drawn_lp)

    # ---- records ---------------------------------------------------------------------------------------------
    def records(self, virtual_ids: list[int]) -> dict:
        """(cand, alpha, logprob) of each virtual id; raises if any id's slot now holds another id (overflow)."""
        emb = self.embedding
        if not virtual_ids:
            return {"cand": [], "alpha": [], "logprob": [], "noise_seed": []}
        vid = torch.tensor(virtual_ids, dtype=torch.int64, device=self.device)
        slot = torch.remainder(vid - VIRTUAL_BASE, emb.ngrpo_slots)
        held = emb.ngrpo_ids[slot]
        lost = int((held != vid).sum())
        if lost:
            raise RuntimeError(
                f"ngrpo mixing table overflow: {lost} of {len(virtual_ids)} mixed steps were overwritten before "
                f"their records were read (table_slots={int(emb.ngrpo_slots)}); raise table_slots/table_capacity "
                f"or generate fewer mixed tokens per call")
        stale = int(emb.ngrpo_stale)
        if stale:
            raise RuntimeError(f"ngrpo mixing table: {stale} stale-slot embeddings were fed to the model")
        return {
            "cand": emb.ngrpo_cand[slot].tolist(),
            "alpha": emb.ngrpo_alpha[slot].float().tolist(),
            "logprob": self.record_logprob[slot].tolist(),
            "noise_seed": self.record_noise_seed[slot].tolist(),
        }

    def stats(self) -> dict:
        emb = self.embedding
        return {"counter": int(self.counter), "stale": int(emb.ngrpo_stale), "slots": int(emb.ngrpo_slots),
                "capacity": self.capacity, "k_max": self.k_max, "steps_hooked": self.steps_hooked,
                "steps_reusing_vllm_logprob": self.steps_reusing_vllm_logprob,
                "resumed_rows": self.resumed_rows, "compositions": self.compositions,
                "neighbor_version": self.tables.version, "live_request_states": len(self.requests)}
