"""Assemble a StepResult from a strategy's mixed rows and their mixtures (shared by every strategy)."""

from __future__ import annotations

import torch

from ngrpo_ray.core.strategies.base import MixState, StepResult, unmixed_record
from ngrpo_ray.core.strategies.sampling import token_logprobs


def compose_step(
    logits: torch.Tensor,
    E: torch.Tensor,
    state: MixState,
    sampled: torch.Tensor,
    mixed: torch.Tensor,
    mix_token: torch.Tensor,
    width: int,
    mix_input: torch.Tensor | None = None,
    mix_cand: torch.Tensor | None = None,
    mix_alpha: torch.Tensor | None = None,
    extras: dict[str, torch.Tensor] | None = None,
) -> StepResult:
    """Emit ``mix_token`` at mixed rows and ``sampled`` elsewhere; feed ``mix_input`` ([n, d], one row per mixed row,
    in row order) at mixed rows and E[token] elsewhere; unmixed rows get the (token, [1, 0, ...]) record filler."""
    tokens = torch.where(mixed, mix_token, sampled)
    inputs = E[tokens]
    cand, alpha = unmixed_record(tokens, width)
    if bool(mixed.any()):
        inputs = inputs.index_put((mixed,), mix_input)
        if mix_cand is not None:
            cand[mixed] = mix_cand
            alpha[mixed] = mix_alpha.float()
    logprobs = token_logprobs(logits, tokens, state.sampling.temperature)
    state.after_step(tokens)
    return StepResult(tokens, inputs, mixed, cand, alpha, logprobs, extras or {})


def emitted_if_mixed(state: MixState, anchor: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """The text token of a mixed step: the anchor (paper eq. 12) or the sampled token (released code)."""
    return anchor if state.params.emit == "anchor" else sampled
