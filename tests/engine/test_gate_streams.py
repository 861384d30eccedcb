"""Every response gates on its own stream (issue 11 item 1), and the hook's per-step path reads no tensor value into
Python (issue 17), on a real vLLM engine.

One engine (tiny random Llama, noise table on, full neighbor table so lookups are plain gathers) serves:
- 64 responses (16 prompts x 4) at rho 0.3 with the default config's mixing seed: 64 distinct gate patterns, each
  equal to an independent replay of its stream (core.gate_stream's Python reference), a mixed fraction inside the
  binomial 99.9% band, other patterns at the next policy version, the same ones again for the same version;
  the same for Gaussian noise, whose recorded seeds equal the stream's noise-seed lane;
- the hooks run under HostReadGuard (installed in the worker) for neighbor mixing and Gaussian noise, at temperature
  1 (vLLM's logprob reused) and 0.8 (the contract's logprob computed), with stop_after / never_mix sets:
  no read of a tensor value is recorded.
Takes about 60 s on a 2-core CPU (engine start included).
"""

from __future__ import annotations

import math

import pytest
import torch

from ngrpo_ray.config.schema import MixingConfig
from ngrpo_ray.core import gate_stream as gs
from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.engine.records_client import check
from ngrpo_ray.engine.rollout import generate_rollout

from conftest import _build

PROMPTS = [[(11 * i + j) % 300 + 2 for j in range(3 + i % 5)] for i in range(16)]
GROUP = 4
STEPS = 40
RHO = 0.3
SAMPLING = {"temperature": 1.0, "max_tokens": STEPS, "ignore_eos": True}


@pytest.fixture(scope="module")
def stream_engine(tiny_models):
    llm = _build(tiny_models["llama"], noise_table=True, neighbor_mode="full")
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _patterns(batch) -> list[tuple[bool, ...]]:
    return [tuple(m.tolist()) for m in batch.mixed_mask]


def _replayed(strategy: str, seed: int, call: int, n: int, lane: int = gs.GATE_LANE):
    """The gates (or noise seeds) each response's stream gives, from the plain-Python reference hash."""
    out = []
    for index in range(n):
        key = gs.stream_key_reference(seed, gs.STRATEGY_CODES[strategy], gs.PURPOSES["train"], call, index)
        if lane == gs.GATE_LANE:
            out.append(tuple(gs.uniform_reference(key, t) < RHO for t in range(STEPS)))
        else:
            out.append([gs.noise_seed_reference(key, t) for t in range(STEPS)])
    return out


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["neighbor_mix", "gaussian_noise"])
def test_each_response_has_its_own_reproducible_stream(stream_engine, strategy):
    seed = MixingConfig().seed  # the default config's mixing seed
    mixing = MixingParams(strategy=strategy, rho=RHO, noise_std=0.05, seed=seed)
    run = lambda version: generate_rollout(stream_engine, PROMPTS, SAMPLING, mixing, policy_version=version,  # noqa
                                           group_size=GROUP)
    first, second, again = run(7), run(8), run(7)
    n = len(PROMPTS) * GROUP
    assert all(len(m) == STEPS for m in first.mixed_mask)
    p1, p2 = _patterns(first), _patterns(second)
    assert len(set(p1)) == n  # 64 pairwise-distinct gate patterns
    assert p1 == _replayed(strategy, seed, 7, n)  # each is its own stream, replayed independently
    assert p2 == _replayed(strategy, seed, 8, n)
    assert all(a != b for a, b in zip(p1, p2))  # the next policy version: other patterns for the same prompts
    assert _patterns(again) == p1  # same seed and version: the same patterns
    frac = sum(map(sum, p1)) / (n * STEPS)
    band = 3.29 * math.sqrt(RHO * (1 - RHO) / (n * STEPS))  # binomial 99.9% band
    assert abs(frac - RHO) < band, (frac, band)
    if strategy == "gaussian_noise":
        seeds = [s.tolist() for s in first.noise_seed]
        replay = _replayed(strategy, seed, 7, n, lane=gs.NOISE_SEED_LANE)
        for got, want, mask in zip(seeds, replay, p1):
            assert got == [w if m else -1 for w, m in zip(want, mask)]
        assert len({tuple(s) for s in seeds}) == n
        assert [s.tolist() for s in again.noise_seed] == seeds
        assert all(a.tolist() != b.tolist() for a, b in zip(first.noise_seed, second.noise_seed))


def _install_guard(worker):
    from ngrpo_ray.engine.host_read_guard import HostReadGuard

    hook = worker._ngrpo_hook_obj
    hook.remove()
    guard = HostReadGuard()

    def pre(module, args, kwargs):
        with guard:
            return hook._pre_hook(module, args, kwargs)

    def post(module, args, kwargs, output):
        with guard:
            return hook._post_hook(module, args, kwargs, output)

    sampler = hook.runner.sampler
    hook._handles = [sampler.register_forward_pre_hook(pre, with_kwargs=True),
                     sampler.register_forward_hook(post, with_kwargs=True)]
    worker._ngrpo_guard = guard
    return True


def _guard_report(worker):
    guard = worker._ngrpo_guard
    return {"calls": guard.calls, "violations": [what for what, _ in guard.violations],
            "first_stack": guard.violations[0][1] if guard.violations else ""}


@pytest.mark.engine
@pytest.mark.slow
def test_hook_step_path_reads_no_tensor_value(stream_engine, eos_id):
    cases = [
        (MixingParams(strategy="neighbor_mix", rho=0.5, stop_after_ids=(7,), never_mix_ids=(3, 5)), 1.0),
        (MixingParams(strategy="neighbor_mix", rho=0.5, stop_after_ids=(7,), metric="cosine"), 0.8),
        (MixingParams(strategy="gaussian_noise", rho=0.5, noise_std=0.05, stop_after_ids=(7,)), 0.8),
        # the soft kernels and the released code's filtered-probability alpha (the request's top-k / top-p)
        (MixingParams(strategy="gumbel_topk", rho=0.5, top_k=3, stop_after_ids=(7,)), 0.8),
        (MixingParams(strategy="neighbor_mix", rho=0.5, alpha_source="filtered_probs"), 0.8),
    ]
    filters = {"top_k": 20, "top_p": 0.9}
    prompts = PROMPTS[:6]
    for mixing, temperature in cases:  # warm-up: the full neighbor table is built on first use
        generate_rollout(stream_engine, prompts, {"temperature": temperature, "max_tokens": 8, **filters}, mixing,
                         group_size=2, stop_token_ids=[eos_id])
    stream_engine.collective_rpc(_install_guard)
    mixed = 0
    for mixing, temperature in cases:
        batch = generate_rollout(stream_engine, prompts, {"temperature": temperature, "max_tokens": 24, **filters},
                                 mixing, group_size=4, stop_token_ids=[eos_id])
        mixed += sum(int(m.sum()) for m in batch.mixed_mask)
    report = stream_engine.collective_rpc(_guard_report)[0]
    check(stream_engine.collective_rpc("ngrpo_install", kwargs={"seed": 0, "neighbor_mode": "full"}))  # unguarded
    assert report["violations"] == [], report["first_stack"]
    assert report["calls"] > 1000 and mixed > 50, (report["calls"], mixed)
