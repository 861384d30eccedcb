"""The memory plan's "mixing hook step" term against the hook's measured temporaries, with the real R1 / Qwen
vocabulary (V = 151,936) on vLLM's own Sampler, no engine.

vLLM sizes its KV cache from a profiling run in which the hook does nothing (no request is in the batch), so what the
hook allocates in a decode step comes on top of the reservation; `planning.engine_memory.hook_step_bytes` bounds it.
Measured with torch's profiler timeline (CPU tensors created during the call): at temperature 0.7 the pre-hook peaks
at exactly the term (2 or 3 x rows x V x 4 B), and a whole step (pre-hook, sampler, post-hook) exceeds the sampler
alone by no more than the term; at temperature 1 the hook allocates less.
"""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.bench import hook_step as hs
from ngrpo_ray.planning.engine_memory import hook_step_bytes, hook_step_factor
from tests.support.memory_timeline import transient_peak_bytes

V, ROWS = 151_936, 16
STRATEGIES = {
    "sample": {"strategy": "sample", "seed": 0},
    "neighbor_mix": {"strategy": "neighbor_mix", "rho": 0.1, "k": 3, "seed": 0},
    "neighbor_mix_every_step": {"strategy": "neighbor_mix", "rho": 1.0, "k": 3, "seed": 0},
    "gaussian_noise": {"strategy": "gaussian_noise", "rho": 1.0, "noise_std": 0.05, "seed": 0},
    "gumbel_topk": {"strategy": "gumbel_topk", "rho": 1.0, "seed": 0},
    "soft_thinking": {"strategy": "soft_thinking", "rho": 1.0, "seed": 0},
    "latent_gumbel": {"strategy": "latent_gumbel", "rho": 1.0, "seed": 0},
}


def _measure(mixing: dict, temperature: float) -> tuple[int, int, int]:
    """(pre-hook peak, whole-step peak, sampler-alone peak) in bytes, after two warm-up steps."""
    a = dict(hs.DEFAULTS, vocab=V, dim=64, temperature=temperature)
    dev = torch.device("cpu")
    sampler, md = hs._sampler_and_metadata(ROWS, temperature, dev)
    hook = hs._hook(sampler, ROWS, a, dev, mixing)
    base = torch.randn(ROWS, V, generator=torch.Generator().manual_seed(1)) * 3.0
    logits = torch.empty_like(base)

    def pre():
        logits.copy_(base)
        hook._pre_hook(sampler, (), {"logits": logits})
        hook._pending = None  # what the pre-hook keeps for the post-hook is part of its peak, not left behind

    def step():
        logits.copy_(base)
        hook._pre_hook(sampler, (), {"logits": logits})
        out = sampler(logits=logits, sampling_metadata=md)
        hook._post_hook(sampler, (), {}, out)

    def sample_only():
        logits.copy_(base)
        sampler(logits=logits, sampling_metadata=md)

    step()
    step()
    return transient_peak_bytes(pre), transient_peak_bytes(step), transient_peak_bytes(sample_only)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_hook_step_term_is_the_measured_peak_at_temperature_0p7(name):
    mixing = STRATEGIES[name]
    term = hook_step_bytes(mixing["strategy"], ROWS, V)
    assert term == hook_step_factor(mixing["strategy"]) * ROWS * V * 4
    pre, step, sampler_alone = _measure(mixing, 0.7)
    assert 0.98 * term <= pre <= 1.02 * term, (name, pre / (ROWS * V * 4))
    assert step - sampler_alone <= term, (name, step, sampler_alone)


@pytest.mark.parametrize("name", ["sample", "neighbor_mix", "gaussian_noise", "soft_thinking"])
def test_temperature_one_stays_under_the_term(name):
    mixing = STRATEGIES[name]
    pre, step, sampler_alone = _measure(mixing, 1.0)
    term = hook_step_bytes(mixing["strategy"], ROWS, V)
    assert pre <= term and step - sampler_alone <= term, (name, pre / (ROWS * V * 4))
