"""Sampler pre/post hooks that implement the exploration strategies inside vLLM's V1 model runner.

Gate (host, no device read): each response has a counter-based stream (core.gate_stream) keyed by (mixing seed,
strategy, purpose, call, global index); its uniform at step t (tokens it emitted so far) decides m ~ Bernoulli(rho).
The per-request state lives in slots (engine.request_table): host columns for the gate, device columns for the
kernels, mapped to the persistent batch's rows by an index built only when the batch composition changes. So the
host knows which rows are gated without looking at any tensor, and the device work is sized by the gated rows.

Pre-hook: the gated rows are grouped by kernel and each group computed on device, vectorised over its rows:
neighbor mixing (engine.neighbor_kernel: paper eq. 6-11, alpha from the logits or the released code's filtered
probabilities), the soft-token baselines (engine.soft_kernel: gumbel_topk, soft_thinking, latent_gumbel over the
top-K log-probabilities, Gumbel noise from the response's stream) and Gaussian noise (engine.noise_kernel, STHT).
Post-hook (sees vLLM's sampled ids): engine.ring_writer turns each mixed row's id into VIRTUAL_BASE + c and writes
its records into ring slot c % S: (cand, alpha) for the embedding, the text token (the anchor, or the sampled token
under emit "sampled") and its logprob. The logprob vLLM reports for every opted-in row is log_softmax(logits /
temperature) of the emitted token, so every recorded logprob follows the records contract. The stopped flags are
updated on device from the emitted tokens.

No host synchronisation on the per-step path: no tensor value is read into Python (tests/engine/test_gate_streams.py
runs the hooks under a guard that fails on any such read). Records stay on device in the ring and are read in bulk
by ``records`` when the requests have finished. Cost per step: O(B) host numpy for the gate, O(G * V) device work on
the G ~ rho * B gated rows, and nothing over [B, V] when every temperature is 1 and vLLM runs in raw_logprobs mode
(its own logprob of the drawn token is then already log_softmax(z)[drawn]); otherwise z and its logsumexp are
computed for all opted-in rows, as the contract needs.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ngrpo_ray.core import gate_stream
from ngrpo_ray.engine.embedding_patch import VIRTUAL_BASE, MixingEmbedding, full_weight
from ngrpo_ray.engine.hook_batch import NEIGHBOR, NOISE, SOFT, Composition, Pending, log_norm, to_device
from ngrpo_ray.engine.neighbor_kernel import neighbor_group
from ngrpo_ray.engine.neighbor_tables import NeighborTables
from ngrpo_ray.engine.noise_kernel import noise_group
from ngrpo_ray.engine.request_table import RequestTable, kind_of
from ngrpo_ray.engine.ring_writer import write_gated
from ngrpo_ray.engine.soft_kernel import soft_group


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
        self.record_token = torch.zeros(self.capacity + 1, dtype=torch.int64, device=self.device)  # the text token
        self.tables = NeighborTables(self.k_max, neighbor_mode)
        self.tables.bind(self.embedding_matrix())
        self.requests = RequestTable(self.device, vocab_size, self.k_max, self.seed, embedding.ngrpo_has_noise,
                                     capacity=max(256, 2 * int(getattr(runner, "max_num_reqs", 0) or 0)))
        self._comp: Composition | None = None
        self._pending: Pending | None = None
        self.steps_hooked = 0
        self.compositions = 0  # how often the batch composition changed (the only time rows are re-indexed)
        # Host-side upper bound of the counter (every gated row could mix): the exact, syncing check runs only
        # once this bound gets near int32.
        self.counter_bound = 0
        self.steps_reusing_vllm_logprob = 0
        self._raw_logprobs = getattr(runner.sampler, "logprobs_mode", None) == "raw_logprobs"
        self.resumed_rows = 0  # a request came back after missing steps: preempted and recomputed
        # Wall time the engine's thread spends inside the two hooks (what they cost the step on CPU; on GPU the time
        # to enqueue their work, which async scheduling overlaps with the device): a direct, low-noise measure of
        # the hook's own cost beside the end-to-end comparison of ``ngrpo bench hook-overhead``.
        self.host_seconds = 0.0
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
        return full_weight(self.embedding, self.vocab_size)  # gathered from every rank under tensor parallelism

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
    def _composition(self, req_ids: list[str]) -> Composition:
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
        rows_t, slots_t = self.to_device(rows_np), self.to_device(slots_np)
        temps = table.temp.index_select(0, slots_t)
        unit_temp = all(float(self.runner.requests[req_ids[r]].sampling_params.temperature) == 1.0 for r in rows)
        kinds = kind_of(table.strategy[slots_np])
        self._comp = Composition(
            list(req_ids), rows_np, slots_np, rows_t, slots_t, rows == list(range(len(req_ids))), unit_temp,
            bool(table.has_stop[slots_np].any()), temps, kinds=kinds, one_kind=bool((kinds == kinds[:1]).all()),
            full_k=bool((table.mix_k[slots_np] == self.k_max).all()),
            emits_sampled=bool(table.emits_sampled[slots_np].any()), filtered=bool(table.filtered[slots_np].any()))
        self.compositions += 1
        return self._comp

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        return to_device(a, self.device)

    # ---- hooks -----------------------------------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        t0 = time.perf_counter()
        try:
            self._pre_step(kwargs.get("logits", args[0] if args else None))
        finally:
            self.host_seconds += time.perf_counter() - t0

    def _post_hook(self, module, args, kwargs, output):
        t0 = time.perf_counter()
        try:
            self._post_step(output)
        finally:
            self.host_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def _pre_step(self, logits: torch.Tensor | None) -> None:
        self._pending = None
        req_ids = self.runner.input_batch.req_ids
        if logits is None or len(req_ids) != logits.shape[0]:  # warm-up / profiling dummy runs
            return
        comp = self._composition(req_ids)
        if not len(comp.rows):
            return
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
        scaled = norm = None
        if reuse:
            self.steps_reusing_vllm_logprob += 1
        else:
            lg = (logits if comp.every_row else logits.index_select(0, comp.rows_t)).float()[:, :V]
            scaled = lg / comp.temps.unsqueeze(1)
            norm = log_norm(scaled)
        p = Pending(comp, scaled, norm)
        pos = np.flatnonzero(gated)
        if pos.size:
            kinds = comp.kinds[pos]
            if not comp.one_kind:
                order = np.argsort(kinds, kind="stable")  # neighbor mixing, then soft tokens, then gaussian_noise
                pos, kinds = pos[order], kinds[order]
            g = self.to_device(np.stack([comp.rows[pos], comp.slots[pos], pos]))
            p.g_rows, p.g_slots, p.g_pos = g[0], g[1], g[2]
            self.counter_bound += int(pos.size)
            for kind in (NEIGHBOR, SOFT, NOISE) if not comp.one_kind else (int(kinds[0]),):
                start, end = np.searchsorted(kinds, kind, "left"), np.searchsorted(kinds, kind, "right")
                if end > start:
                    p.groups.append(self._group(kind, logits, p, int(start), int(end), comp.slots[pos[start:end]],
                                                steps[pos[start:end]]))
        self._pending = p

    def _group(self, kind: int, logits: torch.Tensor, p: Pending, start: int, end: int, slots: np.ndarray,
               steps: np.ndarray):
        """One kind's gated rows through its kernel (device)."""
        if kind == NOISE:
            return noise_group(self, slots, steps, start, end)
        rows, slot_t = p.g_rows[start:end], p.g_slots[start:end]
        if p.scaled_logits is not None:
            z = p.scaled_logits.index_select(0, p.g_pos[start:end])
            norm = p.log_norm.index_select(0, p.g_pos[start:end])
        else:  # every temperature is 1: z = logits
            z, norm = logits.index_select(0, rows)[:, : self.vocab_size].float(), None
        if kind == NEIGHBOR:
            return neighbor_group(self, logits, z, norm, rows, slot_t, slots, start, end, p.comp)
        return soft_group(self, z, norm, slot_t, slots, steps, start, end)

    @torch.no_grad()
    def _post_step(self, output) -> None:
        p, self._pending = self._pending, None
        if p is None:
            return
        comp, V = p.comp, self.vocab_size
        sampled = output.sampled_token_ids  # [B, 1] int32
        lp = output.logprobs_tensors
        if lp is not None and p.scaled_logits is not None:  # the contract's logprob: temperature only
            drawn = sampled.index_select(0, comp.rows_t)[:, 0].long()
            drawn_lp = p.scaled_logits.gather(1, drawn.clamp_max(V - 1).unsqueeze(1)).squeeze(1) - p.log_norm
            lp.logprobs[comp.rows_t, 0] = drawn_lp.to(lp.logprobs.dtype)
        if p.num_gated:
            write_gated(self, p, sampled, lp)
        if comp.any_stop:  # a request that emitted a stop_after id never mixes again (set on device)
            table = self.requests
            emitted = sampled.index_select(0, comp.rows_t)[:, 0].long().clamp(0, V)  # virtual ids -> column V
            hit = table.id_sets[table.stop_set.index_select(0, comp.slots_t), emitted]
            discard = self.runner.discard_request_mask.gpu[: sampled.shape[0]].index_select(0, comp.rows_t)
            table.stopped[comp.slots_t] = table.stopped.index_select(0, comp.slots_t) | (hit & ~discard.bool())

    # ---- records ---------------------------------------------------------------------------------------------
    def records(self, virtual_ids: list[int]) -> dict:
        """(cand, alpha, text token, logprob, noise seed) of each virtual id; raises if any id's slot now holds
        another id (overflow)."""
        emb = self.embedding
        if not virtual_ids:
            return {"cand": [], "alpha": [], "token": [], "logprob": [], "noise_seed": []}
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
            "token": self.record_token[slot].tolist(),
            "logprob": self.record_logprob[slot].tolist(),
            "noise_seed": self.record_noise_seed[slot].tolist(),
        }

    def stats(self) -> dict:
        emb = self.embedding
        return {"counter": int(self.counter), "stale": int(emb.ngrpo_stale), "slots": int(emb.ngrpo_slots),
                "capacity": self.capacity, "k_max": self.k_max, "steps_hooked": self.steps_hooked,
                "steps_reusing_vllm_logprob": self.steps_reusing_vllm_logprob,
                "resumed_rows": self.resumed_rows, "compositions": self.compositions,
                "hook_host_seconds": self.host_seconds,
                "neighbor_version": self.tables.version, "live_request_states": len(self.requests)}
