"""Exploration strategies behind one interface: fn(logits [B, V], E [V, d], state, generator) -> StepResult."""

from __future__ import annotations

from typing import Callable

import torch

from ngrpo_ray.core.mixing_params import STRATEGIES, MixingParams, SamplingParams
from ngrpo_ray.core.strategies.base import MixState, StepResult
from ngrpo_ray.core.strategies.gaussian_noise import gaussian_noise_step
from ngrpo_ray.core.strategies.neighbor_mix import neighbor_alpha, neighbor_mix_step
from ngrpo_ray.core.strategies.sample import sample_step
from ngrpo_ray.core.strategies.sampling import filtered_logits, sample_tokens, token_logprobs
from ngrpo_ray.core.strategies.soft_mixtures import (
    gumbel_topk_step,
    latent_gumbel_step,
    latent_step_logdensity,
    soft_thinking_step,
)

StrategyFn = Callable[[torch.Tensor, torch.Tensor, MixState, torch.Generator], StepResult]

STRATEGY_FUNCTIONS: dict[str, StrategyFn] = {
    "sample": sample_step,
    "neighbor_mix": neighbor_mix_step,
    "gaussian_noise": gaussian_noise_step,
    "gumbel_topk": gumbel_topk_step,
    "soft_thinking": soft_thinking_step,
    "latent_gumbel": latent_gumbel_step,
}
assert tuple(STRATEGY_FUNCTIONS) == STRATEGIES


def mixing_step(logits: torch.Tensor, E: torch.Tensor, state: MixState, generator: torch.Generator) -> StepResult:
    """Run the strategy named by ``state.params.strategy`` for one decoding step."""
    return STRATEGY_FUNCTIONS[state.params.strategy](logits, E, state, generator)


__all__ = [
    "MixState", "MixingParams", "SamplingParams", "StepResult", "STRATEGY_FUNCTIONS", "mixing_step",
    "sample_step", "neighbor_mix_step", "gaussian_noise_step", "gumbel_topk_step", "soft_thinking_step",
    "latent_gumbel_step", "latent_step_logdensity", "neighbor_alpha", "filtered_logits", "sample_tokens",
    "token_logprobs",
]
