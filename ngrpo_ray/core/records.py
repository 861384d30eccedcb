"""Per-response rollout records and the reconstruction of the inputs the engine fed (paper section 3.3).

Record contract (length T per response): ``response_ids`` [T], ``logprobs`` [T], ``mixed_mask`` [T],
``cand_ids`` [T, k], ``alpha`` [T, k], plus strategy extras (``noise_seed`` [T], ``scores`` [T, K]).
The mixture of response step t is the INPUT at the position of response token t, i.e. position prompt_len + t of
the [prompt; response] sequence (the model's input there represents token t).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import torch


Embedding = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def _lookup(E: Embedding) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of E for an id tensor: E[ids] for a weight tensor, E(ids) for an embedding module.

    Training passes the module: under ZeRO-3 its weight is a partitioned (empty) tensor outside the module's forward,
    and calling the module is what gathers it (and routes the gradient back to the partitions). Both give the same
    values bit for bit (a lookup is a copy)."""
    return E.__getitem__ if isinstance(E, torch.Tensor) else E


def mix_embeddings(E: Embedding, cand_ids: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """sum_j alpha[..., j] * E[cand_ids[..., j]] -> [..., d]  (E: a [V, d] weight or an embedding module).

    The sum is an explicit left-to-right loop over j in fp32 with one rounding to E's dtype at the end
    (``mix_rows_fp32``), so rollout (shape [B, k]) and training (shape [B, L, k]) agree bit for bit, also where the
    engine's forward is compiled: Inductor computes bf16 elementwise chains in fp32 and drops the roundings between
    fused ops, so a bf16 chain (alpha cast to bf16, each product and partial sum rounded) would be computed one way
    in a compiled engine and another in the eager trainer. alpha is a constant (no gradient); E gets one.
    """
    return _mix_rows(_lookup(E)(cand_ids), alpha)  # one lookup (one ZeRO-3 gather) for every candidate


def _mix_rows(rows: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """rows [..., k, d] (the candidates' embeddings), alpha [..., k] -> the left-to-right sum [..., d] in rows'
    dtype: computed in fp32, rounded once."""
    if rows.shape[-2] > 64:  # full-vocabulary soft thinking: inference only, never rebuilt, so a matmul is fine
        return torch.einsum("...k,...kd->...d", alpha.detach().to(rows.dtype), rows)
    return mix_rows_fp32(rows, alpha).to(rows.dtype)


def mix_rows_fp32(rows: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """sum_j alpha[..., j] * float(rows[..., j, :]), left to right, in fp32 (the engine's embedding adds its noise
    rows in fp32 too, then rounds once, as the trainer's bf16 ``E[token] + noise`` does)."""
    a = alpha.detach().float()
    out = a[..., 0:1] * rows[..., 0, :].float()
    for j in range(1, rows.shape[-2]):
        out = out + a[..., j : j + 1] * rows[..., j, :].float()
    return out


def noise_from_seeds(seeds: torch.Tensor, d: int, std: float) -> torch.Tensor:
    """[...] int64 seeds -> [..., d] fp32 noise std * N(0, I), regenerated on CPU from torch.Generator(seed).

    A seed < 0 means "no noise" and gives zeros.
    """
    flat = seeds.reshape(-1).tolist()
    out = torch.zeros(len(flat), d, dtype=torch.float32)
    for i, s in enumerate(flat):
        if s >= 0:
            out[i] = torch.randn(d, generator=torch.Generator().manual_seed(int(s))) * std
    return out.reshape(*seeds.shape, d)


def rebuild_inputs_embeds(
    input_ids: torch.Tensor,
    E: Embedding,
    mixed_mask: torch.Tensor,
    cand_ids: torch.Tensor,
    alpha: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, L] ids -> [B, L, d] input embeddings: E[input_ids], with sum_j alpha * E[cand] at masked positions.

    ``noise`` [B, L, d] (Gaussian-noise baseline) is added at masked positions instead of the mixture:
    E[input_ids] + noise. Gradients flow into E; alpha and noise are constants. E: a [V, d] weight, or (training,
    ZeRO-3) the embedding module itself.
    """
    # ONE lookup for the plain ids and every mixed position's candidates: under ZeRO-3 each call of the module is a
    # collective gather, so every rank must make the same number of calls whatever its mixture count.
    pos = mixed_mask.nonzero(as_tuple=True)
    cand = cand_ids[pos]  # [M, k]
    rows = _lookup(E)(torch.cat([input_ids.reshape(-1), cand.reshape(-1)]))
    n = input_ids.numel()
    base = rows[:n].reshape(*input_ids.shape, -1)
    if noise is not None:
        return torch.where(mixed_mask.unsqueeze(-1), base + noise.detach().to(base.dtype), base)
    if cand.shape[0] == 0:
        return base
    # Only the masked positions are mixed: gather them, mix, scatter back (no [B, L, k, d] tensor).
    mixed = _mix_rows(rows[n:].reshape(*cand.shape, -1), alpha[pos])
    return base.index_put(pos, mixed)


@dataclass
class ResponseRecord:
    """What one rollout keeps per response, length T = number of emitted tokens."""

    response_ids: torch.Tensor  # [T] int64
    logprobs: torch.Tensor  # [T] float32
    mixed_mask: torch.Tensor  # [T] bool
    cand_ids: torch.Tensor  # [T, k] int64
    alpha: torch.Tensor  # [T, k] float32
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # noise_seed [T], scores [T, K], ...
    stop_reason: str = "length"  # "eos" | "stop" | "length"
    step_logits: torch.Tensor | None = None  # [T, V] when asked for (tests)

    def __len__(self) -> int:
        return int(self.response_ids.numel())

    @property
    def k(self) -> int:
        return int(self.cand_ids.shape[1])


@dataclass
class AlignedRecords:
    """[B, L] tensors aligned with a padded [prompt; response] batch."""

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    position_ids: torch.Tensor  # [B, L] int64 (0 at the first real token)
    mixed_mask: torch.Tensor  # [B, L] bool
    cand_ids: torch.Tensor  # [B, L, k] int64
    alpha: torch.Tensor  # [B, L, k] float32
    response_mask: torch.Tensor  # [B, L] bool: positions holding response tokens
    noise_seed: torch.Tensor | None  # [B, L] int64, -1 where no noise


def align_records(
    prompts: list[torch.Tensor],
    records: list[ResponseRecord],
    pad_id: int,
    padding_side: str = "right",
) -> AlignedRecords:
    """Place each [prompt; response] in one row and its records at positions prompt_len + t.

    ``padding_side`` "right" puts padding after the response; "left" puts it before the prompt.
    The mask of the last response token is kept as recorded: its mixture only matters if it is fed, and a
    teacher-forced forward does feed it (its output is just unused).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    B = len(records)
    k = max(r.k for r in records)
    L = max(int(p.numel()) + len(r) for p, r in zip(prompts, records))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    mixed = torch.zeros(B, L, dtype=torch.bool)
    cand = torch.zeros(B, L, k, dtype=torch.long)
    alpha = torch.zeros(B, L, k, dtype=torch.float32)
    resp_mask = torch.zeros(B, L, dtype=torch.bool)
    has_noise = any("noise_seed" in r.extras for r in records)
    noise_seed = torch.full((B, L), -1, dtype=torch.long) if has_noise else None
    for b, (p, r) in enumerate(zip(prompts, records)):
        P, T = int(p.numel()), len(r)
        off = 0 if padding_side == "right" else L - P - T
        input_ids[b, off : off + P] = p
        input_ids[b, off + P : off + P + T] = r.response_ids
        attention_mask[b, off : off + P + T] = 1
        sl = slice(off + P, off + P + T)
        resp_mask[b, sl] = True
        mixed[b, sl] = r.mixed_mask
        cand[b, sl, : r.k] = r.cand_ids
        alpha[b, sl, : r.k] = r.alpha
        if noise_seed is not None and "noise_seed" in r.extras:
            noise_seed[b, sl] = r.extras["noise_seed"]
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    return AlignedRecords(input_ids, attention_mask, position_ids, mixed, cand, alpha, resp_mask, noise_seed)
