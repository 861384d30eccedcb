"""Plain token sampling (GRPO): no mixing; rho is ignored."""

from __future__ import annotations

import torch

from ngrpo_ray.core.strategies.base import MixState, StepResult
from ngrpo_ray.core.strategies.compose import compose_step
from ngrpo_ray.core.strategies.sampling import sample_tokens


def sample_step(logits: torch.Tensor, E: torch.Tensor, state: MixState, generator: torch.Generator) -> StepResult:
    sampled = sample_tokens(logits, state.sampling, generator)
    none = torch.zeros_like(sampled, dtype=torch.bool)
    return compose_step(logits, E, state, sampled, none, sampled, state.params.k)
