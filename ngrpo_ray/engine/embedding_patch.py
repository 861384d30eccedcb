"""In-graph input embedding that understands "virtual token ids".

A mixed step emits the id ``VIRTUAL_BASE + c`` (c: a running counter) instead of a vocabulary id. The id then travels
through vLLM's own plumbing (next-step input, the request's token list, recompute after preemption, prefix-cache
hashes) and lands here, where it is embedded as ``sum_j alpha[s, j] * E[cand[s, j]]`` with ``s = c % slots``.

The layer replaces ``VocabParallelEmbedding`` through vLLM's out-of-tree registry, so the embedding stays inside the
compiled graph and the engine does not need prompt-embeds mode (which would run the embedding eagerly every step).
Only static-shape ops are used (gathers, a k-term sum, ``torch.where``). The ring table lives in non-persistent
buffers that the sampler post-hook writes in place; their size is fixed at construction from
``additional_config["ngrpo"]`` (``table_capacity``, ``k_max``, ``noise``).

Tensor parallelism: each rank holds a vocabulary shard, looks up the plain and candidate rows it owns and one
all-reduce makes them whole (``_vocab_parallel_rows``); the hook runs on every rank over identical all-gathered logits,
the same host-side gate streams and the full matrix (``full_weight``), so every rank writes the same ring.

Gaussian noise (the STHT baseline) uses the same slots: cand = the sampled token with alpha (1, 0, ...) plus a noise
row, so its input is E[token] + noise. The [capacity + 1, d] noise table exists only in engines built with
``noise: true`` (else one unused row, and the forward adds nothing): it costs capacity * d floats.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from ngrpo_ray.core.records import mix_rows_fp32

VIRTUAL_BASE = 1 << 24  # above every real vocabulary (Qwen2.5: 151,936); virtual ids must stay below 2**31 (int32)
DEFAULT_TABLE_CAPACITY = 1 << 16
DEFAULT_K_MAX = 3


def _ngrpo_settings() -> dict:
    """``additional_config["ngrpo"]`` of the vLLM config being built (empty outside a config context)."""
    try:
        from vllm.config import get_current_vllm_config

        extra = get_current_vllm_config().additional_config
    except Exception:  # no current config (e.g. a unit test building the layer by hand)
        return {}
    return dict(extra.get("ngrpo", {})) if isinstance(extra, dict) else {}


def add_ring_buffers(module: torch.nn.Module, capacity: int, k_max: int, noise: bool, dim: int, dtype: torch.dtype,
                     device) -> None:
    """The ring table's non-persistent buffers (and sizes) on ``module``: what the sampler hook writes."""
    # One extra row (index ``capacity``) is a write sink for rows that did not mix: no host sync needed.
    module.register_buffer("ngrpo_ids", torch.full((capacity + 1,), -1, dtype=torch.int64, device=device),
                           persistent=False)
    module.register_buffer("ngrpo_cand", torch.zeros(capacity + 1, k_max, dtype=torch.int64, device=device),
                           persistent=False)
    module.register_buffer("ngrpo_alpha", torch.zeros(capacity + 1, k_max, dtype=torch.float32, device=device),
                           persistent=False)
    # Effective ring size (<= capacity) as a tensor so changing it never recompiles the graph.
    module.register_buffer("ngrpo_slots", torch.tensor(capacity, dtype=torch.int64, device=device), persistent=False)
    module.register_buffer("ngrpo_stale", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
    noise_rows = capacity + 1 if noise else 1
    module.register_buffer("ngrpo_noise", torch.zeros(noise_rows, dim, dtype=dtype, device=device), persistent=False)
    module.ngrpo_has_noise = noise_rows > 1
    module.ngrpo_capacity = capacity
    module.ngrpo_k_max = k_max


class MixingEmbedding(VocabParallelEmbedding):
    """VocabParallelEmbedding + a ring table of mixtures addressed by virtual ids."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = _ngrpo_settings()
        device = self.weight.device if self.weight.device.type != "meta" else None
        add_ring_buffers(self, int(settings.get("table_capacity", DEFAULT_TABLE_CAPACITY)),
                         int(settings.get("k_max", DEFAULT_K_MAX)), bool(settings.get("noise")), self.embedding_dim,
                         self.weight.dtype, device)

    def forward(self, input_):
        ids = input_.long()
        is_virtual = ids >= VIRTUAL_BASE
        slot = torch.remainder((ids - VIRTUAL_BASE).clamp_min(0), self.ngrpo_slots)
        cand = self.ngrpo_cand[slot]  # [N, k_max]
        alpha = self.ngrpo_alpha[slot]  # [N, k_max]
        plain_ids = torch.where(is_virtual, cand[:, 0], ids)
        if self.tp_size == 1:
            plain = self.quant_method.embedding(self, plain_ids)
            rows = self.weight[cand]  # [N, k_max, d]
        else:
            plain, rows = self._vocab_parallel_rows(plain_ids, cand)
        # The trainer's own sum (core.records.mix_rows_fp32): fp32, left to right, one rounding below, so rollout
        # and trainer agree bit for bit, compiled or not (padding columns carry alpha 0 and add exact zeros).
        mixed = mix_rows_fp32(rows, alpha)
        if self.ngrpo_has_noise:  # zero rows for neighbor mixtures: x + 0 leaves them bit for bit
            mixed = mixed + self.ngrpo_noise[slot].float()
        if not torch.compiler.is_compiling():  # eager: count virtual ids whose slot was overwritten
            self.ngrpo_stale += (is_virtual & (self.ngrpo_ids[slot] != ids)).sum()
        return torch.where(is_virtual.unsqueeze(-1), mixed.to(plain.dtype), plain)

    def _vocab_parallel_rows(self, plain_ids: torch.Tensor, cand: torch.Tensor):
        """Tensor parallelism: the plain rows and the candidate rows, each whole on every rank.

        Each rank looks up the ids its vocabulary shard owns and zeroes the others (vLLM's own masking); one
        all-reduce then sums [N, 1 + k_max, d]. Every id has exactly one owner, so the sum is that owner's row plus
        exact zeros: bit for bit the unsharded rows, and the k-term mixture is then summed in the single-rank order.
        Reducing the mixture itself would add the partial sums in rank order instead (off by an ulp from the
        trainer's rebuild); the price is k_max more rows in the embedding's all-reduce, small beside a layer's two."""
        from vllm.distributed import tensor_model_parallel_all_reduce
        from vllm.model_executor.layers.vocab_parallel_embedding import get_masked_input_and_mask

        si = self.shard_indices
        every = torch.cat([plain_ids.unsqueeze(1), cand], dim=1)  # [N, 1 + k_max]
        local, foreign = get_masked_input_and_mask(every, si.org_vocab_start_index, si.org_vocab_end_index,
                                                   si.num_org_vocab_padding, si.added_vocab_start_index,
                                                   si.added_vocab_end_index)
        rows = self.quant_method.embedding(self, local.long())  # [N, 1 + k_max, d]
        rows = tensor_model_parallel_all_reduce(rows.masked_fill(foreign.unsqueeze(-1), 0))
        return rows[:, 0], rows[:, 1:]


def full_weight(embedding: torch.nn.Module, vocab_size: int) -> torch.Tensor:
    """The whole [vocab_size, d] embedding matrix on this rank (what the neighbor tables are built over).

    One rank (or any module with a plain ``weight``): the weight itself. Tensor parallelism: every rank's shard
    gathered and put back in token-id order (vLLM's own sharded-to-full mapping); a collective, so every rank must call
    it (the install and weight-load RPCs run on all workers)."""
    if getattr(embedding, "tp_size", 1) == 1:
        return embedding.weight[:vocab_size]
    from vllm.distributed import tensor_model_parallel_all_gather

    gathered = tensor_model_parallel_all_gather(embedding.weight.contiguous(), dim=0)
    order = torch.tensor(embedding.get_sharded_to_full_mapping()[:vocab_size], dtype=torch.long,
                         device=gathered.device)
    return gathered.index_select(0, order)


RING_BUFFERS = ("ngrpo_ids", "ngrpo_cand", "ngrpo_alpha", "ngrpo_slots", "ngrpo_stale", "ngrpo_noise")


def keep_ring_out_of_weight_reload() -> None:
    """vLLM's layerwise reload (the load path of its nccl and ipc weight transfers) takes every buffer of a layer for a
    weight to wait for: it moves them to the meta device while the weights load, processes the layer once all of them
    arrived and materializes them again. The ring is never loaded, so the embedding waited for ``finalize`` with its
    received bytes buffered (1.09 GB at 7B in bf16), and a copy of the ring was materialized (3.2 GB for the STHT
    noise ring). Its names join vLLM's tensors that are never loaded (``reload.meta``): the embedding is then loaded as
    soon as its weight arrives and the ring stays where it is (tests/engine/test_layerwise_reload_ring.py)."""
    from vllm.model_executor.model_loader.reload import meta

    meta.SKIP_LOAD_TENSORS.update(RING_BUFFERS)
    meta.SKIP_TENSORS.update(RING_BUFFERS)  # built from SKIP_LOAD_TENSORS at import: a set of its own


_REGISTERED = False


def register_mixing_embedding() -> None:
    """Make every VocabParallelEmbedding built from now on in this process a MixingEmbedding (idempotent).

    Runs in the engine's worker process when vLLM imports the worker extension, i.e. before the model is built.
    ParallelLMHead keeps its own class (its name is looked up, not the base's)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.custom_op import op_registry_oot

    if op_registry_oot.get("VocabParallelEmbedding") not in (None, MixingEmbedding):
        raise RuntimeError(f"another out-of-tree VocabParallelEmbedding is registered: "
                           f"{op_registry_oot['VocabParallelEmbedding']}")
    if "VocabParallelEmbedding" not in op_registry_oot:
        VocabParallelEmbedding.register_oot(MixingEmbedding)
    keep_ring_out_of_weight_reload()  # before the model is built: vLLM records its reload metadata at load
    _REGISTERED = True
