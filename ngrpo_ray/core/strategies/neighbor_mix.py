"""Semantic Neighbor Mixing, paper eq. 6-11.

Gate m ~ Bernoulli(rho) per row; anchor v* = argmax logits (eq. 6); C = [v*] + its k-1 nearest rows of E (eq. 7-8);
alpha = softmax over C of logits / tau (eq. 9, tau defaults to the sampling temperature); next input
sum_c alpha(c) E[c] (eq. 10-11); the emitted text token is the anchor (eq. 12). Unmixed rows sample normally.
"""

from __future__ import annotations

import torch

from ngrpo_ray.core.records import mix_embeddings
from ngrpo_ray.core.strategies.base import MixState, StepResult
from ngrpo_ray.core.strategies.compose import compose_step, emitted_if_mixed
from ngrpo_ray.core.strategies.sampling import filtered_logits, sample_tokens


def neighbor_alpha(logits: torch.Tensor, cand: torch.Tensor, state: MixState) -> torch.Tensor:
    """[n, V] logits of the mixed rows, [n, k] candidates -> [n, k] fp32 weights."""
    p = state.params
    if p.alpha_source == "logits":
        tau = p.tau if p.tau is not None else state.sampling.temperature
        return torch.softmax(logits.float().gather(1, cand) / tau, dim=-1)
    # released code: model probabilities after top-k / top-p filtering, renormalised over C (anchor always kept)
    probs = filtered_logits(logits, state.sampling).softmax(-1).gather(1, cand)
    return probs / probs.sum(-1, keepdim=True)


def neighbor_mix_step(logits: torch.Tensor, E: torch.Tensor, state: MixState,
                      generator: torch.Generator) -> StepResult:
    sampled = sample_tokens(logits, state.sampling, generator)
    gate = state.gate(logits.shape[0], logits.device)
    anchor = logits.argmax(-1)
    mix_token = emitted_if_mixed(state, anchor, sampled)
    mixed = gate & state.allowed(mix_token, anchor)
    cand = state.neighbors(E, anchor[mixed])
    alpha = neighbor_alpha(logits[mixed], cand, state)
    mix_input = mix_embeddings(E, cand, alpha)
    return compose_step(logits, E, state, sampled, mixed, mix_token, state.params.k, mix_input, cand, alpha)
