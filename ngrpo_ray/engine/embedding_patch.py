"""In-graph input embedding that understands "virtual token ids".

A mixed step emits the id ``VIRTUAL_BASE + c`` (c: a running counter) instead of a vocabulary id. The id then travels
through vLLM's own plumbing (next-step input, the request's token list, recompute after preemption, prefix-cache
hashes) and lands here, where it is embedded as ``sum_j alpha[s, j] * E[cand[s, j]]`` with ``s = c % slots``.

The layer replaces ``VocabParallelEmbedding`` through vLLM's out-of-tree registry, so the embedding stays inside the
compiled graph and the engine does not need prompt-embeds mode (which would run the embedding eagerly every step).
Only static-shape ops are used (gathers, a k-term sum, ``torch.where``). The ring table lives in non-persistent
buffers that the sampler post-hook writes in place; their size is fixed at construction from
``additional_config["ngrpo"]`` (``table_capacity``, ``k_max``, ``noise``).

Gaussian noise (the STHT baseline) uses the same slots: cand = the sampled token with alpha (1, 0, ...) plus a noise
row, so its input is E[token] + noise. The [capacity + 1, d] noise table exists only in engines built with
``noise: true`` (else one unused row, and the forward adds nothing): it costs capacity * d floats.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

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
        if self.tp_size != 1:  # refused at install; kept here so a wrong setup fails loudly, not silently
            raise RuntimeError("ngrpo MixingEmbedding supports tensor_parallel_size == 1 only")
        is_virtual = ids >= VIRTUAL_BASE
        slot = torch.remainder((ids - VIRTUAL_BASE).clamp_min(0), self.ngrpo_slots)
        cand = self.ngrpo_cand[slot]  # [N, k_max]
        alpha = self.ngrpo_alpha[slot]  # [N, k_max]
        plain_ids = torch.where(is_virtual, cand[:, 0], ids)
        plain = self.quant_method.embedding(self, plain_ids)
        # Same left-to-right sum as core.records.mix_embeddings, so rollout and trainer agree bit for bit
        # (padding columns carry alpha 0 and add exact zeros).
        a = alpha.to(self.weight.dtype)
        mixed = a[:, 0:1] * self.weight[cand[:, 0]]
        for j in range(1, cand.shape[1]):
            mixed = mixed + a[:, j : j + 1] * self.weight[cand[:, j]]
        if self.ngrpo_has_noise:  # zero rows for neighbor mixtures: x + 0 leaves them bit for bit
            mixed = mixed + self.ngrpo_noise[slot]
        if not torch.compiler.is_compiling():  # eager: count virtual ids whose slot was overwritten
            self.ngrpo_stale += (is_virtual & (self.ngrpo_ids[slot] != ids)).sum()
        return torch.where(is_virtual.unsqueeze(-1), mixed.to(plain.dtype), plain)


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
    _REGISTERED = True
