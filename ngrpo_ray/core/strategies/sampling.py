"""Plain temperature sampling with top-k / top-p, and the rollout log-probability of the record contract."""

from __future__ import annotations

import torch

from ngrpo_ray.core.mixing_params import SamplingParams


def filtered_logits(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """fp32 logits / temperature with tokens outside top-k and the top-p nucleus set to -inf."""
    z = logits.float() / sp.temperature
    V = z.shape[-1]
    if 0 < sp.top_k < V:
        kth = torch.topk(z, sp.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        cum = sorted_z.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_z.softmax(-1)) >= sp.top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_tokens(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """[B, V] -> [B] tokens by the exponential race argmax(p / q), q ~ Exp(1) (one [B, V] draw per step)."""
    probs = filtered_logits(logits, sp).softmax(-1)
    q = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / q).argmax(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[tokens] in fp32 (temperature only, no top-k/top-p renormalisation)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
