"""A counter-based random stream per response: the gate draws and noise seeds of every exploration strategy.

Each response has a 64-bit key derived once from who it is:

    key = H(seed, strategy, purpose, call, index)

- ``seed``: the run's ``mixing.seed`` (``ngrpo compare`` sets it to the compare seed);
- ``strategy``: the mixing strategy's code (N-GRPO and STHT draw different patterns under one seed);
- ``purpose``: training rollout, validation or evaluation (PURPOSES);
- ``call``: the policy version of a training or validation rollout, the benchmark's position in an evaluation;
- ``index``: the response's global index in the call, prompt index x group size + group position.

Its draw at decode step t (t = number of tokens the response emitted before this step) on lane ``lane`` is

    h = mix64(key ^ mix64(2 * t + lane + GOLDEN)),  uniform = (h >>> 40) / 2**24,  noise seed = h >>> 2

with ``mix64`` the splitmix64 finaliser. The Gumbel noise of the soft-token strategies (gumbel_topk, latent_gumbel)
has its own sub-stream, keyed by the step and the candidate column j (rank in the top-K):

    h = mix64(mix64(mix64(key ^ GUMBEL_SALT) ^ mix64(t + GOLDEN)) ^ mix64(j + GOLDEN)),
    u = ((h >>> 40) + 1/2) / 2**24 in (0, 1),  g = -log(-log u)  (computed in float64, stored as float32)

so the engine and the reference generator draw the same noise, and a replay recomputes it from (key, t, j). Nothing has state: the draw is the same on every tensor-parallel rank, in any
batch composition, after preemption, and a rerun reproduces it. ``gate = uniform < rho``.

All functions work on int64 ``torch`` tensors (any device) and on int64 ``numpy`` arrays with the same code: both wrap
int64 products modulo 2**64 (two's complement), and the right shifts here are made logical by masking the sign-filled
high bits. ``*_reference`` are the same hash on Python ints (unsigned 64-bit), for tests.
"""

from __future__ import annotations

from typing import Any

import torch

MASK64 = (1 << 64) - 1
GATE_LANE = 0
NOISE_SEED_LANE = 1
GUMBEL_SALT = 0x6A09E667F3BCC908  # separates the Gumbel sub-stream from the gate / noise-seed lanes
PURPOSES = {"train": 0, "validate": 1, "evaluate": 2, "bench": 3}
STRATEGY_CODES = {"sample": 0, "neighbor_mix": 1, "gaussian_noise": 2, "gumbel_topk": 3, "soft_thinking": 4,
                  "latent_gumbel": 5}
UNIFORM_BITS = 24  # float32 holds every multiple of 2**-24 in [0, 1) exactly: the same value on every device


def _signed(c: int) -> int:
    c &= MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
_GOLDEN = 0x9E3779B97F4A7C15
_C1_S, _C2_S, _GOLDEN_S = _signed(_C1), _signed(_C2), _signed(_GOLDEN)


def _srl(x: Any, s: int) -> Any:
    """Logical right shift of int64 values (``>>`` is arithmetic on int64: mask the copied sign bits away)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: Any) -> Any:
    """splitmix64's finaliser on int64 tensors / arrays (wrapping arithmetic)."""
    x = x ^ _srl(x, 30)
    x = x * _C1_S
    x = x ^ _srl(x, 27)
    x = x * _C2_S
    return x ^ _srl(x, 31)


def mix64_reference(x: int) -> int:
    x &= MASK64
    x ^= x >> 30
    x = (x * _C1) & MASK64
    x ^= x >> 27
    x = (x * _C2) & MASK64
    return x ^ (x >> 31)


def stream_key_reference(seed: int, strategy: int, purpose: int, call: int, index: int) -> int:
    """The response's key as an unsigned 64-bit Python int (computed once per response, on the host)."""
    h = mix64_reference(seed + _GOLDEN)
    for part in (strategy, purpose, call, index):
        h = mix64_reference(h ^ mix64_reference(part + _GOLDEN))
    return h


def stream_key(seed: int, strategy: str | int, purpose: str | int, call: int, index: int) -> int:
    """The key as a signed int64 value (what the int64 tensors hold)."""
    s = STRATEGY_CODES[strategy] if isinstance(strategy, str) else int(strategy)
    p = PURPOSES[purpose] if isinstance(purpose, str) else int(purpose)
    return _signed(stream_key_reference(int(seed), s, p, int(call), int(index)))


def _draw(key: Any, step: Any, lane: int) -> Any:
    return mix64(key ^ mix64(step * 2 + (lane + _GOLDEN_S)))


def _draw_reference(key: int, step: int, lane: int) -> int:
    return mix64_reference((key & MASK64) ^ mix64_reference(2 * step + lane + _GOLDEN))


def uniforms(key: Any, step: Any, lane: int = GATE_LANE) -> Any:
    """[n] int64 keys, [n] int64 steps -> [n] float32 uniforms in [0, 1) (torch or numpy, like the inputs)."""
    bits = _srl(_draw(key, step, lane), 64 - UNIFORM_BITS)
    if isinstance(bits, torch.Tensor):
        return bits.to(torch.float32) * (2.0 ** -UNIFORM_BITS)
    import numpy as np

    return bits.astype(np.float32) * np.float32(2.0 ** -UNIFORM_BITS)


def uniform_reference(key: int, step: int, lane: int = GATE_LANE) -> float:
    return (_draw_reference(key, step, lane) >> (64 - UNIFORM_BITS)) * 2.0 ** -UNIFORM_BITS


def noise_seeds(key: Any, step: Any) -> Any:
    """[n] int64 seeds in [0, 2**62) for the Gaussian-noise rows (core.records.noise_from_seeds rebuilds the noise)."""
    return _srl(_draw(key, step, NOISE_SEED_LANE), 2)


def noise_seed_reference(key: int, step: int) -> int:
    return _draw_reference(key, step, NOISE_SEED_LANE) >> 2


def _gumbel_bits(key: torch.Tensor, step: torch.Tensor, width: int) -> torch.Tensor:
    """[n] int64 keys, [n] int64 steps -> [n, width] int64 draws of the Gumbel sub-stream (24 high bits)."""
    sub = mix64(key ^ _signed(GUMBEL_SALT))
    row = mix64(sub ^ mix64(step + _GOLDEN_S)).unsqueeze(1)
    col = torch.arange(width, dtype=torch.int64, device=key.device).unsqueeze(0)
    return _srl(mix64(row ^ mix64(col + _GOLDEN_S)), 64 - UNIFORM_BITS)


def gumbel(key: torch.Tensor, step: torch.Tensor, width: int) -> torch.Tensor:
    """[n] int64 keys, [n] int64 steps -> [n, width] float32 Gumbel(0, 1) noise, column j for candidate rank j."""
    u = (_gumbel_bits(key, step, width).to(torch.float64) + 0.5) * (2.0 ** -UNIFORM_BITS)
    return (-torch.log(-torch.log(u))).to(torch.float32)


def gumbel_reference(key: int, step: int, column: int) -> float:
    """The same draw on Python ints and floats (tests)."""
    import math

    sub = mix64_reference((key & MASK64) ^ GUMBEL_SALT)
    row = mix64_reference(sub ^ mix64_reference(step + _GOLDEN))
    h = mix64_reference(row ^ mix64_reference(column + _GOLDEN))
    u = ((h >> (64 - UNIFORM_BITS)) + 0.5) * 2.0 ** -UNIFORM_BITS
    return -math.log(-math.log(u))
