"""Gaussian noise (the STHT baseline) for the gated rows of one sampler call.

A gated row keeps vLLM's sampled token as its text; its slot gets cand = (token, token, ...), alpha = (1, 0, ...)
(written by the post-hook, which sees the token) and the noise row noise_std * N(0, I) regenerated from an int64 seed
drawn from the response's stream (lane 1), on the host like core.records.noise_from_seeds, so the next input is
E[token] + noise and the trainer rebuilds it from the recorded seed.
"""

from __future__ import annotations

import numpy as np
import torch

from ngrpo_ray.core import gate_stream
from ngrpo_ray.engine.hook_batch import NOISE, GatedGroup


def noise_group(hook, slots: np.ndarray, steps: np.ndarray, start: int, end: int) -> GatedGroup:
    """Seeds from the responses' streams and their noise rows, made on the host, then sent to the device."""
    table, d = hook.requests, hook.embedding.embedding_dim
    seeds = gate_stream.noise_seeds(table.key[slots], steps)
    noise = torch.empty(len(slots), d, dtype=torch.float32)
    for j, (s, std) in enumerate(zip(seeds, table.noise_std[slots])):
        noise[j] = torch.randn(d, generator=torch.Generator().manual_seed(int(s))) * float(std)
    noise = noise.to(hook.embedding.ngrpo_noise.dtype)
    on_device = noise if hook.device.type == "cpu" else noise.pin_memory().to(hook.device, non_blocking=True)
    return GatedGroup(NOISE, start, end, noise=on_device, noise_seed=hook.to_device(seeds))
