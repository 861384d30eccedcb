"""Gaussian noise on the input embedding (the STHT baseline, "Soft tokens, hard truths").

A token is sampled as usual; at gated rows the next input is E[token] + noise_std * N(0, I). The noise is rebuilt
exactly from a per-step int64 seed (record ``noise_seed``, -1 where no noise) on CPU in fp32, see
``ngrpo_ray.core.records.noise_from_seeds``.
"""

from __future__ import annotations

import torch

from ngrpo_ray.core.records import noise_from_seeds
from ngrpo_ray.core.strategies.base import MixState, StepResult
from ngrpo_ray.core.strategies.compose import compose_step
from ngrpo_ray.core.strategies.sampling import sample_tokens

SEED_HIGH = 2**62


def gaussian_noise_step(logits: torch.Tensor, E: torch.Tensor, state: MixState,
                        generator: torch.Generator) -> StepResult:
    B = logits.shape[0]
    sampled = sample_tokens(logits, state.sampling, generator)
    gate = state.gate(B, logits.device)
    seeds = state.noise_seeds(B, logits.device)  # the response's stream, like the engine's
    mixed = gate & state.allowed(sampled, sampled)
    noise = noise_from_seeds(seeds[mixed].cpu(), E.shape[1], state.params.noise_std)
    mix_input = E[sampled[mixed]] + noise.to(E.device, E.dtype)
    noise_seed = torch.where(mixed, seeds, torch.full_like(seeds, -1))
    return compose_step(logits, E, state, sampled, mixed, sampled, state.params.k, mix_input,
                        extras={"noise_seed": noise_seed})
