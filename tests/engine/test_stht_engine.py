"""The STHT baseline (Gaussian noise on the input embedding) inside the vLLM engine: a gated step keeps the sampled
token as its text and feeds E[token] + noise_std * N(0, I), the noise drawn from a recorded seed; the trainer's
`response_logprobs` rebuilds those inputs from the seeds and reproduces every rollout logprob."""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.engine.rollout import generate_rollout
from ngrpo_ray.training.logprobs import response_logprobs

from conftest import _build
from hf_oracle import load_hf

TEMPERATURE = 0.8
NOISE_STD = 0.05  # the tiny model's embedding rows have std 0.02: this noise moves the logits visibly
PROMPTS = [[(7 * i + j) % 300 + 2 for j in range(3 + i % 4)] for i in range(8)]


@pytest.fixture(scope="module")
def noise_engine(tiny_models):
    llm = _build(tiny_models["llama"], noise_table=True)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.mark.engine
def test_gaussian_noise_rollout_is_rebuilt_exactly_by_the_trainer(noise_engine, tiny_models, eos_id):
    mixing = MixingParams(strategy="gaussian_noise", rho=0.5, noise_std=NOISE_STD)
    batch = generate_rollout(noise_engine, PROMPTS, {"temperature": TEMPERATURE, "max_tokens": 24}, mixing,
                             group_size=2, stop_token_ids=[eos_id])
    assert batch.noise_seed is not None
    records = batch.records()
    noised = 0
    for rec in records:
        seeds, mixed = rec.extras["noise_seed"], rec.mixed_mask
        assert torch.equal(seeds >= 0, mixed)  # a seed exactly at the noised steps
        assert torch.equal(rec.cand_ids[mixed][:, 0], rec.response_ids[mixed])  # the sampled token is the text
        assert bool((rec.alpha[mixed][:, 0] == 1.0).all()) and bool((rec.alpha[mixed][:, 1:] == 0.0).all())
        assert eos_id not in rec.response_ids[mixed].tolist()  # a stop token is never noised (it would hide the stop)
        noised += int(mixed.sum())
    assert noised >= 20, noised  # about half of ~380 steps

    model = load_hf(tiny_models["llama"])
    with torch.no_grad():
        rebuilt = response_logprobs(model, batch.prompt_ids, records, TEMPERATURE, noise_std=NOISE_STD)
        plain = response_logprobs(model, batch.prompt_ids, records, TEMPERATURE, noise_std=0.0)
    gap, control_gap = 0.0, 0.0
    for b, rec in enumerate(records):
        T = len(rec)
        gap = max(gap, float((rebuilt.logp[b, :T] - rec.logprobs).abs().max()))
        control_gap = max(control_gap, float((plain.logp[b, :T] - rec.logprobs).abs().max()))
    assert gap < 1e-4, gap
    assert control_gap > 1e-2, control_gap  # without the noise the trainer would see other inputs
    with pytest.raises(ValueError, match="no noise_std"):
        response_logprobs(model, batch.prompt_ids, records, TEMPERATURE)
