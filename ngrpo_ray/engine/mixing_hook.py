"""Sampler pre/post hooks that implement Semantic Neighbor Mixing inside vLLM's V1 model runner (paper eq. 6-11).

Pre-hook (sees the raw logits of every row): for each opted-in row
  z = logits / temperature, anchor = argmax z, C = neighbor_table[anchor, :k], alpha = softmax(logits[C] / tau),
  anchor logprob = log_softmax(z)[anchor], gate m ~ Bernoulli(rho) from a dedicated seeded generator.
Post-hook (sees vLLM's sampled ids): a mixed row's id becomes VIRTUAL_BASE + c and (C, alpha, logprob) go into ring
slot c % S; the logprob vLLM reports for every opted-in row is replaced by log_softmax(logits / temperature) of the
emitted token (the anchor at mixed steps), so every recorded logprob follows the records contract.

Gaussian noise (the STHT baseline, strategy "gaussian_noise"): a gated row keeps vLLM's sampled token as its text;
its slot gets cand = (token, token, ...), alpha = (1, 0, ...) and the noise row noise_std * N(0, I) regenerated from a
recorded int64 seed (core.records.noise_from_seeds, on CPU), so the next input is E[token] + noise and the trainer
rebuilds it from the seed. Its recorded logprob is the sampled token's.

Cost per step stays O(B * k) plus work on the ~rho * B gated rows: the gate is drawn first and anchors / alpha /
anchor logprobs are computed for gated rows only; when every temperature is 1 and vLLM runs in raw_logprobs mode its
own logprob of the drawn token is already log_softmax(z)[drawn], so no [B, V] pass happens here at all (otherwise z
and its logsumexp are computed for all rows, as the contract needs). No host sync in the post-hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ngrpo_ray.core.records import noise_from_seeds
from ngrpo_ray.core.strategies.gaussian_noise import SEED_HIGH
from ngrpo_ray.engine.embedding_patch import VIRTUAL_BASE, MixingEmbedding
from ngrpo_ray.engine.neighbor_tables import NeighborTables
from ngrpo_ray.engine.request_options import EXTRA_ARGS_KEY, RequestMixing, from_wire

_INT32_MAX = (1 << 31) - 1


@dataclass
class _RequestState:
    options: RequestMixing
    stopped: bool = False  # a stop_after id was emitted
    scanned: int = 0  # output tokens already scanned for stop_after ids
    generator: torch.Generator | None = None
    noise_generator: torch.Generator | None = None  # CPU: draws the noise seeds of a seeded request
    last_step: int = -1  # last hooked step this request had a row in


@dataclass
class _Pending:
    """What the pre-hook computed for the post-hook of the same sampler call."""

    rows: torch.Tensor  # [H] batch rows that opted in
    mixed: torch.Tensor  # [H] bool
    cand: torch.Tensor  # [H, k_max]
    alpha: torch.Tensor  # [H, k_max]
    anchor_logprob: torch.Tensor  # [H], valid at mixed rows
    scaled_logits: torch.Tensor | None  # [H, V] logits / temperature; None: vLLM's logprob is reused
    log_norm: torch.Tensor | None  # [H] logsumexp of scaled_logits
    noise_rows: torch.Tensor | None = None  # [N] positions (in rows) of gated gaussian_noise rows
    noise_states: list | None = None  # their request states (stop / never-mix sets apply to the sampled token)
    noise: torch.Tensor | None = None  # [H, d] noise per row, zero outside noise_rows
    noise_seed: torch.Tensor | None = None  # [H] int64 seed per row, -1 outside noise_rows


class MixingHook:
    """Owns the hook handles, the gate generator, the counter, the record columns and the per-request state."""

    def __init__(self, runner, embedding: MixingEmbedding, vocab_size: int, seed: int, neighbor_mode: str):
        self.runner = runner
        self.embedding = embedding
        self.vocab_size = vocab_size
        self.device = embedding.weight.device
        self.k_max = embedding.ngrpo_k_max
        self.capacity = embedding.ngrpo_capacity
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.counter = torch.zeros((), dtype=torch.int64, device=self.device)  # virtual ids handed out so far
        self.record_logprob = torch.zeros(self.capacity + 1, dtype=torch.float32, device=self.device)
        self.record_noise_seed = torch.full((self.capacity + 1,), -1, dtype=torch.int64, device=self.device)
        self.noise_generator = torch.Generator().manual_seed(int(seed) + 1)  # CPU: noise seeds of unseeded requests
        self.tables = NeighborTables(self.k_max, neighbor_mode)
        self.tables.bind(self.embedding_matrix())
        self._states: dict[str, _RequestState] = {}
        self._never_masks: dict[tuple, torch.Tensor] = {}
        self._pending: _Pending | None = None
        self._row_cache: tuple | None = None
        self.steps_hooked = 0
        # Host-side upper bound of the counter (every hooked row could mix): the exact, syncing check runs only
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

    # ---- per-request options ---------------------------------------------------------------------------------
    def _state(self, req_id: str) -> _RequestState | None:
        st = self._states.get(req_id)
        if st is not None:
            return st
        req = self.runner.requests.get(req_id)
        extra = getattr(getattr(req, "sampling_params", None), "extra_args", None) or {}
        wire = extra.get(EXTRA_ARGS_KEY)
        if wire is None:
            return None
        options = from_wire(wire)
        if options.k > self.k_max:
            raise ValueError(f"mixing.k={options.k} exceeds the engine's k_max={self.k_max}")
        if options.strategy == "gaussian_noise" and not self.embedding.ngrpo_has_noise:
            raise ValueError("mixing.strategy='gaussian_noise' needs an engine built with a noise table "
                             "(EngineSpec.noise_table=True)")
        st = _RequestState(options)
        if options.seed is not None:
            st.generator = torch.Generator(device=self.device)
            st.generator.manual_seed(options.seed)
            st.noise_generator = torch.Generator().manual_seed(options.seed + 1)
        if len(self._states) > 4096:  # forget finished requests now and then
            live = set(self.runner.requests.keys())
            self._states = {r: s for r, s in self._states.items() if r in live}
        self._states[req_id] = st
        return st

    def _never_mask(self, options: RequestMixing) -> torch.Tensor:
        key = (options.stop_after_ids, options.never_mix_ids, options.no_mix_anchor_ids)
        mask = self._never_masks.get(key)
        if mask is None:
            mask = torch.zeros(self.vocab_size + 1, dtype=torch.bool, device=self.device)
            ids = [i for i in (*key[0], *key[1], *key[2]) if 0 <= i < self.vocab_size]
            if ids:
                mask[torch.tensor(ids, dtype=torch.long)] = True
            self._never_masks[key] = mask
        return mask

    def _update_stopped(self, req_id: str, st: _RequestState) -> None:
        if st.stopped or not st.options.stop_after_ids:
            return
        out = self.runner.requests[req_id].output_token_ids
        new = out[st.scanned:]
        st.scanned = len(out)
        marks = st.options.stop_after_ids
        if any(t in marks for t in new):
            st.stopped = True

    # ---- hooks -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _pre_hook(self, module, args, kwargs):
        self._pending = None
        logits = kwargs.get("logits", args[0] if args else None)
        req_ids = self.runner.input_batch.req_ids
        if logits is None or len(req_ids) != logits.shape[0]:  # warm-up / profiling dummy runs
            return None
        rows, states = [], []
        for i, rid in enumerate(req_ids):
            st = self._state(rid)
            if st is not None:
                if 0 <= st.last_step < self.steps_hooked:
                    self.resumed_rows += 1
                st.last_step = self.steps_hooked + 1
                self._update_stopped(rid, st)
                rows.append(i)
                states.append(st)
        if not rows:
            return None
        self.steps_hooked += 1
        dev = logits.device
        rows_t, temps, taus, ks, rhos, unit_temp = self._row_tensors(req_ids, rows, states, dev)
        every_row = len(rows) == logits.shape[0]  # the usual case: no copy of the [B, V] logits
        lg = (logits if every_row else logits.index_select(0, rows_t)).float()[:, : self.vocab_size]
        # vLLM's own logprob of the drawn token is log_softmax(logits)[drawn] in raw_logprobs mode, which is the
        # contract's value when every temperature is 1: then no full-vocab pass is needed here for unmixed rows.
        reuse_vllm_logprob = unit_temp and self._raw_logprobs and logits.shape[1] == self.vocab_size
        scaled, log_norm = None, None
        if reuse_vllm_logprob:
            self.steps_reusing_vllm_logprob += 1
        else:
            scaled = lg / temps.unsqueeze(1)
            log_norm = torch.logsumexp(scaled, dim=-1)

        u = torch.rand(len(rows), generator=self.generator, device=dev)
        for j, st in enumerate(states):  # per-request generators replace the shared draw
            if st.generator is not None:
                u[j] = torch.rand(1, generator=st.generator, device=dev)[0]
        discard = self.runner.discard_request_mask.gpu[: len(req_ids)].index_select(0, rows_t).to(dev)
        gate = (u < rhos) & ~discard
        # Anchors only for gated rows (about rho of them): the anchor of a row that does not mix is never used.
        gidx = gate.nonzero().flatten()
        mixed = torch.zeros(len(rows), dtype=torch.bool, device=dev)
        cand = torch.zeros(len(rows), self.k_max, dtype=torch.long, device=dev)
        alpha = torch.zeros(len(rows), self.k_max, dtype=torch.float32, device=dev)
        alpha[:, 0] = 1.0
        anchor_logprob = torch.zeros(len(rows), dtype=torch.float32, device=dev)
        noise_parts = None
        if gidx.numel() and any(st.options.strategy == "gaussian_noise" for st in states):
            is_noise = torch.tensor([states[i].options.strategy == "gaussian_noise" for i in gidx.tolist()],
                                    dtype=torch.bool, device=dev)
            noise_parts = self._noise_rows(gidx[is_noise], states, len(rows), dev)
            gidx = gidx[~is_noise]  # the neighbor-mixing path below takes the other gated rows
        if gidx.numel():
            g_states = [states[i] for i in gidx.tolist()]
            g_lg = lg.index_select(0, gidx)
            g_z = scaled.index_select(0, gidx) if scaled is not None else g_lg / temps.index_select(0, gidx).unsqueeze(1)
            g_anchor = g_z.argmax(dim=-1)
            keep = ~self._banned(g_states, g_anchor)
            midx, m_anchor, m_z, m_lg = gidx[keep], g_anchor[keep], g_z[keep], g_lg[keep]
            m_states = [s for s, kept in zip(g_states, keep.tolist()) if kept]
            if midx.numel():
                m_lognorm = log_norm.index_select(0, midx) if log_norm is not None else torch.logsumexp(m_z, dim=-1)
                m_cand = self._candidates(m_states, m_anchor)
                col = torch.arange(self.k_max, device=dev).unsqueeze(0)
                in_set = col < ks.index_select(0, midx).unsqueeze(1)
                m_cand = torch.where(in_set, m_cand, m_anchor.unsqueeze(1))  # padding points at the anchor, alpha 0
                m_logits = m_lg.gather(1, m_cand)
                scores = torch.where(in_set, m_logits / taus.index_select(0, midx).unsqueeze(1),
                                     torch.tensor(float("-inf"), device=dev))
                mixed[midx] = True
                cand[midx] = m_cand
                alpha[midx] = torch.softmax(scores, dim=-1)
                anchor_logprob[midx] = m_z.gather(1, m_anchor.unsqueeze(1)).squeeze(1) - m_lognorm
        self._pending = _Pending(rows_t, mixed, cand, alpha, anchor_logprob, scaled, log_norm,
                                 *(noise_parts or (None, None, None, None)))
        return None

    def _noise_rows(self, nidx: torch.Tensor, states: list[_RequestState], num_rows: int, dev) -> tuple:
        """Seeds (CPU generators) and noise_std * N(0, I) rows for the gated gaussian_noise rows `nidx`."""
        d = self.embedding.embedding_dim
        noise = torch.zeros(num_rows, d, dtype=self.embedding.ngrpo_noise.dtype, device=dev)
        seeds = torch.full((num_rows,), -1, dtype=torch.int64)
        n_states = [states[i] for i in nidx.tolist()]
        for j, st in zip(nidx.tolist(), n_states):
            gen = st.noise_generator or self.noise_generator
            seeds[j] = int(torch.randint(0, SEED_HIGH, (1,), generator=gen))
            noise[j] = noise_from_seeds(seeds[j : j + 1], d, st.options.noise_std)[0].to(dev, noise.dtype)
        return nidx, n_states, noise, seeds.to(dev)

    def _row_tensors(self, req_ids, rows, states, dev):
        """Per-row option tensors, rebuilt only when the batch composition or a stop flag changes."""
        key = (tuple(req_ids), tuple(st.stopped for st in states))
        if self._row_cache is not None and self._row_cache[0] == key:
            return self._row_cache[1]
        temps = [self._temperature(r) for r in rows]
        value = (
            torch.tensor(rows, dtype=torch.long, device=dev),
            torch.tensor(temps, dtype=torch.float32, device=dev),
            torch.tensor([st.options.tau if st.options.tau is not None else t for st, t in zip(states, temps)],
                         dtype=torch.float32, device=dev),
            torch.tensor([st.options.k for st in states], dtype=torch.long, device=dev),
            torch.tensor([0.0 if st.stopped else st.options.rho for st in states], dtype=torch.float32, device=dev),
            all(t == 1.0 for t in temps),
        )
        self._row_cache = (key, value)
        return value

    def _banned(self, states: list[_RequestState], anchor: torch.Tensor) -> torch.Tensor:
        """[G] bool: the anchor is a stop / never-mix id of its request (one gather when all rows share the sets)."""
        masks = {id(m): m for m in (self._never_mask(st.options) for st in states)}
        if len(masks) == 1:
            return next(iter(masks.values()))[anchor]
        return torch.stack([self._never_mask(st.options)[a] for st, a in zip(states, anchor.unbind(0))])

    def _temperature(self, row: int) -> float:
        rid = self.runner.input_batch.req_ids[row]
        t = float(self.runner.requests[rid].sampling_params.temperature)
        if t < 1e-5:
            raise ValueError("ngrpo mixing needs temperature > 0 (refused before the request runs; reached here "
                             "only if a request bypassed the driver's checks)")
        return t

    def _candidates(self, states: list[_RequestState], anchor: torch.Tensor) -> torch.Tensor:
        metrics = [st.options.metric for st in states]
        if len(set(metrics)) == 1:
            return self.tables.rows(metrics[0], anchor)
        out = torch.empty(len(states), self.k_max, dtype=torch.long, device=anchor.device)
        for m in set(metrics):
            idx = torch.tensor([j for j, x in enumerate(metrics) if x == m], device=anchor.device)
            out[idx] = self.tables.rows(m, anchor[idx])
        return out

    @torch.no_grad()
    def _post_hook(self, module, args, kwargs, output):
        p, self._pending = self._pending, None
        if p is None:
            return None
        sampled = output.sampled_token_ids  # [B, 1] int32
        drawn = sampled.index_select(0, p.rows)[:, 0].long()
        lp = output.logprobs_tensors
        drawn_lp = None
        if lp is not None:  # the contract's logprob: temperature only, of the emitted token (anchor when mixed)
            if p.scaled_logits is None:  # temperature 1, raw_logprobs: vLLM's value is already log_softmax(z)[drawn]
                drawn_lp = lp.logprobs.index_select(0, p.rows)[:, 0].float()
            else:
                drawn_lp = p.scaled_logits.gather(1, drawn.clamp_max(self.vocab_size - 1).unsqueeze(1)).squeeze(1) \
                    - p.log_norm
        mixed, cand, record_lp = p.mixed, p.cand, p.anchor_logprob
        if p.noise_rows is not None:  # gaussian_noise rows: the sampled token, unless it is a stop / never-mix id
            nr = p.noise_rows
            n_drawn = drawn.index_select(0, nr)
            mixed = mixed.index_put((nr,), ~self._banned(p.noise_states, n_drawn.clamp_max(self.vocab_size)))
            cand = cand.index_put((nr,), n_drawn.unsqueeze(1).expand(-1, cand.shape[1]))
            if drawn_lp is not None:
                record_lp = record_lp.index_put((nr,), drawn_lp.index_select(0, nr))
        n = mixed.long()
        offset = torch.cumsum(n, 0) - n  # rank among this step's mixed rows
        c = self.counter + offset
        vid = VIRTUAL_BASE + c
        self._counter_bound += int(p.rows.shape[0])
        if VIRTUAL_BASE + self._counter_bound > _INT32_MAX and int(vid.max()) + 1 > _INT32_MAX:
            raise RuntimeError("ngrpo virtual-id counter exhausted (int32); restart the engine")
        self.counter += n.sum()
        slot = torch.where(mixed, torch.remainder(c, self.embedding.ngrpo_slots), self.capacity)
        emb = self.embedding
        emb.ngrpo_ids[slot] = torch.where(mixed, vid, -1)
        emb.ngrpo_cand[slot] = cand
        emb.ngrpo_alpha[slot] = p.alpha.to(emb.ngrpo_alpha.dtype)
        self.record_logprob[slot] = record_lp
        if emb.ngrpo_has_noise:  # every slot written this step gets its noise row (zeros for neighbor mixtures)
            emb.ngrpo_noise[slot] = p.noise if p.noise is not None else 0.0
            self.record_noise_seed[slot] = p.noise_seed if p.noise_seed is not None else -1
        final = torch.where(mixed, vid, drawn)
        sampled[p.rows, 0] = final.to(sampled.dtype)
        if lp is not None:
            lp.logprobs[p.rows, 0] = torch.where(mixed, record_lp, drawn_lp).to(lp.logprobs.dtype)
            lp.logprob_token_ids[p.rows, 0] = final.to(lp.logprob_token_ids.dtype)
        return None

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
                "resumed_rows": self.resumed_rows,
                "neighbor_version": self.tables.version, "live_request_states": len(self._states)}
