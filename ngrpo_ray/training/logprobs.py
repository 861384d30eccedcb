"""A trainer's log-probs of rollout responses, teacher-forced on the inputs the engine fed (the records' mixtures).

The record contract: log_softmax(logits / temperature)[token], no top-p/top-k renormalisation, computed over chunks of
``chunk_tokens`` response tokens (``core.token_logprobs``: no [tokens, V] tensor). Under ZeRO-3 every rank makes the
same number of module calls (``_agreed_count``), and every pass of a phase calls the head equally often
(``training.zero3_passes``). This module imports no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ngrpo_ray.core.records import ResponseRecord, align_records, noise_from_seeds, rebuild_inputs_embeds
from ngrpo_ray.core.token_logprobs import chunked_token_logprobs
from ngrpo_ray.training.micro_batches import global_count, split_micro_batches
from ngrpo_ray.training.train_sequence import TrainSequence, seq_tokens
from ngrpo_ray.training.zero3_passes import head_calls as phase_head_calls
from ngrpo_ray.training.zero3_passes import is_zero3


@dataclass
class TokenBatch:
    """A micro-batch in response coordinates: [B, T] where T is the longest response."""

    logp: torch.Tensor
    mask: torch.Tensor  # [B, T] bool
    entropy: torch.Tensor | None = None  # [B, T] detached entropy of the tempered distribution (a metric)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body returning hidden states, output head) of a HF causal LM."""
    body = getattr(model, "model", None) or model.base_model
    return body, model.get_output_embeddings()


