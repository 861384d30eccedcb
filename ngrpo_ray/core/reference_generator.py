"""Reference generator on plain transformers: the oracle the vLLM mixing hook is tested against.

Batched with left padding and a KV cache; every step feeds ``inputs_embeds`` (the strategy's next input), so mixed
inputs enter exactly as in the engine. One seeded torch.Generator drives token sampling; each response's
counter-based stream (core.gate_stream, through MixState) the gate, the noise seeds and the Gumbel noise. Returns one ResponseRecord per prompt (records contract in ngrpo_ray.core.records).
"""

from __future__ import annotations

import torch

from ngrpo_ray.core.mixing_params import MixingParams, SamplingParams
from ngrpo_ray.core.neighbors import LazyNeighborTable
from ngrpo_ray.core.records import ResponseRecord
from ngrpo_ray.core.strategies import MixState, StepResult, mixing_step


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """List of [P_i] ids -> ([B, P] ids, [B, P] attention mask), padding on the left."""
    P = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - p.numel():] = p
        mask[b, P - p.numel():] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    params: MixingParams,
    sampling: SamplingParams,
    max_new_tokens: int,
    seed: int = 0,
    eos_ids: tuple[int, ...] = (),
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    table: LazyNeighborTable | torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    return_logits: bool = False,
) -> list[ResponseRecord]:
    """Sample one response per prompt with the strategy in ``params``; stop a row at an eos/stop id or the length."""
    device = next(model.parameters()).device
    E = model.get_input_embeddings().weight
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    B = ids.shape[0]
    gen = torch.Generator(device=device).manual_seed(seed)
    state = MixState.create(params, sampling, B, device, sampling_seed=seed, table=table, valid=valid)
    end_ids = torch.tensor(tuple(eos_ids) + tuple(stop_ids), dtype=torch.long, device=device)

    positions = (mask.cumsum(1) - 1).clamp_min(0)
    out = model(inputs_embeds=E[ids], attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    next_pos = positions[:, -1:] + 1
    steps: list[StepResult] = []
    step_logits: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    length = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        res = mixing_step(logits, E, state, gen)
        steps.append(res)
        if return_logits:
            step_logits.append(logits.float().clone())
        ended = ~done & torch.isin(res.tokens, end_ids)
        length[ended] = t + 1
        done |= ended
        if bool(done.all()) or t + 1 == max_new_tokens:
            break
        # Finished rows keep decoding (their outputs are dropped) so the batch stays rectangular.
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        out = model(inputs_embeds=res.inputs_embeds.unsqueeze(1), attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = next_pos + 1
    return _collect(steps, step_logits, length, eos_ids, stop_ids)


def _collect(steps: list[StepResult], step_logits: list[torch.Tensor], length: torch.Tensor,
             eos_ids: tuple[int, ...], stop_ids: tuple[int, ...]) -> list[ResponseRecord]:
    """Stack the per-step batch results into per-response records cut at each row's length."""
    tokens = torch.stack([s.tokens for s in steps], 1).cpu()
    logprobs = torch.stack([s.logprobs for s in steps], 1).cpu()
    mixed = torch.stack([s.mixed for s in steps], 1).cpu()
    cand = torch.stack([s.cand_ids for s in steps], 1).cpu()
    alpha = torch.stack([s.alpha for s in steps], 1).cpu()
    extras = {name: torch.stack([s.extras[name] for s in steps], 1).cpu() for name in steps[0].extras}
    logits = torch.stack(step_logits, 1).cpu() if step_logits else None
    records = []
    for b in range(tokens.shape[0]):
        T = int(length[b])
        last = int(tokens[b, T - 1])
        reason = "eos" if last in eos_ids else "stop" if last in stop_ids else "length"
        records.append(ResponseRecord(
            response_ids=tokens[b, :T].clone(), logprobs=logprobs[b, :T].clone(), mixed_mask=mixed[b, :T].clone(),
            cand_ids=cand[b, :T].clone(), alpha=alpha[b, :T].clone(),
            extras={name: v[b, :T].clone() for name, v in extras.items()}, stop_reason=reason,
            step_logits=None if logits is None else logits[b, :T].clone()))
    return records
