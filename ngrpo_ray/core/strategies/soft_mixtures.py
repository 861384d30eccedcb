"""Soft-token baselines over the top-K tokens: Gumbel top-k (SofT-GRPO), soft thinking, Latent-GRPO's latent step.

All three feed sum_i w_i E[c_i] over candidates c = top-K of the temperature-scaled log-probabilities:
- gumbel_topk: scores = logp + g, g ~ Gumbel(0, 1); w = softmax(scores / gumbel_tau); text token = argmax scores.
- soft_thinking: w = probabilities renormalised over the top-K (all tokens when top_k is None); text = argmax.
- latent_gumbel: g clamped to noise_clamp and, one-sided, shifted by -noise_clamp[0] (so g >= 0);
  scores = logp + noise_scale * g; w = softmax(scores / gumbel_tau); text token = argmax scores; the step's
  log-density is ``latent_step_logdensity``.
The Gumbel noise comes from each row's counter-based stream (core.gate_stream.gumbel, keyed by the step and the
candidate rank j), the same draws as the vLLM hook's, so a replay recomputes the weights; token sampling is untouched,
so unmixed rows sample exactly like "sample".
"""

from __future__ import annotations

import torch

from ngrpo_ray.core.records import mix_embeddings
from ngrpo_ray.core.strategies.base import MixState, StepResult
from ngrpo_ray.core.strategies.compose import compose_step, emitted_if_mixed
from ngrpo_ray.core.strategies.sampling import sample_tokens


def latent_step_logdensity(logp_topk: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [...]: mean_i(-D_i - exp(-D_i)), D_i = s_i - logp_i (Gumbel density averaged over components)."""
    D = scores - logp_topk
    return (-D - torch.exp(-D)).mean(-1)


def latent_noise(g: torch.Tensor, noise_clamp: tuple[float, float], one_sided: bool) -> torch.Tensor:
    """Latent-GRPO's noise: Gumbel clamped to noise_clamp, shifted by -low when one-sided (so it is >= 0)."""
    lo, hi = noise_clamp
    g = g.clamp(lo, hi)
    return g - lo if one_sided else g


def _top_logp(logits: torch.Tensor, state: MixState) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float() / state.sampling.temperature, dim=-1)
    K = state.params.record_width(logits.shape[-1])
    return torch.topk(logp, K, dim=-1)


def _finish(logits, E, state, sampled, gate, cand, weights, anchor, extras) -> StepResult:
    mix_token = emitted_if_mixed(state, anchor, sampled)
    mixed = gate & state.allowed(mix_token, anchor)
    mix_input = mix_embeddings(E, cand[mixed], weights[mixed])
    return compose_step(logits, E, state, sampled, mixed, mix_token, cand.shape[1], mix_input, cand[mixed],
                        weights[mixed], extras)


def gumbel_topk_step(logits: torch.Tensor, E: torch.Tensor, state: MixState,
                     generator: torch.Generator) -> StepResult:
    B = logits.shape[0]
    sampled = sample_tokens(logits, state.sampling, generator)
    gate = state.gate(B, logits.device)
    top_logp, cand = _top_logp(logits, state)
    scores = top_logp + state.gumbel(B, top_logp.shape[1], logits.device)
    weights = torch.softmax(scores / state.params.gumbel_tau, dim=-1)
    anchor = cand.gather(1, scores.argmax(-1, keepdim=True)).squeeze(1)
    return _finish(logits, E, state, sampled, gate, cand, weights, anchor, {"scores": scores})


def soft_thinking_step(logits: torch.Tensor, E: torch.Tensor, state: MixState,
                       generator: torch.Generator) -> StepResult:
    B = logits.shape[0]
    sampled = sample_tokens(logits, state.sampling, generator)
    gate = state.gate(B, logits.device)
    top_logp, cand = _top_logp(logits, state)
    weights = torch.softmax(top_logp, dim=-1)  # = probabilities renormalised over the candidates
    anchor = cand[:, 0]
    return _finish(logits, E, state, sampled, gate, cand, weights, anchor, {})


def latent_gumbel_step(logits: torch.Tensor, E: torch.Tensor, state: MixState,
                       generator: torch.Generator) -> StepResult:
    p = state.params
    B = logits.shape[0]
    sampled = sample_tokens(logits, state.sampling, generator)
    gate = state.gate(B, logits.device)
    top_logp, cand = _top_logp(logits, state)
    g = latent_noise(state.gumbel(B, top_logp.shape[1], logits.device), p.noise_clamp, p.one_sided)
    scores = top_logp + p.noise_scale * g
    weights = torch.softmax(scores / p.gumbel_tau, dim=-1)
    anchor = cand.gather(1, scores.argmax(-1, keepdim=True)).squeeze(1)
    extras = {"scores": scores, "latent_logdensity": latent_step_logdensity(top_logp, scores)}
    return _finish(logits, E, state, sampled, gate, cand, weights, anchor, extras)