def response_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    records: Sequence[ResponseRecord],
    temperature: float,
    pad_id: int = 0,
    use_records: bool = True,
    with_entropy: bool = False,
    noise_std: float | None = None,
    chunk_tokens: int = 1024,
    head_calls: int | None = None,
) -> TokenBatch:
    """log_softmax(logits / T)[response token] for every response step, teacher-forced on the rebuilt inputs.

    With ``use_records=False`` the mixtures are ignored (plain token embeddings): the control that must disagree.
    Records with noise seeds (the gaussian_noise baseline) get noise_std * N(0, I) regenerated from each seed added at
    their positions, as the engine added it; ``noise_std`` must then be given.
    Only response positions go through the output head, ``chunk_tokens`` at a time, so the extra memory is
    O(chunk_tokens x V) whatever the response length; ``with_entropy`` adds the per-token entropy (no gradient).
    ``head_calls``: call the head exactly this often (ZeRO-3: the phase's count, agreed over ranks and passes); None:
    as often as the chunks need, agreed over ranks.
    """
    device = next(model.parameters()).device
    al = align_records(list(prompts), list(records), pad_id, padding_side="right")
    body, head = _causal_lm_parts(model)
    # The embedding MODULE, not its weight: under ZeRO-3 the weight is an empty partition outside the module.
    emb = model.get_input_embeddings()
    mixed = al.mixed_mask if use_records else torch.zeros_like(al.mixed_mask)
    noise = None
    if use_records and al.noise_seed is not None and bool((al.noise_seed >= 0).any()):
        if noise_std is None:  # never train on inputs the engine did not see
            raise ValueError("records carry noise seeds (gaussian_noise) but no noise_std was given")
        # a noise step's record is (token, alpha 1): E[token] + noise, as the engine fed it
        d = getattr(emb, "embedding_dim", None) or model.config.hidden_size
        noise = noise_from_seeds(al.noise_seed, d, noise_std).to(device)
    embeds = rebuild_inputs_embeds(al.input_ids.to(device), emb, mixed.to(device), al.cand_ids.to(device),
                                   al.alpha.to(device), noise=noise)
    # no padding mask (causal_positions says why): SDPA runs causal, with no [B, 1, L, L] mask
    hidden = body(inputs_embeds=embeds, attention_mask=None, position_ids=causal_positions(al.input_ids).to(device),
                  use_cache=False).last_hidden_state
    B = len(records)
    T = max(len(r) for r in records)
    lengths = torch.tensor([len(r) for r in records])
    starts = torch.tensor([int(p.numel()) for p in prompts])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    # response token t of row b sits at position P_b + t; the logits predicting it are at P_b + t - 1
    pos = (starts[:, None] + torch.arange(T)[None, :] - 1).clamp(max=al.input_ids.shape[1] - 1)
    rows = torch.arange(B)[:, None].expand(B, T)
    b_idx, p_idx = rows[mask].to(device), pos[mask].to(device)
    targets = al.input_ids[rows[mask], pos[mask] + 1].to(device)
    need = -(-len(targets) // chunk_tokens)
    if head_calls is not None and head_calls < need:
        raise ValueError(f"{len(targets)} response tokens need {need} head chunks of {chunk_tokens}, the pass was "
                         f"given {head_calls}")
    n_chunks = head_calls if head_calls is not None else _agreed_count(need, model)
    token_logp, token_entropy = chunked_token_logprobs(head, hidden[b_idx, p_idx], targets, temperature,
                                                       chunk_tokens, with_entropy, min_chunks=n_chunks)
    where = (b_idx, mask.nonzero()[:, 1].to(device))
    logp = torch.zeros(B, T, dtype=token_logp.dtype, device=device).index_put(where, token_logp)
    entropy = None
    if token_entropy is not None:
        entropy = torch.zeros(B, T, dtype=torch.float32, device=device).index_put(where, token_entropy)
    return TokenBatch(logp=logp, mask=mask.to(device), entropy=entropy)


def causal_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Position ids 0..L-1 on every row of a right-padded [B, L] batch, for a forward with no padding mask.

    Every row starts at column 0 and its padding comes after its last real token, so under the causal mask no real
    token attends to a pad: the padding mask changes nothing that is read (the logits at pad positions are never
    used). Without it HF's SDPA path builds no [B, 1, L, L] mask and runs the causal kernel (flash on GPU); with it,
    the mask and its float bias cost about 3.8 x B x L^2 bytes (measured on CPU; 8 x 8,704 tokens: 2.3 GB), and the
    hidden states of the real tokens are bit-identical either way, the gradients equal to fp32 rounding
    (tests/training/test_causal_forward.py). The pads' positions continue the count so that HF sees no packed
    sequences (a position step other than 1 starts one)."""
    B, L = input_ids.shape
    return torch.arange(L).expand(B, L)


def _agreed_count(local: int, model: torch.nn.Module) -> int:
    """Under ZeRO-3 every module call is a collective gather: the number of calls (forward passes, head chunks) must
    be the same on every rank, so take the maximum over ranks. Elsewhere the local count is fine."""
    if not is_zero3(model) or _world()[1] == 1:
        return local
    return global_count(local, next(model.parameters()).device)


def _pad_rows(values: Sequence[torch.Tensor], T: int, device) -> torch.Tensor:
    out = torch.zeros(len(values), T, dtype=torch.float32, device=device)
    for i, v in enumerate(values):
        out[i, : v.numel()] = v.to(device=device, dtype=torch.float32)
    return out


@torch.no_grad()
def batched_logprobs(model: torch.nn.Module, seqs: Sequence[TrainSequence], temperature: float, pad_id: int,
                     chunk: int = 8, noise_std: float | None = None, max_tokens: int | None = None,
                     chunk_tokens: int = 1024, start_pass: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """Per-sequence [T_i] log-probs without gradient (old / reference / parity checks), in the input order; batched
    ``chunk`` sequences at a time, or by the token budget ``max_tokens`` when set. ``start_pass``: called before each
    forward pass (``zero3_passes.start_pass`` of the model's DeepSpeed engine)."""
    order = list(range(len(seqs)))
    if max_tokens is None:
        parts = [order[i: i + chunk] for i in range(0, len(seqs), chunk)]
    else:
        parts = split_micro_batches(order, [seq_tokens(s) for s in seqs], 1, max_tokens)
    out: list[torch.Tensor | None] = [None] * len(seqs)
    # ZeRO-3: as many forward passes as the busiest rank (repeating a part rewrites the same values)
    parts += [parts[0]] * (_agreed_count(len(parts), model) - len(parts))
    calls = phase_head_calls([sum(len(seqs[i].record) for i in part) for part in parts], chunk_tokens, model,
                             max_tokens)
    for part in parts:
        if start_pass is not None:
            start_pass()
        tb = response_logprobs(model, [seqs[i].prompt_ids for i in part], [seqs[i].record for i in part],
                               temperature, pad_id, noise_std=noise_std, chunk_tokens=chunk_tokens, head_calls=calls)
        for j, i in enumerate(part):
            out[i] = tb.logp[j, : len(seqs[i].record)].float().cpu()
    return out  # type: ignore[return-value]
