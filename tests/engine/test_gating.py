"""Done-when 3: rho = 0 is exactly vLLM's unhooked output; the mixed fraction is rho within 3 standard errors;
no mixing after the marker or on a never-mix id."""

from __future__ import annotations

import math

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.engine.rollout import generate_rollout
from ngrpo_ray.engine.embedding_patch import VIRTUAL_BASE

from conftest import reseed

PROMPTS = [[(11 * i + j) % 300 + 2 for j in range(4)] for i in range(12)]


@pytest.mark.engine
def test_rho_zero_is_vanilla_vllm(qwen2_engine, vanilla_qwen2_engine, eos_id):
    """One request per call: the engine core starts stepping while requests still arrive, so a multi-request
    batch's row order (hence which random draw goes to which request) is timing dependent, hooked or not."""
    from vllm import SamplingParams

    sampling = {"temperature": 1.0, "max_tokens": 20}
    plain_sp = SamplingParams(detokenize=False, stop_token_ids=[eos_id], **sampling)
    plain, hooked, other = [], [], []
    for i, prompt in enumerate(PROMPTS):
        reseed(vanilla_qwen2_engine, 1000 + i)
        out = vanilla_qwen2_engine.generate([{"prompt_token_ids": prompt}], plain_sp, use_tqdm=False)
        plain.append(list(out[0].outputs[0].token_ids))
        reseed(qwen2_engine, 1000 + i)
        batch = generate_rollout(qwen2_engine, [prompt], sampling, MixingParams(rho=0.0), stop_token_ids=[eos_id])
        assert batch.num_mixed == 0
        hooked.append(batch.response_ids[0].tolist())
        reseed(qwen2_engine, 5000 + i)  # another seed gives other tokens: the equality is not vacuous
        other.append(generate_rollout(qwen2_engine, [prompt], sampling, MixingParams(rho=0.0),
                                      stop_token_ids=[eos_id]).response_ids[0].tolist())
    assert hooked == plain
    assert sum(a != b for a, b in zip(other, hooked)) >= len(PROMPTS) // 2


@pytest.mark.engine
def test_mixed_fraction_is_rho(qwen2_engine):
    rho = 0.3
    prompts = [[(5 * i + j) % 300 + 2 for j in range(3)] for i in range(48)]
    batch = generate_rollout(qwen2_engine, prompts, {"temperature": 1.0, "max_tokens": 40, "ignore_eos": True},
                             MixingParams(rho=rho, k=3))
    n = batch.num_tokens
    assert n == 48 * 40
    se = math.sqrt(rho * (1 - rho) / n)
    assert abs(batch.mixed_fraction - rho) <= 3 * se, (batch.mixed_fraction, se)
    assert all((c[m][:, 0] == r[m]).all() for c, r, m in zip(batch.cand_ids, batch.response_ids, batch.mixed_mask))
    assert all((r < VIRTUAL_BASE).all() for r in batch.response_ids)  # virtual ids never leak to the driver


def _most_common(batch, n: int) -> list[int]:
    ids, counts = torch.cat(batch.response_ids).unique(return_counts=True)
    return ids[counts.argsort(descending=True)][:n].tolist()


@pytest.mark.engine
def test_no_mixing_after_marker(qwen2_engine):
    prompts = [[(3 * i + j) % 300 + 2 for j in range(3)] for i in range(32)]
    sampling = {"temperature": 1.0, "max_tokens": 40, "ignore_eos": True}
    markers = tuple(_most_common(generate_rollout(qwen2_engine, prompts, sampling, MixingParams(rho=0.0)), 6))
    batch = generate_rollout(qwen2_engine, prompts, sampling, MixingParams(rho=0.5, k=3, stop_after_ids=markers))
    seen, before_mixed, after_total = 0, 0, 0
    for r, m in zip(batch.response_ids, batch.mixed_mask):
        hits = torch.isin(r, torch.tensor(markers)).nonzero().flatten()
        if hits.numel():
            seen += 1
            first = int(hits[0])
            assert not m[first:].any()  # the marker step and everything after it never mix
            before_mixed += int(m[:first].sum())
            after_total += len(r) - first
    assert seen >= 4 and before_mixed > 0 and after_total > 20  # the check above had steps to look at
    assert batch.mixed_fraction > 0.2  # rows without the marker mix as usual


@pytest.mark.engine
def test_no_mixing_on_never_mix_ids(qwen2_engine):
    """At rho = 1 every allowed step mixes and emits its argmax; a never-mix argmax samples instead."""
    prompts = [[(3 * i + j) % 300 + 2 for j in range(3)] for i in range(32)]
    sampling = {"temperature": 1.0, "max_tokens": 40, "ignore_eos": True}
    free = generate_rollout(qwen2_engine, prompts, sampling, MixingParams(rho=1.0, k=3))
    assert free.mixed_fraction == 1.0
    never = tuple(_most_common(free, 3))
    banned = generate_rollout(qwen2_engine, prompts, sampling, MixingParams(rho=1.0, k=3, never_mix_ids=never))
    for r, m in zip(banned.response_ids, banned.mixed_mask):
        assert not m[torch.isin(r, torch.tensor(never))].any()  # a mixed step emits its anchor: never a banned one
    assert 0.3 < banned.mixed_fraction < 1.0
