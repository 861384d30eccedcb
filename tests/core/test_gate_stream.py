"""The counter-based gate stream: the vectorised int64 hash (torch and numpy) equals the plain-Python reference bit for
bit, its uniforms are uniform, and responses / calls / seeds / strategies get different streams."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from ngrpo_ray.core import gate_stream as gs


def _keys_and_steps(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    keys = [gs.stream_key(rng.randrange(1 << 32), rng.choice(list(gs.STRATEGY_CODES)), rng.randrange(4),
                          rng.randrange(1 << 20), rng.randrange(1 << 20)) for _ in range(n)]
    keys += [gs._signed(x) for x in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)]  # sign-bit edge cases
    steps = [rng.randrange(1 << 16) for _ in range(n)] + [0, 1, 8191, 1 << 31, (1 << 40) + 3]
    return keys, steps


def test_torch_and_numpy_equal_the_python_reference():
    keys, steps = _keys_and_steps(2000)
    for lane in (gs.GATE_LANE, gs.NOISE_SEED_LANE):
        ref_u = [gs.uniform_reference(k, s, lane) for k, s in zip(keys, steps)]
        kt, st = torch.tensor(keys, dtype=torch.int64), torch.tensor(steps, dtype=torch.int64)
        ka, sa = np.array(keys, dtype=np.int64), np.array(steps, dtype=np.int64)
        assert gs.uniforms(kt, st, lane).tolist() == ref_u
        assert gs.uniforms(ka, sa, lane).tolist() == ref_u
    ref_seed = [gs.noise_seed_reference(k, s) for k, s in zip(keys, steps)]
    assert gs.noise_seeds(torch.tensor(keys), torch.tensor(steps)).tolist() == ref_seed
    assert gs.noise_seeds(np.array(keys), np.array(steps)).tolist() == ref_seed
    assert all(0 <= s < 2 ** 62 for s in ref_seed)


def test_mix64_matches_splitmix64_published_values():
    # splitmix64 with state 0: next() = mix64(0 + GOLDEN), then mix64(2 * GOLDEN) (reference outputs of the
    # generator by Vigna: 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4)
    assert gs.mix64_reference(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    assert gs.mix64_reference(2 * 0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    x = torch.tensor([gs._signed(0x9E3779B97F4A7C15)], dtype=torch.int64)
    assert gs.mix64(x).item() == gs._signed(0xE220A8397B1DCDAF)


def test_uniforms_are_uniform_and_independent_of_neighbours():
    # 64 responses x 4096 steps: a chi-square test on 64 bins, the mean, and the lag-1 correlation along the steps
    keys = torch.tensor([gs.stream_key(0, "neighbor_mix", "train", 0, i) for i in range(64)], dtype=torch.int64)
    steps = torch.arange(4096, dtype=torch.int64)
    u = gs.uniforms(keys[:, None].expand(64, 4096), steps[None, :].expand(64, 4096))
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    n = u.numel()
    counts = torch.bincount((u * 64).long().flatten(), minlength=64).double()
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 120.0, chi2  # 63 dof: p(chi2 > 120) ~ 2e-5
    assert abs(float(u.double().mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    a, b = u[:, :-1].double().flatten(), u[:, 1:].double().flatten()
    corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
    assert abs(corr) < 4 / math.sqrt(a.numel()), corr
    # gates at rho 0.3: the fraction is within the binomial 99.9% band, and no two responses share a pattern
    gates = u[:, :256] < 0.3
    frac = float(gates.double().mean())
    band = 3.29 * math.sqrt(0.3 * 0.7 / gates.numel())
    assert abs(frac - 0.3) < band, (frac, band)
    assert len({tuple(row.tolist()) for row in gates}) == 64


def test_every_part_of_the_identity_changes_the_stream():
    base = dict(seed=0, strategy="neighbor_mix", purpose="train", call=3, index=5)
    others = [dict(base, seed=1), dict(base, strategy="gaussian_noise"), dict(base, purpose="validate"),
              dict(base, call=4), dict(base, index=6)]
    steps = torch.arange(512, dtype=torch.int64)

    def pattern(ident: dict) -> torch.Tensor:
        key = torch.full((512,), gs.stream_key(**ident), dtype=torch.int64)
        return gs.uniforms(key, steps) < 0.3

    p0 = pattern(base)
    assert torch.equal(p0, pattern(dict(base)))  # reproducible
    for o in others:
        assert not torch.equal(p0, pattern(o)), o
    # the noise-seed lane is not the gate lane
    key = torch.full((512,), gs.stream_key(**base), dtype=torch.int64)
    assert not torch.equal(gs.noise_seeds(key, steps) >> 38, (gs.uniforms(key, steps) * 2 ** 24).long())


def test_reference_strategies_gate_on_the_engines_streams():
    from ngrpo_ray.core.mixing_params import MixingParams, SamplingParams
    from ngrpo_ray.core.strategies.base import MixState

    params = MixingParams(strategy="gaussian_noise", rho=0.3, seed=5)
    state = MixState.create(params, SamplingParams(), 6, "cpu", call=2, first_index=10)
    gates, seeds = [], []
    for _ in range(64):
        gates.append(state.gate(6, torch.device("cpu")))
        seeds.append(state.noise_seeds(6, torch.device("cpu")))
        state.after_step(torch.zeros(6, dtype=torch.long))
    gates, seeds = torch.stack(gates, 1), torch.stack(seeds, 1)
    for b in range(6):
        key = gs.stream_key_reference(5, gs.STRATEGY_CODES["gaussian_noise"], gs.PURPOSES["train"], 2, 10 + b)
        assert gates[b].tolist() == [gs.uniform_reference(key, t) < 0.3 for t in range(64)]
        assert seeds[b].tolist() == [gs.noise_seed_reference(key, t) for t in range(64)]


def test_gumbel_noise_is_the_streams_and_the_reference_strategies_use_it():
    """The Gumbel sub-stream: equal to the Python-int reference, distinct from the gate lane, Gumbel(0, 1) in
    distribution; gumbel_topk's scores are logp + exactly these draws (what the engine adds)."""
    from ngrpo_ray.core.mixing_params import MixingParams, SamplingParams
    from ngrpo_ray.core.strategies import mixing_step
    from ngrpo_ray.core.strategies.base import MixState

    key = gs.stream_key(9, "gumbel_topk", "train", 4, 2)
    g = gs.gumbel(torch.tensor([key, key]), torch.tensor([0, 5]), 3)
    expected = [[gs.gumbel_reference(key, t, j) for j in range(3)] for t in (0, 5)]
    torch.testing.assert_close(g, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    many = gs.gumbel(torch.full((4096,), key), torch.arange(4096), 8)
    assert abs(float(many.mean()) - 0.5772) < 0.02 and abs(float(many.std()) - 1.2825) < 0.02  # Euler gamma, pi/sqrt6

    params = MixingParams(strategy="gumbel_topk", rho=1.0, top_k=4, seed=9)
    state = MixState.create(params, SamplingParams(), 3, "cpu", call=4, first_index=1)
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    for t in range(2):
        res = mixing_step(logits, torch.randn(12, 2), state, torch.Generator().manual_seed(t))
        top = torch.topk(torch.log_softmax(logits, -1), 4, -1).values
        keys = torch.tensor([gs.stream_key(9, "gumbel_topk", "train", 4, 1 + b) for b in range(3)])
        torch.testing.assert_close(res.extras["scores"] - top, gs.gumbel(keys, torch.full((3,), t), 4), atol=1e-6, rtol=0)
